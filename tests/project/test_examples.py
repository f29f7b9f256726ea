"""The example Trainer scripts run end to end in --dry_run mode, reading a real image folder."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
pytest.importorskip("datasets", reason="the image-folder path needs `datasets` (dev extra)")
PIL = pytest.importorskip("PIL.Image")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def image_folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            PIL.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    return tmp_path / "images"


@pytest.mark.parametrize("loss", ["contrastive", "class_ce"])
def test_train_lorsu_dry_run(image_folder, tmp_path, loss):
    out = tmp_path / "lorsu"
    schedule = ["--lr_schedule", "epoch_cosine", "--learning_rate", "1e-3"] if loss == "class_ce" else []
    trainer = load_example("train_lorsu").main(
        [
            *schedule,
            "--output_dir",
            str(out),
            "--train_data",
            str(image_folder),
            "--split",
            "train",
            "--dry_run",
            "--loss",
            loss,
            "--r",
            "4",
            "--use_cpu",
            "--per_device_train_batch_size",
            "4",
            "--save_strategy",
            "no",
        ]
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORSU" and len(config["selected_heads"]) == 2
    assert (out / "adapter_model.safetensors").exists() and "images (train, 8 images)" in (
        out / "README.md"
    ).read_text()
    factors = [f(0) for f in getattr(trainer.lr_scheduler, "lr_lambdas", [])]
    if schedule:  # the named schedule drives the run: its first epoch at the warm-up rate 1e-6
        assert factors == [pytest.approx(1e-3)] and trainer.optimizer.param_groups[0]["initial_lr"] == 1e-3
    else:  # TrainingArguments' own (linear): starts at the full rate
        assert factors and all(f == 1.0 for f in factors)


def test_train_rlp_dry_run(image_folder, tmp_path):
    out = tmp_path / "rlp"
    load_example("train_rlp").main(
        [
            "--output_dir",
            str(out),
            "--train_data",
            str(image_folder),
            "--split",
            "train",
            "--dry_run",
            "--use_cpu",
            "--per_device_train_batch_size",
            "4",
            "--save_strategy",
            "no",
        ]
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "RLP" and config["n_ctx"] == 4
    assert "RLP (Re-parameterized Low-rank Prompt)" in (out / "README.md").read_text()
