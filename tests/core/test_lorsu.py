"""LoRSU tuner: counts, init, what training may change, save/load, merge, adapters, validation."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from conftest import clip_batches, tiny_clip, to_device
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

import peft_lorsu
from peft_lorsu import HeadLoRALinear, LoRSUConfig, SparseLinear, probe_lorsu
from peft_lorsu.lorsu.budget import count_trainable


def closed_form_count(L, d, H, m, o, r, k, p, projection=True):
    """The paper's trainable-parameter count (see docs/lorsu.md)."""
    d_h = d // H
    per_layer = math.floor(p * m * d) + m + 3 * d + r * (3 * k * d_h + d)
    return L * per_layer + (r * (d + o) if projection else 0)


def probed(model, batches, **kwargs) -> LoRSUConfig:
    config = LoRSUConfig(**{"r": 4, "lora_alpha": 8, "top_k_heads": 2, "sparsity": 0.1, **kwargs})
    return probe_lorsu(model, config, batches, show_progress=False)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits_per_image


def train_steps(peft_model, batches, steps=3, lr=1e-2):
    peft_model.train()
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        loss = peft_model(**batches[step % len(batches)], return_loss=True).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft_model.eval()
    return opt


# --------------------------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=4, top_k_heads=2, sparsity=0.1),
        dict(r=1, top_k_heads=1, sparsity=0.5),
        dict(r=8, top_k_heads=4, sparsity=1.0),
    ],
)
def test_count_matches_closed_form(batches, kwargs):
    model = tiny_clip()
    config = probed(model, batches, **kwargs)
    peft_model = get_peft_model(model, config)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    expected = closed_form_count(
        L=2, d=32, H=4, m=64, o=16, r=kwargs["r"], k=kwargs["top_k_heads"], p=kwargs["sparsity"]
    )
    assert trainable == expected
    assert count_trainable(tiny_clip(), config) == expected  # the closed form the budget rule uses


@pytest.mark.parametrize(
    "shape, expected",
    [
        (
            dict(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                patch_size=16,
                image_size=224,
                projection_dim=512,
            ),
            3_862_316,
        ),
        (
            dict(
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=24,
                num_attention_heads=16,
                patch_size=14,
                image_size=336,
                projection_dim=768,
            ),
            12_515_728,
        ),
    ],
    ids=["ViT-B/16", "ViT-L/14"],
)
def test_count_reference_figures(shape, expected):
    """r=64, k=2, p=0.1, extras on: the reference's figures (built on the meta device)."""
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**shape))
    config = LoRSUConfig(r=64, lora_alpha=64, top_k_heads=2, sparsity=0.1, selection="random")
    peft_model = get_peft_model(model, config)
    assert peft_model.get_nb_trainable_parameters()[0] == expected
    L, d, H, o = (
        shape["num_hidden_layers"],
        shape["hidden_size"],
        shape["num_attention_heads"],
        shape["projection_dim"],
    )
    assert closed_form_count(L, d, H, 4 * d, o, 64, 2, 0.1) == expected


def test_separate_factors_and_parts_off(batches):
    model = tiny_clip()
    config = probed(model, batches, share_qkv_factor=False, train_biases=False, adapt_projection=False)
    peft_model = get_peft_model(model, config)
    # each of q, k, v owns V (r x d); no biases, no projection
    expected = 2 * (math.floor(0.1 * 64 * 32) + 3 * 4 * (2 * 8 + 32))
    assert peft_model.get_nb_trainable_parameters()[0] == expected


# ------------------------------------------------------------------------------------------------ behaviour


def test_init_equals_base(batches):
    model = tiny_clip()
    reference = copy.deepcopy(model)
    peft_model = get_peft_model(model, probed(model, batches))
    assert torch.equal(logits(peft_model, batches[0]), logits(reference, batches[0]))


def test_init_weights_false_changes_output(batches):
    model = tiny_clip()
    reference = copy.deepcopy(model)
    peft_model = get_peft_model(model, probed(model, batches, init_weights=False))
    assert (logits(peft_model, batches[0]) - logits(reference, batches[0])).abs().max() > 1e-3


@pytest.mark.parametrize("init", ["lorsu", "lora"])
def test_init_layouts(batches, init):
    model = tiny_clip()
    peft_model = get_peft_model(model, probed(model, batches, init_weights=init))
    q = peft_model.base_model.model.vision_model.encoder.layers[0].self_attn.q_proj
    U, V = q.lorsu_U["default"], q.factor("default")
    zero, random = (V, U) if init == "lorsu" else (U, V)
    assert torch.count_nonzero(zero) == 0
    bound = 1 / math.sqrt(random.shape[1])
    assert random.abs().max() <= bound and random.abs().max() > 0.5 * bound


