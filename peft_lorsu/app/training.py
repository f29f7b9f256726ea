"""A plain training loop for PEFT-wrapped models (the Trainer integration builds on the same losses)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..lorsu.probe import default_loss

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
) -> FitResult:
    """Train the parameters of ``model`` that require grad with Adam(W) for ``epochs`` passes over ``dataloader``.

    Args:
        model: typically a ``PeftModel``; only parameters with ``requires_grad`` are optimised.
        dataloader: dict batches of model keyword arguments.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default: the model's own loss (``return_loss=True``).
        lr_by_name: other learning rates for some parameters: ``{"rlp_": 3e-2}`` trains every parameter whose name
            contains ``"rlp_"`` at 3e-2 (the first matching key wins) and the rest at ``lr``. Each key must match a
            trainable parameter.

    Returns:
        the mean loss of every epoch and the step count.
    """
    if epochs < 1:
        raise ValueError(f"fit: epochs must be >= 1, got {epochs}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("fit: the model has no parameter that requires grad")
    loss_fn = loss_fn or default_loss
    device = named[0][1].device
    optimizer = torch.optim.AdamW(param_groups(named, lr, lr_by_name or {}), lr=lr, weight_decay=weight_decay)
    result = FitResult()
    model.train()
    for epoch in range(epochs):
        total, count = 0.0, 0
        bar = tqdm(dataloader, desc=f"epoch {epoch + 1}/{epochs}", disable=not show_progress, unit="batch")
        for batch in bar:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            loss = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            count += 1
            result.steps += 1
            bar.set_postfix(loss=f"{loss.item():.4f}")
        result.epoch_losses.append(total / max(count, 1))
        logger.info("epoch %d/%d: mean loss %.4f", epoch + 1, epochs, result.epoch_losses[-1])
    model.eval()
    return result
