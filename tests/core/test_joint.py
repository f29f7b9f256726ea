"""LoRSU (image tower) + RLP (text tower) as one adapter: counts, joint training, save/load, parts, merge, errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import clip_tokenizer, needs_structural_peft, tiny_clip
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_lorsu  # noqa: F401  (registers LORSU, RLP and LORSU_RLP)
from peft_lorsu import LoRSUConfig, LoRSURLPConfig, RLPConfig, ZeroShotClassifier, probe_lorsu
from peft_lorsu.app.training import fit
from peft_lorsu.compat import pooled_features
from peft_lorsu.joint import save_parts, trainable_parameters_by_part
from peft_lorsu.lorsu.budget import count_trainable
from peft_lorsu.trainer import ClassPromptCollator, class_prompt_probe_loss

CLASSES = ["cat", "dog", "owl"]
PROMPT = "a photo of a"


def clip():
    return tiny_clip(real_vocab=True)


def class_batches(tokenizer) -> list[dict]:
    """Two batches of 3 labelled images with the prompts of all classes (ClassPromptCollator)."""
    g = torch.Generator().manual_seed(0)
    samples = [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": i % 3} for i in range(6)]
    collator = ClassPromptCollator(tokenizer, CLASSES, init_text=PROMPT)
    return [collator(samples[:3]), collator(samples[3:])]


def joint_config(model, tokenizer, batches) -> LoRSURLPConfig:
    lorsu = LoRSUConfig(r=4, lora_alpha=4, top_k_heads=1, sparsity=0.1)
    probe_lorsu(model, lorsu, batches, loss_fn=class_prompt_probe_loss, show_progress=False)
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    return LoRSURLPConfig(lorsu=lorsu, rlp=RLPConfig(init_text=PROMPT, init_token_ids=ids, rank=1))


def features(model, pixel_values, prompt_ids):
    with torch.no_grad():
        return (
            pooled_features(model.get_image_features(pixel_values=pixel_values)),
            pooled_features(model.get_text_features(input_ids=prompt_ids)),
        )


@pytest.fixture
def trained(tmp_path):
    """A joint model trained for a few steps with the class-prompt classifier, saved to tmp_path / "joint"."""
    tokenizer = clip_tokenizer()
    model = clip()
    batches = class_batches(tokenizer)
    config = joint_config(model, tokenizer, batches)
    peft_model = get_peft_model(model, config)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    classifier = ZeroShotClassifier.from_class_names(peft_model, tokenizer, CLASSES, init_text=PROMPT)
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for step in range(3):
        batch = batches[step % 2]
        loss = classifier(batch["pixel_values"], labels=batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    fit(peft_model, batches[:1], epochs=1, lr=1e-2, loss_fn=class_prompt_probe_loss, show_progress=False)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "joint")
    return peft_model, before, batches, tokenizer


def test_peft_mixed_model_refuses_the_plugin_types():
    """Why the joint adapter is its own tuner: peft 0.21's PeftMixedModel accepts a fixed list of LoRA-like types."""
    with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
        get_peft_model(clip(), LoRSUConfig(r=4, selection="random"), mixed=True)


@needs_structural_peft
def test_counts_are_the_sum_of_both_parts():
    tokenizer = clip_tokenizer()
    model = clip()
    config = joint_config(model, tokenizer, class_batches(tokenizer))
    lorsu_count = count_trainable(model, config.lorsu)
    peft_model = get_peft_model(model, config)
    parts = trainable_parameters_by_part(peft_model)
    assert parts == {"lorsu": lorsu_count, "rlp": 4 * 1 + 1 * 32}  # RLP: n_ctx * rank + rank * d
    assert peft_model.get_nb_trainable_parameters()[0] == sum(parts.values())
    assert type(peft_model.base_model).__name__ == "LoRSURLPModel"


@needs_structural_peft
def test_joint_training_changes_both_parts_and_only_them(trained):
    peft_model, before, _, _ = trained
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p, before[n])}
    assert any(".lorsu_U." in n for n in changed) and any(".lorsu_V." in n for n in changed)
    assert any(".lorsu_values." in n for n in changed) and any(".rlp_B." in n for n in changed)
    assert all(".lorsu_" in n or ".rlp_" in n for n in changed), "a frozen weight changed"


