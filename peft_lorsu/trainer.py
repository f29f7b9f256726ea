"""HF ``Trainer`` integration: collators, losses and the probe-then-wrap helper.

Two training signals are supported out of the box:

- **CLIP contrastive** (image-caption pairs): :class:`ImageTextCollator` adds ``return_loss=True`` to every batch,
  so ``Trainer`` uses ``CLIPModel``'s own symmetric loss. Set ``TrainingArguments(label_names=[])``.
- **Class-prompt cross-entropy** (image + label): :class:`ClassPromptCollator` adds the tokenised prompts of all
  classes to every batch, so ``CLIPModel`` returns ``logits_per_image`` of shape `(B, C)`; pass
  ``compute_loss_func=peft_lorsu.class_cross_entropy`` and ``TrainingArguments(remove_unused_columns=False)``.

:func:`get_lorsu_model` probes on the training dataset with the same collator and loss the Trainer will use, then
wraps the model, so a Trainer script needs no glue of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from torch.utils.data import DataLoader

from .lorsu import LoRSUConfig, probe_lorsu
from .lorsu.probe import default_loss
from .objectives import build_class_prompts, class_cross_entropy

logger = logging.getLogger(__name__)


def _pixel_values(samples: Sequence[Mapping[str, Any]], image_processor: Any) -> torch.Tensor:
    """`(B, 3, H, W)` from samples holding ``pixel_values`` tensors or raw ``image`` entries (PIL / arrays)."""
    if all("pixel_values" in s for s in samples):
        return torch.stack([torch.as_tensor(s["pixel_values"]) for s in samples]).float()
    if image_processor is None:
        raise ValueError("samples hold 'image' but no 'pixel_values': pass an image_processor to the collator")
    images = [s["image"] for s in samples]
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


class ImageTextCollator:
    """Batches image-caption pairs for the CLIP contrastive loss.

    Each sample holds ``pixel_values`` `(3, H, W)` (or an ``image`` for ``image_processor``) and a ``caption`` /
    ``text`` string (or already tokenised ``input_ids``). The batch has ``pixel_values`` `(B, 3, H, W)`,
    ``input_ids`` / ``attention_mask`` `(B, L)` and ``return_loss=True``.
    """

    def __init__(self, tokenizer: Any = None, image_processor: Any = None, max_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_length = max_length

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {"pixel_values": _pixel_values(samples, self.image_processor)}
        if all("input_ids" in s for s in samples):
            ids = [torch.as_tensor(s["input_ids"]) for s in samples]
            batch["input_ids"] = nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=0)
            batch["attention_mask"] = nn.utils.rnn.pad_sequence(
                [torch.ones_like(i) for i in ids], batch_first=True, padding_value=0
            )
        else:
            if self.tokenizer is None:
                raise ValueError("samples hold captions but no input_ids: pass a tokenizer to ImageTextCollator")
            texts = [s["caption"] if "caption" in s else s["text"] for s in samples]
            encoded = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            batch["input_ids"], batch["attention_mask"] = encoded["input_ids"], encoded["attention_mask"]
        batch["return_loss"] = True
        return batch


class ClassPromptCollator:
    """Batches labelled images with the tokenised prompts of every class, for a class-prompt cross-entropy.

    The batch has ``pixel_values`` `(B, 3, H, W)`, ``labels`` `(B,)` and the prompts' ``input_ids`` /
    ``attention_mask`` `(C, L)`, so ``CLIPModel(**batch_without_labels).logits_per_image`` is `(B, C)`.
    """

    def __init__(
        self,
        tokenizer: Any,
        class_names: Sequence[str],
        init_text: str = "a photo of a",
        template: str = "{init_text} {classname}.",
        image_processor: Any = None,
    ) -> None:
        self.image_processor = image_processor
        self.prompts = build_class_prompts(class_names, init_text=init_text, template=template)
        encoded = tokenizer(self.prompts, padding=True, return_tensors="pt")
        self.input_ids, self.attention_mask = encoded["input_ids"], encoded["attention_mask"]

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        labels = [s["labels"] if "labels" in s else s["label"] for s in samples]
        return {
            "pixel_values": _pixel_values(samples, self.image_processor),
            "labels": torch.as_tensor(np.asarray(labels), dtype=torch.long),
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
        }


def class_prompt_probe_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """``loss_fn(model, batch)`` form of :func:`~peft_lorsu.objectives.class_cross_entropy`, for probe and ``fit``."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return class_cross_entropy(model(**inputs), batch["labels"])