@pytest.mark.parametrize("init, projection_random", [(True, "V"), ("lorsu", "U"), ("lora", "V")])
def test_projection_init_follows_the_reference(batches, tmp_path, init, projection_random):
    """By default the projection's random factor is the input-side V (the authors' LoRA on x @ P, in HF's transposed
    layout) while q/k/v keep U random and V zero; "lorsu" gives the projection the heads' layout (the old default)."""
    model = tiny_clip()
    reference = copy.deepcopy(model)
    peft_model = get_peft_model(model, probed(model, batches, init_weights=init))
    projection = peft_model.base_model.model.visual_projection
    U, V = projection.lorsu_U["default"], projection.lorsu_V["default"]
    assert U.shape == (projection.out_features, 4) and V.shape == (4, projection.in_features)
    random, zero = (V, U) if projection_random == "V" else (U, V)
    assert torch.count_nonzero(zero) == 0 and torch.count_nonzero(random) == random.numel()
    q = peft_model.base_model.model.vision_model.encoder.layers[0].self_attn.q_proj
    q_random, q_zero = (q.factor("default"), q.lorsu_U["default"]) if init == "lora" else (q.lorsu_U["default"],
                                                                                            q.factor("default"))
    assert torch.count_nonzero(q_zero) == 0 and torch.count_nonzero(q_random) == q_random.numel()
    assert torch.equal(logits(peft_model, batches[0]), logits(reference, batches[0]))  # the base model's output
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path)
    assert loaded.peft_config["default"].init_weights == init
    for name in ("lorsu_U", "lorsu_V"):
        assert torch.equal(getattr(loaded.base_model.model.visual_projection, name)["default"],
                           getattr(projection, name)["default"])


@pytest.mark.parametrize("parts", [True, False, ["attention"], ["mlp"], ["attention", "mlp"]])
def test_train_biases_parts_choose_which_biases_train(batches, parts):
    """q/k/v biases with "attention", fc1's with "mlp"; the count drops by L * 3d or L * m for a part left out."""
    model = tiny_clip()
    config = probed(model, batches, train_biases=parts)
    closed_form = count_trainable(model, config)
    peft_model = get_peft_model(model, config)
    trained = {n.split(".lorsu_bias.")[0].rsplit(".", 1)[1] for n, p in peft_model.named_parameters()
               if ".lorsu_bias." in n and p.requires_grad}
    attention = parts is True or (parts is not False and "attention" in parts)
    mlp = parts is True or (parts is not False and "mlp" in parts)
    assert trained == ({"q_proj", "k_proj", "v_proj"} if attention else set()) | ({"fc1"} if mlp else set())
    L, d, m = 2, 32, 64
    full = closed_form_count(L, d, 4, m, 16, 4, 2, 0.1)
    expected = full - (0 if attention else L * 3 * d) - (0 if mlp else L * m)
    assert peft_model.get_nb_trainable_parameters()[0] == closed_form == expected


def test_training_changes_only_allowed_entries(batches):
    model = tiny_clip()
    reference = copy.deepcopy(model)
    config = probed(model, batches)
    peft_model = get_peft_model(model, config)
    frozen_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    train_steps(peft_model, batches)
    for name, p in peft_model.named_parameters():
        if name in frozen_before:
            assert torch.equal(p, frozen_before[name]), f"frozen {name} changed during training"
    merged = peft_model.merge_and_unload()
    base_sd, merged_sd = reference.state_dict(), merged.state_dict()
    assert base_sd.keys() == merged_sd.keys()
    S = math.floor(0.1 * 64 * 32)
    changed = set()
    for name, before in base_sd.items():
        diff = merged_sd[name] != before
        if not diff.any():
            continue
        changed.add(name)
        block = name.rsplit(".", 2)[0]
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            heads = config.selected_heads[block]
            rows = torch.zeros(32, dtype=torch.bool)
            for h in heads:
                rows[h * 8 : (h + 1) * 8] = True
            assert not diff[~rows].any(), f"{name}: rows of unselected heads changed"
            assert diff[rows].any()
        elif name.endswith("fc1.weight"):
            assert int(diff.sum()) <= S
            allowed = torch.zeros(64 * 32, dtype=torch.bool)
            allowed[config.fc1_indices[name.rsplit(".", 1)[0]]] = True
            assert not diff.reshape(-1)[~allowed].any()
        else:
            allowed_suffixes = ("q_proj.bias", "k_proj.bias", "v_proj.bias", "fc1.bias", "visual_projection.weight")
            assert name.endswith(allowed_suffixes), f"{name} changed but LoRSU must not touch it"
    assert any(n.startswith("text_model") for n in base_sd)
    assert not any(n.startswith("text_model") or "out_proj" in n or "fc2" in n for n in changed)
    assert any(n.endswith("fc1.weight") for n in changed) and any(n.endswith("q_proj.weight") for n in changed)


