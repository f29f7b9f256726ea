"""What a LoRSU training step keeps for backward, and that keeping less changes no number.

- q/k/v and fc1 take their input from a LayerNorm; backward recomputes it from the norm's input (which the norm keeps
  anyway) instead of keeping it: the value and factor gradients are the same bits as when the input is kept.
- q, k and v compute their shared ``z = x V^T`` once per attention call.
- The head-row update keeps only the row indices (``index_add_`` would also keep its `(N, n_rows)` source).
- Where the input is not the norm's unmodified output, the layer keeps it as before.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import clip_batches, tiny_clip, to_device
from peft import LoraConfig, get_peft_model
from test_backbones import CASES, make_config
from torch import nn

from peft_lorsu import HeadLoRALinear, LoRSUConfig, SparseLinear, probe_lorsu
from peft_lorsu.lorsu import layer as layer_module
from peft_lorsu.lorsu.layer import LoRSULinear
from peft_lorsu.lorsu.probe import default_loss
from peft_lorsu.lorsu.saved_inputs import normed_linear

M, D = 24, 8


def saved_storages(run) -> dict[int, torch.Tensor]:
    """Storage pointer -> one tensor, for every tensor autograd keeps during ``run()`` (a forward)."""
    kept: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return kept


def activation_bytes(model: nn.Module, run) -> int:
    """Bytes of the distinct storages autograd keeps during ``run()``, parameters and buffers left out."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept = saved_storages(run)
    return sum(t.untyped_storage().nbytes() for ptr, t in kept.items() if ptr not in own)


def kept_norm_outputs(model: nn.Module, run) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Names of the LayerNorms whose output autograd keeps during ``run()``, and every norm's output by name.

    The outputs are held until the end of the run, so no later tensor can reuse their memory and look like them.
    """
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda mod, args, out, name=name: outputs.__setitem__(name, out))
        for name, m in model.named_modules()
        if type(m) is nn.LayerNorm
    ]
    try:
        kept = saved_storages(run)
    finally:
        for h in handles:
            h.remove()
    return [n for n, out in outputs.items() if out.untyped_storage().data_ptr() in kept], outputs


def without_norm_taps(model: nn.Module) -> nn.Module:
    """A copy whose LoRSU layers keep their inputs (the attention scopes stay)."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if isinstance(module, LoRSULinear) and module.input_norm is not None:
            module.input_norm.remove()
            module.input_norm = None
    return copied


def without_hooks(model: nn.Module) -> nn.Module:
    """A copy whose LoRSU layers place no hook at all: no recomputation, no shared ``z``."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if isinstance(module, LoRSULinear):
            module.remove_hooks()
    return copied


def lorsu_clip(device: str, **config):
    model = tiny_clip().to(device)
    batches = [to_device(b, device) for b in clip_batches()]
    config = probe_lorsu(model, LoRSUConfig(r=4, init_weights=False, **config), batches, show_progress=False)
    return get_peft_model(model, config).train(), batches


def grads_of(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(**batch, return_loss=True).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_training_keeps_no_layer_norm_output_and_the_same_gradients(device):
    peft_model, batches = lorsu_clip(device)
    keeping = without_norm_taps(peft_model)
    kept, outputs = kept_norm_outputs(peft_model, lambda: peft_model(**batches[0], return_loss=True))
    tapped = sorted(n for n in outputs if "vision_model.encoder.layers." in n)
    assert len(tapped) == 4  # layer_norm1 and layer_norm2 of the two vision layers LoRSU adapts
    assert not set(kept) & set(tapped), "a LayerNorm output feeding q/k/v or fc1 was kept"
    kept_before, _ = kept_norm_outputs(keeping, lambda: keeping(**batches[0], return_loss=True))
    assert {n for n in tapped if n.endswith("layer_norm1")} <= set(kept_before)  # q/k/v's input (fc1: its columns)
    per_step = [activation_bytes(m, lambda m=m: m(**batches[0], return_loss=True)) for m in (peft_model, keeping)]
    assert per_step[0] < per_step[1]
    # recomputing the norm in backward replays the same op: every gradient is the same bits
    expected, got = grads_of(keeping, batches[0]), grads_of(peft_model, batches[0])
    assert expected.keys() == got.keys() and len(got) > 10
    for name in got:
        assert torch.equal(got[name], expected[name]), name


def test_shared_low_rank_input_gives_the_unshared_numbers(device, monkeypatch):
    peft_model, batches = lorsu_clip(device)
    plain = without_hooks(peft_model)
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(**batches[0]).logits_per_image, plain(**batches[0]).logits_per_image, rtol=0, atol=0
        )
    got, expected = grads_of(peft_model, batches[0]), grads_of(plain, batches[0])
    scale = max(g.abs().max().item() for g in expected.values())
    for name in got:  # the gradients into z are summed before V's and x's, not after: rounding only
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6 * scale, msg=name)
    # one z per attention call, not three: V multiplies the input once per adapted block (2), not once per q/k/v (6);
    # the projection has a factor of its own (1)
    calls = []
    counted = lambda x, weight, norm=None: calls.append(weight) or normed_linear(x, weight, norm)  # noqa: E731
    monkeypatch.setattr(layer_module, "normed_linear", counted)
    for model, expected_calls in ((peft_model, 2 + 1), (plain, 6 + 1)):
        calls.clear()
        model(**batches[0], return_loss=True).loss.backward()
        assert len(calls) == expected_calls
    assert all(not m.z_scope.values for m in peft_model.modules() if isinstance(m, HeadLoRALinear) and m.z_scope)


def test_keeps_less_for_backward_than_lora_at_the_same_rank():
    """LoRA keeps q/k/v's input and one `(N, r)` product per projection; LoRSU keeps neither the norm outputs nor
    three products, which outweighs fc1's update (CLIP vision tower, same rank)."""
    batches = clip_batches()
    lorsu, _ = lorsu_clip("cpu", adapt_projection=False, train_biases=False)
    lora = get_peft_model(
        tiny_clip(), LoraConfig(r=4, lora_alpha=4, target_modules=r".*vision_model.*\.(q_proj|k_proj|v_proj)")
    ).train()
    used = activation_bytes(lorsu, lambda: lorsu(**batches[0], return_loss=True))
    baseline = activation_bytes(lora, lambda: lora(**batches[0], return_loss=True))
    assert used < baseline


