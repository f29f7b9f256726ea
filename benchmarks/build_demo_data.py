"""Build ``peft_lorsu/assets/demo``: a few hundred real images the demo can use without any data package.

Writes ``demo.safetensors`` (uint8 images ``<split>.images`` (N, 28, 28) and int64 labels ``<split>.labels`` (N,))
and ``classes.json`` (class names and provenance per split). Splits:

- ``target_train``: handwritten digits from the digits *train* split, ``--shots`` per class (few-shot pool);
- ``target_test``: handwritten digits from the digits *test* split, ``--test-per-class`` per class;
- ``control``: Fashion-MNIST *test* images, ``--control-per-class`` per class (classes the base model knows).

Images are drawn at random per class with a seed (no selection by model outcome). No pickle is written.

Usage::

    python benchmarks/build_demo_data.py --out peft_lorsu/assets/demo
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from peft_lorsu.app import data as D  # noqa: E402

logger = logging.getLogger("build_demo_data")

PROVENANCE = {
    "digits": "scikit-learn load_digits (UCI optical recognition of handwritten digits, CC BY 4.0; scikit-learn "
    "BSD-3-Clause), 8x8 upsampled to 20x20 and centred in 28x28 by peft_lorsu.app.data.load_digits",
    "fashion_mnist": "Fashion-MNIST test set (Zalando Research, MIT), Debian package dataset-fashion-mnist",
}


def main(argv: list[str] | None = None) -> None:
    """Sample the three splits and write them."""
    p = argparse.ArgumentParser(description="Build the packaged demo images.")
    p.add_argument("--out", type=Path, default=REPO / "peft_lorsu" / "assets" / "demo")
    p.add_argument("--shots", type=int, default=15, help="target_train images per digit class")
    p.add_argument("--test-per-class", type=int, default=20)
    p.add_argument("--control-per-class", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    plan = {
        "target_train": ("digits", "train", args.shots),
        "target_test": ("digits", "test", args.test_per_class),
        "control": ("fashion_mnist", "test", args.control_per_class),
    }
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}
    for split, (source, source_split, per_class) in plan.items():
        data = D.load_image_dataset(source, source_split)
        idx = D.sample_per_class(data.labels, per_class, seed=args.seed).sort().values
        part = D.subset(data, idx)
        tensors[f"{split}.images"] = part.images.contiguous()
        tensors[f"{split}.labels"] = part.labels.contiguous()
        meta[split] = {
            "class_names": part.class_names,
            "source": f"{source} ({source_split} split)",
            "per_class": per_class,
            "count": len(idx),
            "provenance": PROVENANCE[source],
        }
        logger.info("%s: %d images from %s/%s", split, len(idx), source, source_split)
    meta["_build"] = {
        "command": "python benchmarks/build_demo_data.py " + " ".join(argv or sys.argv[1:]),
        "seed": args.seed,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out / "demo.safetensors"), metadata={"format": "peft-lorsu demo images v1"})
    (args.out / "classes.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
