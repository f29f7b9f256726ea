"""Objectives shared by LoRSU and RLP: class prompts, a zero-shot CLIP classifier head, losses and accuracy.

Conventions: ``logit_scale`` arguments are the multiplier ``s`` (CLIP's ``model.logit_scale.exp()``, 100 for
trained CLIP), not its logarithm. Accuracies are fractions in ``[0, 1]``. Shapes: B images, C classes, D the
projection width, L the prompt length.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .compat import pooled_features

T = TypeVar("T")
ClassPrompts = Sequence[str] | Mapping[str, torch.Tensor]


def build_class_prompts(
    class_names: Sequence[str],
    init_text: str = "a photo of a",
    template: str = "{init_text} {classname}.",
    replace_underscores: bool = True,
) -> list[str]:
    """One prompt per class, ``template`` filled with ``init_text`` and the class name.

    ``build_class_prompts(["cat", "sea_lion"])`` gives ``["a photo of a cat.", "a photo of a sea lion."]``. With
    RLP, ``init_text`` must be the adapter's init text so the prompts carry its context.
    """
    if len(class_names) == 0:
        raise ValueError("class_names is empty")
    prompts = []
    for name in class_names:
        name = name.replace("_", " ") if replace_underscores else name
        prompts.append(template.format(init_text=init_text, classname=name).strip())
    return prompts


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of shape ``(C, L)``, padded to the longest prompt."""
    encoded = tokenizer(list(prompts), padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def class_logits(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """``s * cos(image_b, text_c)``.

    Args:
        image_embeds (`torch.FloatTensor` of shape `(B, D)`): image features, any norm.
        text_embeds (`torch.FloatTensor` of shape `(C, D)`): one text feature per class, any norm.
        logit_scale: the multiplier ``s`` (``model.logit_scale.exp()``).

    Returns:
        `torch.FloatTensor` of shape `(B, C)`.
    """
    return logit_scale * F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).t()


def clip_contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """CLIP's symmetric loss ``(CE(s * I @ T.T, diag) + CE(s * T @ I.T, diag)) / 2``, features L2-normalised first.

    Args:
        image_embeds (`torch.FloatTensor` of shape `(B, D)`): row b is paired with row b of ``text_embeds``.
        text_embeds (`torch.FloatTensor` of shape `(B, D)`): the captions' features.
        logit_scale: the multiplier ``s`` (``model.logit_scale.exp()``).

    Returns:
        `torch.FloatTensor` scalar.
    """
    if image_embeds.shape[0] != text_embeds.shape[0]:
        raise ValueError(
            "image_embeds and text_embeds must pair row by row, got "
            f"{image_embeds.shape[0]} and {text_embeds.shape[0]} rows"
        )
    logits_per_image = class_logits(image_embeds, text_embeds, logit_scale)
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.t(), targets)) / 2


