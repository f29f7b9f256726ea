"""Model cards of saved and pushed adapters; push_to_hub with the Hub client replaced (no network)."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import torch
from conftest import clip_batches, tiny_clip
from huggingface_hub import ModelCard, ModelCardData
from peft import PeftModel, get_peft_model

import peft_lorsu
from peft_lorsu import LoRSUConfig, probe_lorsu, record_card_info


def lorsu_model():
    model = tiny_clip()
    base = copy.deepcopy(model)
    config = probe_lorsu(model, LoRSUConfig(r=4, top_k_heads=2, init_weights=False), clip_batches(),
                         show_progress=False)
    return base, get_peft_model(model, config)


def test_saved_card_describes_the_adapter(tmp_path):
    _, peft_model = lorsu_model()
    record_card_info(peft_model, dataset="random pairs", results={"target accuracy": 0.5})
    peft_model.save_pretrained(tmp_path)
    peft_model.save_pretrained(tmp_path)  # saving twice replaces the section
    card = (tmp_path / "README.md").read_text()
    assert card.count("<!-- peft-lorsu:start -->") == 1
    assert "LoRSU (Low-Rank Structured Updates)" in card
    assert f"trainable parameters: {peft_model.get_nb_trainable_parameters()[0]:,}" in card
    heads = peft_model.peft_config["default"].selected_heads["vision_model.encoder.layers.0.self_attn"]
    assert f"| `vision_model.encoder.layers.0.self_attn` | {heads} |" in card
    assert "`sparsity` = 0.1" in card and "- data: random pairs" in card and "target accuracy: 0.5000" in card
    assert "library_name: peft" in card


def test_push_to_hub_uploads_files_and_card(tmp_path, monkeypatch):
    import transformers.utils.hub as hub

    uploaded: dict[str, bytes] = {}

    def create_commit(repo_id, operations, **kwargs):
        for op in operations:
            with open(op.path_or_fileobj, "rb") as f:
                uploaded[op.path_in_repo] = f.read()
        return SimpleNamespace(commit_url=f"https://example.invalid/{repo_id}")

    fake_api = SimpleNamespace(create_repo=lambda repo_id, **kw: SimpleNamespace(repo_id=repo_id),
                               create_commit=create_commit)
    monkeypatch.setattr(hub, "hf_api", lambda: fake_api)
    monkeypatch.setattr(hub, "create_and_tag_model_card",
                        lambda repo_id, tags=None, token=None: ModelCard.from_template(ModelCardData()))

    base, peft_model = lorsu_model()
    peft_model.push_to_hub("me/clip-lorsu")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(uploaded)
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in uploaded)
    assert "LoRSU (Low-Rank Structured Updates)" in uploaded["README.md"].decode()
    assert json.loads(uploaded["adapter_config.json"])["peft_type"] == "LORSU"

    for name, data in uploaded.items():
        (tmp_path / name).write_bytes(data)
    restored = PeftModel.from_pretrained(base, tmp_path)
    batch = clip_batches(n=1)[0]
    with torch.no_grad():
        assert torch.equal(restored(**batch).logits_per_image, peft_model(**batch).logits_per_image)


def test_hook_is_idempotent_and_skips_other_methods(tmp_path):
    from peft import LoraConfig

    peft_lorsu.hub.install_model_card_hook()
    model = get_peft_model(tiny_clip(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    assert "peft-lorsu" not in (tmp_path / "README.md").read_text()
