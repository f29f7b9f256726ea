"""Accuracy benchmark: continual few-shot learning (CL-T) with LoRSU and its baselines, and RLP vs CoOp base-to-new.

Usage::

    python -m benchmarks.accuracy --out docs/benchmarks        # the full run on the packaged mini-CLIP (CPU)
    python -m benchmarks.accuracy --smoke --out /tmp/acc       # a tiny run in seconds (the test suite runs this)
    python -m benchmarks.accuracy --model openai/clip-vit-base-patch16 --target <hub name> --control <hub name> ...

Every method sees the same sessions, images, epochs, batch size and so the same number of optimizer steps. Each
method's learning rate is picked from a small grid on a validation split carved out of the target's *training* images
(the test images are never used for a choice). Results are written as ``accuracy.json`` (every run), ``accuracy.md``
(tables, the targets of issue 11, what was checked where one is missed) and ``accuracy_*.png`` into ``--out``.

Finished runs are appended to ``<out>/accuracy_runs.jsonl`` as they complete; a crashed or interrupted run is resumed
from there with ``--resume`` (runs whose settings changed are not reused). ``--report-only`` rebuilds the Markdown and
the plots from an existing ``accuracy.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from tqdm.auto import tqdm

from peft_lorsu.app.continual import ContinualConfig, ContinualRunner
from peft_lorsu.app.data import LabeledImages, load_image_dataset
from peft_lorsu.app.inputs import to_pixel_values
from peft_lorsu.app.lr_search import GRIDS, per_class_indices, select_lr
from peft_lorsu.app.models import load_clip
from peft_lorsu.app.sessions import ClassificationSet
from peft_lorsu.lorsu import LoRSUConfig, probe_lorsu
from peft_lorsu.lorsu.scoring import HeadScorer, HeadStatistics
from peft_lorsu.objectives import base_to_new_split, build_class_prompts, evaluate_base_to_new

from . import accuracy_report
from .accuracy_report import mean_std

logger = logging.getLogger("benchmarks.accuracy")


# ------------------------------------------------------------------------------------------------------------ methods


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the benchmark: which :class:`ContinualRunner` method it runs, with which grid and probe options."""

    name: str
    runner_method: str
    grid: str  # key of Plan.grids; "" for zero-shot
    side: str  # "vision", "text" or "-"
    description: str
    lorsu_options: dict[str, Any] | None = None  # LoRSUConfig fields of a LoRSU variant (head_scoring, ...)
    config_fields: dict[str, Any] | None = None  # ContinualConfig fields of this row that differ from the plan's
    head_scorer: HeadScorer | None = None  # a user-supplied head scorer given to probe_lorsu (issue 12)
    prompt_lr_scale: float | None = None  # lorsu_rlp: the prompt part trains at this multiple of the row's lr

    def to_json(self) -> dict[str, Any]:
        """The row as JSON: its fields, the head scorer by its qualified name."""
        out = dataclasses.asdict(self)
        out["head_scorer"] = self.head_scorer.__qualname__ if self.head_scorer else None
        return out

    @property
    def head_scoring(self) -> str | None:
        """The head-scoring strategy of issue 12 this variant needs (``peft_lorsu.lorsu.scoring``), if any."""
        return (self.lorsu_options or {}).get("head_scoring")


