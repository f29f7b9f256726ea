"""Helpers for running LoRSU / RLP under ``torch.distributed``: collectives for the probe and FSDP wrapping of CLIP.

Nothing here starts a process group; every function is a no-op (or the single-process answer) when
``torch.distributed`` is not initialised, so the same script runs with ``python`` and with ``accelerate launch``.

FSDP and CLIP: both FSDP implementations refuse 0-d parameters, and ``CLIPModel.logit_scale`` is one.
:func:`fsdp_ignored_parameters` lists them so they can be left out of sharding (they stay replicated, which is only
correct while they are frozen, as in LoRSU and RLP), and :func:`fully_shard_clip` applies FSDP2 with one unit per
CLIP encoder layer on that basis.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = [
    "all_reduce_sum_",
    "shard_batches",
    "any_rank",
    "clip_encoder_layer_classes",
    "distributed_info",
    "fsdp_ignored_parameters",
    "fully_shard_clip",
    "is_distributed",
    "is_fsdp_wrapped",
]

# Class names of the CLIP-family encoder layers FSDP should wrap one by one (transformers' CLIP and its copies).
ENCODER_LAYER_CLASS_NAMES = frozenset({"CLIPEncoderLayer", "SiglipEncoderLayer", "CLIPSegEncoderLayer"})


def is_distributed() -> bool:
    """True when a default ``torch.distributed`` process group exists (with any number of processes)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def distributed_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if not is_distributed():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place; returns it (unchanged without a process group)."""
    if is_distributed():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every process if ``flag`` is true on at least one (a collective: every rank must call it)."""
    if not is_distributed():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def shard_batches(
    num_samples: int, batch_size: int, rank: int | None = None, world_size: int | None = None
) -> list[list[int]]:
    """This process's batches of dataset indices for the probe: batch ``i`` goes to rank ``i % world_size``.

    Batch ``i`` is ``[i * batch_size, (i + 1) * batch_size)`` (the last one may be short), so the batches of all ranks
    together are exactly the batches one process would see, each once: no padding or repeated samples (which
    ``DistributedSampler`` and accelerate's ``even_batches`` add to even out the shards, and which would bias the
    probe's mean gradient). The probe copes with shards of different lengths. Use it as
    ``DataLoader(dataset, batch_sampler=shard_batches(len(dataset), batch_size), collate_fn=...)``.

    Args:
        rank / world_size: default: those of the default process group (``0`` / ``1`` without one).
    """
    if batch_size < 1:
        raise ValueError(f"shard_batches: batch_size must be >= 1, got {batch_size}")
    default_rank, default_world = distributed_info()
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"shard_batches: rank {rank} outside 0..{world_size - 1}")
    starts = range(rank * batch_size, num_samples, world_size * batch_size)
    return [list(range(start, min(start + batch_size, num_samples))) for start in starts]


def is_fsdp_wrapped(model: nn.Module) -> bool:
    """True if ``model`` or a submodule is sharded by FSDP1 (``FullyShardedDataParallel``) or FSDP2."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in model.modules())


def fsdp_ignored_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The 0-d parameters of ``model`` (``CLIPModel.logit_scale``), which neither FSDP version can shard.

    Pass them as ``ignored_params`` to FSDP2's ``fully_shard`` or as ``ignored_states`` to FSDP1. Ignored
    parameters are not sharded and their gradients are not reduced, so they must stay frozen.

    Raises:
        ValueError: a 0-d parameter requires grad (ignoring it would let the ranks drift apart).
    """
    scalars = {name: p for name, p in model.named_parameters() if p.dim() == 0}
    trainable = sorted(name for name, p in scalars.items() if p.requires_grad)
    if trainable:
        raise ValueError(
            f"FSDP cannot shard the 0-d parameter(s) {trainable} and they require grad; freeze them "
            "(LoRSU and RLP do) or reshape them to 1-D tensors before wrapping"
        )
    return set(scalars.values())


def clip_encoder_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The encoder layer classes (``CLIPEncoderLayer`` and relatives) present in ``model``: FSDP's wrap units."""
    return {type(m) for m in model.modules() if type(m).__name__ in ENCODER_LAYER_CLASS_NAMES}


def _encoder_layers(model: nn.Module, layer_classes: Iterable[type[nn.Module]] | None) -> list[nn.Module]:
    classes = tuple(layer_classes) if layer_classes is not None else tuple(clip_encoder_layer_classes(model))
    if not classes:
        raise ValueError(
            f"no CLIP encoder layer ({', '.join(sorted(ENCODER_LAYER_CLASS_NAMES))}) found in "
            f"{type(model).__name__}; pass layer_classes"
        )
    return [m for m in model.modules() if isinstance(m, classes)]


def fully_shard_clip(
    model: nn.Module,
    layer_classes: Iterable[type[nn.Module]] | None = None,
    **fully_shard_kwargs: Any,
) -> nn.Module:
    """Shard a (PEFT-wrapped) CLIP model with FSDP2: one unit per encoder layer, the rest in the root unit.

    Each encoder layer's frozen weights and its LoRSU tensors (``lorsu_U``, the shared ``lorsu_V``, ``lorsu_values``,
    bias deltas) are gathered together before the layer runs, so the q/k/v projections that read the shared factor
    of a sibling see its full value. 0-d parameters (``logit_scale``) are left out of sharding, see
    :func:`fsdp_ignored_parameters`. Call it after ``get_peft_model`` and before building the optimizer; save with a
    full state dict (``torch.distributed.checkpoint.state_dict.get_model_state_dict`` with
    ``full_state_dict=True``) passed to ``save_pretrained(..., state_dict=...)`` on the main process.

    Args:
        model: the model to shard, in place.
        layer_classes: the module classes that get their own FSDP unit; default: the CLIP encoder layers found.
        fully_shard_kwargs: passed to every ``fully_shard`` call (``mesh``, ``mp_policy``, ``reshard_after_forward``,
            ``offload_policy``, ...). ``ignored_params`` is extended with the 0-d parameters.

    Returns:
        ``model`` (FSDP2 shards in place and changes the class of the sharded modules).
    """
    from torch.distributed.fsdp import fully_shard

    if not is_distributed():
        raise RuntimeError("fully_shard_clip needs an initialised torch.distributed process group")
    ignored = set(fully_shard_kwargs.pop("ignored_params", None) or ()) | fsdp_ignored_parameters(model)
    for layer in _encoder_layers(model, layer_classes):
        fully_shard(layer, ignored_params=ignored, **fully_shard_kwargs)
    fully_shard(model, ignored_params=ignored, **fully_shard_kwargs)
    return model
