"""A learning rate per method, chosen on validation data: the runner's ``lr="auto"`` and the accuracy benchmark's rule.

Methods differ in their best learning rate by one to two orders of magnitude (full fine-tuning wants far smaller
steps than an adapter, a text prompt far larger ones), so comparing them at one rate says more about the rate than
about the method. The rule here: run the method once per grid value on a validation split carved out of the target's
*training* data (test images are never used for a choice), score each run by its final target validation accuracy
(mean over the selection seeds), keep the best, ties to the smaller rate.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .sessions import ClassificationSet

logger = logging.getLogger(__name__)

# Default grids, by kind of method and optimizer. Chosen on the packaged mini-CLIP (see docs/benchmarks/accuracy.md);
# on another model pass your own grid (ContinualConfig.lr_grid, ``--lr-grid``).
GRIDS: dict[str, tuple[float, ...]] = {
    "full": (3e-5, 1e-4, 3e-4),
    "adapter": (1e-3, 3e-3, 1e-2),
    "prompt_adamw": (1e-2, 3e-2, 1e-1),
    "prompt_sgd": (2e-3, 2e-2, 2e-1),
}
RULE = "best final target validation accuracy (mean over the selection seeds); ties go to the smaller lr"


def default_grid(method: str, optimizer: str) -> list[float]:
    """The grid for a runner method (``"full"``, a prompt method ``"rlp"`` / ``"coop"``, or an image-side adapter)."""
    if method == "full":
        return list(GRIDS["full"])
    if method in ("rlp", "coop"):
        return list(GRIDS[f"prompt_{optimizer}"])
    return list(GRIDS["adapter"])


@dataclass
class LRSelection:
    """What the rule saw and chose.

    ``grid``: one row ``[lr, target accuracy, TI, CC]`` per grid value, validation numbers averaged over the
    selection seeds (TI / CC as in :class:`~peft_lorsu.app.sessions.ContinualResult`; CC is 0 without control data).
    ``chosen``: the rule's choice; ``chosen_balanced``: the lr with the best TI + CC, when asked for.
    """

    grid: list[list[float]]
    chosen: float
    chosen_balanced: float | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    rule: str = RULE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LRSelection:
        return cls(**data)

    def table(self) -> str:
        """The grid, the scores and the choice as text lines (printed by the CLI)."""
        lines = [f"{'lr':>10} {'target val':>10} {'TI':>7}"]
        for lr, target, ti, _ in self.grid:
            mark = "  <- chosen" if lr == self.chosen else ""
            lines.append(f"{lr:>10g} {100 * target:>9.1f}% {100 * ti:>+6.1f}{mark}")
        return "\n".join(lines)


def select_lr(
    grid: Sequence[float],
    evaluate: Callable[[float, int], Mapping[str, Any]],
    seeds: Iterable[int] = (0,),
    balanced: bool = False,
    show_progress: bool = False,
    desc: str = "lr search",
) -> LRSelection:
    """Score every grid value with validation runs ``evaluate(lr, seed)`` and pick one by :data:`RULE`.

    ``evaluate`` returns a run's results as a mapping with ``rows`` (accuracy matrix, target first),
    ``target_improvement`` and ``control_change`` (``ContinualResult.to_dict()`` has them). With ``balanced`` the lr
    with the best ``TI + CC`` (target gain and control loss weighted alike) is reported too.
    """
    grid, seeds = [float(lr) for lr in grid], list(seeds)
    if not grid or any(not lr > 0 for lr in grid):
        raise ValueError(f"lr grid must be a non-empty list of numbers > 0, got {grid!r}")
    if not seeds:
        raise ValueError("select_lr: seeds must not be empty")
    rows = []
    for lr in tqdm(grid, desc=desc, unit="lr", disable=not show_progress):
        runs = [evaluate(lr, seed) for seed in seeds]
        n = len(runs)
        target = sum(r["rows"][-1][0] for r in runs) / n
        ti = sum(r["target_improvement"] for r in runs) / n
        cc = sum(r["control_change"] for r in runs) / n
        rows.append([lr, target, ti, cc])
        logger.info("lr %g: target val %.4f, TI %+.4f, CC %+.4f", lr, target, ti, cc)
    by_lr = sorted(rows)  # max() keeps the first of equal scores: the smallest lr
    selection = LRSelection(rows, max(by_lr, key=lambda g: g[1])[0], seeds=seeds)
    if balanced:
        selection.chosen_balanced = max(by_lr, key=lambda g: g[2] + g[3])[0]
    return selection


def per_class_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Up to ``n`` random indices of every class (all of a class with fewer), seeded, sorted; int64 `(M,)`."""
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in labels.unique(sorted=True).tolist():
        idx = torch.nonzero(labels == c).flatten()
        picked.append(idx[torch.randperm(len(idx), generator=gen)[:n]])
    return torch.cat(picked).sort().values


def split_validation(
    data: ClassificationSet, per_class: int, seed: int = 0
) -> tuple[ClassificationSet, ClassificationSet]:
    """``(rest, validation)``: ``per_class`` images of every class for validation, the others to train on."""
    if not (isinstance(per_class, int) and per_class >= 1):
        raise ValueError(f"validation images per class must be an integer >= 1, got {per_class!r}")
    counts = torch.bincount(data.labels, minlength=len(data.class_names))
    short = [data.class_names[c] for c in range(len(counts)) if 0 < counts[c] <= per_class]
    if short:
        raise ValueError(
            f"lr='auto' sets {per_class} validation images per class aside, which leaves none to train on for "
            f"{short} (fewest images: {int(counts[counts > 0].min())}); lower lr_val_per_class (--lr-val-per-class)"
        )
    val = per_class_indices(data.labels, per_class, seed)
    keep = torch.ones(len(data.labels), dtype=torch.bool)
    keep[val] = False
    rest = torch.nonzero(keep).flatten()
    names = list(data.class_names)
    return (
        ClassificationSet(data.pixel_values[rest], data.labels[rest], names),
        ClassificationSet(data.pixel_values[val], data.labels[val], names),
    )


def parse_lr(text: str) -> float | str:
    """A command-line learning rate: a number or ``auto``."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'auto', got {text!r}") from None


def parse_lr_grid(text: str) -> list[float]:
    """A command-line grid: comma-separated numbers."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers such as 1e-4,1e-3, got {text!r}") from None
