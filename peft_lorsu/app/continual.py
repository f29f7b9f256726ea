"""Continual few-shot sessions (the LoRSU paper's CL-T setting), for LoRSU and the baselines it is compared with.

The target data is split into T sessions (disjoint classes by default, ``shots`` images per class each). Every
session adapts the current model on that session's images only, then folds the update into the encoder (or keeps
one adapter per session), and evaluates on the target test set and on control sets. The result is an accuracy matrix
(rows: zero-shot, then each session; columns: target and controls), the target improvement
``TI = acc_target(final) - acc_target(zero-shot)`` and the control change
``CC = mean_c acc_c(final) - acc_c(zero-shot)``.

Methods are chosen by name (:data:`METHODS`) so that every one sees the same data, steps and evaluation.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ..joint import LoRSURLPConfig
from ..lorsu import LoRSUConfig, probe_lorsu
from ..lorsu.probe import default_loss
from ..objectives import build_class_prompts, class_prompt_probe_loss, zero_shot_accuracy
from ..rlp import RLPConfig
from .sessions import (
    LOSSES,
    ClassificationSet,
    ContinualResult,
    EpochBatches,
    adapter_nbytes,
    load_checkpoint,
    make_batches,
    save_checkpoint,
)
from .training import TrainingDiverged, fit

logger = logging.getLogger(__name__)

VISION_METHODS = ("lorsu", "lorsu_random", "lora", "full", "spu")
SESSION_ADAPTER_METHODS = ("lorsu", "lorsu_random", "lora", "spu")  # one named adapter per session with merge=False
PROMPT_METHODS = ("rlp", "coop")
JOINT_METHODS = ("lorsu_rlp",)  # LoRSU on the image tower and RLP on the text tower, one adapter (LoRSURLPConfig)
CLASS_CE_METHODS = (*PROMPT_METHODS, *JOINT_METHODS)  # methods that train a text prompt need class prompts
METHODS = ("zero_shot", *VISION_METHODS, *PROMPT_METHODS, *JOINT_METHODS)


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
        epochs, lr, batch_size, weight_decay: optimisation per session (AdamW, constant lr).
        loss: ``"contrastive"`` (image-caption CLIP loss, the paper) or ``"class_ce"`` (class-prompt cross-entropy);
            the loss of the vision methods; the methods that train a text prompt (RLP, CoOp, ``lorsu_rlp``) always use
            ``"class_ce"``, since their prompt only exists in class prompts.
        r, lora_alpha, top_k_heads, sparsity: LoRSU / LoRA / sparse-update settings.
        merge: fold each session's adapter into the weights (the paper); ``False`` keeps one named adapter per
            session (``session_1``, ``session_2``, ...), all active, only the newest trainable, so that
            :meth:`ContinualRunner.rollback` can undo sessions (LoRSU, its ablations and LoRA).
        init_text, prompt_rank: RLP / CoOp context and rank; also the evaluation prompt prefix.
        prompt_dropout: RLP's dropout on ``P_A @ P_B`` in ``[0, 1)``; only ``rlp`` and ``lorsu_rlp`` have that
            low-rank branch, the other methods refuse a non-zero value.
        prompt_lr: ``lorsu_rlp`` only: the learning rate of the prompt part (default: ``lr`` for both parts). A text
            prompt usually wants a larger rate than the image-side adapter.
        seed: data sampling, initialisation and shuffling.
    """

    method: str = "lorsu"
    sessions: int = 5
    shots: int = 5
    disjoint_classes: bool = True
    epochs: int = 5
    lr: float = 1e-5
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
    prompt_dropout: float = 0.0
    prompt_lr: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"ContinualConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"ContinualConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("sessions", "shots", "epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ContinualConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"ContinualConfig.lr must be a finite number > 0, got {self.lr!r}")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"ContinualConfig.prompt_dropout must be in [0, 1), got {self.prompt_dropout!r}")
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
        if self.prompt_dropout > 0.0 and self.method not in ("rlp", "lorsu_rlp"):
            raise ValueError(
                f"ContinualConfig.prompt_dropout={self.prompt_dropout} needs RLP's low-rank branch (methods 'rlp' and "
                f"'lorsu_rlp'); method {self.method!r} has none (use 0.0)"
            )


def session_indices(data: ClassificationSet, config: ContinualConfig) -> list[torch.Tensor]:
    """Indices of each session's few-shot images (seeded; sessions never share an image)."""
    g = torch.Generator().manual_seed(config.seed)
    classes = data.labels.unique(sorted=True)
    if config.disjoint_classes:
        if len(classes) < config.sessions:
            raise ValueError(f"sessions={config.sessions} exceeds the {len(classes)} target classes")
        groups = [classes[i :: config.sessions] for i in range(config.sessions)]
    else:
        groups = [classes] * config.sessions
    pools = {int(c): torch.nonzero(data.labels == c).flatten() for c in classes}
    pools = {c: idx[torch.randperm(len(idx), generator=g)] for c, idx in pools.items()}
    used = dict.fromkeys(pools, 0)
    sessions = []
    for group in groups:
        picked = []
        for c in group.tolist():
            start, stop = used[c], used[c] + config.shots
            if stop > len(pools[c]):
                raise ValueError(f"class {data.class_names[c]!r} has {len(pools[c])} images, needs {stop}")
            picked.append(pools[c][start:stop])
            used[c] = stop
        sessions.append(torch.cat(picked))
    return sessions


class ContinualRunner:
    """Runs :class:`ContinualConfig` on a CLIP model; see the module docstring.

    Args:
        model: a ``CLIPModel`` (adapted in place; pass a copy to keep the original).
        tokenizer: the model's tokenizer (captions, class prompts, RLP init text).
        target_train / target_test: the target data the model should learn.
        controls: name -> data the model should not forget.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        target_train: ClassificationSet,
        target_test: ClassificationSet,
        controls: dict[str, ClassificationSet],
        config: ContinualConfig,
    ) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.target_train, self.target_test, self.controls = target_train, target_test, controls
        self.loss = "class_ce" if config.method in CLASS_CE_METHODS else config.loss

    # -------------------------------------------------------------------------------------------- data

    def _batches(self, indices: torch.Tensor, shuffle: bool, seed: int) -> list[dict]:
        cfg = self.config
        return make_batches(
            self.target_train,
            indices,
            self.tokenizer,
            self.loss,
            cfg.batch_size,
            cfg.init_text,
            shuffle=shuffle,
            seed=seed,
        )

    def _loss_fn(self):
        return class_prompt_probe_loss if self.loss == "class_ce" else default_loss

    # -------------------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> list[float]:
        """Accuracy on the target test set, then on every control set."""
        accs = []
        for data in (self.target_test, *self.controls.values()):
            prompts = build_class_prompts(data.class_names, init_text=self.config.init_text)
            accs.append(zero_shot_accuracy(model, data.eval_batches(), prompts, self.tokenizer))
        return accs

    # -------------------------------------------------------------------------------------------- methods

    def _adapt(self, model: nn.Module, session: int, probe_data: list[dict]) -> nn.Module:
        """Return the module to train this session (``model`` itself, or a PEFT model around it)."""
        cfg, method = self.config, self.config.method
        name = self._adapter_name(session)
        if method in ("lorsu", "lorsu_random", "spu"):
            lorsu = self._probed_lorsu(model, session, probe_data)
            return self._add_adapter(model, lorsu, name)
        if method == "lorsu_rlp":  # a fresh pair every session: the last one was merged and folded in _finish

            lorsu = self._probed_lorsu(model, session, probe_data)
            return get_peft_model(model, LoRSURLPConfig(lorsu=lorsu, rlp=self._rlp_config()))
        if method == "lora":
            lora = LoraConfig(
                r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=r".*vision_model.*\.(q_proj|k_proj|v_proj)"
            )
            return self._add_adapter(model, lora, name)
        if method == "full":
            for p in model.parameters():
                p.requires_grad_(False)
            for module in (model.vision_model, model.visual_projection):
                module.requires_grad_(True)
            return model
        if method in PROMPT_METHODS:
            if isinstance(model, PeftModel):  # prompts keep training across sessions
                return model
            return get_peft_model(model, self._rlp_config())
        raise ValueError(f"unknown method {method!r}")

    def _probed_lorsu(self, model: nn.Module, session: int, probe_data: list[dict]) -> LoRSUConfig:
        """This session's LoRSU config (or its random / sparse-only ablation), its selection filled in by the probe."""
        cfg, method = self.config, self.config.method
        lorsu = LoRSUConfig(
            r=cfg.r,
            lora_alpha=cfg.lora_alpha,
            top_k_heads=cfg.top_k_heads,
            sparsity=cfg.sparsity,
            selection="random" if method == "lorsu_random" else "gradient",
            seed=cfg.seed + session,
        )
        if method == "spu":
            lorsu.adapt_attention = lorsu.adapt_projection = lorsu.train_biases = False
        probe_lorsu(model, lorsu, probe_data, loss_fn=self._loss_fn(), show_progress=False)
        return lorsu

    def _rlp_config(self):
        """The text prompt of RLP (low rank) or CoOp (full rank), initialised from ``init_text``."""

        cfg = self.config
        return RLPConfig(
            init_text=cfg.init_text,
            init_token_ids=self.tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"],
            rank=cfg.prompt_rank,
            dropout=cfg.prompt_dropout,
            mode="full_rank" if cfg.method == "coop" else "low_rank",
        )

    def _add_adapter(self, model: nn.Module, peft_config, name: str) -> nn.Module:
        if not isinstance(model, PeftModel):
            return get_peft_model(model, peft_config, adapter_name=name)
        # stacked adapters: all sessions active, only the newest trainable
        model.add_adapter(name, peft_config)
        names = list(model.peft_config)
        model.base_model.set_adapter(names)
        model.base_model.set_requires_grad([n for n in names if n != name], requires_grad=False)
        return model

    def _adapter_name(self, session: int) -> str:
        per_session = not self.config.merge and self.config.method in SESSION_ADAPTER_METHODS
        return f"session_{session}" if per_session else "default"

    def _session_bytes(self, trained: nn.Module, session: int) -> int:
        """What session ``session`` adds to the model, in bytes (see :class:`ContinualResult`)."""
        if isinstance(trained, PeftModel):
            return adapter_nbytes(trained, self._adapter_name(session))
        return sum(p.numel() * p.element_size() for p in trained.parameters() if p.requires_grad)

    def rollback(self, session: int) -> nn.Module:
        """Undo sessions ``session .. T`` of a finished run with ``merge=False``; return the model as it was after
        session ``session - 1`` (the base model, unwrapped, for ``session=1``).

        The adapters ``session_{session}`` and later are deleted from :attr:`final_model` (later sessions were trained
        on top of the rolled-back one, so they go too); the remaining ones stay active and the newest of them
        trainable. To drop a single session instead, call ``final_model.delete_adapter("session_<s>")``.

        Raises:
            ValueError: the run merged its sessions (``merge=True``), the method keeps no per-session adapter, no run
                has finished, or ``session`` is outside ``1..T``.
        """
        cfg = self.config
        if cfg.merge or cfg.method not in SESSION_ADAPTER_METHODS:
            raise ValueError(
                f"rollback needs one adapter per session: ContinualConfig(merge=False) with a method in "
                f"{SESSION_ADAPTER_METHODS}; this run has merge={cfg.merge}, method={cfg.method!r}"
            )
        model = getattr(self, "final_model", None)
        if not isinstance(model, PeftModel):
            raise ValueError("rollback: no adapters to roll back; call run() first")
        kept = [int(n.removeprefix("session_")) for n in model.peft_config]
        if not (isinstance(session, int) and 1 <= session <= max(kept)):
            raise ValueError(f"rollback: session must be in 1..{max(kept)}, got {session!r}")
        if session == 1:
            self.final_model = model.unload().eval()
            return self.final_model
        for s in sorted((s for s in kept if s >= session), reverse=True):
            model.delete_adapter(f"session_{s}")
        names = list(model.peft_config)
        model.base_model.set_adapter(names)
        model.base_model.set_requires_grad(names[:-1], requires_grad=False)
        self.final_model = model.eval()
        return model

    def _finish(self, trained: nn.Module) -> nn.Module:
        """The model the next session starts from."""
        if self.config.method == "full":
            trained.requires_grad_(False)
            return trained
        if self.config.method == "lorsu_rlp":
            # LoRSU merges into the image encoder; the prompt folds into the text position embeddings, exact here
            # because every prompt this runner builds starts with init_text (see RLPModel.merge_and_unload)
            return trained.merge_and_unload(fold_into_position_embedding=True)
        if isinstance(trained, PeftModel) and self.config.merge and self.config.method not in PROMPT_METHODS:
            return trained.merge_and_unload()
        return trained

    # -------------------------------------------------------------------------------------------- run

    def run(self, show_progress: bool = True, checkpoint_dir: str | Path | None = None) -> ContinualResult:
        """Run every session; return the accuracy matrix and the costs.

        Args:
            checkpoint_dir: keep each finished session there (results and model, :func:`save_checkpoint`); a run
                given the folder of an interrupted one with the same settings resumes after its last finished
                session.

        Raises:
            TrainingDiverged: a session's loss stopped being finite (the message names the session, the step and the
                learning rate); the sessions before it stay in ``checkpoint_dir``.
        """
        cfg = self.config
        torch.manual_seed(cfg.seed)
        columns = ["target", *self.controls]
        result = ContinualResult(method=cfg.method, columns=columns, config=asdict(cfg))
        start = time.perf_counter()
        model, done = self.model.eval(), 0
        resumed = load_checkpoint(Path(checkpoint_dir), asdict(cfg), model) if checkpoint_dir else None
        if resumed is not None:
            done, result, model = resumed
            logger.info("resuming %s after session %d of %d", cfg.method, done, cfg.sessions)
        else:
            result.rows.append(self.evaluate(model))
            logger.info("zero-shot: %s", dict(zip(columns, result.rows[0])))
        sessions = [] if cfg.method == "zero_shot" else session_indices(self.target_train, cfg)
        for session, indices in enumerate(sessions, start=1):
            if session <= done:
                continue
            torch.manual_seed(cfg.seed + session)  # each session's initialisation, also when resumed after s - 1
            probe_data = self._batches(indices, shuffle=False, seed=cfg.seed)
            trainable = self._adapt(model, session, probe_data)
            result.trainable_params.append(sum(p.numel() for p in trainable.parameters() if p.requires_grad))
            batches = [
                self._batches(indices, shuffle=True, seed=cfg.seed + 1000 * session + e) for e in range(cfg.epochs)
            ]
            try:
                fit(
                    trainable,
                    EpochBatches(batches),
                    epochs=cfg.epochs,
                    lr=cfg.lr,
                    weight_decay=cfg.weight_decay,
                    loss_fn=self._loss_fn(),
                    show_progress=show_progress,
                    lr_by_name={"rlp_": cfg.prompt_lr} if cfg.prompt_lr is not None else None,
                )
            except TrainingDiverged as error:
                error.args = (f"{cfg.method}, session {session}: {error}",)
                raise
            result.adapter_bytes.append(self._session_bytes(trainable, session))
            model = self._finish(trainable).eval()
            result.rows.append(self.evaluate(model))
            logger.info("session %d/%d: %s", session, cfg.sessions, dict(zip(columns, result.rows[-1])))
            if checkpoint_dir:
                save_checkpoint(Path(checkpoint_dir), asdict(cfg), session, result, model)
        if isinstance(model, PeftModel):
            tags = ("lora_", "lorsu_", "rlp_")
            result.adapter_params = sum(p.numel() for n, p in model.named_parameters() if any(t in n for t in tags))
            result.final_adapter_bytes = sum(adapter_nbytes(model, name) for name in model.peft_config)
        result.seconds += time.perf_counter() - start
        self.final_model = model
        return result
