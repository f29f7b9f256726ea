"""Model cards of saved and pushed adapters; push_to_hub with the Hub client replaced (no network)."""

from __future__ import annotations

import copy
import json
import os
from types import SimpleNamespace

import torch
from conftest import clip_batches, tiny_clip
from peft import PeftModel, get_peft_model

from peft_lorsu import LoRSUConfig, probe_lorsu, push_adapter_to_hub, record_card_info


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


class FakeHubApi:
    """Stands in for ``huggingface_hub.HfApi``: records the repository and the uploaded folder's files."""

    def __init__(self):
        self.repos: list[str] = []
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.repos.append(repo_id)

    def upload_folder(self, repo_id, folder_path, commit_message):
        for root, _, files in os.walk(folder_path):
            for name in files:
                path = os.path.join(root, name)
                self.uploaded[os.path.relpath(path, folder_path)] = open(path, "rb").read()
        return SimpleNamespace(commit_url=f"https://example.invalid/{repo_id}/commit/1")


def test_push_adapter_to_hub_uploads_the_saved_folder_with_its_card(tmp_path):
    base, peft_model = lorsu_model()
    record_card_info(peft_model, results={"target accuracy": 0.75})
    api = FakeHubApi()
    url = push_adapter_to_hub(peft_model, "me/clip-lorsu", api=api)
    assert url == "https://example.invalid/me/clip-lorsu/commit/1" and api.repos == ["me/clip-lorsu"]
    assert set(api.uploaded) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    card = api.uploaded["README.md"].decode()
    assert "LoRSU (Low-Rank Structured Updates)" in card and "target accuracy: 0.7500" in card
    assert json.loads(api.uploaded["adapter_config.json"])["peft_type"] == "LORSU"

    for name, data in api.uploaded.items():
        (tmp_path / name).write_bytes(data)
    restored = PeftModel.from_pretrained(base, tmp_path)
    batch = clip_batches(n=1)[0]
    with torch.no_grad():
        assert torch.equal(restored(**batch).logits_per_image, peft_model(**batch).logits_per_image)


def test_card_opens_with_the_import_and_leaves_other_methods_alone(tmp_path):
    from peft import LoraConfig

    _, peft_model = lorsu_model()
    peft_model.save_pretrained(tmp_path / "lorsu")
    card = (tmp_path / "lorsu" / "README.md").read_text()
    metadata_end = card.index("\n---\n", 4) + 5
    body = card[metadata_end:].lstrip()
    assert body.startswith("<!-- peft-lorsu:start -->\n## peft-lorsu adapter\n\n**Load it after `import peft_lorsu`**")
    model = get_peft_model(tiny_clip(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "lora")
    assert "peft-lorsu" not in (tmp_path / "lora" / "README.md").read_text()


def test_peft_is_not_patched():
    """Importing the plugin wraps no peft function: the card comes from the plugin's own config class."""
    from peft import PeftModel as Model

    for name in ("create_or_update_model_card", "_upload_modified_files", "save_pretrained", "from_pretrained"):
        method = getattr(Model, name)
        assert method.__module__.startswith(("peft.", "transformers.")), (name, method.__module__)