def value_heads_score(stats: HeadStatistics) -> torch.Tensor:
    """A user-style head scorer for the ablation row ``lorsu_custom``: heads ranked by the squared norm of their rows
    of the mean v gradient alone, `(H * d_h, d)` -> `(H,)` (the paper's score also counts q and k)."""
    return stats.grad_v.reshape(stats.num_heads, -1).pow(2).sum(1)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("zero_shot", "zero_shot", "", "-", "no training (reference row)"),
        Method("full", "full", "full", "vision", "full fine-tuning of the vision encoder and projection"),
        Method("lora", "lora", "adapter", "vision", "peft LoRA on q/k/v of every vision layer, same rank"),
        Method("spu", "spu", "adapter", "vision", "sparse update only: top-S fc1 entries by gradient, no heads"),
        Method("lorsu", "lorsu", "adapter", "vision", "LoRSU: gradient-chosen heads + top-S fc1 (+ biases, proj.)"),
        Method("lorsu_random", "lorsu_random", "adapter", "vision", "LoRSU with random heads and random fc1 entries"),
        Method(
            "lorsu_random_heads",
            "lorsu",
            "adapter",
            "vision",
            "LoRSU with random heads, fc1 by gradient",
            {"head_scoring": "random"},
        ),
        Method(
            "lorsu_fisher",
            "lorsu",
            "adapter",
            "vision",
            "LoRSU, heads by per-sample Fisher score",
            {"head_scoring": "fisher"},
        ),
        Method(
            "lorsu_custom",
            "lorsu",
            "adapter",
            "vision",
            "LoRSU, heads by a user-supplied scorer (v-gradient rows only)",
            head_scorer=value_heads_score,
        ),
        Method("rlp", "rlp", "prompt", "text", "RLP: rank-1 low-rank text context (CoOp style), dropout 0.5"),
        Method("coop", "coop", "prompt", "text", "CoOp: full-rank text context"),
        # issue 12's joint model next to each of its parts alone, all three on the class-prompt loss
        Method(
            "lorsu_ce",
            "lorsu",
            "adapter",
            "vision",
            "LoRSU trained with the class-prompt cross-entropy (the loss of the joint row)",
            config_fields={"loss": "class_ce"},
        ),
        Method(
            "lorsu_rlp",
            "lorsu_rlp",
            "adapter",
            "both",
            "LoRSU (image) + rank-1 RLP (text) as one adapter, class-prompt cross-entropy",
        ),
        # the prompt's own rate: RLP alone picks 10-33x the lr LoRSU picks on validation in every continual setting
        Method(
            "lorsu_rlp_x10",
            "lorsu_rlp",
            "adapter",
            "both",
            "LoRSU + RLP as one adapter, the prompt at 10x the lr (ContinualConfig.prompt_lr)",
            prompt_lr_scale=10.0,
        ),
    )
}
PROMPT_METHODS = ("rlp", "coop")
_NO_EXTRAS = {"adapt_projection": False, "train_biases": False}
_HEADS_ONLY = {"adapt_mlp": False, **_NO_EXTRAS}
# LoRSU variants of the investigation (validation data only): which part of LoRSU forgets, does the head choice matter
VARIANTS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lorsu_no_proj", "lorsu", "adapter", "vision", "LoRSU without the projection adapter",
               {"adapt_projection": False}),
        Method("lorsu_no_bias", "lorsu", "adapter", "vision", "LoRSU without dense q/k/v/fc1 biases",
               {"train_biases": False}),
        Method("lorsu_core", "lorsu", "adapter", "vision", "LoRSU heads + fc1 only (no biases, no projection)",
               _NO_EXTRAS),
        Method("lorsu_k1", "lorsu", "adapter", "vision", "LoRSU with top_k_heads = 1", {"top_k_heads": 1}),
        Method("lorsu_r8", "lorsu", "adapter", "vision", "LoRSU with r = alpha = 8", {"r": 8, "lora_alpha": 8.0}),
        Method("lorsu_s05", "lorsu", "adapter", "vision", "LoRSU with sparsity 0.05", {"sparsity": 0.05}),
        Method("lorsu_k4", "lorsu", "adapter", "vision", "LoRSU with top_k_heads = 4 (a wider head selection)",
               {"top_k_heads": 4}),
        Method("lorsu_s20", "lorsu", "adapter", "vision", "LoRSU with sparsity 0.2 (twice the fc1 entries)",
               {"sparsity": 0.2}),
        Method("lorsu_e10", "lorsu", "adapter", "vision", "LoRSU with 10 epochs per session (twice the steps)",
               config_fields={"epochs": 10}),
        Method("full_e10", "full", "full", "vision", "full fine-tuning with 10 epochs per session (twice the steps)",
               config_fields={"epochs": 10}),
        Method("heads_only", "lorsu", "adapter", "vision", "gradient-chosen heads only (no fc1, biases, proj.)",
               _HEADS_ONLY),
        Method("heads_only_random", "lorsu", "adapter", "vision", "random heads only (no fc1, biases, proj.)",
               {**_HEADS_ONLY, "head_scoring": "random"}),
    )
}  # fmt: skip
# RLP variants of the base-to-new investigation (validation data only): the dropout rate, the runner's SGD recipe
PROMPT_VARIANTS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("rlp_drop25", "rlp", "prompt", "text", "RLP with dropout 0.25 on P_A P_B",
               config_fields={"prompt_dropout": 0.25}),
        Method("rlp_nodrop", "rlp", "prompt", "text", "RLP without dropout on P_A P_B",
               config_fields={"prompt_dropout": 0.0}),
        Method("rlp_sgd", "rlp", "prompt", "text", "RLP with the runner's RLP recipe: SGD (momentum 0.9), cosine",
               config_fields={"optimizer": "sgd", "lr_schedule": "cosine"}),
    )
}  # fmt: skip
# the LoRSU authors' schedule (epoch 1 at 1e-6, then the peak lr) against the constant lr of the headline runs
SCHEDULE_VARIANTS: dict[str, Method] = {
    f"{base}_epoch_cosine": Method(
        f"{base}_epoch_cosine",
        base,
        METHODS[base].grid,
        "vision",
        f"{base} with LoRSU's reference schedule (lr_schedule='epoch_cosine')",
        config_fields={"lr_schedule": "epoch_cosine"},
    )
    for base in ("full", "lora", "lorsu")
}
ALL_METHODS = {**METHODS, **VARIANTS, **PROMPT_VARIANTS, **SCHEDULE_VARIANTS}
# the headline rows; the other rows of METHODS run when asked for (--method), their findings are in accuracy_notes.md
HEADLINE_METHODS = (
    "zero_shot",
    "full",
    "lora",
    "spu",
    "lorsu",
    "lorsu_random",
    "lorsu_random_heads",
    "rlp",
    "lorsu_rlp",
)


def head_scoring_available() -> bool:
    """Whether this peft_lorsu has the head-scoring strategies of issue 12 (``LoRSUConfig.head_scoring``)."""
    return any(f.name == "head_scoring" for f in dataclasses.fields(LoRSUConfig))


