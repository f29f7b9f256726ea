"""The peft-lorsu command line, in-process, on a tiny CLIP saved to disk and a tiny stand-in for the demo images."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import clip_tokenizer, tiny_clip
from safetensors.torch import save_file

import peft_lorsu.app.data
from peft_lorsu.app.cli import build_parser, main


@pytest.fixture
def tiny_assets(tmp_path, monkeypatch):
    """A tiny CLIP (28 px, real tokenizer) in a folder, and a 4-class demo image set replacing the packaged one."""
    model_dir = tmp_path / "clip"
    model = tiny_clip(real_vocab=True, image_size=28)
    model.save_pretrained(model_dir)
    clip_tokenizer().save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    demo_dir = tmp_path / "demo"
    demo_dir.mkdir()
    tensors, meta = {}, {}
    for split, n in (("target_train", 16), ("target_test", 12), ("control", 8)):
        tensors[f"{split}.images"] = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        tensors[f"{split}.labels"] = torch.arange(n) % 4
        meta[split] = {"class_names": ["zero", "one", "two", "three"]}
    save_file(tensors, str(demo_dir / "demo.safetensors"))
    (demo_dir / "classes.json").write_text(json.dumps(meta))
    monkeypatch.setattr(peft_lorsu.app.data, "DEMO_DIR", demo_dir)
    return model_dir


def test_help_names_every_command(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("probe", "train", "eval", "continual", "demo"))


def test_probe_prints_heads_and_saves_heatmap(tiny_assets, tmp_path, capsys):
    out_json, heatmap = tmp_path / "probe.json", tmp_path / "heads.png"
    assert main(["probe", "--model", str(tiny_assets), "--r", "4", "--output", str(out_json),
                 "--heatmap", str(heatmap), "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out_json.read_text())
    assert set(saved["selected_heads"]) == {f"vision_model.encoder.layers.{i}.self_attn" for i in range(2)}
    for block, heads in saved["selected_heads"].items():
        assert f"{block:<48} {str(heads):<10}" in printed
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_then_eval(tiny_assets, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    assert main(["train", "--model", str(tiny_assets), "--r", "4", "--lora-alpha", "4", "--epochs", "2",
                 "--lr", "1e-3", "--output-dir", str(adapter), "--loss", "class_ce"]) == 0
    assert (adapter / "adapter_model.safetensors").exists()
    card = (adapter / "README.md").read_text()
    assert "demo (target_train)" in card and "LoRSU" in card
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_assets), "--adapter", str(adapter), "--dataset", "demo",
                 "--split", "target_test"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("demo")][0]
    accuracy = float(line.split()[-1].rstrip("%"))
    assert 0.0 <= accuracy <= 100.0 and accuracy * 12 / 100 == pytest.approx(round(accuracy * 12 / 100))


def test_continual_compares_methods_each_at_its_validated_lr(tiny_assets, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["continual", "--model", str(tiny_assets), "--target", "demo", "--control", "demo",
                 "--method", "lorsu", "--method", "zero_shot", "--sessions", "2", "--shots", "1", "--epochs", "1",
                 "--r", "4", "--batch-size", "4", "--output-dir", str(out), "--lr-val-per-class", "1",
                 "--lr-grid", "1e-3,1e-1"]) == 0
    assert {"lorsu.json", "lorsu.csv", "zero_shot.json", "sessions.png"} <= {p.name for p in out.iterdir()}
    printed = capsys.readouterr().out
    assert "== lorsu: choosing the learning rate on 1 validation images per class" in printed
    selection = json.loads((out / "lr_selection.json").read_text())["lorsu"]  # only methods that train have one
    assert [row[0] for row in selection["grid"]] == [1e-3, 1e-1] and selection["chosen"] in (1e-3, 1e-1)
    assert f"{selection['chosen']:>10g}" in printed and "<- chosen" in printed
    lorsu_row = [ln for ln in printed.splitlines() if ln.startswith("lorsu ")][-1]
    assert lorsu_row.split()[1] == f"{selection['chosen']:g}"
    assert json.loads((out / "lorsu.json").read_text())["config"]["lr"] == selection["chosen"]


def test_continual_lr_options(tiny_assets, tmp_path, capsys):
    out = tmp_path / "one"
    assert main(["continual", "--model", str(tiny_assets), "--target", "demo", "--method", "rlp", "--sessions", "1",
                 "--shots", "1", "--epochs", "1", "--batch-size", "4", "--output-dir", str(out)]) == 0
    config = json.loads((out / "rlp.json").read_text())["config"]  # one method: its own recipe, no search
    assert (config["optimizer"], config["lr"], config["lr_schedule"]) == ("sgd", 2e-3, "cosine")
    assert not (out / "lr_selection.json").exists()
    for bad, message in ((["--lr", "fast"], "must be a number or 'auto', got 'fast'"),
                         (["--lr-grid", "1e-3,x"], "must be comma-separated numbers"),
                         (["--lr-schedule", "linear"], "invalid choice: 'linear'")):
        with pytest.raises(SystemExit):
            main(["continual", "--method", "lorsu", *bad])
        assert message in capsys.readouterr().err


def test_budget_option_reports_and_applies_the_choice(tiny_assets, tmp_path, capsys):
    assert main(["probe", "--model", str(tiny_assets), "--budget", "3000", "--batch-size", "8"]) == 0
    expected = "budget 3,000: r=4, top_k_heads=1, sparsity=0.498047, lora_alpha=4 -> 3,000 trainable parameters"
    assert expected in capsys.readouterr().out
    adapter = tmp_path / "adapter"
    assert main(["train", "--model", str(tiny_assets), "--budget", "2000", "--epochs", "1", "--output-dir",
                 str(adapter)]) == 0
    saved = json.loads((adapter / "adapter_config.json").read_text())
    printed = capsys.readouterr().out
    assert f"r={saved['r']}, top_k_heads={saved['top_k_heads']}" in printed
    trainable = int(printed.split("trainable params: ")[1].split()[0].replace(",", ""))
    assert abs(trainable - 2000) <= 20
    with pytest.raises(SystemExit, match=r"--budget 50: LoRSUConfig.from_budget: trainable_params=50 is outside"):
        main(["probe", "--model", str(tiny_assets), "--budget", "50"])
