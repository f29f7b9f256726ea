#!/usr/bin/env python
"""LoRSU on CLIP with a plain accelerate loop: probe every rank's shard, train under DDP or FSDP2, save once.

What it shows: the probe agreeing across processes, DDP and FSDP2 training of a LoRSU adapter, gathering and saving
the adapter from the main process only, reloading it everywhere.

How long: on a laptop CPU with 2 gloo processes, `--dry_run` takes under 20 s and the default run (packaged mini-CLIP,
packaged demo digits, 5 epochs) under 30 s, process start-up included. A ViT-B/16 on real images wants GPUs.

    # one machine, 2 GPUs, DDP (or FSDP2 with fsdp.yaml)
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/accelerate/train_clip.py \
        --model_name_or_path openai/clip-vit-base-patch16 --train_data path/to/images --output_dir out/lorsu
    # CPU only: 2 processes on gloo, a tiny random CLIP and random data (a smoke test, a few seconds)
    ACCELERATE_USE_CPU=true accelerate launch --config_file examples/accelerate/ddp.yaml \
        examples/accelerate/train_clip.py --dry_run --output_dir /tmp/lorsu-ddp

``--train_data`` is a folder with one sub-folder per class (or a dataset name of ``peft_lorsu.app.data``, ``demo`` by
default, with the packaged mini-CLIP); each image is paired with a caption naming its class and trained with CLIP's
own contrastive loss. What makes it correct on several processes:

- every process builds the same model from the same seed and probes its own batches of the data
  (:func:`peft_lorsu.distributed.shard_batches`); ``probe_lorsu`` all-reduces the gradient sums and sample counts,
  so every process selects the same heads and fc1 entries as one process probing all batches;
- DDP needs no ``find_unused_parameters``: every LoRSU tensor takes part in every forward pass;
- under FSDP (fsdp.yaml) the script shards the model itself with :func:`peft_lorsu.distributed.fully_shard_clip`
  (one FSDP2 unit per ``CLIPEncoderLayer``, ``logit_scale`` left out) and gives accelerate only the data loader:
  accelerate's own FSDP preparation does not handle a ``CLIPModel`` (see docs/distributed.md);
- the full adapter tensors are gathered on every process (a collective) and only the main process writes them;
  after a barrier every process can load them.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from peft import PeftModel, get_peft_model
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import DataLoader
from transformers import CLIPImageProcessor, CLIPModel

from peft_lorsu import LoRSUConfig, probe_lorsu
from peft_lorsu.app.models import load_clip, tiny_clip_config
from peft_lorsu.app.scripts import load_image_classification
from peft_lorsu.distributed import fully_shard_clip, shard_batches
from peft_lorsu.trainer import ImageTextCollator

logger = logging.getLogger(__name__)


def tiny_clip(seed: int = 0) -> CLIPModel:
    """A random CLIP small enough for a CPU smoke test (vision 32 x 2 layers on 16 px images)."""
    torch.manual_seed(seed)
    return CLIPModel(tiny_clip_config()).eval()


def random_pairs(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` random image-caption samples for :func:`tiny_clip`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (n, 7), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    return [{"pixel_values": torch.randn(3, 16, 16, generator=g), "input_ids": ids[i]} for i in range(n)]


def probe(
    accelerator: Accelerator,
    model: nn.Module,
    config: LoRSUConfig,
    dataset: Sequence[Any],
    batch_size: int,
    collate_fn: Any,
) -> LoRSUConfig:
    """Probe this process's batches (batch ``i`` on rank ``i % world``, none repeated); returns ``config``."""
    loader = DataLoader(dataset, batch_sampler=shard_batches(len(dataset), batch_size), collate_fn=collate_fn)
    model.to(accelerator.device)
    return probe_lorsu(model, config, loader, show_progress=accelerator.is_main_process)


