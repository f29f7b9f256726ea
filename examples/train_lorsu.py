#!/usr/bin/env python
"""Fine-tune a CLIP image encoder with LoRSU using transformers' Trainer.

What it shows: the probe-then-wrap helper (`get_lorsu_model`), both training losses (CLIP image-caption contrastive
loss, or class-prompt cross-entropy with `compute_loss_func`), saving the adapter with its model card.

How long: `--dry_run` (a tiny random CLIP, two steps) takes a few seconds; the packaged mini-CLIP on the packaged
demo digits (`--train_data demo`) takes about a minute on a laptop CPU.

    python examples/train_lorsu.py --output_dir out/lorsu --train_data demo --split target_train \
        --num_train_epochs 5 --learning_rate 1e-3 --per_device_train_batch_size 16
    python examples/train_lorsu.py --output_dir out/lorsu --train_data path/to/image_folder --loss class_ce
    python examples/train_lorsu.py --output_dir /tmp/lorsu --dry_run
    python examples/train_lorsu.py --output_dir out/lorsu --train_data demo --split target_train \
        --num_train_epochs 5 --learning_rate 1e-3 --lr_schedule epoch_cosine   # LoRSU's reference schedule
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments

from peft_lorsu import LoRSUConfig, class_cross_entropy, record_card_info
from peft_lorsu.app.scripts import ImageDataArguments, load_script_inputs
from peft_lorsu.trainer import LR_SCHEDULES, ClassPromptCollator, ImageTextCollator, get_lorsu_model, lr_schedule

logger = logging.getLogger(__name__)


@dataclass
class LoRSUArguments:
    r: int = field(default=64, metadata={"help": "Rank of the low-rank updates."})
    lora_alpha: float = field(default=64, metadata={"help": "Scale lora_alpha / r."})
    top_k_heads: int = field(default=2, metadata={"help": "Heads adapted per layer."})
    sparsity: float = field(default=0.1, metadata={"help": "Fraction of fc1 entries trained."})
    probe_batches: int | None = field(default=None, metadata={"help": "Probe at most this many batches."})
    loss: str = field(default="contrastive", metadata={"help": "'contrastive' (captions) or 'class_ce' (labels)."})
    lr_schedule: str | None = field(
        default=None,
        metadata={
            "help": "A schedule of peft_lorsu by name: 'epoch_cosine' (LoRSU's reference: epoch 1 at 1e-6, then the "
            "peak lr), 'cosine' or 'constant', with AdamW; unset: TrainingArguments' --lr_scheduler_type."
        },
    )


def scheduled_optimizer(model: torch.nn.Module, training: TrainingArguments, rows: list, name: str) -> tuple:
    """``(optimizer, scheduler)`` for ``Trainer(optimizers=...)``: AdamW at ``--learning_rate`` and the named
    schedule over the run's epochs, counted in optimizer steps as Trainer takes them."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=training.weight_decay)
    batches = math.ceil(len(rows) / (training.per_device_train_batch_size * training.world_size))
    steps_per_epoch = math.ceil(batches / training.gradient_accumulation_steps)
    if training.max_steps > 0:
        epochs = math.ceil(training.max_steps / steps_per_epoch)
    else:
        epochs = math.ceil(training.num_train_epochs)
    return optimizer, lr_schedule(optimizer, name, steps_per_epoch, epochs)


def main(argv: list[str] | None = None) -> Trainer:
    parser = HfArgumentParser((ImageDataArguments, LoRSUArguments, TrainingArguments))
    script, lorsu, training = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if lorsu.loss not in ("contrastive", "class_ce"):
        raise ValueError(f"--loss must be 'contrastive' or 'class_ce', got {lorsu.loss!r}")
    if lorsu.lr_schedule not in (None, *LR_SCHEDULES):
        raise ValueError(f"--lr_schedule must be one of {LR_SCHEDULES} or unset, got {lorsu.lr_schedule!r}")
    model, tokenizer, rows, class_names = load_script_inputs(script, training)

    if lorsu.loss == "contrastive":
        collator, compute_loss = ImageTextCollator(tokenizer), None
        training.label_names = []
    else:
        collator, compute_loss = ClassPromptCollator(tokenizer, class_names), class_cross_entropy
    training.remove_unused_columns = False

    config = LoRSUConfig(
        r=lorsu.r, lora_alpha=lorsu.lora_alpha, top_k_heads=lorsu.top_k_heads, sparsity=lorsu.sparsity
    )
    peft_model = get_lorsu_model(
        model, config, rows, collator, batch_size=training.per_device_train_batch_size, num_batches=lorsu.probe_batches
    )
    peft_model.print_trainable_parameters()
    optimizers = (None, None)
    if lorsu.lr_schedule is not None:
        optimizers = scheduled_optimizer(peft_model, training, rows, lorsu.lr_schedule)
    trainer = Trainer(
        model=peft_model,
        args=training,
        train_dataset=rows,
        data_collator=collator,
        compute_loss_func=compute_loss,
        optimizers=optimizers,
    )
    result = trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    record_card_info(
        peft_model,
        dataset=f"{script.train_data} ({script.split}, {len(rows)} images)",
        results={"train loss": result.training_loss},
    )
    peft_model.save_pretrained(training.output_dir)
    logger.info("adapter saved to %s", training.output_dir)
    return trainer


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
    sys.exit(0)
