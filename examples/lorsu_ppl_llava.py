#!/usr/bin/env python
"""LoRSU-Ppl: adapt the vision tower of a LLaVA model through the language model's next-token loss on VQA data.

What it shows: the paper's VLM variant (`lorsu_ppl_config`: separate q/k/v factors, PEFT-style init, no projection
adapter, fc1's bias trained and the q/k/v biases frozen), a chat-template collator whose labels cover the answer only
(`VQACollator`), the gradient probe through the VLM's own loss, training with a plain loop while the language model
and projector stay frozen, and save / reload / merge. Only the vision layers whose output LLaVA reads
(`vision_feature_layer`, default -2) are adapted.

How long: `--dry_run` (a tiny random LLaVA built in code, synthetic "what color is the square?" data) takes seconds.

    python examples/lorsu_ppl_llava.py --dry_run --output_dir /tmp/lorsu-ppl
    python examples/lorsu_ppl_llava.py --model llava-hf/llava-1.5-7b-hf --data train.jsonl --eval_data val.jsonl \
        --output_dir out/lorsu-ppl --r 64 --top_k_heads 2 --sparsity 0.1 --lr 1e-5 --epochs 5 --batch_size 8

A JSONL data file holds one {"image": "path/to/image.png", "question": "...", "answer": "..."} per line; image paths
are relative to the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from torch.utils.data import DataLoader

from peft_lorsu import probe_lorsu
from peft_lorsu.lorsu import VQACollator, lorsu_ppl_config

logger = logging.getLogger("lorsu_ppl_llava")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="LLaVA checkpoint (Hub id or folder); not needed with --dry_run")
    parser.add_argument("--data", help="training JSONL (image, question, answer); not needed with --dry_run")
    parser.add_argument("--eval_data", help="held-out JSONL for the answer loss before and after")
    parser.add_argument("--output_dir", required=True, help="where the adapter is saved")
    parser.add_argument("--dry_run", action="store_true", help="tiny random LLaVA and synthetic data")
    parser.add_argument("--r", type=int, default=64, help="rank of the q/k/v updates")
    parser.add_argument("--lora_alpha", type=float, default=64, help="scale lora_alpha / r")
    parser.add_argument("--top_k_heads", type=int, default=2, help="heads adapted per vision layer")
    parser.add_argument("--sparsity", type=float, default=0.1, help="fraction of fc1 entries trained")
    parser.add_argument("--probe_batches", type=int, default=None, help="probe at most this many batches")
    parser.add_argument("--lr", type=float, default=1e-5, help="Adam learning rate")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=None, help="cut answers so sequences fit")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    return parser


def read_jsonl(path: str) -> list[dict]:
    """Examples with PIL images, read from a JSONL file of {"image", "question", "answer"}."""
    from PIL import Image

    root = Path(path).parent
    examples = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            image = Image.open(root / row["image"]).convert("RGB")
            examples.append({"image": image, "question": row["question"], "answer": row["answer"]})
    return examples


def load(args: argparse.Namespace):
    """(model, processor, train examples, eval examples)."""
    if args.dry_run:
        from peft_lorsu.app.tiny_llava import color_vqa, tiny_llava, tiny_llava_processor

        processor = tiny_llava_processor()
        return tiny_llava(processor, seed=args.seed), processor, color_vqa(32, seed=args.seed), color_vqa(16, seed=99)
    if not (args.model and args.data):
        raise SystemExit("--model and --data are required unless --dry_run")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    train = read_jsonl(args.data)
    return model, processor, train, read_jsonl(args.eval_data) if args.eval_data else train[: args.batch_size]


@torch.no_grad()
def answer_loss(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Mean next-token loss over the answer tokens of ``loader``."""
    model.eval()
    losses = [model(**{k: v.to(device) for k, v in batch.items()}).loss.item() for batch in loader]
    return sum(losses) / len(losses)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.dry_run:  # settings that show an effect on the tiny model within seconds
        args.r, args.lora_alpha, args.lr, args.epochs, args.batch_size = 4, 8, 3e-2, 3, 8

    model, processor, train, held_out = load(args)
    device = next(model.parameters()).device
    collate = VQACollator(processor, max_length=args.max_length)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate, generator=generator)
    probe_loader = DataLoader(train, batch_size=args.batch_size, collate_fn=collate)
    eval_loader = DataLoader(held_out, batch_size=args.batch_size, collate_fn=collate)
    loss_before = answer_loss(model, eval_loader, device)

    # Probe through the VLM's own loss (labels on the answer tokens), then wrap: only the vision tower is adapted.
    config = lorsu_ppl_config(
        r=args.r, lora_alpha=args.lora_alpha, top_k_heads=args.top_k_heads, sparsity=args.sparsity
    )
    probe_lorsu(model, config, probe_loader, num_batches=args.probe_batches, show_progress=not args.dry_run)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()} if args.dry_run else None
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()

    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=args.lr)
    for epoch in range(args.epochs):
        peft_model.train()
        for batch in train_loader:
            loss = peft_model(**{k: v.to(device) for k, v in batch.items()}).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        logger.info("epoch %d: last batch loss %.4f", epoch, loss.item())
    loss_after = answer_loss(peft_model, eval_loader, device)
    peft_model.save_pretrained(args.output_dir)

    summary = {
        "adapted_layers": len(config.selected_heads),
        "selected_heads": config.selected_heads,
        "trainable_parameters": peft_model.get_nb_trainable_parameters()[0],
        "answer_loss_before": loss_before,
        "answer_loss_after": loss_after,
    }
    if args.dry_run:
        summary.update(check_round_trip(peft_model, base, eval_loader, args))
    print(json.dumps(summary, indent=2))
    return summary


def check_round_trip(peft_model: PeftModel, base_state: dict, loader: DataLoader, args: argparse.Namespace) -> dict:
    """Reload the saved adapter on a fresh copy of the base model, and merge: both must match the trained model."""
    from peft_lorsu.app.tiny_llava import tiny_llava, tiny_llava_processor

    batch = next(iter(loader))
    with torch.no_grad():
        trained = peft_model(**batch).logits
        fresh = tiny_llava(tiny_llava_processor(), seed=args.seed)
        fresh.load_state_dict(base_state)
        reloaded = PeftModel.from_pretrained(fresh, args.output_dir)(**batch).logits
        merged = peft_model.merge_and_unload()(**batch).logits
    return {
        "reload_identical": bool(torch.equal(trained, reloaded)),
        "merge_max_abs_diff": float((trained - merged).abs().max()),
        "finite": bool(math.isfinite(float(trained.abs().max()))),
    }


if __name__ == "__main__":
    main()