# ------------------------------------------------------------------------------ one layer behind a LayerNorm


def tapped_fc1(device: str) -> tuple[nn.LayerNorm, SparseLinear]:
    torch.manual_seed(0)
    norm = nn.LayerNorm(D).to(device)
    indices = torch.tensor([r * D + c for r in (1, 5, 6, 20) for c in (0, 3, 4)])
    fc1 = SparseLinear(nn.Linear(D, M), "default", num_values=12, indices=indices, init=False).to(device)
    fc1.get_base_layer().requires_grad_(False)
    fc1.tap_input_norm(norm)
    return norm, fc1


def value_grad(fc1: SparseLinear, make_input) -> tuple[torch.Tensor, dict]:
    fc1.zero_grad()
    kept = saved_storages(lambda: fc1(make_input()).pow(2).sum().backward())
    return fc1.lorsu_values["default"].grad.clone(), kept


@pytest.mark.parametrize("case", ["norm_output", "another_tensor", "modified_in_place", "untapped"])
def test_fc1_keeps_its_input_unless_it_is_the_norms_output(case, device):
    norm, fc1 = tapped_fc1(device)
    source = torch.randn(3, 5, D, device=device, requires_grad=True)

    def make_input():
        y = norm(source)
        if case == "another_tensor":
            return y * 1.0
        if case == "modified_in_place":
            return y.mul_(2.0)  # LayerNorm's backward does not read its output: allowed, and must not be replayed
        return y

    if case == "untapped":
        fc1.remove_hooks()
        assert not norm._forward_hooks
    grad, kept = value_grad(fc1, make_input)
    columns = [t for t in kept.values() if t.shape == (15, 3)]  # the selected columns 0, 3, 4 of 15 positions
    assert bool(columns) == (case != "norm_output")
    with torch.no_grad():
        x = make_input().reshape(15, D)
        g = 2 * nn.functional.linear(x, fc1.get_base_layer().weight + fc1.get_delta_weight("default"))
        g = g + 2 * fc1.get_base_layer().bias
    expected = (g.t() @ x).reshape(-1)[fc1.lorsu_indices["default"].long()]
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_fc1_replays_the_norm_under_autocast(device):
    norm, fc1 = tapped_fc1(device)
    source = torch.randn(4, D, device=device)
    grads = []
    for tapped in (True, False):
        if not tapped:
            fc1.remove_hooks()
        fc1.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16):
            out = fc1(norm(source))
        assert out.dtype == torch.bfloat16
        out.float().pow(2).sum().backward()
        grads.append(fc1.lorsu_values["default"].grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_head_update_keeps_only_its_rows_for_backward(device):
    torch.manual_seed(0)
    layer = HeadLoRALinear(nn.Linear(16, 16), "default", r=3, lora_alpha=3, heads=[1, 3], head_dim=4, init=False)
    layer = layer.to(device)
    x = torch.randn(6, 16, device=device)
    kept = saved_storages(lambda: layer(x))
    assert [tuple(t.shape) for t in kept.values() if t.shape[0] == 6] == [(6, 16), (6, 3)]  # x and z, no (6, 8) update


def test_unloading_takes_every_hook_off_the_model():
    peft_model, _ = lorsu_clip("cpu")
    hooked = [m for m in peft_model.modules() if type(m) is nn.LayerNorm and m._forward_hooks]
    scoped = [m for n, m in peft_model.named_modules() if n.endswith("self_attn") and m._forward_pre_hooks]
    assert len(hooked) == 4 and len(scoped) == 2
    copied = copy.deepcopy(peft_model)
    base = peft_model.merge_and_unload()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())
    # the copy's hooks are its own: still in place, and still working
    assert sum(bool(m._forward_hooks) for m in copied.modules() if type(m) is nn.LayerNorm) == 4
    batch = clip_batches()[0]
    kept, outputs = kept_norm_outputs(copied.train(), lambda: copied(**batch, return_loss=True))
    assert len(outputs) > 4 and not [n for n in kept if "vision_model.encoder" in n]


@pytest.mark.parametrize("name", [n for n in CASES if not CASES[n].fused])
def test_every_family_recomputes_its_norm_outputs(name):
    case = CASES[name]
    model, batches = case.build(), case.batches()
    config = probe_lorsu(model, make_config(case), batches, loss_fn=case.loss, show_progress=False)
    peft_model = get_peft_model(model, config).train()
    fed = [m for m in peft_model.modules() if isinstance(m, SparseLinear) or getattr(m, "z_scope", None) is not None]
    taps = [m.input_norm for m in fed if m.input_norm is not None]
    assert len(taps) == len(fed) >= 8  # q, k, v and fc1 of every adapted layer
    loss_fn = case.loss or default_loss
    kept, _ = kept_norm_outputs(peft_model, lambda: loss_fn(peft_model, batches[0]))
    norms = {id(t.norm) for t in taps}
    names = [n for n, m in peft_model.named_modules() if id(m) in norms]
    assert len(names) == len(taps) // 2 and not set(kept) & set(names)
