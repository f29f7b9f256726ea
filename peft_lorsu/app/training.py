"""A plain training loop for PEFT-wrapped models (the Trainer integration builds on the same losses)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..lorsu.probe import default_loss
from ..trainer import LR_SCHEDULES, lr_schedule

logger = logging.getLogger(__name__)


def param_groups(
    named: list[tuple[str, nn.Parameter]], lr: float, lr_by_name: Mapping[str, float]
) -> list[dict[str, Any]]:
    """Optimizer groups: one per key of ``lr_by_name`` (parameters whose name contains it) and one at ``lr``."""
    for key, value in lr_by_name.items():
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"fit: lr_by_name[{key!r}] must be a number > 0, got {value!r}")
    groups: dict[str | None, list[nn.Parameter]] = {key: [] for key in lr_by_name}
    groups[None] = []
    for name, param in named:
        groups[next((key for key in lr_by_name if key in name), None)].append(param)
    unmatched = [key for key in lr_by_name if not groups[key]]
    if unmatched:
        raise ValueError(f"fit: lr_by_name keys {unmatched} match no trainable parameter name")
    return [
        {"params": params, "lr": lr if key is None else lr_by_name[key]} for key, params in groups.items() if params
    ]


OPTIMIZERS = ("adamw", "sgd")
SGD_MOMENTUM = 0.9  # CoOp's, which RLP's recipe follows


def make_optimizer(name: str, groups: list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``"adamw"`` (LoRSU's and LoRA's recipe) or ``"sgd"`` with momentum 0.9 (RLP's and CoOp's)."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
    raise ValueError(f"fit: optimizer must be one of {OPTIMIZERS}, got {name!r}")


# How often (in steps) the loop checks that the loss is still finite: each check waits for the device, so the
# training step itself never does.
CHECK_EVERY = 20


class TrainingDiverged(RuntimeError):
    """The training loss stopped being finite: the run is abandoned, nothing it trained should be kept."""

    def __init__(self, step: int, lr: float, loss: float) -> None:
        self.step, self.lr, self.loss = step, lr, loss
        super().__init__(
            f"training diverged: the loss was {loss} at step {step} (learning rate {lr:g}); nothing was saved. "
            "Lower the learning rate"
        )


def _check_finite(losses: list[torch.Tensor], first_step: int, lr: float) -> None:
    """Raise :class:`TrainingDiverged` at the first non-finite loss of ``losses`` (steps from ``first_step``)."""
    if not losses:
        return
    values = torch.stack(losses)
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad):
        index = int(bad[0, 0])
        raise TrainingDiverged(first_step + index, lr, float(values[index]))


@dataclass
class FitResult:
    """Per-epoch mean training losses and the number of optimizer steps taken."""

    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0


def fit(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    epochs: int = 1,
    lr: float = 1e-5,
    weight_decay: float = 0.0,
    loss_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor] | None = None,
    show_progress: bool = True,
    lr_by_name: Mapping[str, float] | None = None,
    optimizer: str = "adamw",
    schedule: str = "constant",
) -> FitResult:
    """Train the parameters of ``model`` that require grad for ``epochs`` passes over ``dataloader``.

    Args:
        model: typically a ``PeftModel``; only parameters with ``requires_grad`` are optimised.
        dataloader: dict batches of model keyword arguments.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default: the model's own loss (``return_loss=True``).
        lr_by_name: other learning rates for some parameters: ``{"rlp_": 3e-2}`` trains every parameter whose name
            contains ``"rlp_"`` at 3e-2 (the first matching key wins) and the rest at ``lr``. Each key must match a
            trainable parameter.
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum 0.9), see :func:`make_optimizer`.
        schedule: a name of :data:`peft_lorsu.trainer.LR_SCHEDULES` (``"constant"``, ``"cosine"``,
            ``"epoch_cosine"``), stepped after every optimizer step; needs ``len(dataloader)``.

    Returns:
        the mean loss of every epoch and the step count.

    Raises:
        TrainingDiverged: the loss became NaN or inf, naming the step (counted from 1) and the learning rate. The
            loop checks every ``CHECK_EVERY`` steps and at the end of every epoch, so that the step itself never
            waits for the device.
    """
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"fit: lr must be a finite number > 0, got {lr!r}")
    if epochs < 1:
        raise ValueError(f"fit: epochs must be >= 1, got {epochs}")
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"fit: schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("fit: the model has no parameter that requires grad")
    loss_fn = loss_fn or default_loss
    device = named[0][1].device
    opt = make_optimizer(optimizer, param_groups(named, lr, lr_by_name or {}), lr, weight_decay)
    scheduler = None if schedule == "constant" else lr_schedule(opt, schedule, max(1, len(dataloader)), epochs)
    result = FitResult()
    model.train()
    for epoch in range(epochs):
        losses: list[torch.Tensor] = []  # this epoch's, kept on the device
        checked = 0
        bar = tqdm(dataloader, desc=f"epoch {epoch + 1}/{epochs}", disable=not show_progress, unit="batch")
        for batch in bar:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            loss = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(loss.detach())
            result.steps += 1
            if len(losses) - checked >= CHECK_EVERY:
                _check_finite(losses[checked:], result.steps - len(losses) + checked + 1, lr)
                checked = len(losses)
                bar.set_postfix(loss=f"{float(losses[-1]):.4f}")
        _check_finite(losses[checked:], result.steps - len(losses) + checked + 1, lr)
        result.epoch_losses.append(float(torch.stack(losses).mean()) if losses else 0.0)
        logger.info("epoch %d/%d: mean loss %.4f", epoch + 1, epochs, result.epoch_losses[-1])
    model.eval()
    return result
