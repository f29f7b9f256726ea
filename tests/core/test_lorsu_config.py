"""LoRSUConfig: defaults, JSON round trip, and every validation error."""

from __future__ import annotations

import pytest
import torch
from conftest import clip_batches, tiny_clip
from peft import PeftConfig, get_peft_model
from transformers import CLIPTextModel

from peft_lorsu import LoRSUConfig, probe_lorsu


def test_defaults_follow_the_reference():
    config = LoRSUConfig()
    assert (config.r, config.lora_alpha, config.top_k_heads, config.sparsity) == (64, 64, 2, 0.1)
    assert config.lora_dropout == 0.0 and config.tower == "vision"
    assert config.train_biases and config.adapt_projection and config.share_qkv_factor
    assert config.resolved_init == "lorsu" and LoRSUConfig(share_qkv_factor=False).resolved_init == "lora"
    # the projection's random factor is on the input side, as in the authors' code (issue 18)
    assert config.resolved_projection_init == "lora" and LoRSUConfig(init_weights="lorsu").resolved_projection_init
    assert config.peft_type == "LORSU"


def test_json_round_trip(tmp_path):
    model = tiny_clip()
    config = probe_lorsu(model, LoRSUConfig(r=4, layers_to_transform=1), clip_batches(), show_progress=False)
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LoRSUConfig)
    assert loaded.layers_to_transform == [1]
    assert loaded.selected_heads == config.selected_heads
    assert loaded.head_scores == config.head_scores
    assert loaded.fc1_indices is None  # tensors travel in the safetensors file, not in JSON
    assert "fc1_indices" not in (tmp_path / "adapter_config.json").read_text()


@pytest.mark.parametrize(
    "value, expected",
    [(True, True), (False, False), (["mlp"], ["mlp"]), (("mlp", "attention", "mlp"), ["attention", "mlp"]), ([], [])],
)
def test_train_biases_parts_round_trip(tmp_path, value, expected):
    """``train_biases`` takes True, False or a list of parts; a list is kept in canonical order, JSON keeps it."""
    config = LoRSUConfig(train_biases=value)
    assert config.train_biases == expected
    config.save_pretrained(tmp_path)
    assert PeftConfig.from_pretrained(tmp_path).train_biases == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, r"LoRSUConfig.r must be an integer >= 1, got 0"),
        (
            {"train_biases": "mlp"},
            r"LoRSUConfig.train_biases must be True, False or a list of parts from \['attention', 'mlp'\], got 'mlp'",
        ),
        ({"train_biases": ["fc2"]}, r"train_biases must be True, False or a list of parts .*, got \['fc2'\]"),
        ({"train_biases": None}, r"train_biases must be True, False or a list of parts"),
        ({"train_biases": 1}, r"train_biases must be True, False or a list of parts"),
        ({"r": 2.5}, r"LoRSUConfig.r must be an integer >= 1"),
        ({"lora_alpha": 0}, r"lora_alpha must be a number in \(0, 1e\+06\]"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\), got 1.0"),
        ({"top_k_heads": 0}, r"top_k_heads must be an integer >= 1"),
        ({"sparsity": 0.0}, r"sparsity must be in \(0, 1\], got 0.0"),
        ({"sparsity": 1.5}, r"sparsity must be in \(0, 1\], got 1.5"),
        ({"tower": "audio"}, r"tower must be one of \('vision', 'text', 'both'\), got 'audio'"),
        ({"selection": "fisher"}, r"selection must be one of"),
        ({"init_weights": "gaussian"}, r"init_weights must be one of"),
        ({"probe_samples": 0}, r"probe_samples must be an integer >= 1"),
        ({"layers_to_transform": [-1]}, r"layers_to_transform must be None, an int or a list"),
        ({"target_modules": 3}, r"target_modules must be None, a regex string or a list"),
        ({"selected_heads": {"a": [0, 0]}}, r"selected_heads must be a dict of module name -> 2 distinct"),
        (
            {"adapt_attention": False, "adapt_mlp": False, "adapt_projection": False, "train_biases": False},
            "nothing to train",
        ),
        (
            {"adapt_attention": False, "adapt_mlp": False, "adapt_projection": False, "train_biases": []},
            "nothing to train",
        ),
    ],
)
def test_invalid_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRSUConfig(**kwargs)


def test_model_dependent_errors():
    model = tiny_clip()
    with pytest.raises(ValueError, match=r"top_k_heads=5 exceeds the 4 heads of .*self_attn \(allowed: 1..4\)"):
        get_peft_model(model, LoRSUConfig(top_k_heads=5, selection="random"))
    with pytest.raises(ValueError, match=r"selected_heads is missing: run peft_lorsu.probe_lorsu"):
        get_peft_model(tiny_clip(), LoRSUConfig())
    with pytest.raises(ValueError, match=r"layers_to_transform=\[7\] names layers the vision tower does not have"):
        get_peft_model(tiny_clip(), LoRSUConfig(layers_to_transform=[7], selection="random"))
    with pytest.raises(ValueError, match="matches no modules"):
        get_peft_model(tiny_clip(), LoRSUConfig(target_modules=r"nothing\..*", selection="random"))
    with pytest.raises(ValueError, match=r"tower='vision': no matching encoder found in CLIPTextModel"):
        get_peft_model(CLIPTextModel(tiny_clip().config.text_config), LoRSUConfig(selection="random"))
    heads = {f"vision_model.encoder.layers.{i}.self_attn": [0, 9] for i in range(2)}
    with pytest.raises(ValueError, match=r"selected_heads\['vision_model.encoder.layers.0.self_attn'\]=\[0, 9\]"):
        get_peft_model(tiny_clip(), LoRSUConfig(selected_heads=heads, adapt_mlp=False))


def test_fc1_without_indices_refuses_to_run():
    """A hand-written config with heads but no probed fc1 entries builds, but never trains a placeholder."""
    model = tiny_clip()
    heads = {f"vision_model.encoder.layers.{i}.self_attn": [0, 1] for i in range(2)}
    peft_model = get_peft_model(model, LoRSUConfig(r=2, selected_heads=heads))
    batch = clip_batches(n=1)[0]
    with pytest.raises(RuntimeError, match="fc1 indices .* were neither chosen by probe_lorsu nor loaded"):
        peft_model(**batch)
    with pytest.raises(RuntimeError, match="neither chosen by probe_lorsu nor loaded"):
        peft_model.merge_and_unload()
    assert torch.isfinite(peft_model.base_model.model.vision_model.encoder.layers[0].mlp.fc1.weight).all()


def test_target_modules_filter():
    model = tiny_clip()
    config = LoRSUConfig(r=2, selection="random", target_modules=["q_proj", "fc1"], adapt_projection=False)
    peft_model = get_peft_model(model, config)
    assert sorted(n.rsplit(".", 1)[-1] for n in peft_model.base_model.targeted_module_names) == [
        "fc1",
        "fc1",
        "q_proj",
        "q_proj",
    ]
