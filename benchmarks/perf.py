"""Cost benchmark of LoRSU and RLP against peft LoRA, full fine-tuning and a dense-masked LoRSU.

Usage::

    python -m benchmarks.perf --full --out docs/benchmarks     # ViT-B/16 shape, batch 16 (+ one ViT-L/14 row)
    python -m benchmarks.perf --smoke --out /tmp/perf          # tiny model, seconds (the test suite runs this)
    python -m benchmarks.perf --full --device cuda --out DIR    # the same on a GPU (CUDA-event times, CUDA peak)

Writes ``perf.json`` (every number), ``perf.md`` (tables, targets with the measured ratio next to each) and
``perf_*.png`` (plots) into ``--out``. Every figure that is compared is a ratio to a baseline measured in the same
run, repetitions interleaved; see ``benchmarks/perf_measure.py`` for what the clocks and the memory figure measure.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch

from peft_lorsu.lorsu.budget import count_trainable

from . import perf_measure, perf_report, perf_sections, perf_variants
from .perf_sections import Plan
from .perf_setup import TEXT_SHAPES, VISION_SHAPES, LoRSUKnobs

logger = logging.getLogger("benchmarks.perf")

PLANS = {
    "smoke": Plan(
        vision=VISION_SHAPES["tiny"],
        text=TEXT_SHAPES["tiny"],
        batch=4,
        repeats=2,
        warmup=1,
        probe_repeats=1,
        scaling_batch=2,
        scaling_repeats=1,
        batches=(2, 4),
        heads=(1, 2),
        sparsities=(0.1, 0.5),
        text_classes=4,
        text_repeats=2,
        kernel_repeats=2,
        large=None,
        large_batch=0,
        large_repeats=0,
        knobs=LoRSUKnobs(r=8, top_k_heads=2, sparsity=0.1),
        variant_repeats=2,
        compiled=False,  # inductor alone takes minutes; tests/core/test_compile.py covers the compiled step
    ),
    "full": Plan(
        vision=VISION_SHAPES["ViT-B/16"],
        text=TEXT_SHAPES["ViT-B/16"],
        batch=16,
        repeats=9,
        warmup=1,
        probe_repeats=3,
        scaling_batch=8,
        scaling_repeats=3,
        batches=(2, 4, 8, 16),
        heads=(1, 2, 4, 8, 12),
        sparsities=(0.01, 0.05, 0.1, 0.2, 0.5),
        text_classes=32,
        text_repeats=15,
        kernel_repeats=5,
        large=VISION_SHAPES["ViT-L/14"],
        large_batch=16,
        large_repeats=3,
        variant_repeats=3,
        bf16_shape=VISION_SHAPES["small"],  # on CUDA: the main shape (see main)
        bf16_batch=8,
        compile_shape=VISION_SHAPES["ViT-B/16 x 4 layers"],  # on CUDA: the main shape
    ),
}

# (key, statement, limit, where the measured ratio comes from); a target is met when the median ratio <= limit
# (``state_exact``: when it is exactly 1).
TARGETS = (
    ("step_vs_lora", "LoRSU step time <= 1.0x peft LoRA's (same rank)", 1.0, ("methods", "lorsu", "lora")),
    (
        "step_vs_floor",
        "LoRSU step time <= 1.05x the input-gradient floor (nothing trained)",
        1.05,
        ("methods", "lorsu", "backprop_floor"),
    ),
    ("memory_vs_lora", "LoRSU peak memory <= peft LoRA's", 1.0, ("memory", "lorsu", "lora")),
    (
        "state_exact",
        "LoRSU trainable state = exactly S values + low-rank factors + biases (params, grads, Adam moments)",
        1.0,
        ("state_exact",),
    ),
    ("probe_vs_step", "probe <= 1.5x one training step, per batch", 1.5, ("probe",)),
    ("merged_inference", "merged inference within 2% of the base model", 1.02, ("inference", "lorsu_merged")),
    ("unmerged_inference", "unmerged inference within 10% of the base model", 1.10, ("inference", "lorsu_unmerged")),
    ("rlp_vs_coop", "RLP step time <= 1.05x CoOp's", 1.05, ("text", "rlp", "coop")),
)


def _ratio(results: dict, source: tuple[str, ...]) -> dict | None:
    """The measured ratio of a target as ``{"median", "min", "max"}`` (min = max = value for non-timed ratios)."""
    kind = source[0]
    if kind == "methods":
        return results["methods"][source[1]][f"step_ratio_vs_{source[2]}"]["cpu"]
    if kind in ("memory", "state"):
        key = ("memory", "peak_bytes") if kind == "memory" else ("trainable_state", "total_bytes")
        a, b = (results["methods"][n][key[0]][key[1]] for n in source[1:])
        return {"median": a / b, "min": a / b, "max": a / b, "of_fastest": a / b}
    if kind == "state_exact":
        state = results["methods"]["lorsu"]["trainable_state"]
        ratio = (state["param_bytes"] + state["grad_bytes"] + state["moment_bytes"]) / results["expected_state_bytes"]
        return {"median": ratio, "min": ratio, "max": ratio, "of_fastest": ratio}
    if kind == "probe":
        return results["probe"]["ratio_to_step_cpu"]
    if kind == "inference":
        return results["inference"][f"{source[1]}_vs_base"]["cpu"]
    if kind == "text":
        return results["text"][source[1]][f"step_ratio_vs_{source[2]}"]["cpu"]
    raise ValueError(f"unknown target source {source}")


# Informational on a GPU only: on a CPU the input-gradient floor alone is about 0.7x a full fine-tuning step.
GPU_INFORMATIONAL = (
    ("step_vs_full", "LoRSU step time <= 0.5x full fine-tuning's", 0.5, ("methods", "lorsu", "full")),
)


def targets(results: dict) -> list[dict]:
    rows = []
    extra = GPU_INFORMATIONAL if results["machine"]["device"] == "cuda" else ()
    for key, statement, limit, source in TARGETS + extra:
        ratio = _ratio(results, source)
        rows.append(
            {
                "key": key,
                "target": statement,
                "limit": limit,
                "measured": {k: ratio[k] for k in ("median", "min", "max", "of_fastest")},
                "met": ratio["median"] == limit if key == "state_exact" else ratio["median"] <= limit,
                "informational": key in {k for k, *_ in extra},
            }
        )
    return rows


def expected_state_bytes(trainees: dict) -> int:
    """Bytes of LoRSU's trainable state from the paper's count alone: every trained number (S fc1 values, the low-rank
    factors, the bias deltas; ``budget.count_trainable``) four times (value, gradient, Adam's two moments)."""
    lorsu = trainees["lorsu"]
    count = count_trainable(trainees["_base"], lorsu.config)
    return 4 * count * lorsu.trainable()[0].element_size()


def run(plan: Plan, threads: int) -> dict:
    """Every section of the benchmark; returns the JSON-ready results."""
    torch.manual_seed(plan.seed)
    machine = perf_measure.machine_info(threads, plan.device)
    results: dict = {"machine": machine, "plan": _plan_dict(plan), "section_seconds": {}}

    def section(name: str, fn, *args):
        logger.info("section %s", name)
        start = time.perf_counter()
        value = fn(*args)
        results["section_seconds"][name] = round(time.perf_counter() - start, 1)
        return value

    results["methods"], trainees = section("vision methods", perf_sections.vision_methods, plan)
    results["expected_state_bytes"] = expected_state_bytes(trainees)
    results["profile"] = section("profile", perf_sections.step_profile, trainees, ("lorsu", "lorsu_random", "lora"))
    results["fc1_kernels"] = section("fc1 kernels", perf_sections.fc1_kernels, plan, trainees)
    results["probe"] = section("probe", perf_sections.probe_cost, plan, trainees)
    results["inference"] = section("inference", perf_sections.inference, plan, trainees)
    del trainees
    results["text"] = section("text", perf_sections.text_methods, plan)
    results["scaling"] = section("scaling", perf_sections.scaling, plan)
    results["large"] = section("large model", perf_sections.large_model, plan)
    results["compiled"] = section("compiled", perf_variants.compiled, plan)
    results["bf16"] = section("bf16", perf_variants.bf16, plan)
    results["targets"] = targets(results)
    return results


def _plan_dict(plan: Plan) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(plan)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--smoke", action="store_true", help="tiny model, seconds (used by the test suite)")
    mode.add_argument("--full", action="store_true", help="ViT-B/16 shape, batch 16, and one ViT-L/14 row")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="output folder")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1; see perf.md)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the steps run (default cpu)")
    parser.add_argument("--no-variants", action="store_true", help="skip the compiled and bf16 rows")
    parser.add_argument("--no-scaling", action="store_true", help="skip the batch, heads and sparsity sweeps")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repetitions per method in every section (override)"
    )
    parser.add_argument("--no-large", action="store_true", help="skip the ViT-L/14 row")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    plan = PLANS["smoke" if args.smoke else "full"]
    overrides: dict = {"seed": args.seed, "device": args.device}
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch finds no CUDA device")
        # a GPU has bf16 units, and compiles in the time the run has: the main shape for both
        overrides.update(bf16_shape=None, bf16_batch=0, compile_shape=None)
    if args.no_variants:
        overrides["variant_repeats"] = 0
    if args.no_scaling:
        overrides.update(batches=(), heads=(), sparsities=())
    if args.repeats is not None:
        if args.repeats < 1:
            raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
        # every timed section: the main repetitions, the text ones; the others at most as many
        overrides.update(repeats=args.repeats, text_repeats=args.repeats)
        for key in ("probe_repeats", "kernel_repeats", "variant_repeats"):
            overrides[key] = min(overrides.get(key, getattr(plan, key)), args.repeats)
    if args.no_large:
        overrides["large"] = None
    plan = dataclasses.replace(plan, **overrides)

    started = dt.datetime.now(dt.timezone.utc)
    results = {
        "schema_version": 1,
        "command": "python -m benchmarks.perf " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "date": started.isoformat(timespec="seconds"),
        "mode": "smoke" if args.smoke else "full",
        **run(plan, args.threads),
    }
    results["total_seconds"] = round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "perf.json").write_text(json.dumps(results, indent=1) + "\n")
    perf_report.write(results, args.out)
    for row in results["targets"]:
        logger.info("%-55s %.3f  %s", row["target"], row["measured"]["median"], "met" if row["met"] else "MISSED")
    return results


if __name__ == "__main__":
    main()
