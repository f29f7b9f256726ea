"""The data and results of few-shot sessions: a labelled image set as CLIP pixel values, its batches for each
loss, and what a run of sessions measured."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_model, save_model
from torch import nn

from ..saving import save_adapter_atomic
from ..trainer import ClassPromptCollator, ImageTextCollator
from .data import load_image_dataset
from .inputs import random_captions, to_pixel_values
from .plots import has_matplotlib, plot_sessions

LOSSES = ("contrastive", "class_ce")


class ClassificationSet(NamedTuple):
    """Images with labels: ``pixel_values`` `(N, 3, H, W)` float, ``labels`` `(N,)` int64, ``class_names``."""

    pixel_values: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def eval_batches(self, size: int = 256) -> list[dict[str, torch.Tensor]]:
        """Consecutive evaluation batches ``{"pixel_values": (<=size, 3, H, W), "labels": (<=size,)}``, in order."""
        return [
            {"pixel_values": self.pixel_values[i : i + size], "labels": self.labels[i : i + size]}
            for i in range(0, len(self.labels), size)
        ]


def load_classification_set(name: str, split: str, image_size: int) -> ClassificationSet:
    """A dataset of :func:`peft_lorsu.app.data.load_image_dataset` (``"digits"``, ``"fashion_mnist:inverted"``, a
    hub name, ...) as CLIP pixel values `(N, 3, image_size, image_size)`. For ``"demo"``, ``train`` / ``test`` mean
    its ``target_train`` / ``target_test`` splits."""

    if name.partition(":")[0] == "demo":  # the packaged set names its splits after their role
        split = {"train": "target_train", "test": "target_test"}.get(split, split)
    data = load_image_dataset(name, split)
    return ClassificationSet(to_pixel_values(data.images, image_size), data.labels, list(data.class_names))


def make_batches(
    data: ClassificationSet,
    indices: torch.Tensor,
    tokenizer: Any,
    loss: str,
    batch_size: int,
    init_text: str = "a photo of a",
    shuffle: bool = False,
    seed: int = 0,
) -> list[dict]:
    """Model-ready batches of ``data[indices]`` for ``loss``.

    ``"contrastive"``: ``pixel_values``, a caption per image from a random template (seeded) as ``input_ids`` /
    ``attention_mask`` `(B, L)`, and ``return_loss=True``. ``"class_ce"``: ``pixel_values``, ``labels`` `(B,)` and the
    prompts ``"{init_text} {class}."`` of all classes as ``input_ids`` / ``attention_mask`` `(C, L)`.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    order = indices
    if shuffle:
        order = indices[torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))]
    if loss == "class_ce":
        collate = ClassPromptCollator(tokenizer, data.class_names, init_text=init_text)
    else:
        collate = ImageTextCollator(tokenizer)
    captions = random_captions(data.labels[order], data.class_names, seed)
    samples = [
        {"pixel_values": data.pixel_values[i], "label": int(data.labels[i]), "caption": caption}
        for i, caption in zip(order.tolist(), captions)
    ]
    return [collate(samples[start : start + batch_size]) for start in range(0, len(samples), batch_size)]


class EpochBatches:
    """Iterable that yields epoch ``e``'s pre-built batches on its ``e``-th iteration (fresh shuffle per epoch)."""

    def __init__(self, epochs: Sequence[list[dict]]) -> None:
        self.epochs, self.calls = list(epochs), 0

    def __iter__(self):
        batches = self.epochs[min(self.calls, len(self.epochs) - 1)]
        self.calls += 1
        return iter(batches)

    def __len__(self) -> int:
        return len(self.epochs[0])


