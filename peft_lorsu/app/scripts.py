"""Inputs of the example Trainer scripts (``examples/train_lorsu.py``, ``examples/train_rlp.py``): data and model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPImageProcessor

from .inputs import random_captions
from .models import load_clip, tiny_random_clip
from .sessions import load_classification_set

logger = logging.getLogger(__name__)


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
            and ``image_processor``), or a dataset name of :func:`peft_lorsu.app.data.load_image_dataset` (``demo``,
            ``digits``, ``fashion_mnist``, a hub name, ...) resized to ``image_size``.
        max_samples: keep the first ``max_samples`` rows (after a seeded shuffle).

    The caption of each row is a template from :data:`peft_lorsu.app.inputs.CAPTION_TEMPLATES` filled with its class
    name, drawn once with ``seed``, for the contrastive loss.
    """
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
        if image_size is None:
            raise ValueError(f"source={source!r} is a dataset name: pass image_size (the model's input size)")
        data = load_classification_set(source, split, image_size)
        pixel_values, labels, names = data.pixel_values, data.labels, data.class_names
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:max_samples]
    captions = random_captions(labels[order], names, seed)
    rows = [
        {"pixel_values": pixel_values[i], "label": int(labels[i]), "caption": caption}
        for i, caption in zip(order.tolist(), captions)
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