@needs_structural_peft
def test_save_load_is_bit_identical(trained, tmp_path):
    peft_model, _, batches, tokenizer = trained
    saved = json.loads((tmp_path / "joint" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORSU_RLP"
    assert saved["lorsu"]["selected_heads"] == peft_model.peft_config["default"].lorsu.selected_heads
    assert saved["rlp"]["init_token_ids"] == [320, 1125, 539, 320]
    keys = load_file(tmp_path / "joint" / "adapter_model.safetensors")
    assert any(".lorsu_indices" in k for k in keys) and any(".rlp_P_fr" in k for k in keys)

    loaded = PeftModel.from_pretrained(clip(), tmp_path / "joint").eval()
    pixels, prompts = batches[0]["pixel_values"], batches[0]["input_ids"]
    for a, b in zip(features(loaded, pixels, prompts), features(peft_model, pixels, prompts)):
        assert torch.equal(a, b)
    logits = [
        ZeroShotClassifier.from_class_names(m, tokenizer, CLASSES)(batches[1]["pixel_values"]).logits
        for m in (loaded, peft_model)
    ]
    assert torch.equal(*logits)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # loaded for inference


@needs_structural_peft
def test_each_part_loads_alone(trained, tmp_path):
    peft_model, _, batches, _ = trained
    folders = save_parts(peft_model, tmp_path / "parts")
    pixels, prompts = batches[0]["pixel_values"], batches[0]["input_ids"]
    joint_image, joint_text = features(peft_model, pixels, prompts)
    base_image, base_text = features(clip(), pixels, prompts)
    lorsu_only = PeftModel.from_pretrained(clip(), folders["lorsu"]).eval()
    rlp_only = PeftModel.from_pretrained(clip(), folders["rlp"]).eval()
    assert [m.peft_config["default"].peft_type for m in (lorsu_only, rlp_only)] == ["LORSU", "RLP"]
    image, text = features(lorsu_only, pixels, prompts)
    assert torch.equal(image, joint_image) and torch.equal(text, base_text)
    image, text = features(rlp_only, pixels, prompts)
    assert torch.equal(image, base_image) and torch.equal(text, joint_text)


@needs_structural_peft
def test_merge_and_unload_folds_both_parts(trained):
    peft_model, _, batches, _ = trained
    pixels, prompts = batches[0]["pixel_values"], batches[0]["input_ids"]
    expected = features(peft_model, pixels, prompts)
    with pytest.raises(ValueError, match="fold_into_position_embedding=True"):
        peft_model.merge_and_unload()
    with peft_model.disable_adapter():
        assert torch.equal(features(peft_model, pixels, prompts)[0], features(clip(), pixels, prompts)[0])
    plain = peft_model.merge_and_unload(fold_into_position_embedding=True)
    assert type(plain).__name__ == "CLIPModel"
    for a, b in zip(features(plain, pixels, prompts), expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_config_errors_name_the_part():
    ids = [320, 1125, 539, 320]
    with pytest.raises(ValueError, match="LoRSURLPConfig.lorsu must be a LoRSUConfig .*got NoneType"):
        LoRSURLPConfig(rlp=RLPConfig(init_token_ids=ids))
    with pytest.raises(ValueError, match="LoRSURLPConfig.rlp holds a LORSU config, expected RLP"):
        LoRSURLPConfig(lorsu=LoRSUConfig(), rlp={"peft_type": "LORSU"})
    with pytest.raises(ValueError, match=r"LoRSURLPConfig.rlp.modules_to_save=\['text_projection'\]: not supported"):
        LoRSURLPConfig(lorsu=LoRSUConfig(), rlp=RLPConfig(init_token_ids=ids, modules_to_save=["text_projection"]))
    restored = LoRSURLPConfig(
        **json.loads(json.dumps(LoRSURLPConfig(lorsu=LoRSUConfig(r=4), rlp=RLPConfig(init_token_ids=ids)).to_dict()))
    )
    assert isinstance(restored.lorsu, LoRSUConfig) and restored.lorsu.r == 4 and restored.rlp.init_token_ids == ids


@needs_structural_peft
def test_fit_trains_each_part_at_its_own_learning_rate():
    tokenizer = clip_tokenizer()
    model = clip()
    batches = class_batches(tokenizer)
    peft_model = get_peft_model(model, joint_config(model, tokenizer, batches))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    fit(
        peft_model,
        batches[:1],
        lr=1e-3,
        lr_by_name={"rlp_": 1e-1},
        loss_fn=class_prompt_probe_loss,
        show_progress=False,
    )
    # Adam's first step moves every entry with a non-zero gradient by exactly its lr
    steps = {n: (p.detach() - before[n]).abs().max().item() for n, p in peft_model.named_parameters() if n in before}
    rlp = max(v for n, v in steps.items() if "rlp_" in n)
    lorsu = max(v for n, v in steps.items() if "lorsu_" in n)
    assert rlp == pytest.approx(1e-1, rel=1e-3) and lorsu == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(ValueError, match=r"lr_by_name keys \['prompt_'\] match no trainable parameter name"):
        fit(peft_model, batches[:1], lr_by_name={"prompt_": 1e-1}, show_progress=False)
    with pytest.raises(ValueError, match=r"lr_by_name\['rlp_'\] must be a number > 0, got 0"):
        fit(peft_model, batches[:1], lr_by_name={"rlp_": 0}, show_progress=False)