class BenchmarkRunner(ContinualRunner):
    """:class:`ContinualRunner` plus LoRSU variants (other LoRSUConfig fields or a head scorer of one's own), and the
    evaluation time kept apart."""

    def __init__(
        self,
        *args: Any,
        lorsu_options: dict[str, Any] | None = None,
        head_scorer: HeadScorer | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lorsu_options = lorsu_options or {}
        self.head_scorer = head_scorer
        self.eval_seconds = 0.0

    def evaluate(self, model: torch.nn.Module) -> list[float]:
        start = time.perf_counter()
        accs = super().evaluate(model)
        self.eval_seconds += time.perf_counter() - start
        return accs

    def _adapt(self, model: torch.nn.Module, session: int, probe_data: list[dict]) -> torch.nn.Module:
        if not self.lorsu_options and self.head_scorer is None:
            return super()._adapt(model, session, probe_data)
        cfg = self.config
        fields = dict(r=cfg.r, lora_alpha=cfg.lora_alpha, top_k_heads=cfg.top_k_heads, sparsity=cfg.sparsity)
        lorsu = LoRSUConfig(**{**fields, **self.lorsu_options}, seed=cfg.seed + session)
        # fisher needs per-sample losses: the probe's default gives them for CLIP's contrastive loss
        loss_fn = None if self.lorsu_options.get("head_scoring") == "fisher" else self._loss_fn()
        probe_lorsu(model, lorsu, probe_data, loss_fn=loss_fn, head_scorer=self.head_scorer, show_progress=False)
        return get_peft_model(model, lorsu)  # the runner merges every session (merge=True): a plain model comes in


# ------------------------------------------------------------------------------------------------------------ plan


# a new domain with new class names, a photometric inversion, a geometric shift and a contrast shift
TARGETS = ("digits", "fashion_mnist:inverted", "fashion_mnist:rotated", "animal_mnist:low_contrast")


@dataclasses.dataclass
class Plan:
    """Everything that decides the numbers (see ``PLANS``); the command line overrides some fields."""

    model: str | None = None  # None: the packaged mini-CLIP
    targets: list[str] = dataclasses.field(default_factory=lambda: list(TARGETS))
    controls: list[str] = dataclasses.field(default_factory=lambda: ["fashion_mnist", "animal_mnist"])
    shots: list[int] = dataclasses.field(default_factory=lambda: [5, 10])
    sessions: int = 5
    disjoint_classes: bool = False  # True: the paper's class-disjoint sessions (see accuracy_notes.md)
    epochs: int = 5
    batch_size: int = 16
    # one optimiser and schedule for every method, so that methods differ only in what they train and their lr (the
    # runner's per-method recipes, e.g. SGD + cosine for RLP, are compared in the investigation)
    optimizer: str = "adamw"
    lr_schedule: str = "constant"
    loss: str = "contrastive"
    r: int = 16
    lora_alpha: float = 16.0
    top_k_heads: int = 2
    sparsity: float = 0.1
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    selection_seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    balanced: bool = True  # also run the final seeds at the lr of the balanced rule (TI_val + CC_val)
    methods: list[str] = dataclasses.field(default_factory=lambda: list(HEADLINE_METHODS))
    grids: dict[str, list[float]] = dataclasses.field(
        default_factory=lambda: {
            "full": list(GRIDS["full"]),
            "adapter": list(GRIDS["adapter"]),
            "prompt": list(GRIDS["prompt_adamw"]),  # the plan trains every row with AdamW
        }
    )
    val_per_class: int = 20  # carved from the target's train split, never from test
    pool_per_class: int = 200  # train images per class the sessions are drawn from (the rest of train is unused)
    test_per_class: int = 100  # evaluation subsample of the target's test split (all images if fewer)
    control_per_class: int = 100  # evaluation subsample of each control's test split
    control_val_per_class: int = 100  # investigation only: control images from their train splits (pretraining data)
    # the investigation (validation data only): LoRSU variants and baselines over a wider lr grid
    investigate_targets: list[str] = dataclasses.field(default_factory=lambda: list(TARGETS))
    investigate_shots: int = 5
    investigate_seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    investigate_methods: list[str] = dataclasses.field(
        default_factory=lambda: [
            "full",
            "lora",
            "spu",
            "lorsu",
            "lorsu_no_bias",
            "lorsu_k4",
            "lorsu_s20",
            "lorsu_r8",
            *SCHEDULE_VARIANTS,
        ]  # fmt: skip
    )
    investigate_grids: dict[str, list[float]] = dataclasses.field(
        default_factory=lambda: {"full": [1e-5, 3e-5, 1e-4, 3e-4], "adapter": [3e-4, 1e-3, 3e-3, 1e-2]}
    )
    # the base-to-new investigation (validation data only): RLP with and without dropout vs CoOp over a wider lr grid,
    # base / new / H measured on the validation images of both halves
    investigate_b2n_datasets: list[str] = dataclasses.field(
        default_factory=lambda: ["fashion_mnist:low_contrast", "fashion_mnist:inverted", "digits"]
    )
    investigate_b2n_methods: list[str] = dataclasses.field(default_factory=lambda: ["rlp", *PROMPT_VARIANTS, "coop"])
    investigate_b2n_grid: list[float] = dataclasses.field(default_factory=lambda: [3e-3, 1e-2, 3e-2, 1e-1])
    investigate_b2n_seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    b2n_datasets: list[str] = dataclasses.field(
        default_factory=lambda: ["fashion_mnist:low_contrast", "fashion_mnist:inverted", "digits"]
    )
    b2n_methods: list[str] = dataclasses.field(default_factory=lambda: ["zero_shot", "rlp", "coop"])
    b2n_shots: int = 16
    b2n_epochs: int = 10
    # context of the prompt methods in base-to-new: the paper's 4 tokens, and a 7-token pretraining template with which
    # rank-1 RLP (n + d parameters) stays under a quarter of CoOp's n * d
    b2n_init_texts: list[str] = dataclasses.field(
        default_factory=lambda: ["a photo of a", "a black and white photo of a"]
    )
    init_text: str = "a photo of a"
    prompt_rank: int = 1
    split_seed: int = 0

    def fingerprint(self) -> str:
        """Hash of the fields a single run depends on (a resumed run reuses only results with the same hash)."""
        # what a run is keyed on anyway (target, shots, method, lr, seed) or what only decides which runs happen
        outside = {
            "targets",
            "shots",
            "seeds",
            "selection_seeds",
            "balanced",
            "methods",
            "grids",
            "b2n_datasets",
            "b2n_methods",
            "b2n_init_texts",
            "control_val_per_class",
        }
        outside |= {f.name for f in dataclasses.fields(self) if f.name.startswith("investigate_")}
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in outside}
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