def test_optimizer_state_only_for_sparse_values(batches):
    model = tiny_clip()
    peft_model = get_peft_model(model, probed(model, batches))
    opt = train_steps(peft_model, batches, steps=1)
    fc1 = peft_model.base_model.model.vision_model.encoder.layers[0].mlp.fc1
    values = fc1.lorsu_values["default"]
    assert opt.state[values]["exp_avg"].shape == (math.floor(0.1 * 64 * 32),)
    assert fc1.get_base_layer().weight.grad is None


def test_sparse_gradient_matches_dense_masked(batches):
    """The custom kernel's value gradients equal the masked entries of the dense fc1 gradient."""
    layer = torch.nn.Linear(6, 5)
    indices = torch.tensor([0, 7, 13, 29])
    sparse = SparseLinear(copy.deepcopy(layer), "default", num_values=4, indices=indices, init=False)
    x = torch.randn(3, 2, 6)
    sparse(x).pow(2).sum().backward()
    dense = copy.deepcopy(layer)
    with torch.no_grad():
        dense.weight.view(-1)[indices] += sparse.lorsu_values["default"]
    dense(x).pow(2).sum().backward()
    torch.testing.assert_close(sparse.lorsu_values["default"].grad, dense.weight.grad.view(-1)[indices])


def test_save_load_round_trip(tmp_path, batches):
    model = tiny_clip()
    reference = copy.deepcopy(model)
    config = probed(model, batches, init_weights=False)
    peft_model = get_peft_model(model, config)
    train_steps(peft_model, batches, steps=2)
    expected = logits(peft_model, batches[1])
    peft_model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("fc1.lorsu_indices") for k in state)
    assert PeftConfig.from_pretrained(tmp_path).selected_heads == config.selected_heads

    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        assert torch.equal(logits(loaded, batches[1]), expected)
        fc1 = loaded.base_model.model.vision_model.encoder.layers[1].mlp.fc1
        assert torch.equal(fc1.lorsu_indices["default"], config.fc1_indices["vision_model.encoder.layers.1.mlp.fc1"])
        assert loaded.peft_config["default"].selected_heads == config.selected_heads


def test_merge_unmerge_and_unload(batches, device):
    batches = [to_device(b, device) for b in batches]
    model = tiny_clip().to(device)
    reference = copy.deepcopy(model)
    peft_model = get_peft_model(model, probed(model, batches, init_weights=False))
    adapted = logits(peft_model, batches[0])
    peft_model.base_model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(logits(peft_model, batches[0]), adapted, atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="already merged"):
        peft_model.base_model.merge_adapter()
    peft_model.base_model.unmerge_adapter()
    torch.testing.assert_close(logits(peft_model, batches[0]), adapted, atol=1e-5, rtol=1e-5)
    with peft_model.disable_adapter():
        torch.testing.assert_close(logits(peft_model, batches[0]), logits(reference, batches[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(peft_model, batches[0]), adapted, atol=1e-5, rtol=1e-5)
    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, peft_lorsu.LoRSULayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, batches[0]), adapted, atol=1e-5, rtol=1e-5)

    unloaded = get_peft_model(
        copy.deepcopy(reference), probed(copy.deepcopy(reference), batches, init_weights=False)
    ).unload()
    assert torch.equal(logits(unloaded, batches[0]), logits(reference, batches[0]))


