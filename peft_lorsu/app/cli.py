"""The ``peft-lorsu`` command. It parses arguments into the library's config dataclasses and calls the library.

peft-lorsu probe      choose LoRSU's heads and fc1 entries on a dataset; print the heads; save a heat map
peft-lorsu train      probe, adapt with LoRSU, save the adapter (with its model card)
peft-lorsu eval       zero-shot accuracy of a model (optionally with an adapter) on datasets
peft-lorsu continual  few-shot sessions on a target, LoRSU and baselines side by side
peft-lorsu demo       the packaged end-to-end demo
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model

from ..hub import record_card_info
from ..lorsu import LoRSUConfig, probe_lorsu
from ..lorsu.budget import count_trainable
from ..objectives import build_class_prompts, class_prompt_probe_loss, zero_shot_accuracy
from ..saving import save_adapter_atomic
from ..trainer import LR_SCHEDULES
from .continual import ContinualConfig, ContinualRunner
from .data import sample_per_class
from .demo import DemoConfig, run_demo
from .lr_search import LRSelection, parse_lr, parse_lr_grid
from .models import load_clip
from .plots import has_matplotlib, heads_table, plot_head_scores, plot_sessions
from .sessions import load_classification_set, make_batches
from .training import OPTIMIZERS, TrainingDiverged, fit

DATASET_HELP = (
    "dataset name: demo, digits, fashion_mnist, animal_mnist (optionally with a shift, e.g. fashion_mnist:inverted) "
    "or a Hugging Face hub name owner/name"
)


def _lorsu_config(args: argparse.Namespace, model=None):
    if getattr(args, "budget", None) is not None:
        return _budget_config(args, model)
    return LoRSUConfig(
        r=args.r,
        lora_alpha=args.lora_alpha,
        top_k_heads=args.top_k_heads,
        sparsity=args.sparsity,
        layers_to_transform=args.layers,
        selection=args.selection,
        seed=args.seed,
    )


def _budget_config(args: argparse.Namespace, model):
    """``--budget N``: r, top_k_heads and sparsity chosen for N trainable parameters; prints the choice."""

    try:
        config = LoRSUConfig.from_budget(
            model,
            trainable_params=args.budget,
            layers_to_transform=args.layers,
            selection=args.selection,
            seed=args.seed,
        )
    except ValueError as error:
        raise SystemExit(f"peft-lorsu: --budget {args.budget}: {error}") from error
    count = count_trainable(model, config)
    print(
        f"budget {args.budget:,}: r={config.r}, top_k_heads={config.top_k_heads}, sparsity={config.sparsity:.6f}, "
        f"lora_alpha={config.lora_alpha:g} -> {count:,} trainable parameters ({100 * (count / args.budget - 1):+.2f}%)"
    )
    return config


def _train_data(args: argparse.Namespace, model, tokenizer) -> list[dict]:
    """Batches of ``args.dataset`` (``args.shots`` per class when set) for ``args.loss``."""

    data = load_classification_set(args.dataset, args.split, model.config.vision_config.image_size)
    indices = torch.arange(len(data.labels))
    if args.shots:
        indices = sample_per_class(data.labels, args.shots, seed=args.seed)
    return make_batches(data, indices, tokenizer, args.loss, args.batch_size, shuffle=False, seed=args.seed)


def _probe(args: argparse.Namespace) -> int:
    model, tokenizer = load_clip(args.model)
    config = _lorsu_config(args, model)
    batches = _train_data(args, model, tokenizer)
    loss_fn = class_prompt_probe_loss if args.loss == "class_ce" else None
    probe_lorsu(model, config, batches, loss_fn=loss_fn, num_batches=args.num_batches)
    print(heads_table(config))
    if args.output:
        Path(args.output).write_text(
            json.dumps({"selected_heads": config.selected_heads, "head_scores": config.head_scores}, indent=2)
        )
        print(f"selection written to {args.output}")
    if args.heatmap:
        plot_head_scores(config, args.heatmap)
        print(f"head-importance heat map written to {args.heatmap}")
    return 0


def _train(args: argparse.Namespace) -> int:
    model, tokenizer = load_clip(args.model)
    config = _lorsu_config(args, model)
    batches = _train_data(args, model, tokenizer)
    loss_fn = class_prompt_probe_loss if args.loss == "class_ce" else None
    probe_lorsu(model, config, batches, loss_fn=loss_fn)
    print(heads_table(config))
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()
    result = fit(peft_model, batches, epochs=args.epochs, lr=args.lr, loss_fn=loss_fn, schedule=args.lr_schedule)
    print("mean loss per epoch: " + " -> ".join(f"{v:.4f}" for v in result.epoch_losses))
    shots = f", {args.shots} shots per class" if args.shots else ""
    record_card_info(
        peft_model,
        dataset=f"{args.dataset} ({args.split}{shots})",
        loss=args.loss,
        epochs=args.epochs,
        learning_rate=args.lr,
    )
    save_adapter_atomic(peft_model, args.output_dir)  # reached only if training stayed finite
    print(f"adapter saved to {args.output_dir}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    model, tokenizer = load_clip(args.model)
    if args.adapter:
        model = PeftModel.from_pretrained(model, args.adapter).eval()
    image_size = (
        model.get_base_model().config.vision_config.image_size
        if args.adapter
        else (model.config.vision_config.image_size)
    )
    print(f"{'dataset':<32} accuracy")
    for name in args.dataset:
        data = load_classification_set(name, args.split, image_size)
        prompts = build_class_prompts(data.class_names, init_text=args.init_text)
        print(f"{name:<32} {100 * zero_shot_accuracy(model, data.eval_batches(), prompts, tokenizer):.2f}%")
    return 0


def _continual(args: argparse.Namespace) -> int:
    out = Path(args.output_dir)
    if args.lr is None and len(args.method) > 1:  # a comparison: each method at its own validated rate
        args.lr = "auto"
    results = {}
    for method in args.method:
        model, tokenizer = load_clip(args.model)
        size = model.config.vision_config.image_size
        config = ContinualConfig(
            method=method,
            **{
                f.name: getattr(args, f.name)
                for f in fields(ContinualConfig)
                if f.name != "method" and hasattr(args, f.name)
            },
        )
        if config.lr == "auto":
            print(f"== {method}: choosing the learning rate on {config.lr_val_per_class} validation images per class")
        controls = {name: load_classification_set(name, "test", size) for name in args.control}
        runner = ContinualRunner(
            model,
            tokenizer,
            load_classification_set(args.target, "train", size),
            load_classification_set(args.target, "test", size),
            controls,
            config,
        )
        print(f"== {method}")
        checkpoints = out / "checkpoints" / method
        try:
            results[method] = runner.run(checkpoint_dir=checkpoints)
        except KeyboardInterrupt:
            print(
                f"interrupted during {method}: its finished sessions are kept in {checkpoints} (and finished methods "
                f"in {out}); run the same command again to resume",
                file=sys.stderr,
            )
            return 130
        results[method].save(out)
        if results[method].lr_selection is not None:
            print(LRSelection.from_dict(results[method].lr_selection).table())
    selections = {m: r.lr_selection for m, r in results.items() if r.lr_selection is not None}
    if selections:
        (out / "lr_selection.json").write_text(json.dumps(selections, indent=2))
    if has_matplotlib():
        plot_sessions(results, out / "sessions.png")
    print(f"{'method':<14} {'lr':>8} {'target before':>13} {'after':>7} {'TI':>7} {'CC':>7} {'params':>10}")
    for method, r in results.items():
        params, lr = max(r.trainable_params, default=0), ("-" if method == "zero_shot" else f"{r.config['lr']:g}")
        print(
            f"{method:<14} {lr:>8} {100 * r.rows[0][0]:>12.1f}% {100 * r.rows[-1][0]:>6.1f}% "
            f"{100 * r.target_improvement:>+6.1f} {100 * r.control_change:>+6.1f} {params:>10,}"
        )
    print(f"results written to {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    run_demo(DemoConfig(epochs=args.epochs, seed=args.seed, output_dir=args.output_dir))
    return 0


def _add_lorsu_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LoRSU")
    group.add_argument("--r", type=int, default=64, help="rank of the low-rank updates (default: 64)")
    group.add_argument("--lora-alpha", type=float, default=64, help="scale = lora_alpha / r (default: 64)")
    group.add_argument("--top-k-heads", type=int, default=2, help="attention heads adapted per layer (default: 2)")
    group.add_argument("--sparsity", type=float, default=0.1, help="fraction of fc1 entries trained (default: 0.1)")
    group.add_argument("--layers", type=int, nargs="+", default=None, help="encoder layers to adapt (default: all)")
    group.add_argument(
        "--budget",
        type=int,
        default=None,
        metavar="N",
        help="trainable-parameter budget: choose r, top-k heads and sparsity so the count lands within 1%% of N "
        "(replaces --r, --lora-alpha, --top-k-heads and --sparsity; see docs/advanced.md)",
    )
    group.add_argument(
        "--selection",
        choices=("gradient", "random"),
        default="gradient",
        help="gradient probe (default) or seeded random heads/entries",
    )


def _add_data_args(parser: argparse.ArgumentParser, split: str = "target_train") -> None:
    parser.add_argument("--model", default=None, help="CLIP hub name or folder (default: the packaged mini-CLIP)")
    parser.add_argument("--dataset", default="demo", help=DATASET_HELP + " (default: demo, the packaged digits)")
    parser.add_argument(
        "--split",
        default=split,
        help=f"dataset split: train / test, or target_train / target_test / control for demo (default: {split})",
    )
    parser.add_argument("--shots", type=int, default=None, help="images per class (default: all)")
    parser.add_argument(
        "--loss",
        choices=("contrastive", "class_ce"),
        default="contrastive",
        help="CLIP image-caption loss (default) or class-prompt cross-entropy",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="batch size (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-lorsu",
        description="Adapt CLIP-style models with LoRSU (image encoder) and RLP (text prompts), as PEFT tuners. "
        "Every command runs offline on CPU with the packaged mini-CLIP; pass --model for your own CLIP.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  peft-lorsu demo\n  peft-lorsu probe --dataset digits --shots 10 --heatmap heads.png\n"
        "  peft-lorsu train --dataset digits --shots 10 --epochs 5 --lr 1e-4 --output-dir my-adapter\n"
        "  peft-lorsu eval --adapter my-adapter --dataset digits --dataset fashion_mnist\n"
        "  peft-lorsu continual --target digits --control fashion_mnist --method lorsu --method lora",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    probe = commands.add_parser(
        "probe",
        help="choose LoRSU's heads and fc1 entries on a dataset",
        description="Run LoRSU's gradient probe on a dataset and show which attention heads "
        "it selects in every layer.",
    )
    _add_data_args(probe)
    _add_lorsu_args(probe)
    probe.add_argument("--num-batches", type=int, default=None, help="stop the probe after this many batches")
    probe.add_argument("--output", default=None, help="write the selection and scores to this JSON file")
    probe.add_argument("--heatmap", default=None, help="save a head-importance heat map to this PNG file")
    probe.set_defaults(func=_probe)

    train = commands.add_parser(
        "train",
        help="probe, adapt with LoRSU and save the adapter",
        description="Probe, wrap the model with LoRSU, train on the dataset and save the "
        "adapter (adapter_config.json, adapter_model.safetensors, README.md model card).",
    )
    _add_data_args(train)
    _add_lorsu_args(train)
    train.add_argument("--epochs", type=int, default=5, help="training epochs (default: 5)")
    train.add_argument("--lr", type=float, default=1e-4, help="learning rate (default: 1e-4)")
    train.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default="constant",
        help="constant, cosine (to 0) or epoch_cosine (LoRSU's reference: epoch 1 at 1e-6) (default: constant)",
    )
    train.add_argument("--output-dir", required=True, help="folder to save the adapter to")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser(
        "eval",
        help="zero-shot accuracy on datasets",
        description="Zero-shot classification accuracy with prompts "
        "'{init_text} {class}.', with or without a saved adapter.",
    )
    evaluate.add_argument("--model", default=None, help="CLIP hub name or folder (default: the packaged mini-CLIP)")
    evaluate.add_argument("--adapter", default=None, help="a saved LoRSU / RLP adapter folder")
    evaluate.add_argument("--dataset", action="append", required=True, help=DATASET_HELP + " (repeatable)")
    evaluate.add_argument("--split", default="test", help="dataset split (default: test)")
    evaluate.add_argument("--init-text", default="a photo of a", help="prompt prefix (default: 'a photo of a')")
    evaluate.set_defaults(func=_eval)

    continual = commands.add_parser(
        "continual",
        help="continual few-shot sessions: LoRSU vs baselines",
        description="Split the target's training data into few-shot sessions; adapt "
        "with each method session by session; report target and control accuracy.",
    )
    continual.add_argument("--model", default=None, help="CLIP hub name or folder (default: the packaged mini-CLIP)")
    continual.add_argument("--target", default="digits", help="target " + DATASET_HELP + " (default: digits)")
    continual.add_argument("--control", action="append", default=[], help="control dataset (repeatable)")
    continual.add_argument(
        "--method",
        action="append",
        required=True,
        help="lorsu, lorsu_random, lora, full, spu, rlp, coop, lorsu_rlp or zero_shot (repeatable)",
    )
    continual.add_argument("--sessions", type=int, default=5, help="number of sessions (default: 5)")
    continual.add_argument("--shots", type=int, default=5, help="images per class per session (default: 5)")
    continual.add_argument("--epochs", type=int, default=5, help="epochs per session (default: 5)")
    continual.add_argument(
        "--lr",
        type=parse_lr,
        default=None,
        help="a learning rate, or 'auto': chosen per method on a validation split of the target's training data "
        "(default: auto when several methods are compared, else each method's own default)",
    )
    continual.add_argument(
        "--lr-grid", type=parse_lr_grid, default=None, help="grid of --lr auto, e.g. 1e-4,1e-3,1e-2"
    )
    continual.add_argument(
        "--lr-val-per-class", type=int, default=10, help="validation images per class of --lr auto (default: 10)"
    )
    continual.add_argument(
        "--optimizer", choices=OPTIMIZERS, default=None, help="default: adamw, and sgd for rlp and coop"
    )
    continual.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=None,
        help="default: constant, and cosine for rlp and coop; epoch_cosine is LoRSU's reference schedule",
    )
    continual.add_argument("--batch-size", type=int, default=16, help="batch size (default: 16)")
    continual.add_argument(
        "--loss",
        choices=("contrastive", "class_ce"),
        default="contrastive",
        help="loss of the vision methods (rlp, coop and lorsu_rlp use class_ce)",
    )
    continual.add_argument("--r", type=int, default=64, help="rank for LoRSU / LoRA (default: 64)")
    continual.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    continual.add_argument("--output-dir", default="continual-results", help="where to write JSON / CSV / PNG")
    continual.set_defaults(func=_continual)

    demo = commands.add_parser(
        "demo",
        help="the end-to-end LoRSU demo (CPU, a few minutes)",
        description="Zero-shot accuracy on a target the model gets wrong, LoRSU few-shot "
        "adaptation, accuracy after, control accuracy kept, the chosen heads, the adapter "
        "saved and reloaded, and a plot.",
    )
    demo.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's setting)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--output-dir", default="lorsu-demo", help="where to write the adapter and plot")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # peft 0.21 calls a transformers 5 property that warns on every get_peft_model; not actionable for a user
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except TrainingDiverged as error:
        print(f"peft-lorsu {args.command}: {error}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
