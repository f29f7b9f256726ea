"""Autograd kernels of LoRSU's sparse fc1 update.

``sparse_delta_linear`` computes ``x @ (W + sum_a scatter(values_a, indices_a))^T + b`` where ``W`` (m x d) is the
frozen fc1 weight and each adapter ``a`` contributes S values at fixed flat indices into ``W``. Autograd through a
dense scatter would keep a weight-sized tensor alive until backward for every layer; this function saves only the
inputs, rebuilds ``W + delta`` in backward, and returns gradients for the S values alone, so the optimizer never
sees (or stores state for) a weight-sized tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def scatter_delta(weight: torch.Tensor, deltas: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``weight + sum scatter(values, indices)`` as a new tensor of ``weight``'s shape and dtype.

    Args:
        weight: `(m, d)`.
        deltas: pairs of values `(S,)` (any float dtype) and flat indices `(S,)` (int64, into ``m * d``).
    """
    flat = weight.reshape(-1)
    for values, indices in deltas:
        flat = flat.index_add(0, indices, values.to(weight.dtype))
    return flat.view_as(weight)


def sampled_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Entries ``indices`` (flat, into ``(m, d)``) of the weight gradient ``grad_out^T @ x``.

    Args:
        grad_out: `(N, m)`; x: `(N, d)`; indices: `(S,)`. Returns `(S,)`.
    """
    return (grad_out.t() @ x).reshape(-1).index_select(0, indices)


class _SparseDeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, compute_dtype, *flat):
        pairs = list(zip(flat[0::2], flat[1::2]))
        w = scatter_delta(weight.to(compute_dtype), pairs)
        b = None if bias is None else bias.to(compute_dtype)
        ctx.compute_dtype = compute_dtype
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, *flat)
        return F.linear(x.to(compute_dtype), w, b)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, *flat = ctx.saved_tensors
        pairs = list(zip(flat[0::2], flat[1::2]))
        cdt = ctx.compute_dtype
        g = grad_out.to(cdt)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ scatter_delta(weight.to(cdt), pairs)).to(x.dtype)
        g2, x2 = g.reshape(-1, g.shape[-1]), x.to(cdt).reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = (g2.t() @ x2).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        grad_flat = []
        for i, (values, indices) in enumerate(pairs):
            needs = ctx.needs_input_grad[4 + 2 * i]
            if not needs:
                grad_flat += [None, None]
                continue
            if grad_w is not None:
                gv = grad_w.reshape(-1).index_select(0, indices)
            else:
                gv = sampled_weight_grad(g2, x2, indices)
            grad_flat += [gv.to(values.dtype), None]
        return (grad_x, grad_w, grad_b, None, *grad_flat)


def sparse_delta_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    deltas: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """``F.linear(x, weight + sparse deltas, bias)`` with gradients only for the sparse values.

    Args:
        x: `(..., d)`.
        weight: `(m, d)`, frozen base weight.
        bias: `(m,)` or ``None``.
        deltas: pairs of values `(S,)` and int64 flat indices `(S,)`, one pair per active adapter.

    Returns:
        `(..., m)` in the autocast dtype when autocast is on, else in ``weight``'s dtype.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = weight.dtype
    flat = [t for pair in deltas for t in pair]
    with torch.autocast(device_type, enabled=False):
        return _SparseDeltaLinear.apply(x, weight, bias, compute_dtype, *flat)
