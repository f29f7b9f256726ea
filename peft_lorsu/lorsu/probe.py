"""The gradient probe: which heads and which fc1 entries LoRSU adapts.

One pass over (part of) the training data accumulates ``sum_batches batch_size * grad`` for the q/k/v and fc1
weights of every targeted layer; dividing by the number of samples gives ``G``, the signed mean gradient (averaged
first, squared later: not a per-sample Fisher). Head ``h`` of a layer scores ``||G_q^h||^2 + ||G_k^h||^2 +
||G_v^h||^2`` and the ``top_k_heads`` best heads of each layer are kept; fc1 keeps its ``S`` entries of largest
``|G|``.

Memory: only the tracked weights require grad during the probe, and a post-accumulate hook moves each gradient into
an fp32 running sum and frees it at once, so at most one weight-sized gradient exists at a time besides the sums.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import LoRSUConfig
from .selection import head_scores, num_sparse_values, random_selection, top_k_indices, top_s_entries
from .targets import Site, as_linear, attention_blocks, find_sites, qkv_gradients, qkv_weights

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain transformers model under DDP / DataParallel / PeftModel wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        else:
            return model


def _batch_size(batch: Mapping[str, Any]) -> int:
    for key in ("pixel_values", "input_ids", "labels"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("probe_lorsu: cannot tell the batch size; batches must be dicts holding at least one tensor")


def default_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The model's own loss: ``model(**batch, return_loss=True).loss`` (CLIP's contrastive loss for CLIPModel)."""
    kwargs = dict(batch)
    if "return_loss" in inspect.signature(unwrap_model(model).forward).parameters:
        kwargs.setdefault("return_loss", True)
    out = model(**kwargs)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            f"{type(unwrap_model(model)).__name__} returned no loss for this batch; "
            "pass loss_fn(model, batch) -> scalar"
        )
    return loss


