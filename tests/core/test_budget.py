"""LoRSUConfig.from_budget: the closed-form count, the built model's count, the 1% promise and the split rule."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_clip
from peft import get_peft_model
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

import peft_lorsu  # noqa: F401  (registers LoRSU)
from peft_lorsu import LoRSUConfig
from peft_lorsu.lorsu.budget import PAPER_ATTENTION_SHARE, count_structure, count_trainable

VIT_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16,
               image_size=224, projection_dim=512)


def paper_formula(L, d, H, m, o, r, k, p, projection=True):
    """docs/lorsu.md: L * (floor(p * m * d) + m + 3d + r * (3 * k * d_h + d)) + r * (d + o)."""
    return L * (math.floor(p * m * d) + m + 3 * d + r * (3 * k * (d // H) + d)) + (r * (d + o) if projection else 0)


def built_count(model, config: LoRSUConfig) -> int:
    config.selection = "random"  # the count does not depend on which heads and entries are chosen
    return get_peft_model(model, config).get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("budget", [482, 1_000, 2_500, 6_000, 9_280])
def test_tiny_clip_budgets_land_within_one_percent(budget):
    model = tiny_clip()
    config = LoRSUConfig.from_budget(model, trainable_params=budget)
    expected = paper_formula(2, 32, 4, 64, 16, config.r, config.top_k_heads, config.sparsity)
    assert count_trainable(model, config) == expected
    assert built_count(model, config) == expected
    assert abs(expected - budget) <= 0.01 * budget
    assert config.r & (config.r - 1) == 0 and config.lora_alpha == config.r  # a power of two, scale 1


@pytest.mark.parametrize(
    "fixed, budget",
    [
        (dict(tower="both"), 4_000),
        (dict(adapt_projection=False, share_qkv_factor=False), 3_000),
        (dict(train_biases=False, layers_to_transform=[1]), 1_500),
        (dict(r=8), 4_000),
        (dict(top_k_heads=3), 5_000),
        (dict(adapt_attention=False, adapt_projection=False), 2_000),
        (dict(train_biases=["mlp"], share_qkv_factor=False, adapt_projection=False), 3_000),
        (dict(train_biases=["attention"]), 4_000),
    ],
    ids=["both-towers", "separate-factors", "one-layer-no-bias", "fixed-r", "fixed-heads", "fc1-only", "ppl-biases",
         "qkv-biases"],
)
def test_flags_and_fixed_fields(fixed, budget):
    model = tiny_clip()
    config = LoRSUConfig.from_budget(model, trainable_params=budget, **fixed)
    assert all(getattr(config, k) == v for k, v in fixed.items())
    count = count_trainable(model, config)
    assert built_count(model, config) == count
    assert abs(count - budget) <= 0.01 * budget


def test_bare_vision_model_with_separate_factors():
    for budget in (5_000, 12_000):
        torch.manual_seed(0)
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6, image_size=16,
            patch_size=8, projection_dim=24,
        ))
        config = LoRSUConfig.from_budget(model, trainable_params=budget, share_qkv_factor=False)
        count = count_trainable(model, config)
        assert built_count(model, config) == count and abs(count - budget) <= 0.01 * budget


@pytest.mark.parametrize("budget", [3_862_316, 1_000_000])
def test_vit_b16_on_the_meta_device(budget):
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_B16))
    config = LoRSUConfig.from_budget(model, trainable_params=budget)
    expected = paper_formula(12, 768, 12, 3072, 512, config.r, config.top_k_heads, config.sparsity)
    assert count_trainable(model, config) == expected and abs(expected - budget) <= 0.01 * budget
    if budget == 3_862_316:  # the paper's own count gives back the paper's knobs
        assert (config.r, config.top_k_heads, round(config.sparsity, 6)) == (64, 2, 0.1)
        assert built_count(model, config) == expected


def test_split_rule_follows_the_share():
    """r: the power of two closest to the low-rank share at the paper's head fraction; then k closest at that r."""
    model = tiny_clip()
    shape = count_structure(model, LoRSUConfig())
    for budget in (1_500, 3_000, 4_500):  # at 6,000 the rule's fc1 part would need sparsity > 1: the fallback
        chosen = LoRSUConfig.from_budget(model, trainable_params=budget)
        target = PAPER_ATTENTION_SHARE * (budget - shape.bias)
        paper_k = max(1, round(4 * 2 / 12))
        r = min((1, 2, 4, 8, 16), key=lambda r: (abs(shape.low_rank(r, paper_k) - target), r))
        k = min(range(1, 5), key=lambda k: (abs(shape.low_rank(r, k) - target), k))
        assert (chosen.r, chosen.top_k_heads) == (r, k)
    smallest = LoRSUConfig.from_budget(model, trainable_params=3_000, attention_share=0.0)
    largest = LoRSUConfig.from_budget(model, trainable_params=3_000, attention_share=1.0)
    assert (smallest.r, smallest.top_k_heads) == (1, 1)
    default = LoRSUConfig.from_budget(model, trainable_params=3_000)
    assert shape.low_rank(largest.r, largest.top_k_heads) > shape.low_rank(default.r, default.top_k_heads)


def test_unreachable_budgets_raise_with_the_range():
    model = tiny_clip()
    with pytest.raises(ValueError, match=r"trainable_params=100 is outside .*: 482 \(r=1, top_k_heads=1.*to 9,280"):
        LoRSUConfig.from_budget(model, trainable_params=100)
    with pytest.raises(ValueError, match=r"trainable_params=20,000 is outside .* to 9,280 \(r=16, top_k_heads=4"):
        LoRSUConfig.from_budget(model, trainable_params=20_000)
    with pytest.raises(ValueError, match="trainable_params must be an integer >= 1, got 0"):
        LoRSUConfig.from_budget(model, trainable_params=0)
    with pytest.raises(ValueError, match=r"attention_share must be in \[0, 1\], got 1.5"):
        LoRSUConfig.from_budget(model, trainable_params=2_000, attention_share=1.5)
    with pytest.raises(ValueError, match=r"top_k_heads=5 exceeds the 4 heads .* \(allowed: 1..4\)"):
        LoRSUConfig.from_budget(model, trainable_params=2_000, top_k_heads=5)
    with pytest.raises(ValueError, match=r"no r / top_k_heads / sparsity within 1% .*closest: 1,458"):
        LoRSUConfig.from_budget(model, trainable_params=1_500, sparsity=0.2)
