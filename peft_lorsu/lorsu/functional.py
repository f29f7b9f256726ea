"""Autograd kernels of LoRSU's sparse fc1 update.

``sparse_delta_linear`` computes ``x @ (W + sum_a scatter(values_a, indices_a))^T + b`` where ``W`` `(m, d)` is the
frozen fc1 weight and each adapter ``a`` contributes S values at fixed flat indices into ``W``. Autograd through a
dense scatter would keep a weight-sized tensor alive until backward for every layer; this function rebuilds
``W + delta`` when it needs it and returns gradients for the S values alone, so the optimizer never sees (or stores
state for) a weight-sized tensor.

Cost of the value gradients. They are S entries of the weight gradient ``g^T x`` `(m, d)`. At LoRSU's densities a
dense GEMM followed by a gather is faster than a sampled kernel (``torch.sparse.sampled_addmm`` took 1.7x the dense
GEMM at 10% density on CPU; see ``docs/benchmarks/perf.md``), so the kernel computes a dense block, but only over the
rows and columns of ``W`` that hold a selected entry (a :class:`SparsePattern`), and keeps only those columns of the
input for backward, or nothing of it when the input is a LayerNorm's output (a :class:`NormInput`): the norm keeps
its own input for its backward anyway, so backward recomputes the norm from that tensor instead. A gradient-probe
selection concentrates on part of fc1 (on a random ViT-B/16, 44% of the rows and 80% of the columns; on the trained
mini-CLIP of ``peft_lorsu/assets``, 35-70% of the rows), which makes that block a fraction of the full product; a
uniformly random selection touches every row and column and gets the full product.
The block is computed in row chunks, and the input gradient ``g @ (W + delta)`` rebuilds ``W + delta`` chunk by
chunk as well, so backward holds no weight-sized temporary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .saved_inputs import NormInput
from .saved_inputs import compute_dtype as compute_dtype_of

# The compact block is used when it has at most this fraction of the weight's entries. Its extra cost is two gathers
# (rows of g, columns of x: memory-bound copies, ~3% of the full product on a ViT-B/16 fc1), so it pays off early.
COMPACT_BELOW = 0.9
# The value gradients are computed in chunks of at most this many rows of the block, so backward never holds a
# weight-sized block (nor a full copy of g's selected rows) at once; the products stay large enough for full speed.
# The chunks are fixed with the pattern, so backward needs no host synchronisation (and torch.compile no graph break).
CHUNK_ROWS = 512


@dataclass(frozen=True)
class SparsePattern:
    """Where sets of flat indices into an `(m, d)` weight fall: the block of rows and columns they use.

    The per-entry positions inside the block are not stored: backward derives them from the indices chunk by chunk
    (``row_pos[i // d] * C + col_pos[i % d]``: a few passes over S integers, small next to the block's product),
    which keeps S more integers per layer out of memory between steps.

    Attributes:
        shape: `(m, d)`.
        rows: `(R,)` int64, ascending rows of the block (every row when the block is not ``compact``).
        cols: `(C,)` int64, ascending columns of the block (every column when it is not ``compact``).
        row_pos: `(m,)` position of each used row inside the block (unused rows: any value), indices' dtype.
        col_pos: `(d,)` the same for columns.
        order: per index set, ``None`` when its indices are ascending, else the permutation that sorts them.
        compact: whether the block is a strict part of the weight (otherwise the full product is computed).
        chunks: ``(row_start, row_stop)`` of each chunk of at most ``CHUNK_ROWS`` block rows.
        bounds: per index set, per chunk, ``(lo, hi)``: the chunk holds the set's sorted entries ``lo:hi``. Python
            ints, computed once with the pattern.
        weight_bounds: per index set, per chunk of ``CHUNK_ROWS`` rows of the *weight* (``weight_chunks``), the
            ``(lo, hi)`` of the set's sorted entries that fall in it: what the input gradient adds to each chunk.
    """

    shape: tuple[int, int]
    rows: torch.Tensor
    cols: torch.Tensor
    row_pos: torch.Tensor
    col_pos: torch.Tensor
    order: tuple[torch.Tensor | None, ...]
    compact: bool
    chunks: tuple[tuple[int, int], ...]
    bounds: tuple[tuple[tuple[int, int], ...], ...]
    weight_bounds: tuple[tuple[tuple[int, int], ...], ...] = ()

    @property
    def weight_chunks(self) -> tuple[tuple[int, int], ...]:
        """``(row_start, row_stop)`` of each chunk of at most ``CHUNK_ROWS`` rows of the `(m, d)` weight."""
        m = self.shape[0]
        return tuple((start, min(m, start + CHUNK_ROWS)) for start in range(0, m, CHUNK_ROWS))

    def sorted_entries(self, k: int, tensor: torch.Tensor, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Entries ``lo:hi``, in ascending index order, of set ``k``'s `(S_k,)` ``tensor`` (indices or values)."""
        perm = self.order[k]
        return tensor[lo:hi] if perm is None else tensor.index_select(0, perm[lo:hi])

    @property
    def block_fraction(self) -> float:
        """``R * C / (m * d)``: the share of the full weight gradient the value gradients compute."""
        return self.rows.numel() * self.cols.numel() / (self.shape[0] * self.shape[1])

    def positions(self, k: int, indices: torch.Tensor, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Positions inside the flattened `(R, C)` block of index set ``k``'s sorted entries ``lo:hi``.

        Args:
            indices: `(S_k,)` the flat indices the pattern was built from.
        """
        part = self.sorted_entries(k, indices, lo, hi)
        return _block_positions(part, self) if self.compact else part


def _block_positions(flat: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """Positions inside ``pattern``'s flattened compact block of the flat indices ``flat`` into the weight."""
    d = pattern.shape[1]
    return pattern.row_pos[flat // d] * pattern.cols.numel() + pattern.col_pos[flat % d]


def index_dtype(numel: int) -> torch.dtype:
    """The narrowest index dtype for flat indices into ``numel`` entries: int32 below 2**31 (half of int64's memory;
    ``index_add`` / ``index_select`` take either), else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


def sparse_pattern(indices: Sequence[torch.Tensor], shape: tuple[int, int]) -> SparsePattern:
    """The :class:`SparsePattern` of one or more sets of flat indices `(S_a,)` into a weight of ``shape`` `(m, d)`."""
    m, d = shape
    if not indices:
        raise ValueError("sparse_pattern needs at least one index tensor")
    flat = torch.cat(list(indices)) if len(indices) > 1 else indices[0]
    device = flat.device
    row_used = torch.zeros(m, dtype=torch.bool, device=device)
    col_used = torch.zeros(d, dtype=torch.bool, device=device)
    row_used[flat // d] = True
    col_used[flat % d] = True
    compact = int(row_used.sum()) * int(col_used.sum()) <= COMPACT_BELOW * m * d
    if compact:
        rows, cols = row_used.nonzero().squeeze(1), col_used.nonzero().squeeze(1)
    else:
        rows, cols = torch.arange(m, device=device), torch.arange(d, device=device)
    # position of every used row / column inside the block (meaningless for unused ones, which no index reaches)
    row_pos = (row_used.to(flat.dtype).cumsum(0) - 1).to(flat.dtype)
    col_pos = (col_used.to(flat.dtype).cumsum(0) - 1).to(flat.dtype)
    pattern = SparsePattern((m, d), rows, cols, row_pos, col_pos, (), compact, (), ())
    order: list[torch.Tensor | None] = []
    local = []  # per set, its positions in the block, sorted (only to find the chunk bounds)
    in_weight = []  # per set, its flat indices in the same order
    for idx in indices:
        positions = _block_positions(idx, pattern) if compact else idx
        if positions.numel() > 1 and not bool((positions[1:] >= positions[:-1]).all()):
            perm = torch.argsort(positions, stable=True)
            order.append(perm)
            local.append(positions[perm])
            in_weight.append(idx[perm])
        else:
            order.append(None)
            local.append(positions)
            in_weight.append(idx)
    n_rows, n_cols = rows.numel(), cols.numel()
    chunks = tuple((start, min(n_rows, start + CHUNK_ROWS)) for start in range(0, n_rows, CHUNK_ROWS))
    edges = torch.tensor([0, *(stop for _, stop in chunks)], device=device) * n_cols
    pattern = dataclasses.replace(pattern, order=tuple(order), chunks=chunks)
    # The block's row order is the weight's (rows ascend), so sorting by block position sorts by flat index too.
    weight_edges = torch.tensor([0, *(stop for _, stop in pattern.weight_chunks)], device=device) * d
    return dataclasses.replace(
        pattern, bounds=_chunk_bounds(local, edges), weight_bounds=_chunk_bounds(in_weight, weight_edges)
    )


def _chunk_bounds(sorted_sets: list[torch.Tensor], edges: torch.Tensor) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per ascending set, the ``(lo, hi)`` of its entries in ``[edges[c], edges[c + 1])`` for every chunk ``c``."""
    bounds = []
    for positions in sorted_sets:
        cut = torch.searchsorted(positions, edges.to(positions.dtype)).tolist()
        bounds.append(tuple(zip(cut[:-1], cut[1:])))
    return tuple(bounds)


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


def sampled_weight_grad(
    grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, pattern: SparsePattern | None = None
) -> torch.Tensor:
    """Entries ``indices`` (flat, into ``(m, d)``) of the weight gradient ``grad_out^T @ x``.

    Args:
        grad_out: `(N, m)`; x: `(N, d)`; indices: `(S,)`.
        pattern: the pattern of ``indices`` alone (computed when not given).

    Returns:
        `(S,)`.
    """
    pattern = pattern or sparse_pattern([indices], (grad_out.shape[-1], x.shape[-1]))
    return _value_grads(grad_out, x, pattern, [indices])[0]


def _take_columns(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """`(N, C)` columns ``cols`` of `(N, d)` ``x``, without a copy when every column is kept."""
    return x if cols.numel() == x.shape[-1] else x.index_select(-1, cols)


def _value_grads(
    g: torch.Tensor, x_kept: torch.Tensor, pattern: SparsePattern, indices: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Value gradients `(S_a,)` per index set from `(N, m)` ``g`` and `(N, d)` or `(N, C)` input columns ``x_kept``.

    ``indices`` are the flat indices the pattern was built from.
    """
    x_block = _take_columns(x_kept, pattern.cols)  # (N, C)
    n_cols = pattern.cols.numel()
    all_rows = pattern.rows.numel() == pattern.shape[0]
    sorted_grads = [g.new_empty(idx.numel()) for idx in indices]
    for c, (start, stop) in enumerate(pattern.chunks):
        spans = [(k, out, *pattern.bounds[k][c]) for k, out in enumerate(sorted_grads)]
        if all(hi == lo for *_, lo, hi in spans):
            continue
        g_rows = g[:, start:stop] if all_rows else g.index_select(-1, pattern.rows[start:stop])
        block = (g_rows.t() @ x_block).reshape(-1)  # ((stop - start) * C,)
        for k, out, lo, hi in spans:
            if hi > lo:
                out[lo:hi] = block.index_select(0, pattern.positions(k, indices[k], lo, hi) - start * n_cols)
    grads = []
    for out, perm in zip(sorted_grads, pattern.order):
        if perm is not None:
            out = torch.empty_like(out).index_copy_(0, perm, out)
        grads.append(out)
    return grads


def _input_grad(g: torch.Tensor, weight: torch.Tensor, pairs: list, pattern: SparsePattern) -> torch.Tensor:
    """``g @ (W + delta)`` `(N, d)` from `(N, m)` ``g``, rebuilding ``W + delta`` in chunks of rows of ``W``.

    A chunk without a selected entry is multiplied as it is; the others are copied and get their entries added. The
    copies are ``CHUNK_ROWS`` rows, not a weight-sized rebuild.
    """
    d = weight.shape[1]
    out = None
    for c, (start, stop) in enumerate(pattern.weight_chunks):
        spans = [(k, *pattern.weight_bounds[k][c]) for k in range(len(pairs))]
        touched = any(hi > lo for _, lo, hi in spans)
        w = weight[start:stop].to(g.dtype, copy=touched)
        if touched:
            flat = w.view(-1)
            for k, lo, hi in spans:
                if hi > lo:
                    values, indices = pairs[k]
                    where = pattern.sorted_entries(k, indices, lo, hi) - start * d
                    flat.index_add_(0, where, pattern.sorted_entries(k, values, lo, hi).to(w.dtype))
        part = g[:, start:stop]
        out = part @ w if out is None else out.addmm_(part, w)
    return out


class _SparseDeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, compute_dtype, pattern, norm, *flat):
        pairs = list(zip(flat[0::2], flat[1::2]))
        w = scatter_delta(weight.to(compute_dtype), pairs)
        b = None if bias is None else bias.to(compute_dtype)
        x_c = x.to(compute_dtype)
        out = F.linear(x_c, w, b)
        ctx.compute_dtype, ctx.x_dtype, ctx.pattern, ctx.x_shape = compute_dtype, x.dtype, pattern, x.shape
        ctx.has_bias = bias is not None
        x2 = x_c.reshape(-1, x.shape[-1])
        # Keep only what backward reads: all of x for a dense weight gradient, else the norm's input to recompute x
        # from, else the selected columns.
        values_need_grad = any(v.requires_grad for v in flat[0::2])
        ctx.replay = None
        if weight.requires_grad:
            kept = [x2]
        elif values_need_grad and norm is not None:
            ctx.replay = norm.replay  # the tensors go through save_for_backward (version checks, saved-tensor hooks)
            kept = [norm.source, norm.weight, norm.bias]
        elif values_need_grad:
            kept = [_take_columns(x2, pattern.cols)]
        else:
            kept = [x2.new_empty(0)]
        ctx.n_kept = len(kept)
        ctx.save_for_backward(*kept, weight, *flat)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        kept, weight, flat = saved[: ctx.n_kept], saved[ctx.n_kept], saved[ctx.n_kept + 1 :]
        if ctx.replay is not None:
            x = ctx.replay(*kept).to(ctx.compute_dtype)
            kept = _take_columns(x.reshape(-1, x.shape[-1]), ctx.pattern.cols)
        else:
            kept = kept[0]
        pairs = list(zip(flat[0::2], flat[1::2]))
        cdt = ctx.compute_dtype
        g2 = grad_out.to(cdt).reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_w = (g2.t() @ kept).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        # Value gradients before the input gradient: their temporaries are freed before the input gradient is
        # allocated, which lowers the peak of the backward pass.
        wanted = [ctx.needs_input_grad[6 + 2 * i] for i in range(len(pairs))]
        grad_flat: list[torch.Tensor | None] = [None] * len(flat)
        if any(wanted):
            indices = [idx for _, idx in pairs]
            if grad_w is not None:
                grads = [grad_w.reshape(-1).index_select(0, idx) for idx in indices]
            else:
                grads = _value_grads(g2, kept, ctx.pattern, indices)
            for i, ((values, _), gv) in enumerate(zip(pairs, grads)):
                if wanted[i]:
                    grad_flat[2 * i] = gv.to(values.dtype)
        del kept
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(g2, weight, pairs, ctx.pattern).view(ctx.x_shape).to(ctx.x_dtype)
        return (grad_x, grad_w, grad_b, None, None, None, *grad_flat)


def sparse_delta_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    deltas: Sequence[tuple[torch.Tensor, torch.Tensor]],
    pattern: SparsePattern | None = None,
    norm: NormInput | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight + sparse deltas, bias)`` with gradients only for the sparse values (and ``bias``).

    Args:
        x: `(..., d)`.
        weight: `(m, d)`, frozen base weight.
        bias: `(m,)` or ``None``; may require grad (e.g. base bias plus a trained bias delta).
        deltas: pairs of values `(S,)` and int64 flat indices `(S,)`, one pair per active adapter.
        pattern: ``sparse_pattern([indices of each pair], (m, d))``; pass it when the indices are reused across calls
            (it is computed here otherwise).
        norm: when ``x`` is ``layer_norm(norm.source)``, backward recomputes ``x`` from ``norm.source`` instead of
            keeping it. The caller vouches that ``x`` is that norm's unmodified output.

    Returns:
        `(..., m)` in the autocast dtype when autocast is on, else in ``weight``'s dtype.
    """
    if not deltas:
        return F.linear(x, weight, bias)
    tensors = [x, weight, bias, *(values for values, _ in deltas)]
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        # inference: nothing to keep for backward
        return F.linear(x, scatter_delta(weight, deltas), bias)
    compute_dtype = compute_dtype_of(x, weight)
    if pattern is None:
        pattern = sparse_pattern([indices for _, indices in deltas], tuple(weight.shape))
    flat = [t for pair in deltas for t in pair]
    with torch.autocast(x.device.type, enabled=False):
        return _SparseDeltaLinear.apply(x, weight, bias, compute_dtype, pattern, norm, *flat)
