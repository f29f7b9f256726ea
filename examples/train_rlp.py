#!/usr/bin/env python
"""Learn a CLIP text prompt with RLP (or CoOp's full-rank context) using transformers' Trainer.

What it shows: `RLPConfig` on the text tower, the class-prompt cross-entropy (`ClassPromptCollator` +
`compute_loss_func`), zero-shot accuracy before and after, saving the ~0.5K-parameter adapter.

How long: `--dry_run` (a tiny random CLIP, two steps) takes seconds; the packaged mini-CLIP on the packaged demo
digits takes well under a minute on a laptop CPU.

    python examples/train_rlp.py --output_dir out/rlp --train_data demo --split target_train \
        --num_train_epochs 10 --learning_rate 2e-3 --per_device_train_batch_size 32
    python examples/train_rlp.py --output_dir out/coop --mode full_rank
    python examples/train_rlp.py --output_dir /tmp/rlp --dry_run
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from peft import get_peft_model
from transformers import HfArgumentParser, Trainer, TrainingArguments

from peft_lorsu import RLPConfig, build_class_prompts, class_cross_entropy, record_card_info, zero_shot_accuracy
from peft_lorsu.app.scripts import ImageDataArguments, load_script_inputs
from peft_lorsu.trainer import ClassPromptCollator

logger = logging.getLogger(__name__)


@dataclass
class PromptArguments:
    init_text: str = field(default="a photo of a", metadata={"help": "Initial context (P_fr)."})
    rank: int = field(default=1, metadata={"help": "Rank r of P_A @ P_B."})
    dropout: float | None = field(
        default=None, metadata={"help": "Dropout on the low-rank branch (default: RLPConfig's, 0.5; 0 for full_rank)."}
    )
    mode: str = field(default="low_rank", metadata={"help": "'low_rank' (RLP) or 'full_rank' (CoOp)."})


def accuracy(model, rows, class_names, tokenizer, init_text) -> float:
    import torch

    batches = [
        {
            "pixel_values": torch.stack([r["pixel_values"] for r in rows[i : i + 64]]),
            "labels": torch.tensor([r["label"] for r in rows[i : i + 64]]),
        }
        for i in range(0, len(rows), 64)
    ]
    return zero_shot_accuracy(model, batches, build_class_prompts(class_names, init_text=init_text), tokenizer)


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ImageDataArguments, PromptArguments, TrainingArguments))
    script, prompt, training = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model, tokenizer, rows, class_names = load_script_inputs(script, training)

    ids = tokenizer(prompt.init_text, add_special_tokens=False)["input_ids"]
    config = RLPConfig(
        init_text=prompt.init_text, init_token_ids=ids, rank=prompt.rank, dropout=prompt.dropout, mode=prompt.mode
    )
    before = accuracy(model, rows, class_names, tokenizer, prompt.init_text)
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()
    training.remove_unused_columns = False
    trainer = Trainer(
        model=peft_model,
        args=training,
        train_dataset=rows,
        data_collator=ClassPromptCollator(tokenizer, class_names, init_text=prompt.init_text),
        compute_loss_func=class_cross_entropy,
    )
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    after = accuracy(peft_model, rows, class_names, tokenizer, prompt.init_text)
    logger.info("training-set accuracy: %.1f%% -> %.1f%%", 100 * before, 100 * after)
    record_card_info(
        peft_model,
        dataset=f"{script.train_data} ({script.split}, {len(rows)} images)",
        results={"train accuracy before": before, "train accuracy after": after},
    )
    peft_model.save_pretrained(training.output_dir)
    logger.info("adapter saved to %s", training.output_dir)


if __name__ == "__main__":
    sys.exit(main())