@contextmanager
def _probe_state(model: nn.Module, tracked: Iterable[nn.Parameter]):
    """Let only ``tracked`` require grad, in eval mode; restore grads, flags and modes afterwards, even on error."""
    params = list(model.parameters())
    requires_grad = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p in params:
            p.grad = None
            p.requires_grad_(False)
        for p in tracked:
            p.requires_grad_(True)
        model.eval()
        yield
    finally:
        for p, flag, grad in zip(params, requires_grad, grads):
            p.requires_grad_(flag)
            p.grad = grad
        for module, mode in modes:
            module.training = mode


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class _GradientSums:
    """fp32 running sums of ``batch_size * grad`` for tracked weights, filled by post-accumulate-grad hooks."""

    def __init__(self, tracked: dict[str, nn.Parameter]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.seen_in_batch: set[str] = set()
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(name)) for name, p in tracked.items()]

    def _hook(self, name: str):
        def hook(param: torch.Tensor) -> None:
            grad = param.grad.detach().float()
            if name in self.sums:
                self.sums[name].add_(grad)
            else:
                self.sums[name] = grad.clone()
            self.seen_in_batch.add(name)
            param.grad = None

        return hook

    def has_zero_entries(self) -> bool:
        return any(bool((s == 0).any()) for s in self.sums.values())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _all_reduce(sums: dict[str, torch.Tensor], num_samples: int, device: torch.device) -> int:
    """Sum the statistics over processes so every rank makes the same choice (no-op when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return num_samples
    for name in sorted(sums):
        torch.distributed.all_reduce(sums[name])
    count = torch.tensor([num_samples], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(count)
    return int(count.item())


def probe_lorsu(
    model: nn.Module,
    config: LoRSUConfig,
    dataloader: Iterable[Mapping[str, Any]] | None = None,
    loss_fn: LossFn | None = None,
    num_batches: int | None = None,
    show_progress: bool = True,
) -> LoRSUConfig:
    """Choose LoRSU's heads and fc1 entries from gradients and record them in ``config`` (returned).

    Call it before ``get_peft_model(model, config)``. The model is left as it was found: weights, ``requires_grad``
    flags, ``.grad`` tensors and train/eval modes.

    Args:
        model: the model to adapt (``CLIPModel``, ``CLIPVisionModel``, ... or a wrapper around one).
        config: the LoRSU configuration; ``selected_heads``, ``head_scores`` and the fc1 indices are written to it.
        dataloader: iterable of dict batches of model keyword arguments (``pixel_values``, ``input_ids``, ...).
            Not needed for ``config.selection == "random"``.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default: the model's own loss with ``return_loss=True``.
        num_batches: stop after this many batches; by default the probe stops once ``config.probe_samples``
            samples are seen and no accumulated entry is zero, or when the data ends.
        show_progress: show a tqdm bar.

    Raises:
        ValueError: empty dataloader, a batch with no gradient path to a targeted layer, NaN/inf gradients,
            ``top_k_heads`` larger than a layer's heads, or nothing to target.
    """
    base = unwrap_model(model)
    sites = find_sites(base, config)
    blocks = attention_blocks(sites)
    for block, (num_heads, _) in blocks.items():
        if config.adapt_attention and config.top_k_heads > num_heads:
            raise ValueError(
                f"LoRSUConfig.top_k_heads={config.top_k_heads} exceeds the {num_heads} heads of {block} "
                f"(allowed: 1..{num_heads})"
            )
    if config.selection == "random":
        random_selection(base, config, sites)
        return config
    if dataloader is None:
        raise ValueError("probe_lorsu needs a dataloader when LoRSUConfig.selection='gradient'")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"probe_lorsu: num_batches must be >= 1 or None, got {num_batches}")

    # Heads are scored on all of q, k and v even if target_modules keeps only some of them.
    tracked = qkv_weights(base, sites) if config.adapt_attention else {}
    fc1 = [s.name for s in sites.values() if s.role == "fc1" and config.adapt_mlp]
    tracked.update({name: as_linear(base.get_submodule(name)).weight for name in fc1})
    if not tracked:
        return config
    loss_fn = loss_fn or default_loss
    device = next(iter(tracked.values())).device
    grads, num_samples, batches = _accumulate(
        model, base, tracked, dataloader, loss_fn, num_batches, config.probe_samples, device, show_progress
    )
    _choose(config, sites, grads)
    logger.info(
        "LoRSU probe: %d samples in %d batches; heads per layer: %s",
        num_samples,
        batches,
        list((config.selected_heads or {}).values()),
    )
    return config


def _accumulate(
    model: nn.Module,
    base: nn.Module,
    tracked: dict[str, nn.Parameter],
    dataloader: Iterable[Mapping[str, Any]],
    loss_fn: LossFn,
    num_batches: int | None,
    min_samples: int,
    device: torch.device,
    show_progress: bool,
) -> tuple[dict[str, torch.Tensor], int, int]:
    """Run the probe's pass; return the mean gradients `{name: (d_out, d_in)}`, samples seen and batches used."""
    num_samples = batches = 0
    total = num_batches if num_batches is not None else (len(dataloader) if hasattr(dataloader, "__len__") else None)
    with _probe_state(base, tracked.values()):
        sums = _GradientSums(tracked)  # hooks need requires_grad, which _probe_state has just set
        try:
            for batch in tqdm(dataloader, total=total, desc="LoRSU probe", disable=not show_progress, unit="batch"):
                batch_size = _batch_size(batch)
                loss = loss_fn(model, _to_device(batch, device))
                if not torch.isfinite(loss):
                    raise ValueError(f"probe_lorsu: the loss of batch {batches} is {loss.item()}")
                sums.seen_in_batch.clear()
                if loss.requires_grad:
                    (loss * batch_size).backward()
                unreached = sorted(set(tracked) - sums.seen_in_batch)
                if unreached:
                    raise ValueError(
                        f"probe_lorsu: batch {batches} has no gradient path to {unreached[:3]}"
                        f"{' and others' if len(unreached) > 3 else ''}; check that the loss depends on the targeted "
                        "tower (e.g. pixel_values for the vision tower)"
                    )
                num_samples += batch_size
                batches += 1
                if num_batches is not None:
                    if batches >= num_batches:
                        break
                elif num_samples >= min_samples and not sums.has_zero_entries():
                    break
        finally:
            sums.remove()
    if batches == 0:
        raise ValueError("probe_lorsu: the dataloader yielded no batches")
    num_samples = _all_reduce(sums.sums, num_samples, device)
    return {name: s.div_(num_samples) for name, s in sums.sums.items()}, num_samples, batches


def _choose(config: LoRSUConfig, sites: dict[str, Site], grads: dict[str, torch.Tensor]) -> None:
    """Write the top-k heads per layer, all head scores and the top-S fc1 entries into ``config``."""
    broken = sorted(name for name, grad in grads.items() if not torch.isfinite(grad).all())
    if broken:
        raise ValueError(f"probe_lorsu: the accumulated gradients of {broken} hold NaN or inf")
    if config.adapt_attention:
        selected, scores = {}, {}
        qkv = qkv_gradients(sites, grads)
        for block, (num_heads, _) in attention_blocks(sites).items():
            s = head_scores(*qkv[block], num_heads=num_heads)
            scores[block] = [float(v) for v in s]
            selected[block] = top_k_indices(s, config.top_k_heads)
        config.selected_heads, config.head_scores = selected, scores
    if config.adapt_mlp:
        config.fc1_indices = {
            site.name: top_s_entries(grads[site.name], num_sparse_values(grads[site.name], config.sparsity))
            for site in sites.values()
            if site.role == "fc1"
        }
