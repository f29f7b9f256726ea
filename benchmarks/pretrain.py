"""Pretrain a small CLIP from scratch on real 28x28 images, so the demo and the accuracy benchmark have a base model.

No pretrained CLIP weights can be downloaded here (see ``shared/reference/offline-assets.md``), so this script trains
a ``transformers.CLIPModel`` of about 8M parameters with CLIP's own contrastive loss
(``model(..., return_loss=True)``) on image-caption pairs built from real labelled images:

- images: Fashion-MNIST train (60,000) + Animal-MNIST train split (8,000, see ``peft_lorsu.app.data``);
- captions: one of five templates per image (``"a black and white photo of a sneaker."``), drawn with a seed;
- tokenizer: the real OpenAI CLIP BPE (``peft_lorsu/assets/clip-tokenizer``) with a 32-token context (not copied
  into the output folder: ``load_clip`` supplies it).

Held out for zero-shot evaluation: Fashion-MNIST test, Animal-MNIST test, handwritten digits (class names never
seen in pretraining: the target LoRSU is meant to fix) and domain-shifted Fashion-MNIST test.
The model, tokenizer and image processor are written with ``save_pretrained`` (weights stored in float16, loaded
in float32) together with a model card that records the command, data, steps, seed, wall time and the figures.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/pretrain.py --out peft_lorsu/assets/mini-clip --steps 3000
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from peft_lorsu.app import data as D  # noqa: E402
from peft_lorsu.app import inputs  # noqa: E402
from peft_lorsu.trainer import ImageTextCollator  # noqa: E402

logger = logging.getLogger("pretrain")
TOKENIZER_DIR = REPO / "peft_lorsu" / "assets" / "clip-tokenizer"
EVAL_SETS = {
    "fashion_mnist (test)": "fashion_mnist",
    "animal_mnist (test)": "animal_mnist",
    "digits (test, unseen names)": "digits",
    "fashion_mnist inverted (test)": "fashion_mnist:inverted",
    "fashion_mnist rotated (test)": "fashion_mnist:rotated",
    "fashion_mnist low-contrast (test)": "fashion_mnist:low_contrast",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults are the configuration of the shipped checkpoint)."""
    p = argparse.ArgumentParser(description="Pretrain a small CLIPModel on Fashion-MNIST + Animal-MNIST.")
    p.add_argument("--out", type=Path, default=REPO / "peft_lorsu" / "assets" / "mini-clip")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps before the cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=128, help="width of both towers")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--projection-dim", type=int, default=64)
    p.add_argument("--patch", type=int, default=7)
    p.add_argument("--context", type=int, default=32, help="text positions (and tokenizer model_max_length)")
    p.add_argument("--animal-train", type=int, default=8000, help="Animal-MNIST train images used (max 8000)")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--card-only", action="store_true", help="rewrite README.md from --out/training_summary.json")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace):
    """A randomly initialised CLIPModel for 28x28 RGB inputs and the CLIP BPE vocabulary."""
    from transformers import CLIPConfig, CLIPModel

    tower = dict(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.intermediate,
    )
    config = CLIPConfig(
        text_config=dict(**tower, max_position_embeddings=args.context, vocab_size=49408),
        vision_config=dict(**tower, image_size=D.IMAGE_SIZE, patch_size=args.patch, num_channels=3),
        projection_dim=args.projection_dim,
    )
    return CLIPModel(config)


def training_data(args: argparse.Namespace) -> D.LabeledImages:
    """Fashion-MNIST train + the first ``args.animal_train`` Animal-MNIST train images (class-balanced order)."""
    fashion = D.load_fashion_mnist("train")
    animal = D.load_animal_mnist("train")
    if args.animal_train < len(animal.labels):
        per_class = args.animal_train // len(animal.class_names)
        animal = D.subset(animal, D.sample_per_class(animal.labels, per_class, seed=args.seed))
    return D.concat_labeled(fashion, animal)


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, data: D.LabeledImages, batch_size: int = 512) -> float:
    """Top-1 accuracy of the prompt-ensemble zero-shot classifier (mean of normalised template embeddings)."""
    model.eval()
    prompts = inputs.class_prompts(data.class_names)
    n_cls, n_tpl = len(prompts), len(prompts[0])
    enc = tokenizer([p for row in prompts for p in row], padding=True, return_tensors="pt")
    text = model.get_text_features(**enc).pooler_output
    text = torch.nn.functional.normalize(text, dim=-1).view(n_cls, n_tpl, -1).mean(dim=1)
    text = torch.nn.functional.normalize(text, dim=-1)
    correct = 0
    for start in range(0, len(data.labels), batch_size):
        pixels = inputs.to_pixel_values(data.images[start : start + batch_size])
        image = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        correct += (image @ text.T).argmax(dim=-1).eq(data.labels[start : start + batch_size]).sum().item()
    model.train()
    return correct / len(data.labels)


