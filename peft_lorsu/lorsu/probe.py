"""The gradient probe: which heads and which fc1 entries LoRSU adapts.

One pass over (part of) the training data accumulates ``sum_batches batch_size * grad`` for the q/k/v and fc1
weights of every targeted layer; dividing by the number of samples gives ``G``, the signed mean gradient (averaged
first, squared later: not a per-sample Fisher). Head ``h`` of a layer scores ``||G_q^h||^2 + ||G_k^h||^2 +
||G_v^h||^2`` and the ``top_k_heads`` best heads of each layer are kept; fc1 keeps its ``S`` entries of largest
``|G|``.

How it ends: with ``num_batches``, after that many batches; otherwise once ``probe_samples`` samples are seen and no
accumulated gradient entry is zero, and at the latest after ``MAX_SAMPLES_FACTOR * probe_samples`` samples (an entry
can stay zero for ever, e.g. a dead unit), or when the data ends. The log says which.

Memory: only the tracked weights require grad during the probe, and a post-accumulate hook moves each gradient into
an fp32 running sum and frees it at once, so at most one weight-sized gradient exists at a time besides the sums.

Distributed: when ``torch.distributed`` is initialised every process probes its own shard of the data and the
processes advance in lock-step. After each batch a 3-number status (has a batch, its size, failed) is summed over the
ranks, so all of them stop at the same step: when every shard is exhausted (a rank whose shard ends early waits for
the others without contributing), after ``num_batches`` steps, or once the *global* sample count reaches
``probe_samples`` and the *globally* summed gradients have no zero entry. The sums are then all-reduced once and each
rank makes the same choice from the same numbers; with the whole data probed that choice equals a single process
probing all shards, up to floating-point summation order. An error on one rank (NaN loss, no gradient path, an
exception in ``loss_fn``) is reported to all ranks instead of leaving them waiting in a collective.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import all_reduce_sum_, any_rank, distributed_info, is_distributed, is_fsdp_wrapped
from ..utils import batch_size, only_these_require_grad, output_field, strip_data_parallel, to_device, unwrap_model
from .config import LoRSUConfig
from .scoring import (
    LossFn,
    check_gradients,
    check_top_k_heads,
    per_sample_fisher,
    probe_losses,
    random_selection,
    resolve_scorer,
    score_heads,
    select_fc1,
)
from .targets import as_linear, attention_blocks, find_sites, qkv_weights

logger = logging.getLogger(__name__)

# The probe reads at most this many times probe_samples when some accumulated entry stays zero.
MAX_SAMPLES_FACTOR = 4



def check_pairs(batch: Mapping[str, Any], where: str = "the batch") -> None:
    """Refuse a batch for CLIP's contrastive loss whose images and captions differ in number."""
    images, texts = batch.get("pixel_values"), batch.get("input_ids")
    if isinstance(images, torch.Tensor) and isinstance(texts, torch.Tensor) and len(images) != len(texts):
        raise ValueError(
            f"the contrastive loss pairs image i with text i, but {where} holds {len(images)} images and "
            f"{len(texts)} texts; give one caption per image (or labels and the class prompts, with "
            "loss_fn=peft_lorsu.class_prompt_probe_loss)"
        )


