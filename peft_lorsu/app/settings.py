"""Settings of a continual run (:class:`ContinualConfig`) and each method's own optimisation defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..trainer import LR_SCHEDULES
from .sessions import LOSSES
from .training import OPTIMIZERS

VISION_METHODS = ("lorsu", "lorsu_random", "lora", "full", "spu")
SESSION_ADAPTER_METHODS = ("lorsu", "lorsu_random", "lora", "spu")  # one named adapter per session with merge=False
PROMPT_METHODS = ("rlp", "coop")
JOINT_METHODS = ("lorsu_rlp",)  # LoRSU on the image tower and RLP on the text tower, one adapter (LoRSURLPConfig)
CLASS_CE_METHODS = (*PROMPT_METHODS, *JOINT_METHODS)  # methods that train a text prompt need class prompts
METHODS = ("zero_shot", *VISION_METHODS, *PROMPT_METHODS, *JOINT_METHODS)

# Each method's recipe when a field is left as None. Image-side methods: the LoRSU authors' run (Adam, lr 1e-5, no
# weight decay); the authors' per-epoch cosine is offered as lr_schedule="epoch_cosine". Prompt methods: the CoOp
# recipe RLP builds on (SGD with momentum, lr 2e-3, cosine). See docs/deviations.md.
IMAGE_DEFAULTS = {"optimizer": "adamw", "lr": 1e-5, "lr_schedule": "constant"}
PROMPT_DEFAULTS = {"optimizer": "sgd", "lr": 2e-3, "lr_schedule": "cosine"}


def method_defaults(method: str) -> dict[str, object]:
    """``{"optimizer", "lr", "lr_schedule"}`` that :class:`ContinualConfig` uses for ``method`` when left unset."""
    return dict(PROMPT_DEFAULTS if method in PROMPT_METHODS else IMAGE_DEFAULTS)


@dataclass
class ContinualConfig:
    """Settings of a continual run. Fields of the adapters follow LoRSU's reference run unless stated.

    Args:
        method: one of :data:`METHODS`: ``zero_shot``; the vision methods ``lorsu``, ``lorsu_random`` (random
            heads and fc1 entries), ``lora``, ``full`` and ``spu`` (fc1 sparse update only); the prompt methods
            ``rlp`` and ``coop``; ``lorsu_rlp``, LoRSU and RLP trained together as one adapter each session.
        sessions: number of sessions T.
        shots: images per class per session.
        disjoint_classes: each session holds its own classes (the paper); else every session samples all classes.
        epochs, batch_size, weight_decay: optimisation per session.
        lr: a number, ``None`` for the method's default (:func:`method_defaults`), or ``"auto"``: chosen per method
            on a validation split of the target's training data (:mod:`peft_lorsu.app.lr_search`) over ``lr_grid``;
            the sessions then draw from the rest of the training data.
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum 0.9); ``None`` for the method's default.
        lr_schedule: ``"constant"``, ``"cosine"`` or ``"epoch_cosine"`` (LoRSU's reference schedule, see
            :func:`peft_lorsu.trainer.lr_schedule`), restarted every session; ``None`` for the method's default.
        lr_grid: the grid of ``lr="auto"`` (default: :func:`peft_lorsu.app.lr_search.default_grid`).
        lr_val_per_class: validation images per class that ``lr="auto"`` carves out of the training data.
        loss: ``"contrastive"`` (image-caption CLIP loss, the paper) or ``"class_ce"`` (class-prompt cross-entropy);
            the loss of the vision methods; the methods that train a text prompt (RLP, CoOp, ``lorsu_rlp``) always use
            ``"class_ce"``, since their prompt only exists in class prompts.
        r, lora_alpha, top_k_heads, sparsity: LoRSU / LoRA / sparse-update settings.
        merge: fold each session's adapter into the weights (the paper); ``False`` keeps one named adapter per
            session (``session_1``, ``session_2``, ...), all active, only the newest trainable, so that
            :meth:`ContinualRunner.rollback` can undo sessions (LoRSU, its ablations and LoRA).
        init_text, prompt_rank: RLP / CoOp context and rank; also the evaluation prompt prefix.
        prompt_dropout: RLP's dropout on ``P_A @ P_B`` in ``[0, 1)``; ``None`` for :class:`~peft_lorsu.RLPConfig`'s
            default (the paper's). Only ``rlp`` and ``lorsu_rlp`` have that low-rank branch, the other methods refuse
            a non-zero value.
        prompt_lr: ``lorsu_rlp`` only: the learning rate of the prompt part (default: ``lr`` for both parts). A text
            prompt usually wants a larger rate than the image-side adapter.
        seed: data sampling, initialisation and shuffling.
    """

    method: str = "lorsu"
    sessions: int = 5
    shots: int = 5
    disjoint_classes: bool = True
    epochs: int = 5
    lr: float | str | None = None
    optimizer: str | None = None
    lr_schedule: str | None = None
    lr_grid: list[float] | None = None
    lr_val_per_class: int = 10
    batch_size: int = 16
    weight_decay: float = 0.0
    loss: str = "contrastive"
    r: int = 64
    lora_alpha: float = 64
    top_k_heads: int = 2
    sparsity: float = 0.1
    merge: bool = True
    init_text: str = "a photo of a"
    prompt_rank: int = 1
    prompt_dropout: float | None = None
    prompt_lr: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"ContinualConfig.method must be one of {METHODS}, got {self.method!r}")
        for name, value in method_defaults(self.method).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.loss not in LOSSES:
            raise ValueError(f"ContinualConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"ContinualConfig.optimizer must be one of {OPTIMIZERS} or None, got {self.optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"ContinualConfig.lr_schedule must be one of {LR_SCHEDULES} or None, got {self.lr_schedule!r}"
            )
        for name in ("sessions", "shots", "epochs", "batch_size", "lr_val_per_class"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ContinualConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.lr != "auto" and not _positive(self.lr):
            raise ValueError(f"ContinualConfig.lr must be a finite number > 0, 'auto' or None, got {self.lr!r}")
        if self.lr_grid is not None:
            if not (isinstance(self.lr_grid, (list, tuple)) and self.lr_grid and all(map(_positive, self.lr_grid))):
                raise ValueError(
                    f"ContinualConfig.lr_grid must be None or a list of numbers > 0, got {self.lr_grid!r}"
                )
            self.lr_grid = [float(lr) for lr in self.lr_grid]
        if self.prompt_dropout is not None and not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"ContinualConfig.prompt_dropout must be None or in [0, 1), got {self.prompt_dropout!r}")
        if self.prompt_lr is not None and (self.method != "lorsu_rlp" or not self.prompt_lr > 0):
            raise ValueError(
                f"ContinualConfig.prompt_lr must be None or > 0 and is only used by method 'lorsu_rlp' (the others "
                f"train one part, at lr); got prompt_lr={self.prompt_lr!r} with method {self.method!r}"
            )
        if self.method == "lorsu_rlp" and not self.merge:
            raise ValueError(
                "ContinualConfig.merge=False is not supported by method 'lorsu_rlp': its sessions are merged (LoRSU) "
                "and folded (the prompt) one by one; use merge=True, or method 'lorsu' for one adapter per session"
            )
        if self.prompt_dropout and self.method not in ("rlp", "lorsu_rlp"):
            raise ValueError(
                f"ContinualConfig.prompt_dropout={self.prompt_dropout} needs RLP's low-rank branch (methods 'rlp' and "
                f"'lorsu_rlp'); method {self.method!r} has none (use None or 0.0)"
            )


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
