"""LoRSU's fast paths give the same numbers as the plain formulas: the sparse fc1 kernel (compact and full weight
gradient, several adapters, trained bias, autocast), the q/k/v update with one shared ``z = x V^T`` and folded bias.
Each runs on the CPU and, where one is present, on CUDA (the ``device`` fixture)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peft_lorsu import HeadLoRALinear, SparseLinear
from peft_lorsu.lorsu import functional
from peft_lorsu.lorsu.functional import sparse_delta_linear, sparse_pattern

M, D = 12, 8  # fc1 shape (m, d)


def dense_reference(x, weight, bias, deltas):
    """Output and value gradients through a dense weight with the values scattered in (what the kernel replaces)."""
    w = weight.detach().clone().reshape(-1)
    leaves = [v.detach().clone().requires_grad_(True) for v, _ in deltas]
    for leaf, (_, idx) in zip(leaves, deltas):
        w = w.index_add(0, idx, leaf)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = nn.functional.linear(x_ref, w.view(M, D), b)
    out.pow(2).sum().backward()
    return out, [leaf.grad for leaf in leaves], None if b is None else b.grad, x_ref.grad


def concentrated_indices(n: int, rows: list[int], cols: list[int], seed: int = 0) -> torch.Tensor:
    """``n`` distinct flat indices inside the given rows x cols (a pattern the compact path handles)."""
    grid = torch.tensor([r * D + c for r in rows for c in cols])
    pick = torch.randperm(grid.numel(), generator=torch.Generator().manual_seed(seed))[:n]
    return grid[pick].sort().values


@pytest.mark.parametrize("kind", ["compact", "full", "two_adapters"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("chunk_rows", [512, 5])  # one chunk; or chunks of rows, some with no selected entry
def test_sparse_kernel_matches_dense_reference(kind, index_dtype, chunk_rows, device, monkeypatch):
    monkeypatch.setattr(functional, "CHUNK_ROWS", chunk_rows)
    torch.manual_seed(0)
    weight = torch.randn(M, D, dtype=torch.float64, device=device)
    bias = torch.randn(M, dtype=torch.float64, device=device, requires_grad=True)
    if kind == "compact":
        index_sets = [concentrated_indices(10, rows=[1, 4, 5], cols=[0, 2, 3, 7])]
    elif kind == "full":
        index_sets = [torch.randperm(M * D)[:40].sort().values]
    else:
        index_sets = [concentrated_indices(6, [0, 1], [1, 2, 5]), concentrated_indices(5, [1, 9], [2, 6], seed=1)]
    index_sets = [i.to(device, index_dtype) for i in index_sets]
    pattern = sparse_pattern(index_sets, (M, D))
    assert pattern.compact == (kind != "full")
    if chunk_rows == 5 and kind != "full":  # rows 10-11 hold no entry: that chunk is multiplied without a copy
        assert len(pattern.weight_chunks) == 3 and all(b[2][0] == b[2][1] for b in pattern.weight_bounds)
    deltas = [(torch.randn(len(i), dtype=torch.float64, device=device, requires_grad=True), i) for i in index_sets]
    x = torch.randn(3, 5, D, dtype=torch.float64, device=device, requires_grad=True)

    out = sparse_delta_linear(x, weight, bias, deltas, pattern=pattern)
    out.pow(2).sum().backward()
    ref_out, ref_value_grads, ref_bias_grad, ref_x_grad = dense_reference(x, weight, bias, deltas)

    torch.testing.assert_close(out, ref_out)
    for (values, _), expected in zip(deltas, ref_value_grads):
        torch.testing.assert_close(values.grad, expected)
    torch.testing.assert_close(bias.grad, ref_bias_grad)
    torch.testing.assert_close(x.grad, ref_x_grad)


def test_sparse_kernel_with_trainable_weight_returns_the_full_gradient(device):
    torch.manual_seed(1)
    weight = torch.randn(M, D, device=device, requires_grad=True)
    indices = concentrated_indices(6, [2, 3], [1, 4, 6]).to(device)
    values = torch.randn(6, device=device, requires_grad=True)
    x = torch.randn(7, D, device=device)
    sparse_delta_linear(x, weight, None, [(values, indices)]).sum().backward()
    expected = torch.ones(7, M, device=device).t() @ x
    torch.testing.assert_close(weight.grad, expected)
    torch.testing.assert_close(values.grad, expected.reshape(-1)[indices])


def test_sparse_kernel_under_autocast(device):
    layer = SparseLinear(
        nn.Linear(D, M), "default", num_values=5, indices=torch.tensor([0, 9, 17, 40, 95]), init=False
    ).to(device)
    x = torch.randn(4, D, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    values = layer.lorsu_values["default"]
    assert values.grad is not None and values.grad.dtype == values.dtype and torch.isfinite(values.grad).all()


def test_sparse_layer_computes_its_pattern_once_and_again_after_a_load(device):
    layer = SparseLinear(nn.Linear(D, M), "default", num_values=4, indices=torch.tensor([1, 2, 9, 10]), init=False)
    layer = layer.to(device)
    key = (("default",), layer.lorsu_indices["default"].device)
    x = torch.randn(2, D, device=device)
    layer(x)
    first = layer.patterns[key]
    layer(x)
    assert layer.patterns[key] is first
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["lorsu_indices.default"] = torch.tensor([3, 20, 50, 90])
    layer.load_state_dict(state)  # new indices arrive only through a load (or update_layer): both clear it
    assert not layer.patterns
    out = layer(x)
    pattern = layer.patterns[key]
    assert pattern is not first and pattern.rows.tolist() == sorted({i // D for i in (3, 20, 50, 90)})
    expected = nn.functional.linear(x, layer.get_base_layer().weight + layer.get_delta_weight("default"))
    torch.testing.assert_close(out, expected + layer.get_base_layer().bias)


def qkv_layers(share: bool, dropout: float = 0.0, device: str = "cpu") -> list[HeadLoRALinear]:
    torch.manual_seed(0)
    width, head_dim = 16, 4
    kwargs = dict(
        r=3, lora_alpha=6, lora_dropout=dropout, heads=[1, 3], head_dim=head_dim, train_bias=True, init=False
    )
    owner = HeadLoRALinear(nn.Linear(width, width), "default", **kwargs)
    others = [
        HeadLoRALinear(nn.Linear(width, width), "default", factor_owner=owner if share else None, **kwargs)
        for _ in range(2)
    ]
    return [layer.to(device) for layer in (owner, *others)]


def plain_head_update(layer: HeadLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """``base(x) + bias delta + scatter_rows(scale * x V^T U^T)`` written out."""
    base = layer.get_base_layer()
    delta = x @ layer.factor("default").t() @ layer.lorsu_U["default"].t() * layer.scaling["default"]
    out = base(x) + layer.lorsu_bias["default"]
    return out.index_add(-1, layer.lorsu_rows["default"], delta)


def test_shared_factor_gives_the_plain_outputs_and_gradients(device):
    layers = qkv_layers(share=True, device=device)
    reference = copy.deepcopy(layers)  # the copies share one V as well
    assert all(layer.factor("default") is layers[0].lorsu_V["default"] for layer in layers)
    x = torch.randn(2, 5, 16, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)

    outs = [layer(x) for layer in layers]
    sum(o.pow(2).sum() for o in outs).backward()
    ref_outs = [plain_head_update(layer, x_ref) for layer in reference]
    sum(o.pow(2).sum() for o in ref_outs).backward()

    for out, ref in zip(outs, ref_outs):
        torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    # q, k and v all contribute to the one shared V's gradient
    torch.testing.assert_close(layers[0].lorsu_V["default"].grad, reference[0].lorsu_V["default"].grad)
    assert sorted(layers[0].lorsu_V) == ["default"] and not layers[1].lorsu_V and not layers[2].lorsu_V
    for layer, ref in zip(layers, reference):
        torch.testing.assert_close(layer.lorsu_U["default"].grad, ref.lorsu_U["default"].grad)
        torch.testing.assert_close(layer.lorsu_bias["default"].grad, ref.lorsu_bias["default"].grad)


def test_shared_factor_follows_an_update_of_v(device):
    q, k, _ = qkv_layers(share=True, device=device)
    x = torch.randn(3, 16, device=device)
    before = k(x)
    with torch.no_grad():
        q.lorsu_V["default"].add_(1.0)
    after = k(x)
    torch.testing.assert_close(after, plain_head_update(k, x))
    assert not torch.allclose(before, after)


def test_dropout_draws_a_mask_per_projection(device):
    layers = qkv_layers(share=True, dropout=0.5, device=device)
    x = torch.randn(4, 16, device=device)
    torch.manual_seed(0)
    outs = [layer.train()(x) - layer.get_base_layer()(x) for layer in layers]
    torch.manual_seed(0)
    again = [layer(x) - layer.get_base_layer()(x) for layer in layers]
    torch.testing.assert_close(outs, again)  # seeded: reproducible
    assert not torch.allclose(outs[1], outs[2])


@pytest.mark.parametrize("concentrated", [True, False])
def test_value_gradients_in_row_chunks_and_for_unsorted_indices(monkeypatch, concentrated, device):
    """Chunked weight-gradient blocks and indices in any order give the entries of the dense ``g^T x``."""
    monkeypatch.setattr(functional, "CHUNK_ROWS", 3)  # a few rows per chunk
    torch.manual_seed(2)
    g = torch.randn(5, 40, dtype=torch.float64, device=device)
    x = torch.randn(5, 12, dtype=torch.float64, device=device)
    if concentrated:
        indices = torch.tensor([r * 12 + c for r in (33, 3, 20, 9) for c in (7, 1, 5)], device=device)
    else:
        indices = torch.randperm(40 * 12)[:300].to(device)
    pattern = sparse_pattern([indices], (40, 12))
    assert pattern.compact == concentrated and pattern.order[0] is not None
    expected = (g.t() @ x).reshape(-1)[indices]
    torch.testing.assert_close(functional.sampled_weight_grad(g, x, indices, pattern), expected)


def test_sparse_layer_inference_path_matches_training_path(device):
    layer = SparseLinear(
        nn.Linear(D, M), "default", num_values=5, indices=torch.tensor([3, 9, 17, 40, 95]), init=False
    ).to(device)
    x = torch.randn(2, 3, D, device=device)
    with torch.no_grad():
        fast = layer(x)
    torch.testing.assert_close(fast, layer(x).detach())
