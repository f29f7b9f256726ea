"""What LoRSU's layers keep for backward: inputs recomputed from a LayerNorm, and the hooks that make it safe.

- :class:`NormInput` / :func:`normed_linear`: a linear whose input is a LayerNorm's output keeps the norm's input
  (which the norm keeps for its own backward anyway) and replays the norm in backward, instead of keeping an
  `(N, d)` activation. The replay is the same op with the same arguments and autocast state: the same bits.
- :class:`NormTap`: a forward hook on the norm that tells a layer whether its input *is* the norm's unmodified output.
- :class:`ForwardScope`: values that live for one call of a module (q, k and v share ``z = x V^T`` through the
  attention block's scope).
- :func:`add_to_columns`: ``out[..., columns] += delta`` keeping only the column indices for backward.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..compat import is_partitioned


@dataclass(frozen=True)
class NormReplay:
    """A LayerNorm call as it ran: its settings and the autocast state, to compute it again bit for bit."""

    normalized_shape: tuple[int, ...]
    eps: float
    autocast: tuple[bool, torch.dtype]  # (enabled, dtype) on the input's device

    def __call__(self, source: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        """`(..., d)` ``layer_norm(source)`` with the norm's `(d,)` ``weight`` and ``bias``."""
        enabled, dtype = self.autocast
        with torch.autocast(source.device.type, dtype=dtype, enabled=enabled):
            return F.layer_norm(source, self.normalized_shape, weight, bias, self.eps)


@dataclass(frozen=True)
class NormInput:
    """A linear's input ``x`` given as ``replay(source, weight, bias)``, so backward can recompute ``x``.

    When ``x`` is a LayerNorm's output, the norm's own backward keeps ``source`` (its input) alive anyway: keeping
    ``source`` and the norm's parameters costs nothing, while keeping ``x`` (or its selected columns) costs an
    `(N, C)` activation per layer. The replay is the same op with the same arguments and autocast state, so the value
    gradients are the same bits.

    Attributes:
        source: `(..., d)` the norm's input; weight / bias: `(d,)` its affine parameters, or ``None``.
    """

    source: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    replay: NormReplay


class _NormedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, compute_dtype, replay, source, norm_weight, norm_bias):
        ctx.compute_dtype, ctx.replay, ctx.x_dtype = compute_dtype, replay, x.dtype
        ctx.save_for_backward(source, norm_weight, norm_bias, weight)
        return F.linear(x.to(compute_dtype), weight.to(compute_dtype))

    @staticmethod
    def backward(ctx, grad_out):
        source, norm_weight, norm_bias, weight = ctx.saved_tensors
        cdt = ctx.compute_dtype
        g2 = grad_out.to(cdt).reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            x = ctx.replay(source, norm_weight, norm_bias).to(ctx.x_dtype).to(cdt)
            grad_w = (g2.t() @ x.reshape(-1, x.shape[-1])).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ weight.to(cdt)).view(*grad_out.shape[:-1], -1).to(ctx.x_dtype)
        return grad_x, grad_w, None, None, None, None, None


def normed_linear(x: torch.Tensor, weight: torch.Tensor, norm: NormInput | None = None) -> torch.Tensor:
    """``F.linear(x, weight)`` `(..., r)` for `(..., d)` ``x`` and `(r, d)` ``weight`` (no bias).

    With ``norm`` (``x`` is ``norm.replay(norm.source, ...)``, possibly cast to another dtype), backward recomputes
    ``x`` for the weight gradient instead of keeping it: an `(N, d)` activation less per call. Results and gradients
    are those of ``F.linear``, autocast included.
    """
    if norm is None or not torch.is_grad_enabled():
        return F.linear(x, weight)
    with torch.autocast(x.device.type, enabled=False):
        dtype = compute_dtype(x, weight)
        return _NormedLinear.apply(x, weight, dtype, norm.replay, norm.source, norm.weight, norm.bias)


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a linear on ``x`` computes in: autocast's when it is on for ``x``'s device, else ``weight``'s."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype


class _AddToColumns(torch.autograd.Function):
    # torch's index_add_ keeps its source for backward only to read its shape; this keeps the column indices alone.
    @staticmethod
    def forward(ctx, out, columns, delta):
        ctx.mark_dirty(out)
        ctx.save_for_backward(columns)
        return out.index_add_(-1, columns, delta)

    @staticmethod
    def backward(ctx, grad):
        (columns,) = ctx.saved_tensors
        return grad, None, grad.index_select(-1, columns)


def add_to_columns(out: torch.Tensor, columns: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``out[..., columns] += delta`` in place, returning ``out``.

    Same result and gradients as ``out.index_add_(-1, columns, delta)``, but backward keeps only ``columns``:
    ``index_add_`` also keeps ``delta``, an `(N, n_columns)` activation per call (per q, k and v of every layer).

    Args:
        out: `(N, d_out)`; columns: `(n,)` int64; delta: `(N, n)` in ``out``'s dtype.
    """
    if torch.compiler.is_compiling():  # dynamo does not trace in-place autograd Functions; the compiler keeps less
        return out.index_add_(-1, columns, delta)
    return _AddToColumns.apply(out, columns, delta)


class NormTap:
    """Watches the LayerNorm that feeds a layer (fc1, or q/k/v), so its backward can recompute the layer's input
    instead of keeping it.

    A forward hook on ``norm`` notes, by weak reference (nothing is kept alive), the input and output of its last
    call. :meth:`input_for` hands the layer a :class:`NormInput` only when the layer's input *is* that
    output, neither it nor the norm's input has been modified in place since, and the norm's weights are whole (not
    partitioned by DeepSpeed ZeRO-3, which gathers them only inside the norm's own backward). In any other case the
    layer keeps its input as before. Under ``torch.compile`` the tap stays idle: the compiler decides what to keep.
    """

    def __init__(self, norm: nn.LayerNorm) -> None:
        self.norm = norm  # a plain attribute: the norm stays a submodule of its own layer only
        self._last: tuple | None = None
        self._handle = norm.register_forward_hook(self._record)

    def _record(self, norm: nn.Module, args: tuple, output: object) -> None:
        if torch.compiler.is_compiling():
            return
        self._last = None
        if not args or not isinstance(output, torch.Tensor):
            return
        source = args[0]
        device = source.device.type
        autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        self._last = (weakref.ref(source), source._version, weakref.ref(output), output._version, autocast)

    def input_for(self, x: torch.Tensor) -> NormInput | None:
        """The norm's call that produced ``x``, or ``None`` when ``x`` is not (or no longer) its output."""
        last = self._last
        if last is None or torch.compiler.is_compiling():
            return None
        source_ref, source_version, output_ref, output_version, autocast = last
        source, norm = source_ref(), self.norm
        if output_ref() is not x or x._version != output_version or source is None:
            return None
        if source._version != source_version or is_partitioned(norm.weight) or is_partitioned(norm.bias):
            return None
        replay = NormReplay(tuple(norm.normalized_shape), norm.eps, autocast)
        return NormInput(source, norm.weight, norm.bias, replay)

    def remove(self) -> None:
        """Take the hook off the norm."""
        self._handle.remove()


class ForwardScope:
    """Values that live for one forward call of ``module``, emptied by hooks when the call starts and when it ends.

    q, k and v share their ``z = x V^T`` through the attention block's scope. Tying the values' lifetime to the block's
    call makes every call, including one that activation checkpointing recomputes in backward, share in the same way
    (the recomputation must keep the same tensors as the first pass), and keeps nothing alive after the block returns.
    Idle under ``torch.compile``.
    """

    def __init__(self, module: nn.Module) -> None:
        self.values: dict[str, tuple] = {}
        self.open = False
        self._handles = (module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._exit))

    def _enter(self, module: nn.Module, args: tuple) -> None:
        if not torch.compiler.is_compiling():
            self.values.clear()
            self.open = True

    def _exit(self, module: nn.Module, args: tuple, output: object) -> None:
        if not torch.compiler.is_compiling():
            self.values.clear()
            self.open = False

    def remove(self) -> None:
        """Take the hooks off the module."""
        for handle in self._handles:
            handle.remove()