def evaluate(model, tokenizer, sets: dict[str, D.LabeledImages]) -> dict[str, float]:
    """Zero-shot accuracy (in %) on every held-out set."""
    return {name: round(100 * zero_shot_accuracy(model, tokenizer, data), 2) for name, data in sets.items()}


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up then cosine decay to 10% of the peak learning rate."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, loader: DataLoader, args: argparse.Namespace, on_eval) -> list[float]:
    """Run ``args.steps`` AdamW steps of the CLIP contrastive loss; returns the per-step losses."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    losses: list[float] = []
    model.train()
    batches = iter(loader)
    progress = tqdm(range(args.steps), desc="pretraining", mininterval=5.0)
    for step in progress:
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # CLIP clamps the temperature at 100
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 20 == 0:
            progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            on_eval(step + 1, sum(losses[-100:]) / len(losses[-100:]))
    return losses


def save(model, tokenizer, args: argparse.Namespace) -> int:
    """Write float16 safetensors (config dtype float32, so loading upcasts) and the image processor. The tokenizer is
    not copied: ``peft_lorsu.app.models.load_clip`` gives a folder without one the packaged CLIP BPE tokenizer."""
    from transformers import CLIPImageProcessor

    args.out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(args.out)
    model.float()
    config_path = args.out / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in ("vocab.json", "merges.txt"):  # the BPE files (1.5 MB) rather than a 3.6 MB tokenizer.json
        shutil.copyfile(TOKENIZER_DIR / name, args.out / name)
    tok_config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    tok_config["model_max_length"] = tokenizer.model_max_length
    (args.out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    processor = CLIPImageProcessor(
        size={"shortest_edge": D.IMAGE_SIZE},
        crop_size={"height": D.IMAGE_SIZE, "width": D.IMAGE_SIZE},
        do_convert_rgb=True,
    )
    processor.save_pretrained(args.out)
    return (args.out / "model.safetensors").stat().st_size


def write_card(args: argparse.Namespace, facts: dict) -> None:
    """Write README.md (the model card) and training_summary.json next to the weights."""
    (args.out / "training_summary.json").write_text(json.dumps(facts, indent=2) + "\n")
    rows = "\n".join(
        f"| {name} | {facts['eval_sizes'][name]} | {acc:.2f} | {facts['chance'][name]:.1f} |"
        for name, acc in facts["zero_shot"].items()
    )
    curve = "\n".join(
        f"| {e['step']} | {e['loss']:.3f} | " + " | ".join(f"{v:.1f}" for v in e["zero_shot"].values()) + " |"
        for e in facts["history"]
    )
    curve_head = " | ".join(facts["zero_shot"])
    card = f"""# mini-CLIP: a CPU-size CLIP pretrained from scratch on 28x28 real images

A `transformers.CLIPModel` ({facts["parameters"] / 1e6:.2f}M parameters) trained from random initialisation with
CLIP's contrastive loss, as the base model of the peft-lorsu demo and accuracy benchmark. It is *not* OpenAI's
CLIP: no pretrained CLIP weights can be downloaded in the environment this project is developed in, so it learns
a small image-text space on real grey 28x28 images. The same code paths run on a real CLIP given a hub name.

```python
from transformers import CLIPModel, CLIPTokenizer, CLIPImageProcessor
model = CLIPModel.from_pretrained("peft_lorsu/assets/mini-clip")   # weights stored float16, loaded float32
```

## How it was made

- command: `{facts["command"]}`
- data: Fashion-MNIST train ({facts["data"]["fashion_mnist_train"]} images, Debian `dataset-fashion-mnist`) +
  Animal-MNIST train split ({facts["data"]["animal_mnist_train"]} images, `animal-mnist==0.4`, stratified 80/20
  split with seed 0 in `peft_lorsu.app.data`); 20 classes; one caption per image, its template drawn with the
  run's seed from {", ".join(f"`{t}`" for t in inputs.CAPTION_TEMPLATES)}.