def test_multiple_adapters(batches):
    model = tiny_clip()
    reference = copy.deepcopy(model)
    first = probed(model, batches, init_weights=False)
    peft_model = get_peft_model(model, first)
    second = probe_lorsu(
        model,
        LoRSUConfig(r=2, top_k_heads=1, sparsity=0.2, init_weights=False, selection="random", seed=3),
        show_progress=False,
    )
    peft_model.add_adapter("other", second)
    out_default = logits(peft_model, batches[0])
    peft_model.set_adapter("other")
    out_other = logits(peft_model, batches[0])
    assert not torch.allclose(out_default, out_other)
    q = peft_model.base_model.model.vision_model.encoder.layers[0].self_attn.q_proj
    assert q.lorsu_U["other"].shape == (8, 2) and q.lorsu_U["default"].shape == (16, 4)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)
    peft_model.delete_adapter("default")
    for module in peft_model.modules():
        if isinstance(module, peft_lorsu.LoRSULayer):
            for attr in module.adapter_layer_names + module.other_param_names:
                assert "default" not in getattr(module, attr), f"{attr} still holds the deleted adapter"
    assert torch.equal(logits(peft_model, batches[0]), out_other)
    peft_model.base_model.delete_adapter("other")
    assert torch.equal(logits(peft_model.base_model.model, batches[0]), logits(reference, batches[0]))


def test_substring_adapter_names_save(tmp_path, batches):
    model = tiny_clip()
    reference = copy.deepcopy(model)
    peft_model = get_peft_model(model, probed(model, batches, init_weights=False), adapter_name="ad")
    peft_model.add_adapter("ad2", probed(model, batches, init_weights=False, r=2))
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "ad2", adapter_name="ad2")
    peft_model.set_adapter("ad2")
    assert torch.equal(logits(loaded, batches[0]), logits(peft_model, batches[0]))


def test_text_tower_on_request(batches):
    model = tiny_clip()
    config = probed(model, batches, tower="text", adapt_projection=False)
    assert all(k.startswith("text_model.") for k in config.selected_heads)
    peft_model = get_peft_model(model, config)
    assert isinstance(peft_model.base_model.model.text_model.encoder.layers[0].self_attn.q_proj, HeadLoRALinear)
    assert not isinstance(peft_model.base_model.model.vision_model.encoder.layers[0].self_attn.q_proj, HeadLoRALinear)


def test_layers_to_transform(batches):
    model = tiny_clip(layers=3)
    config = probed(model, clip_batches(), layers_to_transform=[1])
    assert list(config.selected_heads) == ["vision_model.encoder.layers.1.self_attn"]
    peft_model = get_peft_model(model, config)
    layers = peft_model.base_model.model.vision_model.encoder.layers
    assert isinstance(layers[1].mlp.fc1, SparseLinear) and not isinstance(layers[0].mlp.fc1, SparseLinear)


# ------------------------------------------------------------------------------------------------ registration


def test_registration_is_idempotent(tmp_path, batches):
    import importlib

    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils.peft_types import PeftType

    importlib.reload(peft_lorsu.compat)
    importlib.reload(peft_lorsu.lorsu)
    assert list(PeftType).count(PeftType.LORSU) == 1
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LORSU] is peft_lorsu.lorsu.LoRSUModel
    model = tiny_clip()
    config = peft_lorsu.lorsu.LoRSUConfig(r=2, selection="random")
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path)
    assert PeftConfig.from_pretrained(tmp_path).peft_type == "LORSU"


def test_load_refuses_mismatched_selection(tmp_path, batches):
    """Weights and config that do not belong together (edited JSON, out-of-range indices) are refused on load."""
    import json

    from safetensors.torch import save_file

    model = tiny_clip()
    reference = copy.deepcopy(model)
    config = probed(model, batches)
    get_peft_model(model, config).save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    original = json.loads(config_path.read_text())

    edited = copy.deepcopy(original)
    block = "vision_model.encoder.layers.0.self_attn"
    edited["selected_heads"][block] = [h for h in range(4) if h not in original["selected_heads"][block]][:2]
    config_path.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="disagree with the selected_heads"):
        PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path)

    config_path.write_text(json.dumps(original))
    weights = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("fc1.lorsu_indices"))
    weights[key] = weights[key] + 64 * 32
    save_file(weights, tmp_path / "adapter_model.safetensors")
    # the config records the SHA-256 of the weights saved with it: edited weights are refused as such ...
    with pytest.raises(ValueError, match="is not the file that was saved with adapter_config.json"):
        PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path)
    # ... and without that record (an older adapter), by the range check of the indices
    config_path.write_text(json.dumps({**original, "weights_sha256": None}))
    base = copy.deepcopy(reference)
    with pytest.raises(ValueError, match=r"lorsu_indices\['default'\] .* values must lie in \[0, 2048\)"):
        PeftModel.from_pretrained(base, tmp_path)
    # every refusal happens before the base model is wrapped
    assert not any(isinstance(m, peft_lorsu.LoRSULayer) for m in base.modules())