def class_cross_entropy(
    outputs: Any, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy over classes; usable as ``transformers.Trainer(compute_loss_func=class_cross_entropy)``.

    Args:
        outputs: logits of shape `(B, C)`, or a mapping / output object with a ``logits`` entry (e.g.
            [`ClassifierOutput`]) or a ``logits_per_image`` entry (a ``CLIPModel`` output over the class prompts).
        labels (`torch.LongTensor` of shape `(B,)`): class indices; -100 is ignored.
        num_items_in_batch: when given (Trainer passes it), the summed loss is divided by it, which keeps gradient
            accumulation exact.
    """
    if isinstance(outputs, torch.Tensor):
        logits = outputs
    else:
        logits = outputs["logits"] if "logits" in outputs else outputs["logits_per_image"]
    labels = labels.to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(logits, labels, reduction="sum") / num_items_in_batch


def class_prompt_probe_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """``loss_fn(model, batch)`` form of :func:`class_cross_entropy` (the batch holds ``labels`` and the class
    prompts), for ``probe_lorsu`` and training loops."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return class_cross_entropy(model(**inputs), batch["labels"])


def harmonic_mean(base: float, new: float) -> float:
    """``H = 2 * B * N / (B + N)``; 0 when both are 0."""
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def base_to_new_split(classes: int | Sequence[T]) -> tuple[list, list]:
    """Split classes into base (the first ``ceil(C / 2)``) and new (the rest).

    ``classes`` is a class count (indices are returned) or a sequence of classes, e.g. names (items are returned):
    ``base_to_new_split(5) == ([0, 1, 2], [3, 4])``.
    """
    items = list(range(classes)) if isinstance(classes, int) else list(classes)
    if len(items) < 2:
        raise ValueError(f"base-to-new needs at least 2 classes, got {len(items)}")
    cut = math.ceil(len(items) / 2)
    return items[:cut], items[cut:]


@dataclass
class BaseToNewResult:
    """Base-to-new accuracies (fractions in [0, 1]) and their harmonic mean."""

    base_accuracy: float
    new_accuracy: float
    harmonic_mean: float

    def __str__(self) -> str:
        return (
            f"base {100 * self.base_accuracy:.2f} / new {100 * self.new_accuracy:.2f} / "
            f"H {100 * self.harmonic_mean:.2f}"
        )


@dataclass
class ClassifierOutput(ModelOutput):
    """Output of [`ZeroShotClassifier`]: ``logits`` `(B, C)` and, given labels, the cross-entropy ``loss``."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


def unwrap_clip(model: nn.Module) -> nn.Module:
    """The CLIP model inside a PEFT model (adapters stay injected); checks it has both towers."""
    clip = model.get_base_model() if hasattr(model, "get_base_model") else model
    missing = [a for a in ("get_text_features", "get_image_features", "logit_scale") if not hasattr(clip, a)]
    if missing:
        raise TypeError(
            f"{type(clip).__name__} is not a CLIP model with both towers (missing {', '.join(missing)}); "
            "pass a CLIPModel or a PEFT model wrapping one"
        )
    return clip


class ZeroShotClassifier(nn.Module):
    """CLIP as a C-way classifier over class prompts: ``logits = s * cos(image_feature, text_feature_c)``.

    The C text features are computed in every forward. When the text side does not change for a while (training
    only the image tower, e.g. LoRSU, or evaluating), say so with :meth:`fixed_text_features`: inside that block they
    are computed once, without a graph, and reused.

    Args:
        model: a ``CLIPModel`` or a PEFT model wrapping one (RLP, LoRSU, ...).
        input_ids (`torch.LongTensor` of shape `(C, L)`): tokenised class prompts.
        attention_mask (`torch.LongTensor` of shape `(C, L)`, *optional*): the prompts' padding mask.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model = model
        self.clip = [unwrap_clip(model)]  # a list keeps it out of the module tree (it is inside self.model)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (num_classes, length), got {tuple(input_ids.shape)}")
        self.register_buffer("input_ids", input_ids, persistent=False)
        self.register_buffer("attention_mask", attention_mask, persistent=False)
        # (C, D) features fixed by `fixed_text_features`, else None
        self.fixed: torch.Tensor | None = None

    @classmethod
    def from_class_names(
        cls,
        model: nn.Module,
        tokenizer: Any,
        class_names: Sequence[str],
        init_text: str = "a photo of a",
        template: str = "{init_text} {classname}.",
    ) -> ZeroShotClassifier:
        """Build the prompts with [`build_class_prompts`] and tokenise them with ``tokenizer``."""
        prompts = build_class_prompts(class_names, init_text=init_text, template=template)
        return cls(model, **tokenize_prompts(tokenizer, prompts))

    @property
    def num_classes(self) -> int:
        return self.input_ids.shape[0]

    @contextmanager
    def fixed_text_features(self) -> Iterator[torch.Tensor]:
        """Compute the text features once (no graph) and use them for every forward inside the block.

        Only correct while nothing on the text side changes; the block ends with them released.
        """
        with torch.no_grad():
            self.fixed = self.text_features()
        try:
            yield self.fixed
        finally:
            self.fixed = None

    def text_features(self) -> torch.Tensor:
        """L2-normalised class text features, `torch.FloatTensor` of shape `(C, D)`."""
        if self.fixed is not None:
            return self.fixed
        output = self.clip[0].get_text_features(input_ids=self.input_ids, attention_mask=self.attention_mask)
        return F.normalize(pooled_features(output), dim=-1)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features, `torch.FloatTensor` of shape `(B, D)`, from pixel values `(B, 3, H, W)`."""
        return F.normalize(pooled_features(self.clip[0].get_image_features(pixel_values=pixel_values)), dim=-1)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ClassifierOutput:
        """
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): the images.
            labels (`torch.LongTensor` of shape `(B,)`, *optional*): class indices into the prompts.

        Returns:
            [`ClassifierOutput`] with ``logits`` `(B, C)` and, with labels, the mean cross-entropy ``loss``.
        """
        image = self.image_features(pixel_values)
        text = self.text_features().to(image.dtype)
        logits = self.clip[0].logit_scale.exp() * image @ text.t()
        loss = class_cross_entropy(logits, labels) if labels is not None else None
        return ClassifierOutput(loss=loss, logits=logits)


def _unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, Mapping):
        labels = batch["labels"] if "labels" in batch else batch["label"]
        return batch["pixel_values"], torch.as_tensor(labels)
    pixel_values, labels = batch[0], batch[1]
    return pixel_values, torch.as_tensor(labels)


def _tokenized(class_prompts: ClassPrompts, tokenizer: Any) -> dict[str, torch.Tensor]:
    if isinstance(class_prompts, Mapping):
        return {"input_ids": class_prompts["input_ids"], "attention_mask": class_prompts.get("attention_mask")}
    if tokenizer is None:
        raise ValueError("class_prompts are strings: pass a tokenizer, or pass tokenised prompts (input_ids)")
    return tokenize_prompts(tokenizer, class_prompts)


@torch.no_grad()
def zero_shot_accuracy(
    model: nn.Module,
    images_loader: Iterable,
    class_prompts: ClassPrompts,
    tokenizer: Any = None,
    classes: Sequence[int] | None = None,
) -> float:
    """Top-1 accuracy of CLIP classifying images among class prompts, in eval mode (the mode is restored after).

    Args:
        model: a ``CLIPModel`` or a PEFT model wrapping one.
        images_loader: batches as dicts with ``pixel_values`` `(B, 3, H, W)` and ``labels`` `(B,)` (or ``label``),
            or as ``(pixel_values, labels)`` pairs; labels index ``class_prompts``.
        class_prompts: C prompt strings (with ``tokenizer``) or tokenised prompts (``input_ids`` `(C, L)`, optional
            ``attention_mask``).
        classes: restrict to these class indices: only images of these classes count, and they are classified among
            these classes only (the base-to-new protocol).

    Returns:
        The fraction of images classified correctly.
    """
    tokens = _tokenized(class_prompts, tokenizer)
    num_classes = tokens["input_ids"].shape[0]
    subset = list(range(num_classes)) if classes is None else list(classes)
    if not subset or min(subset) < 0 or max(subset) >= num_classes:
        raise ValueError(f"classes must be a non-empty list of indices in [0, {num_classes}), got {classes!r}")
    index = torch.tensor(subset)
    mask = tokens["attention_mask"]
    device = next(model.parameters()).device
    classifier = ZeroShotClassifier(
        model,
        tokens["input_ids"][index].to(device),
        None if mask is None else mask[index].to(device),
    )
    # global label -> position in `subset`, -1 for images outside it
    local = torch.full((num_classes,), -1, dtype=torch.long)
    local[index] = torch.arange(len(subset))

    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        with classifier.fixed_text_features():
            for batch in images_loader:
                pixel_values, labels = _unpack_batch(batch)
                targets = local[labels.long().cpu()]
                keep = targets >= 0
                if not bool(keep.any()):
                    continue
                logits = classifier(pixel_values[keep.to(pixel_values.device)].to(device)).logits
                correct += int((logits.argmax(dim=-1).cpu() == targets[keep]).sum())
                total += int(keep.sum())
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("images_loader yielded no images of the requested classes")
    return correct / total


def evaluate_base_to_new(
    model: nn.Module, images_loader: Iterable, class_prompts: ClassPrompts, tokenizer: Any = None
) -> BaseToNewResult:
    """Base-to-new evaluation: base accuracy on the first ``ceil(C / 2)`` classes (classified among themselves), new
    accuracy on the rest (among themselves), and their harmonic mean.

    ``images_loader`` holds test images of all C classes with labels indexing ``class_prompts``; see
    [`zero_shot_accuracy`] for the accepted formats.
    """
    if isinstance(class_prompts, Mapping):
        num_classes = class_prompts["input_ids"].shape[0]
    else:
        num_classes = len(class_prompts)
    base, new = base_to_new_split(num_classes)
    base_acc = zero_shot_accuracy(model, images_loader, class_prompts, tokenizer, classes=base)
    new_acc = zero_shot_accuracy(model, images_loader, class_prompts, tokenizer, classes=new)
    return BaseToNewResult(base_acc, new_acc, harmonic_mean(base_acc, new_acc))
