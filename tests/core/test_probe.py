"""The gradient probe: planted answers, determinism, state restoration, stopping rule and errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import clip_batches, tiny_clip, tiny_clip_config
from transformers import CLIPVisionModel

from peft_lorsu import LoRSUConfig, probe_lorsu
from peft_lorsu.compat import pooled_features
from peft_lorsu.lorsu.scoring import head_scores, top_k_indices, top_s_entries

# Planted answer per vision layer: (head, fc1 rows). d=32, H=4 (d_h=8), fc1 m=64.
PLANTED = {0: (3, range(40, 48)), 1: (1, range(8, 16))}
# The tiny CLIP the planted answers are found in. The same seed draws other weights under transformers 4.x and 5.x;
# with some draws the planted terms of layer 1, flowing back, reach a few fc1 rows of layer 0 outside the planted ones.
# Seed 3 gives a model where every planted answer stands out on both (checked: 4.57.6 and 5.25.0).
PLANTED_SEED = 3


def planted_loss(model, batch):
    """The model's own loss plus large terms on one head's q/k/v rows and some fc1 rows in every layer."""
    captured = []
    hooks = []
    for i, layer in enumerate(model.vision_model.encoder.layers):
        head, fc1_rows = PLANTED[i]
        rows = list(range(head * 8, head * 8 + 8))
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            hooks.append(proj.register_forward_hook(lambda m, a, out, r=rows: captured.append(out[..., r])))
        hooks.append(
            layer.mlp.fc1.register_forward_hook(lambda m, a, out, r=list(fc1_rows): captured.append(out[..., r]))
        )
    try:
        loss = model(**batch, return_loss=True).loss
    finally:
        for h in hooks:
            h.remove()
    return loss + 100 * sum(c.pow(2).mean() for c in captured)


def test_probe_finds_planted_heads_and_fc1_entries():
    model = tiny_clip(PLANTED_SEED)
    config = probe_lorsu(
        model,
        LoRSUConfig(r=4, top_k_heads=1, sparsity=0.05),
        clip_batches(),
        loss_fn=planted_loss,
        show_progress=False,
    )
    for i, (head, fc1_rows) in PLANTED.items():
        assert config.selected_heads[f"vision_model.encoder.layers.{i}.self_attn"] == [head]
        scores = config.head_scores[f"vision_model.encoder.layers.{i}.self_attn"]
        assert len(scores) == 4 and max(scores) == scores[head]
        rows = config.fc1_indices[f"vision_model.encoder.layers.{i}.mlp.fc1"] // 32
        assert set(rows.tolist()) <= set(fc1_rows)


def test_probe_is_deterministic_and_leaves_model_as_found():
    model = tiny_clip()
    model.train()
    model.vision_model.encoder.layers[0].eval()
    for p in model.text_model.parameters():
        p.requires_grad_(False)
    model.logit_scale.grad = torch.ones(())
    before = copy.deepcopy(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}

    first = probe_lorsu(model, LoRSUConfig(r=4), clip_batches(), show_progress=False)
    second = probe_lorsu(model, LoRSUConfig(r=4), clip_batches(), show_progress=False)
    assert first.selected_heads == second.selected_heads
    assert first.head_scores == second.head_scores
    assert all(torch.equal(first.fc1_indices[k], second.fc1_indices[k]) for k in first.fc1_indices)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert modes == {n: m.training for n, m in model.named_modules()}
    assert torch.equal(model.logit_scale.grad, torch.ones(()))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "logit_scale")


def test_probe_uses_mean_gradient_and_stops_after_enough_samples():
    model = tiny_clip()
    batches = clip_batches(n=6, batch_size=2)
    # probe_samples=4: two batches of 2 suffice when no accumulated entry is zero
    counted = []

    def counting_loss(m, batch):
        counted.append(batch["pixel_values"].shape[0])
        return m(**batch, return_loss=True).loss

    probe_lorsu(model, LoRSUConfig(r=2, probe_samples=4), batches, loss_fn=counting_loss, show_progress=False)
    assert counted == [2, 2]
    counted.clear()
    probe_lorsu(
        model, LoRSUConfig(r=2, probe_samples=4), batches, loss_fn=counting_loss, num_batches=5, show_progress=False
    )
    assert len(counted) == 5


def test_probe_on_bare_vision_model():
    torch.manual_seed(0)
    model = CLIPVisionModel(tiny_clip_config().vision_config)
    batches = [{"pixel_values": b["pixel_values"]} for b in clip_batches()]
    config = probe_lorsu(
        model,
        LoRSUConfig(r=2, top_k_heads=2),
        batches,
        loss_fn=lambda m, b: m(**b).pooler_output.pow(2).mean(),
        show_progress=False,
    )
    tower = "vision_model." if hasattr(model, "vision_model") else ""  # transformers >= 5.6 flattens the model
    assert set(config.selected_heads) == {f"{tower}encoder.layers.0.self_attn", f"{tower}encoder.layers.1.self_attn"}
    assert set(config.fc1_indices) == {f"{tower}encoder.layers.0.mlp.fc1", f"{tower}encoder.layers.1.mlp.fc1"}


def test_random_selection_is_seeded():
    model = tiny_clip(layers=4)
    a = probe_lorsu(model, LoRSUConfig(selection="random", seed=1, top_k_heads=2))
    b = probe_lorsu(model, LoRSUConfig(selection="random", seed=1, top_k_heads=2))
    c = probe_lorsu(model, LoRSUConfig(selection="random", seed=2, top_k_heads=2))
    assert a.selected_heads == b.selected_heads
    assert a.selected_heads != c.selected_heads
    assert all(len(h) == 2 for h in a.selected_heads.values())
    assert all(torch.equal(a.fc1_indices[k], b.fc1_indices[k]) for k in a.fc1_indices)


def test_head_scores_and_top_entries_by_hand():
    g = torch.zeros(4, 2)  # H=2 heads, d_h=2, d_in=2
    g[0, 0], g[3, 1] = 1.0, 2.0  # head 0: 1, head 1: 4
    scores = head_scores(g, g, 2 * g, num_heads=2)
    torch.testing.assert_close(scores, torch.tensor([1 + 1 + 4, 4 + 4 + 16.0]))
    assert top_k_indices(torch.tensor([1.0, 3.0, 3.0, 0.5]), 2) == [1, 2]
    assert top_k_indices(torch.tensor([2.0, 2.0, 2.0]), 1) == [0]
    grad = torch.tensor([[0.1, -5.0], [3.0, 0.0]])
    assert top_s_entries(grad, 2).tolist() == [1, 2]


# ------------------------------------------------------------------------------------------------ errors


def test_probe_errors_and_restores_state_on_failure():
    model = tiny_clip()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="yielded no batches"):
        probe_lorsu(model, LoRSUConfig(), [], show_progress=False)
    with pytest.raises(ValueError, match="needs a dataloader"):
        probe_lorsu(model, LoRSUConfig())
    with pytest.raises(ValueError, match="no gradient path"):
        probe_lorsu(
            model,
            LoRSUConfig(),
            clip_batches(),
            loss_fn=lambda m, b: pooled_features(m.get_text_features(input_ids=b["input_ids"])).sum(),
            show_progress=False,
        )

    def nan_loss(m, b):
        return m(**b, return_loss=True).loss * torch.tensor(float("nan"))

    with pytest.raises(ValueError, match="loss of batch 0 is nan"):
        probe_lorsu(model, LoRSUConfig(), clip_batches(), loss_fn=nan_loss, show_progress=False)

    def inf_grad_loss(m, b):
        # finite loss, but the gradient reaching layer 1's fc1 output is scaled to inf
        fc1 = m.vision_model.encoder.layers[1].mlp.fc1

        def scale_grad(module, args, out):
            out.register_hook(lambda g: g * float("inf"))

        hook = fc1.register_forward_hook(scale_grad)
        try:
            return m(**b, return_loss=True).loss
        finally:
            hook.remove()

    with pytest.raises(ValueError, match=r"gradients of .*layers\.1\.mlp\.fc1.* hold NaN or inf"):
        probe_lorsu(model, LoRSUConfig(), clip_batches(), loss_fn=inf_grad_loss, show_progress=False)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="top_k_heads=5 exceeds the 4 heads"):
        probe_lorsu(model, LoRSUConfig(top_k_heads=5), clip_batches(), show_progress=False)
    with pytest.raises(ValueError, match="no loss"):
        probe_lorsu(
            CLIPVisionModel(tiny_clip_config().vision_config),
            LoRSUConfig(),
            [{"pixel_values": torch.randn(2, 3, 16, 16)}],
            show_progress=False,
        )


def test_loading_a_random_adapter_keeps_its_saved_heads(tmp_path):
    """A random selection is drawn once; a reload takes the heads from the JSON even if the seed would differ."""
    import json

    from peft import PeftModel, get_peft_model

    model = tiny_clip(layers=4)
    reference = copy.deepcopy(model)
    config = LoRSUConfig(r=2, selection="random", seed=5)
    get_peft_model(model, config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    saved["seed"] = 6  # a different seed must not re-draw the stored heads
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    loaded = PeftModel.from_pretrained(reference, tmp_path)
    assert loaded.peft_config["default"].selected_heads == config.selected_heads