@dataclass
class ContinualResult:
    """Accuracy matrix (``rows[0]`` zero-shot, then one per session) over ``columns`` (target, then controls).

    Memory: ``adapter_bytes[s]`` is what session ``s + 1`` adds, the bytes of its adapter tensors as saved
    (trainable weights plus index buffers such as LoRSU's fc1 indices and head rows, or RLP's frozen context), taken
    right after training; for ``full`` it is the bytes of the weights it trained. ``final_adapter_bytes`` is what the
    final model still holds in adapters: the sum of every session's with ``merge=False``, 0 once they are merged.
    """

    method: str
    columns: list[str]
    rows: list[list[float]] = field(default_factory=list)
    trainable_params: list[int] = field(default_factory=list)
    adapter_params: int = 0
    adapter_bytes: list[int] = field(default_factory=list)
    final_adapter_bytes: int = 0
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    lr_selection: dict | None = None  # lr="auto": the grid, the validation scores and the choice (LRSelection)

    @property
    def target_improvement(self) -> float:
        return self.rows[-1][0] - self.rows[0][0]

    @property
    def control_change(self) -> float:
        if len(self.columns) < 2:
            return 0.0
        changes = [self.rows[-1][j] - self.rows[0][j] for j in range(1, len(self.columns))]
        return sum(changes) / len(changes)

    def to_dict(self) -> dict:
        return {**asdict(self), "target_improvement": self.target_improvement, "control_change": self.control_change}

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write ``{method}.json``, ``{method}.csv`` and ``{method}.png`` (accuracy per session) into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"{self.method}.json", out / f"{self.method}.csv", out / f"{self.method}.png"]
        paths[0].write_text(json.dumps(self.to_dict(), indent=2))
        with paths[1].open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["session", *self.columns])
            for i, row in enumerate(self.rows):
                writer.writerow([i, *(f"{v:.4f}" for v in row)])
        if has_matplotlib():
            plot_sessions({self.method: self}, paths[2])
        else:
            paths.pop()
        return paths


# ---------------------------------------------------------------------------------------------------- checkpoints

PROGRESS = "progress.json"


def save_checkpoint(folder: Path, config: dict, session: int, result: ContinualResult, model: nn.Module) -> None:
    """Keep what session ``session`` finished with: the results so far and the model the next session starts from.

    A plain model is saved whole (``model.safetensors``); a PEFT model as its adapters (``adapters/``). The progress
    file is written last, by an atomic rename, so a checkpoint is either the previous one or this one.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        kind, names = "adapters", list(model.peft_config)
        save_adapter_atomic(model, folder / "adapters")
    else:
        kind, names = "model", []
        save_model(model, str(folder / "model.tmp.safetensors"))
        os.replace(folder / "model.tmp.safetensors", folder / "model.safetensors")
    progress = {"config": config, "session": session, "kind": kind, "adapters": names, "result": asdict(result)}
    (folder / f"{PROGRESS}.tmp").write_text(json.dumps(progress))
    os.replace(folder / f"{PROGRESS}.tmp", folder / PROGRESS)


def load_checkpoint(folder: Path, config: dict, base: nn.Module) -> tuple[int, ContinualResult, nn.Module] | None:
    """``(last finished session, results so far, model to continue from)``, or ``None`` without a checkpoint.

    Raises:
        ValueError: the checkpoint was made with other settings (resuming would mix two experiments).
    """
    path = folder / PROGRESS
    if not path.exists():
        return None
    progress = json.loads(path.read_text())
    if progress["config"] != config:
        changed = sorted(k for k in config if progress["config"].get(k) != config[k])
        raise ValueError(
            f"{folder} holds sessions of a run with other settings ({changed}); use another output folder or delete it"
        )
    result = ContinualResult(**progress["result"])
    if progress["kind"] == "model":
        load_model(base, str(folder / "model.safetensors"))
        return progress["session"], result, base
    first, *others = progress["adapters"]
    adapters = folder / "adapters"
    model = PeftModel.from_pretrained(base, _adapter_dir(adapters, first), adapter_name=first, is_trainable=True)
    for name in others:
        model.load_adapter(_adapter_dir(adapters, name), adapter_name=name, is_trainable=True)
    model.base_model.set_adapter(progress["adapters"])
    return progress["session"], result, model


def _adapter_dir(folder: Path, name: str) -> Path:
    """Where ``save_pretrained`` put adapter ``name``: the folder itself for ``default``, else a subfolder."""
    return folder if name == "default" else folder / name


def adapter_nbytes(model: PeftModel, adapter_name: str = "default") -> int:
    """Bytes of the tensors ``save_pretrained`` would write for ``adapter_name`` (parameters and saved buffers)."""
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return sum(t.numel() * t.element_size() for t in state.values())
