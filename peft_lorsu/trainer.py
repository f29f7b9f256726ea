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
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from torch import nn
from torch.utils.data import DataLoader

from .lorsu.config import LoRSUConfig
from .lorsu.probe import default_loss, probe_lorsu
from .objectives import build_class_prompts, class_prompt_probe_loss

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
            "labels": torch.tensor([int(label) for label in labels], dtype=torch.long),
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
        }


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
    resume_from: str | os.PathLike | None = None,
) -> PeftModel:
    """Probe on ``train_dataset`` (unless ``config`` already holds a selection), then ``get_peft_model``.

    The one call a Trainer script needs before ``Trainer(model=..., data_collator=data_collator, ...)``.

    Args:
        resume_from: a Trainer checkpoint (``output_dir/checkpoint-N``) or a saved adapter folder: its adapter is
            loaded, trainable, instead of probing again (the selection must be the one the run started with; a probe
            on other data picks other heads). Then ``trainer.train(resume_from_checkpoint=...)`` restores the
            optimizer and continues. ``config`` and the data are not used in this case.
    """
    if resume_from is not None:
        return PeftModel.from_pretrained(model, resume_from, adapter_name=adapter_name, is_trainable=True)
    if not config.has_selection:
        probe_on_dataset(model, config, train_dataset, data_collator, batch_size, loss_fn, num_batches, show_progress)
    return get_peft_model(model, config, adapter_name=adapter_name)


# Learning-rate schedules by name, as multipliers of each parameter group's own rate.
LR_SCHEDULES = ("constant", "cosine", "epoch_cosine")


def lr_schedule(
    optimizer: torch.optim.Optimizer,
    name: str,
    steps_per_epoch: int,
    epochs: int,
    warmup_lr: float = 1e-6,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler to step once per optimizer step (as ``Trainer`` and the runner do).

    - ``"constant"``: every group at its own rate.
    - ``"cosine"``: cosine from each group's rate to 0 over ``epochs * steps_per_epoch`` steps (the CoOp / RLP
      recipe).
    - ``"epoch_cosine"``: LoRSU's reference schedule. Its cosine with warm-up is stepped once per *epoch* although it
      spans every optimizer step, so epoch 1 runs at ``warmup_lr`` (capped at the group's rate) and the later epochs
      at the group's rate, decayed by less than ``(pi (E-1) / 2T)^2`` relative (T the run's optimizer steps).

    Pass it to ``Trainer(optimizers=(optimizer, lr_schedule(optimizer, "epoch_cosine", steps, epochs)))``.
    """
    if name not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule: name must be one of {LR_SCHEDULES}, got {name!r}")
    for field, value in (("steps_per_epoch", steps_per_epoch), ("epochs", epochs)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"lr_schedule: {field} must be an integer >= 1, got {value!r}")
    if not (isinstance(warmup_lr, (int, float)) and warmup_lr > 0):
        raise ValueError(f"lr_schedule: warmup_lr must be a number > 0, got {warmup_lr!r}")
    total = steps_per_epoch * epochs

    def factor(base_lr: float, step: int) -> float:
        if name == "constant":
            return 1.0
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        floor = min(warmup_lr, base_lr) / base_lr
        epoch = step // steps_per_epoch
        if epoch == 0:
            return floor
        return floor + 0.5 * (1.0 - floor) * (1.0 + math.cos(math.pi * (epoch - 1) / total))

    lambdas = [lambda step, lr=group["lr"]: factor(lr, step) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