PLANS: dict[str, Plan] = {
    "full": Plan(),
    "smoke": Plan(
        targets=["digits", "fashion_mnist:inverted"],
        methods=list(METHODS),  # every row, also those the full plan leaves out of its headline
        shots=[1],
        sessions=2,
        epochs=1,
        batch_size=8,
        r=4,
        lora_alpha=4.0,
        seeds=[0, 1],
        grids={"full": [1e-4], "adapter": [1e-3, 3e-3], "prompt": [1e-2]},
        val_per_class=2,
        pool_per_class=4,
        test_per_class=4,
        control_per_class=3,
        b2n_datasets=["digits"],
        b2n_shots=2,
        b2n_epochs=1,
        b2n_init_texts=["a photo of a"],
        control_val_per_class=3,
        investigate_targets=["digits"],
        investigate_shots=1,
        investigate_methods=["lora", "lorsu", "lorsu_core", "lorsu_epoch_cosine"],
        investigate_grids={"full": [1e-4], "adapter": [1e-3, 1e-2]},
        investigate_b2n_datasets=["digits"],
        investigate_b2n_methods=["rlp", "rlp_drop25", "rlp_sgd", "coop"],
        investigate_b2n_grid=[1e-2],
        investigate_b2n_seeds=[0],
    ),
}


# ------------------------------------------------------------------------------------------------------------ data


@dataclasses.dataclass
class TargetData:
    """A target's session pool (train minus validation), its validation split (train) and its test split."""

    name: str
    pool: ClassificationSet
    val: ClassificationSet
    test: ClassificationSet

    def sizes(self) -> dict:
        return {
            "pool": len(self.pool.labels),
            "val": len(self.val.labels),
            "test": len(self.test.labels),
            "classes": self.test.class_names,
        }


def take(
    data: ClassificationSet, indices: torch.Tensor, class_names: Sequence[str] | None = None
) -> ClassificationSet:
    names = list(class_names) if class_names is not None else list(data.class_names)
    return ClassificationSet(data.pixel_values[indices], data.labels[indices], names)


def load_labeled(name: str, split: str) -> LabeledImages:
    """``name``'s ``split`` as uint8 images (the test suite replaces this with stand-ins where data is missing)."""
    if name.partition(":")[0] == "demo":  # the packaged set names its splits after their role
        split = {"train": "target_train", "test": "target_test"}.get(split, split)
    return load_image_dataset(name, split)


def as_pixels(data: LabeledImages, indices: torch.Tensor, image_size: int) -> ClassificationSet:
    """The images at ``indices`` as CLIP pixel values (converted after subsampling: a 60k-image split stays cheap)."""
    pixels = to_pixel_values(data.images[indices], image_size)
    return ClassificationSet(pixels, data.labels[indices], list(data.class_names))


def load_target(name: str, image_size: int, plan: Plan) -> TargetData:
    """Validation: ``val_per_class`` train images per class; pool: up to ``pool_per_class`` of the other train
    images per class (the sessions are drawn from it); test: up to ``test_per_class`` test images per class."""
    train, test = load_labeled(name, "train"), load_labeled(name, "test")
    val_idx = per_class_indices(train.labels, plan.val_per_class, plan.split_seed)
    rest = torch.ones(len(train.labels), dtype=torch.bool)
    rest[val_idx] = False
    rest_idx = torch.nonzero(rest).flatten()
    pool_idx = rest_idx[per_class_indices(train.labels[rest_idx], plan.pool_per_class, plan.split_seed)]
    test_idx = per_class_indices(test.labels, plan.test_per_class, plan.split_seed)
    return TargetData(
        name,
        as_pixels(train, pool_idx, image_size),
        as_pixels(train, val_idx, image_size),
        as_pixels(test, test_idx, image_size),
    )