def default_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The model's own loss: ``model(**batch, return_loss=True).loss`` (CLIP's contrastive loss for CLIPModel)."""
    kwargs = dict(batch)
    if "return_loss" in inspect.signature(unwrap_model(model).forward).parameters:
        kwargs.setdefault("return_loss", True)
        check_pairs(batch)
    return output_field(model(**kwargs), "loss", model, "pass loss_fn(model, batch) -> scalar")


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

    def complete(self, tracked: dict[str, nn.Parameter], device: torch.device) -> dict[str, torch.Tensor]:
        """The sums of every tracked weight, zeros for those no batch reached (a rank whose shard was empty)."""
        for name in tracked:
            if name not in self.sums:
                self.sums[name] = torch.zeros(tracked[name].shape, dtype=torch.float32, device=device)
        return self.sums

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def probe_lorsu(
    model: nn.Module,
    config: LoRSUConfig,
    dataloader: Iterable[Mapping[str, Any]] | None = None,
    loss_fn: LossFn | None = None,
    num_batches: int | None = None,
    show_progress: bool = True,
    head_scorer: Callable[..., torch.Tensor] | None = None,
) -> LoRSUConfig:
    """Choose LoRSU's heads and fc1 entries from gradients and record them in ``config`` (returned).

    Call it before ``get_peft_model(model, config)``. The model is left as it was found: weights, ``requires_grad``
    flags, ``.grad`` tensors and train/eval modes.

    Under ``torch.distributed`` (e.g. ``accelerate launch``) call it on every process with that process's shard of
    the data: the gradient sums and sample counts are all-reduced, every process writes the same selection into its
    ``config``, and a DDP wrapper around ``model`` is bypassed (``loss_fn`` receives the module inside it). Probe
    before sharding the model with FSDP.

    Args:
        model: the model to adapt (``CLIPModel``, ``CLIPVisionModel``, ... or a wrapper around one).
        config: the LoRSU configuration; ``selected_heads``, ``head_scores`` and the fc1 indices are written to it.
        dataloader: iterable of dict batches of model keyword arguments (``pixel_values``, ``input_ids``, ...).
            Not needed for ``config.selection == "random"``.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default: the model's own loss with ``return_loss=True``.
            It may also return per-sample losses `(batch_size,)` (their mean is used); ``head_scoring='fisher'``
            needs that form (the default loss provides it for CLIP).
        head_scorer: rank the heads with this function instead of ``config.head_scoring``: it receives each
            block's :class:`~peft_lorsu.lorsu.scoring.HeadStatistics` and returns `(H,)` scores; the config then
            records ``head_scoring='custom'``. fc1 entries are chosen by the mean gradient in every case.
        num_batches: stop after this many batches (per process when distributed); by default the probe stops once
            ``config.probe_samples`` samples are seen (over all processes) and no accumulated entry is zero, or when
            the data ends (on every process).
        show_progress: show a tqdm bar (on the first process only).

    Raises:
        ValueError: empty dataloader, a batch with no gradient path to a targeted layer, NaN/inf gradients,
            ``top_k_heads`` larger than a layer's heads, nothing to target, or a model already sharded by FSDP.
        RuntimeError: another process failed during the probe (that process raises its own error).
    """
    if is_fsdp_wrapped(model):
        raise ValueError(
            "probe_lorsu: the model is sharded by FSDP; probe the unsharded model (on every process) before "
            "get_peft_model and FSDP wrapping"
        )
    base = unwrap_model(model)
    sites = find_sites(base, config)
    blocks = attention_blocks(sites)
    check_top_k_heads(config, blocks)
    if config.selection == "random":
        random_selection(base, config, sites)
        return config
    if dataloader is None:
        raise ValueError("probe_lorsu needs a dataloader when LoRSUConfig.selection='gradient'")
    if num_batches is not None and (type(num_batches) is not int or num_batches < 1):
        raise ValueError(f"probe_lorsu: num_batches must be an integer >= 1 or None, got {num_batches!r}")

    # Heads are scored on all of q, k and v even if target_modules keeps only some of them.
    tracked = qkv_weights(base, sites) if config.adapt_attention else {}
    fc1 = [s.name for s in sites.values() if s.role == "fc1" and config.adapt_mlp]
    tracked.update({name: as_linear(base.get_submodule(name)).weight for name in fc1})
    if not tracked:
        return config
    scorer = resolve_scorer(config, head_scorer) if config.adapt_attention else None  # fails before the pass
    per_sample_loss_fn, loss_fn = probe_losses(config, loss_fn, default_loss)
    device = next(iter(tracked.values())).device
    grads, num_samples, batches = _accumulate(
        model, base, tracked, dataloader, loss_fn, num_batches, config.probe_samples, device, show_progress
    )
    check_gradients(grads, sites, heads_by_gradient=head_scorer is None and config.head_scoring != "random")
    if scorer is not None:
        fisher = None
        if config.head_scoring == "fisher":
            fisher, _ = per_sample_fisher(model, sites, dataloader, per_sample_loss_fn, batches)
        score_heads(config, sites, grads, num_samples, scorer, fisher)
        if head_scorer is not None:
            config.head_scoring = "custom"
    if config.adapt_mlp:
        config.fc1_indices = select_fc1(config, sites, grads)
    logger.info(
        "LoRSU probe: %d samples in %d batches (per process); heads per layer: %s",
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
    """Run the probe's pass; return the mean gradients `{name: (d_out, d_in)}`, samples seen and steps taken.

    Samples are counted over all processes; a step is one batch on every process that still has data.
    """
    rank, world = distributed_info()
    forward_model = strip_data_parallel(model)
    total = num_batches if num_batches is not None else (len(dataloader) if hasattr(dataloader, "__len__") else None)
    bar = tqdm(total=total, desc="LoRSU probe", disable=not show_progress or rank != 0, unit="batch")
    num_samples = steps = 0
    reason = "the data ended"
    with only_these_require_grad(base, tracked.values()):
        sums = _GradientSums(tracked)  # hooks need requires_grad, which only_these_require_grad has just set
        try:
            batches = iter(dataloader)
            exhausted = False
            while True:
                has_batch, batch_size, error = False, 0, None
                try:
                    batch = None if exhausted else next(batches, None)
                    exhausted = batch is None
                    if batch is not None:
                        has_batch = True
                        batch_size = _probe_batch(forward_model, batch, loss_fn, tracked, sums, steps, device)
                        bar.update(1)
                except Exception as exc:  # reported to every rank below, then re-raised here
                    if world == 1:
                        raise
                    error = exc
                active, step_samples = _agree_on_step(has_batch, batch_size, error, steps, device)
                if not active:
                    break
                num_samples += step_samples
                steps += 1
                if num_batches is not None:
                    if steps >= num_batches:
                        reason = f"num_batches={num_batches} reached"
                        break
                elif num_samples >= min_samples:
                    if not _has_zero_entries(sums.complete(tracked, device)):
                        reason = f"probe_samples={min_samples} reached with every gradient entry measured"
                        break
                    if num_samples >= MAX_SAMPLES_FACTOR * min_samples:
                        reason = (
                            f"{MAX_SAMPLES_FACTOR} x probe_samples read while some gradient entries stayed exactly "
                            "zero (dead units, or batches of one sample)"
                        )
                        break
        finally:
            sums.remove()
            bar.close()
    if num_samples == 0:
        where = f" on any of the {world} processes" if world > 1 else ""
        raise ValueError(f"probe_lorsu: the dataloader yielded no batches{where}")
    logger.info("LoRSU probe stopped after %d samples in %d batches: %s", num_samples, steps, reason)
    grads = sums.complete(tracked, device)
    for name in sorted(grads):  # the same order on every rank
        all_reduce_sum_(grads[name])
    return {name: s.div_(num_samples) for name, s in grads.items()}, num_samples, steps


def _probe_batch(
    model: nn.Module,
    batch: Mapping[str, Any],
    loss_fn: LossFn,
    tracked: dict[str, nn.Parameter],
    sums: _GradientSums,
    step: int,
    device: torch.device,
) -> int:
    """Add ``batch_size * grad`` of one batch to ``sums``; return the batch size."""
    size = batch_size(batch)
    if "labels" not in batch:
        check_pairs(batch, f"probe_lorsu's batch {step}")
    loss = loss_fn(model, to_device(batch, device))
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"probe_lorsu: loss_fn must return a scalar tensor, got {got} for batch {step}")
    if not torch.isfinite(loss):
        raise ValueError(f"probe_lorsu: the loss of batch {step} is {loss.item()}")
    sums.seen_in_batch.clear()
    if loss.requires_grad:
        (loss * size).backward()
    unreached = sorted(set(tracked) - sums.seen_in_batch)
    if unreached:
        raise ValueError(
            f"probe_lorsu: batch {step} has no gradient path to {unreached[:3]}"
            f"{' and others' if len(unreached) > 3 else ''}; check that the loss depends on the targeted "
            "tower (e.g. pixel_values for the vision tower)"
        )
    return size


def _agree_on_step(
    has_batch: bool, batch_size: int, error: Exception | None, step: int, device: torch.device
) -> tuple[bool, int]:
    """Share one step's outcome between the processes: ``(any rank had a batch, samples over all ranks)``.

    Raises the local ``error`` on the rank that had it and a ``RuntimeError`` on the others, so that no rank is left
    waiting in a collective the failed one never joins.
    """
    if not is_distributed():
        return has_batch, batch_size
    status = torch.tensor([int(has_batch), batch_size, int(error is not None)], dtype=torch.int64, device=device)
    all_reduce_sum_(status)
    active, samples, failed = (int(v) for v in status.tolist())
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(
            f"probe_lorsu: {failed} other process(es) failed at batch {step}; their error is in their own log"
        )
    return active > 0, samples


def _has_zero_entries(sums: dict[str, torch.Tensor]) -> bool:
    """Whether the sums, added over all processes, hold an exact zero (the same answer on every rank)."""
    distributed = is_distributed()
    found = False
    device = torch.device("cpu")
    for name in sorted(sums):
        total = all_reduce_sum_(sums[name].clone()) if distributed else sums[name]
        found = found or bool((total == 0).any())
        device = total.device
    return any_rank(found, device)
