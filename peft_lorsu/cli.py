"""The ``peft-lorsu`` command. It only parses arguments into config dataclasses and calls the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings


def _demo(args: argparse.Namespace) -> int:
    from .demo import SyntheticDemoConfig, run_synthetic_demo

    run_synthetic_demo(SyntheticDemoConfig(epochs=args.epochs, seed=args.seed, output_dir=args.output_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-lorsu",
        description="LoRSU and RLP adapters for CLIP-style models, as PEFT tuners.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="probe, adapt, save and reload a small CLIP with LoRSU (CPU, about a minute)",
        description="End-to-end LoRSU run on a small CLIP: gradient probe, adaptation with the CLIP loss, "
        "parameter count against full fine-tuning, save and reload of the adapter.",
    )
    demo.add_argument("--epochs", type=int, default=5, help="training epochs (default: 5)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--output-dir", default=None, help="where to save the adapter (default: a temporary folder)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # peft 0.21 calls a transformers 5 property that warns on every get_peft_model; not actionable for a user
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
