"""Bad input that used to be accepted silently or fail late: blind probes, endless probes, configs that load but
cannot work, modules_to_save clashes, broken adapter_config.json files, mismatched batches."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from conftest import clip_batches, tiny_clip
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_reliability import assert_untouched, snapshot  # what a refused load must leave as it was

from peft_lorsu import LoRSUConfig, RLPConfig, probe_lorsu, safe_load_adapter
from peft_lorsu.lorsu.sparse import SparseLinear


def test_a_probe_that_measured_nothing_says_so():
    """CLIP's contrastive loss on batches of one image is exactly 0: every gradient is zero."""
    single = [{k: v[:1] for k, v in batch.items()} for batch in clip_batches()]
    with pytest.raises(ValueError, match=r"exactly zero, so the probe measured nothing.*batches of at least 2"):
        probe_lorsu(tiny_clip(), LoRSUConfig(r=4), single, show_progress=False)


def test_a_probe_blind_in_some_layers_names_them():
    model = tiny_clip()
    with torch.no_grad():  # layer 1's fc1 feeds nothing: its gradient is zero, layer 0's is not
        model.vision_model.encoder.layers[1].mlp.fc2.weight.zero_()
    with pytest.raises(ValueError, match=r"1 module\(s\).*layers\.1\.mlp\.fc1") as info:
        probe_lorsu(model, LoRSUConfig(r=4), clip_batches(), show_progress=False)
    assert "layers.0" not in str(info.value)


def test_a_probe_on_an_endless_iterable_ends_after_a_bounded_number_of_samples():
    model = tiny_clip()
    with torch.no_grad():  # a dead unit: fc1 row 0 feeds nothing, so its gradient entries stay exactly zero
        for layer in model.vision_model.encoder.layers:
            layer.mlp.fc2.weight[:, 0] = 0.0
    batches = clip_batches(n=4)
    read = []

    def endless():
        for batch in itertools.cycle(batches):
            read.append(len(batch["pixel_values"]))
            yield batch

    config = probe_lorsu(model, LoRSUConfig(r=4, probe_samples=8), endless(), show_progress=False)
    assert sum(read) == 4 * 8  # MAX_SAMPLES_FACTOR x probe_samples, then it stops (and logs why)
    assert config.has_selection


def test_batches_of_different_sizes_get_a_clear_error():
    batches = clip_batches()
    batches[1] = {"pixel_values": batches[1]["pixel_values"][:3], "input_ids": batches[1]["input_ids"]}
    with pytest.raises(ValueError, match=r"pairs image i with text i, but probe_lorsu's batch 1 holds 3 images and 4"):
        probe_lorsu(tiny_clip(), LoRSUConfig(r=4), batches, show_progress=False)


@pytest.mark.parametrize("alpha", [1e30, float("inf"), float("nan"), 0.0, -1.0])
def test_absurd_lora_alpha_is_refused_at_construction_and_at_load(alpha, tmp_path):
    with pytest.raises(ValueError, match="LoRSUConfig.lora_alpha must be a number in"):
        LoRSUConfig(lora_alpha=alpha)
    get_peft_model(tiny_clip(), LoRSUConfig(r=2, selection="random")).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "lora_alpha": alpha}))
    base = tiny_clip()
    before = snapshot(base)
    with pytest.raises(ValueError, match="lora_alpha"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_untouched(base, before)


def saved_with_one_edit(folder, suffix: str, edit) -> None:
    """Save a random LoRSU adapter to ``folder``, then ``edit`` the first tensor whose name ends with ``suffix`` in
    place (still a valid safetensors file) and drop the recorded hash, as for an adapter saved before it existed."""
    get_peft_model(tiny_clip(), LoRSUConfig(r=2, selection="random")).save_pretrained(folder)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    edit(tensors[next(k for k in tensors if k.endswith(suffix))])
    save_file(tensors, weights, metadata={"format": "pt"})
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "weights_sha256": None}))