def load_controls(plan: Plan, image_size: int) -> dict[str, ClassificationSet]:
    controls = {}
    for name in plan.controls:
        data = load_labeled(name, "test")
        controls[name] = as_pixels(
            data, per_class_indices(data.labels, plan.control_per_class, plan.split_seed), image_size
        )
    return controls


def base_only(data: ClassificationSet) -> ClassificationSet:
    """The images of the base classes (the first ceil(C / 2)), labels unchanged, class names cut to the base."""
    base, _ = base_to_new_split(len(data.class_names))
    keep = torch.nonzero(data.labels < len(base)).flatten()
    return take(data, keep, data.class_names[: len(base)])


# ------------------------------------------------------------------------------------------------------------ runs


class RunCache:
    """Finished runs, one JSON object a line, appended as they complete (survives a crash; no pickle)."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path, self.records, self.reused = path, {}, 0
        self.bar: Any = None  # a tqdm bar advanced by every run, finished or reused
        if resume and path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.records[record["key"]] = record
            logger.info("resuming: %d finished runs in %s", len(self.records), path)
        elif path.exists():
            path.unlink()

    def get_or_run(self, key: dict, fn: Callable[[], dict]) -> dict:
        text = json.dumps(key, sort_keys=True)
        if self.bar is not None:
            self.bar.update(1)
        if text in self.records:
            self.reused += 1
            return self.records[text]["result"]
        result = fn()
        record = {"key": text, "result": result}
        self.records[text] = record
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return result


class Bench:
    """Holds the model, the data and the run cache; runs the continual and base-to-new experiments of a plan."""

    def __init__(self, plan: Plan, out: Path, resume: bool) -> None:
        self.plan, self.out = plan, out
        self.model, self.tokenizer = load_clip(plan.model)
        self.image_size = int(self.model.config.vision_config.image_size)
        self.cache = RunCache(out / "accuracy_runs.jsonl", resume)
        self.fingerprint = plan.fingerprint()
        self._targets: dict[str, TargetData] = {}
        self.controls = load_controls(plan, self.image_size)

    def control_val(self) -> dict[str, ClassificationSet]:
        """Validation images of the controls: ``control_val_per_class`` per class from their *train* splits (images
        the mini-CLIP was pretrained on), so that forgetting can be measured without their test images."""
        if not hasattr(self, "_control_val"):
            self._control_val = {}
            for name in self.plan.controls:
                data = load_labeled(name, "train")
                idx = per_class_indices(data.labels, self.plan.control_val_per_class, self.plan.split_seed)
                self._control_val[name] = as_pixels(data, idx, self.image_size)
        return self._control_val

    def target(self, name: str) -> TargetData:
        if name not in self._targets:
            self._targets[name] = load_target(name, self.image_size, self.plan)
        return self._targets[name]

    def _config(self, method: Method, lr: float, seed: int, **fields: Any) -> ContinualConfig:
        """The run's ContinualConfig: the plan's settings, then the method's own fields, then ``fields``."""
        p = self.plan
        base = dict(
            method=method.runner_method,
            sessions=p.sessions,
            disjoint_classes=p.disjoint_classes,
            shots=1,
            epochs=p.epochs,
            lr=lr or 1.0,  # zero-shot trains nothing; the runner still wants a positive rate
            batch_size=p.batch_size,
            loss=p.loss,
            r=p.r,
            lora_alpha=p.lora_alpha,
            top_k_heads=p.top_k_heads,
            sparsity=p.sparsity,
            init_text=p.init_text,
            prompt_rank=p.prompt_rank,
            optimizer=p.optimizer,
            lr_schedule=p.lr_schedule,
            seed=seed,
        )
        if method.prompt_lr_scale is not None:
            base["prompt_lr"] = base["lr"] * method.prompt_lr_scale
        return ContinualConfig(**{**base, **(method.config_fields or {}), **fields})

    def _run(self, key: dict, method: Method, config: ContinualConfig, train, test, controls) -> tuple[dict, Any]:
        runner = BenchmarkRunner(
            copy.deepcopy(self.model),
            self.tokenizer,
            train,
            test,
            controls,
            config,
            lorsu_options=method.lorsu_options,
            head_scorer=method.head_scorer,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' is_gradient_checkpointing deprecation
            result = runner.run(show_progress=False)
        record = {
            "columns": result.columns,
            "rows": result.rows,
            "target_improvement": result.target_improvement,
            "control_change": result.control_change,
            "trainable_params": max(result.trainable_params, default=0),
            "seconds": result.seconds,
            "train_seconds": result.seconds - runner.eval_seconds,
        }
        logger.info(
            "%s: final %s (%.1fs)",
            json.dumps({k: v for k, v in key.items() if k != "plan"}),
            [round(100 * v, 1) for v in result.rows[-1]],
            result.seconds,
        )
        return record, runner

    # ---------------------------------------------------------------------------------------------- continual

    def continual_run(self, target: str, shots: int, method: Method, lr: float, seed: int, split: str) -> dict:
        """One continual run, trained on the pool; evaluated on ``split``: ``"val"`` the target's validation images,
        ``"val+controls"`` those and the controls' validation images (from their train splits), ``"test"`` the
        target's and the controls' test images."""
        key = dict(kind="continual", target=target, shots=shots, method=method.name, lr=lr, seed=seed, split=split)
        key["plan"] = self.fingerprint
        if split == "val+controls":
            key["control_val_per_class"] = self.plan.control_val_per_class

        def run() -> dict:
            data = self.target(target)
            test, controls = {
                "val": (data.val, {}),
                "val+controls": (data.val, self.control_val()),
                "test": (data.test, self.controls),
            }[split]
            config = self._config(method, lr, seed, shots=shots)
            return self._run(key, method, config, data.pool, test, controls)[0]

        return self.cache.get_or_run(key, run)

    def select_lr(self, grid: list[float], evaluate: Callable[[float, int], dict], balanced: bool) -> dict:
        """The runner's rule (:func:`peft_lorsu.app.lr_search.select_lr`) over the plan's selection seeds: the best
        final target validation accuracy; with ``balanced`` also the best TI_val + CC_val (CC_val from the controls'
        validation images). Ties go to the smaller lr."""
        return select_lr(grid, evaluate, self.plan.selection_seeds, balanced=balanced).to_dict()

    def method_entry(
        self,
        method: Method,
        val_run: Callable[[float, int], dict],
        final: Callable[[float, int], dict],
        balanced: bool = False,
    ) -> dict:
        """Pick the lr of ``method`` on validation runs ``val_run(lr, seed)``, then ``final(lr, seed)`` for every
        seed; with ``balanced`` also at the lr of the balanced rule (see :meth:`select_lr`)."""
        if not method.grid:
            runs = [{"seed": s, **final(0.0, s)} for s in self.plan.seeds[:1]]  # zero-shot: no seed dependence
            return {"lr": 0.0, "lr_selection": None, "runs": runs}
        selection = self.select_lr(self.plan.grids[method.grid], val_run, balanced)
        entry = {"lr": selection["chosen"], "lr_selection": selection}
        entry["runs"] = [{"seed": s, **final(entry["lr"], s)} for s in self.plan.seeds]
        if balanced:
            lr = selection["chosen_balanced"]
            entry["balanced"] = {"lr": lr, "runs": [{"seed": s, **final(lr, s)} for s in self.plan.seeds]}
        return entry

    def continual_setting(self, target: str, shots: int) -> dict:
        setting: dict[str, Any] = {"target": target, "shots": shots, "methods": {}}
        for name in self.plan.methods:
            m = ALL_METHODS[name]
            entry = self.method_entry(
                m,
                lambda lr, seed, m=m: self.continual_run(target, shots, m, lr, seed, "val+controls"),
                lambda lr, seed, m=m: self.continual_run(target, shots, m, lr, seed, "test"),
                balanced=self.plan.balanced,
            )
            setting["columns"] = entry["runs"][0]["columns"]
            setting["methods"][name] = entry
            logger.info("%s %d-shot %s done (lr %g)", target, shots, name, entry["lr"])
        return setting

    # ---------------------------------------------------------------------------------------------- base-to-new

    def b2n_run(self, dataset: str, init_text: str, method: Method, lr: float, seed: int, split: str) -> dict:
        """Train ``method`` on the base classes only (one session of ``b2n_shots`` per class); ``split="val"``
        returns the base-class validation accuracy, ``"test"`` base / new / H on the test split, ``"val_b2n"``
        base / new / H on the validation split (the investigation; never used to choose a headline setting)."""
        key = dict(kind="b2n", dataset=dataset, init_text=init_text, method=method.name, lr=lr, seed=seed, split=split)
        key["plan"] = self.fingerprint

        def run() -> dict:
            data = self.target(dataset)
            pool, val = base_only(data.pool), base_only(data.val)
            config = self._config(
                method,
                lr,
                seed,
                sessions=1,
                shots=self.plan.b2n_shots,
                epochs=self.plan.b2n_epochs,
                init_text=init_text,
                disjoint_classes=False,
            )
            record, runner = self._run(key, method, config, pool, val, {})
            evaluated = {"test": data.test, "val_b2n": data.val}.get(split)
            if evaluated is not None:
                prompts = build_class_prompts(evaluated.class_names, init_text=init_text)
                b2n = evaluate_base_to_new(runner.final_model, evaluated.eval_batches(), prompts, self.tokenizer)
                record.update(base=b2n.base_accuracy, new=b2n.new_accuracy, harmonic=b2n.harmonic_mean)
            return record

        return self.cache.get_or_run(key, run)

    def b2n_setting(self, dataset: str, init_text: str) -> dict:
        setting: dict[str, Any] = {"dataset": dataset, "init_text": init_text, "methods": {}}
        for name in self.plan.b2n_methods:
            m = ALL_METHODS[name]
            setting["methods"][name] = self.method_entry(
                m,
                lambda lr, seed, m=m: self.b2n_run(dataset, init_text, m, lr, seed, "val"),
                lambda lr, seed, m=m: self.b2n_run(dataset, init_text, m, lr, seed, "test"),
            )
        return setting

    # ---------------------------------------------------------------------------------------------- investigation

    def investigation(self, target: str) -> dict:
        """Validation-only trade-off of every investigated method over its wider lr grid: TI and CC measured on the
        target's and the controls' validation images (no test image is used)."""
        p = self.plan
        shots = p.investigate_shots
        out: dict[str, Any] = {"target": target, "shots": shots, "seeds": p.investigate_seeds, "methods": {}}
        for name in p.investigate_methods:
            m = ALL_METHODS[name]
            points = []
            for lr in p.investigate_grids[m.grid]:
                runs = [self.continual_run(target, shots, m, lr, s, "val+controls") for s in p.investigate_seeds]
                points.append(
                    {
                        "lr": lr,
                        "target_val": mean_std([r["rows"][-1][0] for r in runs]),
                        "ti_val": mean_std([r["target_improvement"] for r in runs]),
                        "cc_val": mean_std([r["control_change"] for r in runs]),
                    }
                )
            out["columns"] = runs[0]["columns"]
            out["zero_shot_val"] = runs[0]["rows"][0]
            out["methods"][name] = {
                "description": m.description,
                "trainable_params": runs[0]["trainable_params"],
                "points": points,
            }
        return out

    def investigation_b2n(self, dataset: str) -> dict:
        """Validation-only base-to-new study: every investigated prompt method over the wider lr grid and seeds,
        base / new / H on the validation images (both halves of the classes)."""
        p = self.plan
        out: dict[str, Any] = {"dataset": dataset, "init_text": p.init_text, "seeds": p.investigate_b2n_seeds}
        out["methods"] = {}
        for name in p.investigate_b2n_methods:
            m = ALL_METHODS[name]
            points = []
            for lr in p.investigate_b2n_grid:
                runs = [self.b2n_run(dataset, p.init_text, m, lr, s, "val_b2n") for s in p.investigate_b2n_seeds]
                points.append({"lr": lr, **{f: mean_std([r[f] for r in runs]) for f in ("base", "new", "harmonic")}})
            out["methods"][name] = {
                "description": m.description,
                "trainable_params": runs[0]["trainable_params"],
                "points": points,
            }
        return out

    def total_runs(self) -> int:
        p = self.plan
        trained = [m for m in p.methods if ALL_METHODS[m].grid]
        # selection runs, final runs at the headline lr, and at the balanced lr (reused where the two agree)
        per_setting = sum(
            len(p.grids[ALL_METHODS[m].grid]) * len(p.selection_seeds) + (1 + p.balanced) * len(p.seeds)
            for m in trained
        )
        per_setting += "zero_shot" in p.methods
        b2n_trained = [m for m in p.b2n_methods if ALL_METHODS[m].grid]
        per_b2n = sum(len(p.grids[ALL_METHODS[m].grid]) * len(p.selection_seeds) + len(p.seeds) for m in b2n_trained)
        per_b2n += "zero_shot" in p.b2n_methods
        total = len(p.targets) * len(p.shots) * per_setting + len(p.b2n_datasets) * len(p.b2n_init_texts) * per_b2n
        per_study = sum(len(p.investigate_grids[ALL_METHODS[m].grid]) for m in p.investigate_methods)
        b2n_study = len(p.investigate_b2n_methods) * len(p.investigate_b2n_grid) * len(p.investigate_b2n_seeds)
        total += len(p.investigate_b2n_datasets) * b2n_study
        return total + len(p.investigate_targets) * per_study * len(p.investigate_seeds)


# ------------------------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy",
        description="Continual few-shot accuracy of LoRSU vs LoRA / full fine-tuning / sparse update / random heads, "
        "and RLP vs CoOp base-to-new, on the packaged mini-CLIP or any CLIP given by --model.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny run (seconds) to check the pipeline")
    mode.add_argument("--report-only", action="store_true", help="rebuild accuracy.md and plots from accuracy.json")
    parser.add_argument("--out", default="docs/benchmarks", help="output folder (default: docs/benchmarks)")
    parser.add_argument("--model", default=None, help="CLIP hub name or folder (default: the packaged mini-CLIP)")
    parser.add_argument(
        "--target",
        action="append",
        help="target dataset (repeatable; default: digits and "
        "fashion_mnist:inverted); local source, hub name, optionally :inverted / :rotated / ...",
    )
    parser.add_argument(
        "--control", action="append", help="control dataset (repeatable; default: fashion_mnist, animal_mnist)"
    )
    parser.add_argument("--b2n", action="append", help="base-to-new dataset (repeatable)")
    parser.add_argument(
        "--b2n-init-text", action="append", help="base-to-new context init text (repeatable; default: the plan's two)"
    )
    parser.add_argument(
        "--method", action="append", choices=list(ALL_METHODS), help="methods (repeatable; default all)"
    )
    parser.add_argument("--shots", type=int, nargs="+", help="shots per class per session (default: 5 10)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds of the final runs (default: 0 1 2)")
    parser.add_argument("--epochs", type=int, help="epochs per session")
    parser.add_argument(
        "--disjoint",
        action="store_true",
        help="the paper's class-disjoint sessions (default: every session holds every class)",
    )
    parser.add_argument("--r", type=int, help="rank of LoRSU and LoRA (lora_alpha follows)")
    parser.add_argument("--top-k-heads", type=int, help="LoRSU heads per layer")
    parser.add_argument("--sparsity", type=float, help="LoRSU / sparse-update fc1 fraction")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared CPU)")
    parser.add_argument(
        "--no-investigate",
        action="store_true",
        help="skip the validation-only investigations (continual and base-to-new)",
    )
    parser.add_argument(
        "--no-balanced", action="store_true", help="skip the final runs at the balanced rule's lr (headline rule only)"
    )
    parser.add_argument(
        "--no-b2n-investigation", action="store_true", help="skip the base-to-new investigation (RLP variants)"
    )
    parser.add_argument(
        "--investigate-target", action="append", help="targets of the investigation (repeatable; default: all four)"
    )
    parser.add_argument(
        "--investigate-method",
        action="append",
        choices=list(ALL_METHODS),
        help="methods of the validation-only investigation (repeatable; default: the plan's list)",
    )
    parser.add_argument("--resume", action="store_true", help="reuse the finished runs in <out>/accuracy_runs.jsonl")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every run")
    return parser.parse_args(argv)


