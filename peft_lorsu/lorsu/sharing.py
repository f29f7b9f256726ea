"""Computing the shared input-side product ``z = x V^T`` once for q, k and v.

With ``share_qkv_factor`` the three projections of an attention block read one ``V`` `(r, d)` and are called one
after the other on the same input ``x`` `(..., d)`. Computing ``z`` `(..., r)` once instead of three times saves two
`(N, d) x (d, r)` products in forward, and in backward autograd sums the three ``dz`` first, so ``dV`` and ``dx``
cost one product each instead of three. The layer owning ``V`` keeps a :class:`SharedFactorInput`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def version_of(tensor: torch.Tensor) -> int:
    """The in-place version counter of ``tensor`` (``-1`` for inference tensors, which have none)."""
    return -1 if tensor.is_inference() else tensor._version


def _context(x: torch.Tensor) -> tuple:
    """What else ``z`` depends on: grad mode and autocast state."""
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    return torch.is_grad_enabled(), autocast, torch.get_autocast_dtype(device) if autocast else None


@dataclass
class _Entry:
    x: torch.Tensor
    key: tuple
    z: torch.Tensor
    served: set[int] = field(default_factory=set)


class SharedFactorInput:
    """Per-adapter, one-entry cache of ``z = x V^T``, kept by the layer that owns ``V``.

    An entry is reused only for the very same input tensor, unchanged since (version counter), with the same ``V``
    version, grad mode and autocast state, and only once per reader. It is dropped as soon as every registered reader
    has read it, so nothing outlives one attention forward in the usual q, k, v order.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._readers: dict[str, set[int]] = {}

    def reset(self, adapter: str) -> None:
        """Forget the readers and the entry of ``adapter`` (its ``V`` is being created anew)."""
        self._entries.pop(adapter, None)
        self._readers.pop(adapter, None)

    def add_reader(self, adapter: str, layer: object) -> None:
        """Register ``layer`` as one of the projections that read ``V`` of ``adapter``."""
        self._readers.setdefault(adapter, set()).add(id(layer))

    def get(
        self, adapter: str, reader: object, x: torch.Tensor, V: torch.Tensor, compute: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """``z`` `(..., r)` for ``reader``: the cached one when valid, else ``compute()`` (then cached)."""
        readers = self._readers.setdefault(adapter, set())
        readers.add(id(reader))
        key = (version_of(x), version_of(V), _context(x))
        entry = self._entries.get(adapter)
        if entry is None or entry.x is not x or entry.key != key or id(reader) in entry.served:
            entry = _Entry(x=x, key=key, z=compute())
            self._entries[adapter] = entry
        entry.served.add(id(reader))
        if entry.served >= readers:
            del self._entries[adapter]
        return entry.z

    def clear(self) -> None:
        """Drop every cached entry (the registered readers stay)."""
        self._entries.clear()

    def __deepcopy__(self, memo: dict) -> SharedFactorInput:
        # A copied layer has other reader ids; the copy relearns them on its first forward. Cached tensors may be
        # non-leaf (with autograd history) and must not be copied.
        return SharedFactorInput()

    def __getstate__(self) -> dict:
        return {"_entries": {}, "_readers": {}}