def test_repeated_fc1_indices_are_refused(tmp_path):
    with pytest.raises(ValueError, match="strictly ascending"):
        SparseLinear(torch.nn.Linear(4, 4), "default", num_values=3, indices=torch.tensor([1, 1, 5]))
    saved_with_one_edit(tmp_path, "lorsu_indices", lambda t: t.__setitem__(1, t[0]))  # repeated, still inside fc1
    base = tiny_clip()
    before = snapshot(base)
    with pytest.raises(ValueError, match="strictly ascending"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_untouched(base, before)


def test_weights_that_overflow_the_model_dtype_are_refused(tmp_path):
    saved_with_one_edit(tmp_path, "lorsu_values", lambda t: t.__setitem__(0, 1e6))  # finite in fp32, inf in fp16
    half = tiny_clip().half()
    before = snapshot(half)
    with pytest.raises(ValueError, match=r"beyond the torch.float16 range"):
        PeftModel.from_pretrained(half, tmp_path)
    assert_untouched(half, before)
    PeftModel.from_pretrained(tiny_clip(), tmp_path)  # float32: fine


@pytest.mark.parametrize("method", ["lorsu", "rlp"])
def test_modules_to_save_that_clash_with_the_adapter_are_refused_before_anything_changes(method, tmp_path):
    if method == "lorsu":
        config = LoRSUConfig(r=2, selection="random", modules_to_save=["visual_projection"])
    else:
        config = RLPConfig(init_token_ids=[5, 6], rank=1, modules_to_save=["embeddings"])
    base = tiny_clip()
    before = snapshot(base)
    with pytest.raises(ValueError, match="modules_to_save=.* names module\\(s\\) the adapter already wraps"):
        get_peft_model(base, copy.deepcopy(config))
    assert_untouched(base, before)


def test_modules_to_save_elsewhere_trains_saves_and_loads(tmp_path):
    config = LoRSUConfig(r=2, selection="random", init_weights=False, modules_to_save=["text_projection"])
    peft_model = get_peft_model(tiny_clip(), config)
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad and "text_projection" in n]
    assert trained == ["base_model.model.text_projection.modules_to_save.default.weight"]
    with torch.no_grad():
        peft_model.base_model.model.text_projection.modules_to_save["default"].weight.mul_(2)
    peft_model.save_pretrained(tmp_path)
    batch = clip_batches(n=1)[0]
    reloaded = PeftModel.from_pretrained(tiny_clip(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits_per_image, peft_model(**batch).logits_per_image)


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"peft_type": "LORSU", "r": ', "is not valid JSON"),
        ("[1, 2, 3]", "must hold a JSON object of config fields, got a list"),
        ('{"r": 4}', "has no peft_type field"),
        ('{"peft_type": "NOT_A_METHOD"}', "holds a NOT_A_METHOD adapter"),
    ],
)
def test_broken_adapter_config_files_name_the_file(content, match, tmp_path):
    get_peft_model(tiny_clip(), LoRSUConfig(r=2, selection="random")).save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(content)
    base = tiny_clip()
    before = snapshot(base)
    with pytest.raises(ValueError, match=match) as info:
        safe_load_adapter(base, tmp_path)
    assert "adapter_config.json" in str(info.value) or "NOT_A_METHOD" in str(info.value)
    assert_untouched(base, before)


@pytest.mark.parametrize("method", ["lorsu", "rlp"])
def test_add_weighted_adapter_is_refused_with_the_alternative(method):
    if method == "lorsu":
        config = LoRSUConfig(r=2, selection="random")
    else:
        config = RLPConfig(init_token_ids=[5, 6], rank=1)
    peft_model = get_peft_model(tiny_clip(), config)
    peft_model.add_adapter("second", copy.deepcopy(config))
    with pytest.raises(NotImplementedError, match=r"cannot be averaged entry by entry.*set_adapter\(\['a', 'b'\]\)"):
        peft_model.add_weighted_adapter(["default", "second"], [0.5, 0.5], "mixed")
    assert set(peft_model.peft_config) == {"default", "second"}
