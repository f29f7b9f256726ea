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

import copy
import json
import logging
import time
from dataclasses import asdict, replace
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
from .lr_search import LRSelection, default_grid, select_lr, split_validation
from .sessions import (
    ClassificationSet,
    ContinualResult,
    EpochBatches,
    adapter_nbytes,
    load_checkpoint,
    make_batches,
    save_checkpoint,
)
from .settings import (
    CLASS_CE_METHODS,
    METHODS,
    PROMPT_METHODS,
    SESSION_ADAPTER_METHODS,
    ContinualConfig,
    method_defaults,
)
from .training import TrainingDiverged, fit

__all__ = ["METHODS", "ContinualConfig", "ContinualRunner", "method_defaults", "session_indices"]
LR_SELECTION = "lr_selection.json"  # kept beside the checkpoints: a resumed lr="auto" run does not search again

logger = logging.getLogger(__name__)


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
            mode="full_rank" if cfg.method == "coop" else "low_rank",
            **({} if cfg.prompt_dropout is None else {"dropout": cfg.prompt_dropout}),
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

        With ``lr="auto"`` the learning rate is chosen first (:meth:`choose_lr`; the grid, the scores and the choice
        are logged and kept in ``result.lr_selection``), then the sessions run at the chosen rate on the training
        data minus the validation images.

        Args:
            checkpoint_dir: keep each finished session there (results and model, :func:`save_checkpoint`); a run
                given the folder of an interrupted one with the same settings resumes after its last finished
                session.

        Raises:
            TrainingDiverged: a session's loss stopped being finite (the message names the session, the step and the
                learning rate); the sessions before it stay in ``checkpoint_dir``.
        """
        if self.config.lr == "auto":
            return self._run_auto(show_progress, checkpoint_dir)
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
                    optimizer=cfg.optimizer,
                    schedule=cfg.lr_schedule,
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

    # -------------------------------------------------------------------------------------------- lr="auto"

    def choose_lr(self, show_progress: bool = False) -> LRSelection:
        """The learning rate of this run's method by the rule of :mod:`peft_lorsu.app.lr_search`.

        ``lr_val_per_class`` images per class of ``target_train`` are set aside; for every value of the grid
        (``lr_grid`` or the method's default grid) all sessions run on the other training images, from a copy of the
        model, and are scored on the set-aside images. Test and control data are not used.
        """
        cfg = self.config
        rest, val = split_validation(self.target_train, cfg.lr_val_per_class, cfg.seed)
        grid = cfg.lr_grid or default_grid(cfg.method, cfg.optimizer)

        def evaluate(lr: float, seed: int) -> dict:
            trial = ContinualRunner(
                copy.deepcopy(self.model), self.tokenizer, rest, val, {}, replace(cfg, lr=lr, seed=seed)
            )
            return trial.run(show_progress=False).to_dict()

        logger.info("%s: choosing lr from %s on %d validation images", cfg.method, grid, len(val.labels))
        return select_lr(grid, evaluate, [cfg.seed], show_progress=show_progress, desc=f"lr search {cfg.method}")

    def _run_auto(self, show_progress: bool, checkpoint_dir: str | Path | None) -> ContinualResult:
        cfg = self.config
        if cfg.method == "zero_shot":  # nothing is trained: no rate to choose
            return self._delegate(
                replace(cfg, lr=method_defaults(cfg.method)["lr"]), None, show_progress, checkpoint_dir
            )
        saved = Path(checkpoint_dir) / LR_SELECTION if checkpoint_dir else None
        selection = None
        if saved is not None and saved.exists():
            record = json.loads(saved.read_text())
            if record["config"] == asdict(cfg):
                selection = LRSelection.from_dict(record["selection"])
                logger.info("%s: lr %g chosen by an earlier run (%s)", cfg.method, selection.chosen, saved)
        if selection is None:
            selection = self.choose_lr(show_progress)
            if saved is not None:
                saved.parent.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps({"config": asdict(cfg), "selection": selection.to_dict()}))
        logger.info("%s: lr %g chosen\n%s", cfg.method, selection.chosen, selection.table())
        rest, _ = split_validation(self.target_train, cfg.lr_val_per_class, cfg.seed)
        return self._delegate(replace(cfg, lr=selection.chosen), selection, show_progress, checkpoint_dir, rest)

    def _delegate(
        self,
        config: ContinualConfig,
        selection: LRSelection | None,
        show_progress: bool,
        checkpoint_dir: str | Path | None,
        target_train: ClassificationSet | None = None,
    ) -> ContinualResult:
        """Run ``config`` (a resolved lr) on the same model and data; keep its final model as this runner's."""
        train = self.target_train if target_train is None else target_train
        final = ContinualRunner(self.model, self.tokenizer, train, self.target_test, self.controls, config)
        result = final.run(show_progress=show_progress, checkpoint_dir=checkpoint_dir)
        result.lr_selection = selection.to_dict() if selection is not None else None
        self.final_model, self.lr_selection = final.final_model, selection
        return result
