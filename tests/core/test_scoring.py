"""Head scoring strategies of the probe: gradient (default), per-sample Fisher, random and a user-supplied scorer."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import clip_batches, tiny_clip
from test_probe import PLANTED, PLANTED_SEED, planted_loss

from peft_lorsu import LoRSUConfig, probe_lorsu
from peft_lorsu.lorsu.scoring import HeadStatistics, per_sample_clip_loss

BLOCKS = [f"vision_model.encoder.layers.{i}.self_attn" for i in range(2)]


def planted_per_sample_loss(model, batch):
    """`(B,)` per-sample losses: test_probe's planted loss on each sample alone (CLIP's loss of a single image-text
    pair is 0, the large terms on the planted head and fc1 rows remain)."""
    size = batch["pixel_values"].shape[0]
    return torch.stack([planted_loss(model, {k: v[i : i + 1] for k, v in batch.items()}) for i in range(size)])


def class_batches(n: int, batch_size: int, seed: int = 0) -> list[dict]:
    """Batches for a 3-class prompt loss: pixel_values `(B, 3, 16, 16)`, labels `(B,)`, prompts `(3, 7)`."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, 99, (3, 7), generator=g)
    prompts[:, 0], prompts[:, -1] = 0, 2
    pixels = torch.randn(n * batch_size, 3, 16, 16, generator=g)
    labels = torch.randint(0, 3, (n * batch_size,), generator=g)
    return [
        {"pixel_values": pixels[i : i + batch_size], "labels": labels[i : i + batch_size], "input_ids": prompts}
        for i in range(0, n * batch_size, batch_size)
    ]


def probe(strategy: str, data=None, loss_fn=planted_per_sample_loss, **kwargs) -> LoRSUConfig:
    config = LoRSUConfig(r=4, top_k_heads=1, sparsity=0.05, head_scoring=strategy, **kwargs)
    model = tiny_clip(PLANTED_SEED if loss_fn is planted_per_sample_loss else 0)
    return probe_lorsu(model, config, data or clip_batches(), loss_fn=loss_fn, show_progress=False)


@pytest.mark.parametrize("strategy", ["gradient", "fisher"])
def test_data_driven_strategies_find_the_planted_heads(strategy):
    config = probe(strategy)
    for i, (head, fc1_rows) in PLANTED.items():
        assert config.selected_heads[BLOCKS[i]] == [head]
        scores = config.head_scores[BLOCKS[i]]
        assert len(scores) == 4 and max(scores) == scores[head]
        assert set((config.fc1_indices[f"vision_model.encoder.layers.{i}.mlp.fc1"] // 32).tolist()) <= set(fc1_rows)
    assert config.head_scoring == strategy


def test_random_heads_are_seeded_and_fc1_still_follows_the_gradient():
    first, again, other = probe("random", seed=1), probe("random", seed=1), probe("random", seed=2)
    assert first.selected_heads == again.selected_heads and first.head_scores == again.head_scores
    assert first.head_scores != other.head_scores
    for i, (_, fc1_rows) in PLANTED.items():
        assert set((first.fc1_indices[f"vision_model.encoder.layers.{i}.mlp.fc1"] // 32).tolist()) <= set(fc1_rows)
    assert all(0 <= h < 4 for heads in first.selected_heads.values() for h in heads)


def test_fisher_is_deterministic_and_leaves_the_model_as_found():
    model = tiny_clip()
    model.vision_model.encoder.layers[0].train()
    before = copy.deepcopy(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    runs = []
    for _ in range(2):
        config = LoRSUConfig(r=4, top_k_heads=2, head_scoring="fisher")
        runs.append(probe_lorsu(model, config, clip_batches(), show_progress=False))  # default per-sample CLIP loss
    assert runs[0].head_scores == runs[1].head_scores and runs[0].selected_heads == runs[1].selected_heads
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert modes == {n: m.training for n, m in model.named_modules()}
    assert all(p.grad is None for p in model.parameters())


def test_fisher_is_the_mean_of_per_sample_gradient_scores():
    """With independent samples (class-prompt loss), a batch's per-sample Fisher equals the mean over one-sample
    batches of the paper's gradient score (for one sample the mean gradient is that sample's gradient)."""
    data = class_batches(n=2, batch_size=3)
    fisher = probe("fisher", data=data, loss_fn=None)
    singles = [{**b, "pixel_values": b["pixel_values"][i : i + 1], "labels": b["labels"][i : i + 1]} for b in data
               for i in range(3)]
    per_sample = [probe("gradient", data=[s], loss_fn=per_sample_clip_loss).head_scores for s in singles]
    for block in BLOCKS:
        expected = torch.tensor([s[block] for s in per_sample]).mean(0)
        torch.testing.assert_close(torch.tensor(fisher.head_scores[block]), expected, rtol=1e-4, atol=1e-12)


def test_custom_scorer_gets_block_statistics_and_decides():
    seen: list[HeadStatistics] = []

    def prefer_head_two(stats: HeadStatistics) -> torch.Tensor:
        seen.append(stats)
        return torch.tensor([0.0, 1.0, 5.0, 2.0])

    config = LoRSUConfig(r=4, top_k_heads=2)
    probe_lorsu(tiny_clip(), config, clip_batches(), head_scorer=prefer_head_two, show_progress=False)
    assert [s.block for s in seen] == BLOCKS
    for stats in seen:
        assert (stats.num_heads, stats.head_dim, stats.num_samples) == (4, 8, 12)
        grads = (stats.grad_q, stats.grad_k, stats.grad_v)
        assert all(g.shape == (32, 32) and g.dtype == torch.float32 for g in grads)
        assert stats.fisher is None
    assert config.selected_heads == dict.fromkeys(BLOCKS, [2, 3])
    assert config.head_scores[BLOCKS[0]] == [0.0, 1.0, 5.0, 2.0]
    assert config.head_scoring == "custom"


def test_custom_scorer_sees_fisher_statistics_when_asked():
    fisher_seen = []
    config = LoRSUConfig(r=4, top_k_heads=1, head_scoring="fisher")
    probe_lorsu(tiny_clip(), config, clip_batches(n=1), show_progress=False,
                head_scorer=lambda s: fisher_seen.append(s.fisher) or s.fisher)
    assert [f.shape for f in fisher_seen] == [(4,), (4,)] and all((f > 0).all() for f in fisher_seen)


def test_scoring_errors_name_the_problem():
    model, data = tiny_clip(), clip_batches(n=1)
    with pytest.raises(ValueError, match=r"LoRSUConfig.head_scoring must be one of .*got 'hessian'"):
        LoRSUConfig(head_scoring="hessian")
    with pytest.raises(ValueError, match="head_scoring='custom' needs the scoring function"):
        probe_lorsu(model, LoRSUConfig(head_scoring="custom"), data, show_progress=False)
    with pytest.raises(ValueError, match=r"must return 4 finite scores, shape \(4,\); got shape \(3,\)"):
        probe_lorsu(model, LoRSUConfig(), data, head_scorer=lambda s: torch.ones(3), show_progress=False)
    scalar_loss = lambda m, b: m(**b, return_loss=True).loss  # noqa: E731
    with pytest.raises(ValueError, match=r"needs per-sample losses: .* shape \(4,\) .* got shape \(\)"):
        probe_lorsu(model, LoRSUConfig(head_scoring="fisher"), data, loss_fn=scalar_loss, show_progress=False)
    with pytest.raises(ValueError, match="must be re-iterable"):
        probe_lorsu(model, LoRSUConfig(head_scoring="fisher"), iter(data), show_progress=False)