def build_plan(args: argparse.Namespace) -> Plan:
    plan = copy.deepcopy(PLANS["smoke" if args.smoke else "full"])
    overrides = {
        "model": args.model,
        "targets": args.target,
        "controls": args.control,
        "b2n_datasets": args.b2n,
        "b2n_init_texts": args.b2n_init_text,
        "methods": args.method,
        "shots": args.shots,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "top_k_heads": args.top_k_heads,
        "sparsity": args.sparsity,
    }
    for name, value in overrides.items():
        if value is not None:
            setattr(plan, name, value)
    if args.no_balanced:
        plan.balanced = False
    if args.no_investigate:
        plan.investigate_targets, plan.investigate_b2n_datasets = [], []
    if args.no_b2n_investigation:
        plan.investigate_b2n_datasets = []
    if args.investigate_target:
        plan.investigate_targets = args.investigate_target
    if args.investigate_method:
        plan.investigate_methods = args.investigate_method
    if args.disjoint:
        plan.disjoint_classes = True
    if args.r is not None:
        plan.r, plan.lora_alpha = args.r, float(args.r)
    if "zero_shot" not in plan.methods:
        plan.methods.insert(0, "zero_shot")
    if not head_scoring_available():
        dropped = [m for m in {*plan.methods, *plan.investigate_methods} if ALL_METHODS[m].head_scoring]
        if dropped:
            logger.warning("this peft_lorsu has no LoRSUConfig.head_scoring: skipping %s", sorted(dropped))
        plan.methods = [m for m in plan.methods if m not in dropped]
        plan.investigate_methods = [m for m in plan.investigate_methods if m not in dropped]
    return plan


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    logger.setLevel(logging.INFO if args.verbose else logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads((out / "accuracy.json").read_text())
        accuracy_report.write_report(results, out)
        return 0
    torch.set_num_threads(args.threads)
    plan = build_plan(args)
    start = time.perf_counter()
    bench = Bench(plan, out, resume=args.resume)
    results: dict[str, Any] = {
        "mode": "smoke" if args.smoke else "full",
        "command": "python -m benchmarks.accuracy " + shlex.join(sys.argv[1:] if argv is None else list(argv)),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "plan": dataclasses.asdict(plan),
        "model": plan.model or "packaged mini-CLIP (peft_lorsu/assets/mini-clip)",
        "data": {},
        "methods": {m: ALL_METHODS[m].to_json() for m in plan.methods},
        "variants": {m: ALL_METHODS[m].to_json() for m in [*plan.investigate_methods, *plan.investigate_b2n_methods]},
        "continual": [],
        "base_to_new": [],
    }
    bench.cache.bar = tqdm(total=bench.total_runs(), desc="accuracy runs", unit="run")
    for target in plan.targets:
        data = bench.target(target)
        results["data"][target] = data.sizes()
        for shots in plan.shots:
            results["continual"].append(bench.continual_setting(target, shots))
            accuracy_report.summarize(results)
            (out / "accuracy.json").write_text(json.dumps(results, indent=1))  # checkpoint after every setting
    for name, data in bench.controls.items():
        results["data"][name] = {"test": len(data.labels), "classes": data.class_names}
    for dataset in plan.b2n_datasets:
        data = bench.target(dataset)
        results["data"].setdefault(dataset, data.sizes())
        for init_text in plan.b2n_init_texts:
            results["base_to_new"].append(bench.b2n_setting(dataset, init_text))
    results["investigation"] = []
    for target in plan.investigate_targets:
        results["investigation"].append(bench.investigation(target))
    results["investigation_b2n"] = [bench.investigation_b2n(d) for d in plan.investigate_b2n_datasets]
    bench.cache.bar.close()
    results["wall_seconds"] = time.perf_counter() - start
    results["runs"] = len(bench.cache.records)
    results["run_seconds_total"] = sum(r["result"]["seconds"] for r in bench.cache.records.values())
    results["resumed"] = bool(args.resume and bench.cache.reused)
    accuracy_report.summarize(results)
    (out / "accuracy.json").write_text(json.dumps(results, indent=1))
    accuracy_report.write_report(results, out)
    logger.info("wrote %s (%d runs, %.1f min)", out / "accuracy.json", results["runs"], results["wall_seconds"] / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