def train(
    accelerator: Accelerator,
    model: nn.Module,
    dataset: Sequence[Any],
    output_dir: str | Path,
    collate_fn: Any,
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 16,
    optimizer: str = "adamw",
    shuffle: bool = True,
    fsdp: bool | None = None,
) -> nn.Module:
    """Train the adapter of ``model`` (a PeftModel) with its own loss; the main process saves it to ``output_dir``.

    Args:
        fsdp: shard with FSDP2 (default: when accelerate runs with ``distributed_type: FSDP``). The model is then
            sharded here by :func:`fully_shard_clip` and only the data loader goes through ``accelerator.prepare``;
            otherwise ``prepare`` wraps the model in DDP (or nothing on one process).

    Returns:
        the trained model without a DDP wrapper (under FSDP its tensors stay sharded: load the saved adapter into an
        unsharded model to merge or evaluate it).
    """
    if fsdp is None:
        fsdp = accelerator.distributed_type == DistributedType.FSDP
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn)
    if fsdp:
        fully_shard_clip(model.to(accelerator.device))  # before the optimizer, which must hold the sharded tensors
    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optimizer]
    opt = opt_cls(params, lr=lr, **({"weight_decay": 0.0} if optimizer == "adamw" else {}))
    if fsdp:
        wrapped, loader = model, accelerator.prepare_data_loader(loader)
    else:
        wrapped, opt, loader = accelerator.prepare(model, opt, loader)
    wrapped.train()
    for epoch in range(epochs):
        total = torch.zeros((), device=accelerator.device)
        for batch in loader:
            loss = wrapped(**batch).loss
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            total += loss.detach()
        mean = accelerator.reduce(total, reduction="mean") / max(len(loader), 1)
        if accelerator.is_main_process:
            logger.info("epoch %d/%d: mean loss %.4f", epoch + 1, epochs, mean.item())
    unwrapped = model if fsdp else accelerator.unwrap_model(wrapped)
    unwrapped.eval()
    # full tensors, gathered from the shards under FSDP: a collective, so every process calls it
    if fsdp:
        state = get_model_state_dict(unwrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = accelerator.get_state_dict(wrapped)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir, state_dict=state)
    accelerator.wait_for_everyone()
    return unwrapped


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model_name_or_path", default=None, help="CLIP hub id or folder; default: the mini-CLIP")
    parser.add_argument("--train_data", default="demo", help="folder/<class>/<image>, or a peft_lorsu dataset name")
    parser.add_argument("--split", default="target_train", help="split of --train_data")
    parser.add_argument("--dry_run", action="store_true", help="tiny random CLIP and random data")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch_size", type=int, default=16, help="per process")
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--top_k_heads", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    accelerator = Accelerator()
    set_seed(args.seed)  # the same seed everywhere: FSDP does not broadcast the initial adapter like DDP does
    if args.dry_run:
        load_base, dataset, collate = tiny_clip, random_pairs(32), ImageTextCollator()
        model = load_base()
        lorsu = LoRSUConfig(r=4, lora_alpha=4, top_k_heads=2, sparsity=0.1)
        args.batch_size, args.epochs = 4, 2
    else:
        model, tokenizer = load_clip(args.model_name_or_path)
        size = model.config.vision_config.image_size
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        dataset, _ = load_image_classification(args.train_data, args.split, processor, size, seed=args.seed)
        collate = ImageTextCollator(tokenizer, max_length=model.config.text_config.max_position_embeddings)

        def load_base() -> CLIPModel:
            return load_clip(args.model_name_or_path)[0]

        lorsu = LoRSUConfig(r=args.r, lora_alpha=args.r, top_k_heads=args.top_k_heads, sparsity=args.sparsity)

    probe(accelerator, model, lorsu, dataset, args.batch_size, collate)
    set_seed(args.seed)
    peft_model = get_peft_model(model, lorsu)
    train(accelerator, peft_model, dataset, args.output_dir, collate, args.epochs, args.lr, args.batch_size)

    # every process can now load what the main process saved
    reloaded = PeftModel.from_pretrained(load_base(), args.output_dir).to(accelerator.device)
    if accelerator.is_main_process:
        logger.info("adapter saved to %s and reloaded on %d process(es)", args.output_dir, accelerator.num_processes)
    del reloaded
    accelerator.end_training()


if __name__ == "__main__":
    main()