def probe_on_dataset(
    model: nn.Module,
    config: LoRSUConfig,
    dataset: Any,
    data_collator: Callable[[list], Mapping[str, Any]],
    batch_size: int = 16,
    loss_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor] | None = None,
    num_batches: int | None = None,
    show_progress: bool = True,
) -> LoRSUConfig:
    """Run :func:`probe_lorsu` over ``dataset`` batched by ``data_collator`` in dataset order (deterministic).

    With :class:`ClassPromptCollator` the default loss is the class-prompt cross-entropy; otherwise the model's own.
    """
    if loss_fn is None:
        loss_fn = class_prompt_probe_loss if isinstance(data_collator, ClassPromptCollator) else default_loss
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=data_collator)
    return probe_lorsu(model, config, loader, loss_fn=loss_fn, num_batches=num_batches, show_progress=show_progress)


def get_lorsu_model(
    model: nn.Module,
    config: LoRSUConfig,
    train_dataset: Any,
    data_collator: Callable[[list], Mapping[str, Any]],
    batch_size: int = 16,
    loss_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor] | None = None,
    num_batches: int | None = None,
    adapter_name: str = "default",
    show_progress: bool = True,
) -> PeftModel:
    """Probe on ``train_dataset`` (unless ``config`` already holds a selection), then ``get_peft_model``.

    The one call a Trainer script needs before ``Trainer(model=..., data_collator=data_collator, ...)``.
    """
    if not config.has_selection:
        probe_on_dataset(model, config, train_dataset, data_collator, batch_size, loss_fn, num_batches, show_progress)
    return get_peft_model(model, config, adapter_name=adapter_name)


def load_image_classification(
    source: str,
    split: str = "train",
    image_processor: Any = None,
    image_size: int | None = None,
    max_samples: int | None = None,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows ``{"pixel_values": (3, S, S), "label": int, "caption": str}`` and the class names, for Trainer scripts.

    Args:
        source: a folder with one sub-folder of images per class (read with ``datasets``' ``imagefolder`` builder
            and ``image_processor``), or a dataset name of :func:`peft_lorsu.datasets.load_image_dataset` (``demo``,
            ``digits``, ``fashion_mnist``, a hub name, ...) resized to ``image_size``.
        max_samples: keep the first ``max_samples`` rows (after a seeded shuffle).

    The caption of each row is a template from :data:`peft_lorsu.datasets.CAPTION_TEMPLATES` filled with its class
    name, drawn once with ``seed``, for the contrastive loss.
    """
    import random
    from pathlib import Path

    from .datasets import CAPTION_TEMPLATES, fill_template

    if Path(source).is_dir():
        try:
            from datasets import load_dataset
        except ImportError as error:
            raise ImportError("reading an image folder needs `datasets`: pip install 'peft-lorsu[data]'") from error
        if image_processor is None:
            raise ValueError("an image folder needs an image_processor to turn its images into pixel_values")
        data = load_dataset("imagefolder", data_dir=source, split=split)
        names = list(data.features["label"].names)
        pixels = image_processor(images=[im.convert("RGB") for im in data["image"]], return_tensors="pt")
        pixel_values, labels = pixels["pixel_values"], torch.as_tensor(data["label"])
    else:
        from .continual import load_classification_set

        if image_size is None:
            raise ValueError(f"source={source!r} is a dataset name: pass image_size (the model's input size)")
        data = load_classification_set(source, split, image_size)
        pixel_values, labels, names = data.pixel_values, data.labels, data.class_names
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:max_samples]
    rng = random.Random(seed)
    rows = [
        {
            "pixel_values": pixel_values[i],
            "label": int(labels[i]),
            "caption": fill_template(rng.choice(CAPTION_TEMPLATES), names[int(labels[i])]),
        }
        for i in order.tolist()
    ]
    return rows, names


@dataclass
class ImageDataArguments:
    """Data and model options shared by the example Trainer scripts (an ``HfArgumentParser`` dataclass)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "CLIP hub name or folder; default: the packaged mini-CLIP."}
    )
    train_data: str = field(
        default="demo", metadata={"help": "Image folder (one sub-folder per class) or a peft_lorsu dataset name."}
    )
    split: str = field(default="target_train", metadata={"help": "Split of train_data."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many images."})
    dry_run: bool = field(default=False, metadata={"help": "Tiny random CLIP and two steps: a smoke test."})


def load_script_inputs(data_args: ImageDataArguments, training_args: Any) -> tuple[Any, Any, list[dict], list[str]]:
    """``(model, tokenizer, rows, class_names)`` for an example script; ``dry_run`` swaps in a tiny random CLIP
    and caps the run at two steps and 16 images."""
    from transformers import CLIPImageProcessor

    from .resources import load_clip, tiny_random_clip

    if data_args.dry_run:
        model, tokenizer = tiny_random_clip()
        training_args.max_steps, training_args.report_to = 2, []
        data_args.max_train_samples = data_args.max_train_samples or 16
    else:
        model, tokenizer = load_clip(data_args.model_name_or_path)
    size = model.config.vision_config.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    rows, class_names = load_image_classification(
        data_args.train_data, data_args.split, processor, size, data_args.max_train_samples, seed=training_args.seed
    )
    logger.info("%d training images, %d classes", len(rows), len(class_names))
    return model, tokenizer, rows, class_names
