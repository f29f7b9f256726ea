"""LoRSU against peft LoRA and the input-gradient floor: step time and peak memory of one code version.

For comparing two versions of the package (a restructure, a kernel change), run it once per checkout, on the same
machine, and compare the ratios it prints (each is measured within one process, repetitions interleaved):

    python benchmarks/step_ratio.py /path/to/checkout-before
    python benchmarks/step_ratio.py /path/to/checkout-after

Model: a 4-layer image encoder of ViT-B/16's width (768, 12 heads, fc1 3072, 224 px), batch 8, one thread, CPU
process time, median of 7 steps after 2 warm-up steps; LoRSU with r=64, top_k_heads=2, sparsity=0.1. Memory: the
transient peak of one step (``perf_measure.transient_peak_bytes``) and the peak with the tensors alive between steps
added (weights, buffers, optimizer state and the fc1 layers' cached patterns).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time


def main(repo: str) -> dict:
    sys.path.insert(0, repo)  # the checkout's benchmarks and peft_lorsu, not the installed ones
    import torch

    from benchmarks import perf_measure
    from benchmarks.perf_setup import LoRSUKnobs, VisionShape, build_vision, vision_batch, vision_model

    torch.set_num_threads(1)
    shape = VisionShape("ViT-B/16 x 4 layers", 4, 768, 12, 3072, 224, 16, 512)
    batch = vision_batch(shape, 8)
    knobs = LoRSUKnobs(r=64, top_k_heads=2, sparsity=0.1)
    trainees = {n: build_vision(n, vision_model(shape), batch, knobs) for n in ("lorsu", "lora", "backprop_floor")}
    for trainee in trainees.values():
        trainee.step()
        trainee.step()
    times: dict[str, list[float]] = {n: [] for n in trainees}
    for _ in range(7):
        for name, trainee in trainees.items():
            start = time.process_time()
            trainee.step()
            times[name].append(time.process_time() - start)
    median = {n: sorted(v)[len(v) // 2] for n, v in times.items()}
    transient = {n: perf_measure.transient_peak_bytes(t.step) for n, t in trainees.items()}
    static = {n: perf_measure.static_bytes(t.model, t.optimizer, cached_tensors(t.model)) for n, t in trainees.items()}
    peak = {n: static[n] + transient[n] for n in trainees}
    return {
        "repo": repo,
        "median_step_s": median,
        "lorsu_over_lora": median["lorsu"] / median["lora"],
        "lorsu_over_floor": median["lorsu"] / median["backprop_floor"],
        "transient_peak_lorsu_over_lora": transient["lorsu"] / transient["lora"],
        "peak_lorsu_over_lora": peak["lorsu"] / peak["lora"],
        "peak_mib": {n: round(b / 2**20, 1) for n, b in peak.items()},
        "static_mib": {n: round(b / 2**20, 1) for n, b in static.items()},
    }


def cached_tensors(model) -> list:
    """The tensors of every fc1 layer's cached patterns (whatever fields the checkout's pattern has)."""
    tensors = []
    for module in model.modules():
        for pattern in getattr(module, "patterns", {}).values():
            for field in dataclasses.fields(pattern):
                value = getattr(pattern, field.name)
                items = value if isinstance(value, tuple) else (value,)
                tensors += [v for v in items if hasattr(v, "untyped_storage")]
    return tensors


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else "."), indent=2))
