"""The sparse fc1 kernel's numbers in fp32 and bf16: fp32 value gradients equal the dense weight gradient's entries,
and in bf16 (a bf16 model, or an fp32 model under ``torch.autocast``) the sums over tokens are accumulated in fp32
and rounded once, which a bf16 running sum would not satisfy. On the CPU and, where present, on CUDA."""

from __future__ import annotations

import pytest
import torch

from peft_lorsu.lorsu.functional import sparse_delta_linear, sparse_pattern

N, M, D = 4096, 24, 16  # many tokens: the sums the value and bias gradients take are long
# One bf16 rounding of a result is at most 2**-9 relative; allow 2**-8. A bf16 running sum over N positive terms
# stalls once the sum's spacing exceeds a term, far beyond this.
BF16_ONCE = 2**-8


def positive_inputs(device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input `(N, D)`, upstream gradient `(N, M)`, weight `(M, D)` and 60 sorted flat indices, inputs in [0.5, 1.5)
    so every gradient entry is a sum of N positive products (no cancellation hides an accumulation error)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N, D, generator=g) + 0.5
    upstream = torch.rand(N, M, generator=g) + 0.5
    weight = torch.randn(M, D, generator=g) * 0.1
    indices = torch.randperm(M * D, generator=g)[:60].sort().values.int()
    return x.to(device), upstream.to(device), weight.to(device), indices.to(device)


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((got.double() - exact).abs() / exact.abs()).max())


def bf16_running_sum(upstream: torch.Tensor, x: torch.Tensor, tokens: int = 8) -> torch.Tensor:
    """``upstream^T x`` `(M, D)` summed ``tokens`` positions at a time into a bf16 accumulator (what the kernel must
    not do)."""
    acc = torch.zeros(upstream.shape[1], x.shape[1], dtype=torch.bfloat16, device=x.device)
    for start in range(0, x.shape[0], tokens):
        acc = acc + upstream[start : start + tokens].t() @ x[start : start + tokens]
    return acc


def test_fp32_value_gradients_are_the_dense_weight_gradients_entries(device):
    torch.manual_seed(0)
    x = torch.randn(300, 40, device=device)
    weight = torch.randn(96, 40, device=device)
    rows, cols = torch.tensor([3, 7, 8, 50, 90]), torch.tensor([0, 5, 6, 21, 39])
    indices = (rows[:, None] * 40 + cols[None, :]).reshape(-1).sort().values.to(device, torch.int32)
    values = torch.randn(indices.numel(), device=device, requires_grad=True)
    upstream = torch.randn(300, 96, device=device)
    pattern = sparse_pattern([indices], (96, 40))
    assert pattern.compact
    sparse_delta_linear(x, weight, None, [(values, indices)], pattern).backward(upstream)
    dense = (upstream.t() @ x).reshape(-1)[indices.long()]  # the plain fp32 weight gradient's entries
    torch.testing.assert_close(values.grad, dense)


@pytest.mark.parametrize("path", ["bf16_model", "autocast"])
def test_bf16_value_and_bias_gradients_accumulate_in_fp32(device, path):
    x, upstream, weight, indices = positive_inputs(device)
    x16, upstream16 = x.bfloat16(), upstream.bfloat16()
    # exact sums of the bf16 operands the kernel sees (autocast casts x and the upstream gradient to bf16 too)
    exact = upstream16.double().t() @ x16.double()
    dtype = torch.bfloat16 if path == "bf16_model" else torch.float32
    values = torch.zeros(indices.numel(), dtype=dtype, device=device, requires_grad=True)
    bias = torch.zeros(M, dtype=dtype, device=device, requires_grad=True)
    pattern = sparse_pattern([indices], (M, D))
    if path == "bf16_model":
        out = sparse_delta_linear(x16, weight.bfloat16(), bias, [(values, indices)], pattern)
        out.backward(upstream16)
    else:
        with torch.autocast(device, dtype=torch.bfloat16):
            out = sparse_delta_linear(x, weight, bias, [(values, indices)], pattern)
        assert out.dtype == torch.bfloat16
        out.float().backward(upstream)
    assert values.grad.dtype == bias.grad.dtype == dtype
    assert relative_error(values.grad, exact.reshape(-1)[indices.long()]) < BF16_ONCE
    assert relative_error(bias.grad, upstream16.double().sum(0)) < BF16_ONCE
    # the bound is tight enough to catch a bf16 accumulator: summing 8 tokens at a time into bf16 misses it widely
    assert (
        relative_error(
            bf16_running_sum(upstream16, x16).reshape(-1)[indices.long()], exact.reshape(-1)[indices.long()]
        )
        > 8 * BF16_ONCE
    )