- tokenizer: OpenAI CLIP BPE (49,408 tokens, `assets/clip-tokenizer`), `model_max_length` {args.context}.
- architecture: both towers width {args.hidden}, {args.layers} layers, {args.heads} heads, MLP {args.intermediate};
  vision patch {args.patch} on 28x28x3 (grey replicated), {args.context} text positions,
  projection {args.projection_dim}.
- optimisation: {args.steps} steps of batch {args.batch_size} ({facts["epochs"]:.2f} epochs), AdamW (lr {args.lr},
  betas 0.9/0.98, weight decay {args.weight_decay} on matrices), {args.warmup} warm-up steps then cosine to 10%,
  gradient clipping 1.0, seed {args.seed}; final mean loss of the last 100 steps {facts["final_loss"]:.3f}.
- hardware: {facts["hardware"]}; wall time {facts["wall_time_min"]:.1f} min (shared machine).
- storage: `model.safetensors` in float16 ({facts["checkpoint_bytes"] / 2**20:.1f} MiB); `config.json` says float32 so
  `from_pretrained` returns a float32 model.

## Zero-shot accuracy (%) on held-out data

Prompt ensemble over the five templates; images normalised with OpenAI CLIP's mean / std.

| evaluation set | images | accuracy | chance |
|---|---|---|---|
{rows}

Digits use the class names `zero` .. `nine`, never seen in pretraining (scikit-learn's 8x8 digits, upsampled):
near-chance accuracy there is the gap the LoRSU demo and benchmark close with few-shot adaptation.

Accuracy during training (on fixed 500-image subsets, 50 per class, of the same held-out sets):

| step | loss | {curve_head} |
|---|---|{"---|" * len(facts["zero_shot"])}
{curve}

## Licences of the training data

Fashion-MNIST: MIT (Zalando Research). Animal-MNIST: MIT (animal-mnist 0.4). CLIP BPE vocabulary: MIT (OpenAI).
"""
    (args.out / "README.md").write_text(card)


def main(argv: list[str] | None = None) -> None:
    """Pretrain, evaluate zero-shot, save the checkpoint and its model card."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.card_only:
        write_card(args, json.loads((args.out / "training_summary.json").read_text()))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=args.context)
    train_set = training_data(args)
    held_out = {name: D.load_image_dataset(source, "test") for name, source in EVAL_SETS.items()}
    quick = {name: D.subset(d, D.sample_per_class(d.labels, 50, seed=1)) for name, d in held_out.items()}
    logger.info("training images: %d (%d classes)", len(train_set.labels), len(train_set.class_names))

    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("CLIPModel with %.2fM parameters", n_params / 1e6)
    collate = ImageTextCollator(tokenizer)  # captions drawn once per image (seeded), see CaptionedImages
    loader = DataLoader(
        inputs.CaptionedImages(train_set, seed=args.seed),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(args.seed),
    )
    history: list[dict] = []

    def on_eval(step: int, loss: float) -> None:
        acc = evaluate(model, tokenizer, quick)
        history.append({"step": step, "loss": loss, "zero_shot": acc})
        logger.info("step %d loss %.3f zero-shot (500-image subsets) %s", step, loss, acc)

    start = time.time()
    losses = train(model, loader, args, on_eval)
    wall = time.time() - start
    final = evaluate(model, tokenizer, held_out)
    tail = losses[-100:]
    history.append({"step": args.steps, "loss": sum(tail) / len(tail), "zero_shot": evaluate(model, tokenizer, quick)})
    logger.info("final zero-shot accuracy (%%): %s; wall time %.1f min", final, wall / 60)
    size = save(model, tokenizer, args)
    env = ["HF_HUB_OFFLINE=1"] + [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ]
    facts = {
        "command": " ".join([*env, "python", shlex.join(["benchmarks/pretrain.py", *(argv or sys.argv[1:])])]),
        "parameters": n_params,
        "data": {"fashion_mnist_train": 60000, "animal_mnist_train": len(train_set.labels) - 60000},
        "epochs": args.steps * args.batch_size / len(train_set.labels),
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "final_loss": sum(tail) / len(tail),
        "wall_time_min": wall / 60,
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads, "
        f"torch {torch.__version__}",
        "checkpoint_bytes": size,
        "zero_shot": final,
        "chance": {name: 100 / len(d.class_names) for name, d in held_out.items()},
        "eval_sizes": {name: len(d.labels) for name, d in held_out.items()},
        "history": history,
    }
    write_card(args, facts)
    logger.info("saved %s (model.safetensors %.1f MiB)", args.out, size / 2**20)


if __name__ == "__main__":
    main()
