"""The measurements of ``python -m benchmarks.perf``, one function per section of the report.

Every function returns plain JSON-ready data. Times are seconds, memory bytes; ratios are paired per repetition
(see ``perf_measure``).
"""

from __future__ import annotations

import copy
import gc
import logging
import statistics
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from peft_lorsu import SparseLinear, probe_lorsu
from peft_lorsu.lorsu.functional import sampled_weight_grad, sparse_pattern

from . import perf_measure as M
from .perf_setup import (
    TEXT_METHODS,
    VISION_METHODS,
    LoRSUKnobs,
    TextShape,
    Trainee,
    VisionShape,
    build_text,
    build_vision,
    image_class_loss,
    prompt_batch,
    text_model,
    vision_batch,
    vision_model,
)

logger = logging.getLogger("benchmarks.perf")


@dataclass(frozen=True)
class Plan:
    """What one run measures: shapes, batch sizes, repetitions, sweeps."""

    vision: VisionShape
    text: TextShape
    batch: int
    repeats: int
    warmup: int
    probe_repeats: int
    scaling_batch: int
    scaling_repeats: int
    batches: tuple[int, ...]
    heads: tuple[int, ...]
    sparsities: tuple[float, ...]
    text_classes: int
    text_repeats: int
    kernel_repeats: int
    large: VisionShape | None
    large_batch: int
    large_repeats: int
    knobs: LoRSUKnobs = LoRSUKnobs()
    seed: int = 0
    device: str = "cpu"
    variant_repeats: int = 0  # compiled and bf16 steps (0: those sections are skipped)
    bf16_shape: VisionShape | None = None  # the bf16 rows' shape and batch (default: the main ones)
    bf16_batch: int = 0
    compile_shape: VisionShape | None = None  # the compiled rows' shape (default: the main one)
    compiled: bool = True  # False: no compiled rows (inductor takes minutes even on the tiny model)


def _runtime_caches(model: torch.nn.Module) -> list[torch.Tensor]:
    """Tensors LoRSU's fc1 layers keep between steps: the rows, columns and block positions of their patterns."""
    tensors = []
    for module in model.modules():
        for pattern in module.patterns.values() if isinstance(module, SparseLinear) else ():
            tensors += [pattern.rows, pattern.cols, pattern.row_pos, pattern.col_pos]
            tensors += [o for o in pattern.order if o is not None]
    return tensors


def step_memory(trainee: Trainee, device: str = "cpu") -> dict[str, int]:
    """Static, transient-peak and peak tensor bytes of one (warm) training step."""
    static = M.static_bytes(trainee.model, trainee.optimizer, _runtime_caches(trainee.model))
    transient = M.transient_peak_bytes(trainee.step, device)
    return {"static_bytes": static, "transient_peak_bytes": transient, "peak_bytes": static + transient}


def _fc1_patterns(trainee: Trainee) -> dict[str, float] | None:
    """Mean share of fc1's rows and columns in the block LoRSU's value gradients compute, and of the full product."""
    layers = [m for m in trainee.model.modules() if isinstance(m, SparseLinear) and m.lorsu_values]
    if not layers:
        return None
    patterns = [
        sparse_pattern([m.lorsu_indices[a] for a in m.lorsu_values], (m.out_features, m.in_features)) for m in layers
    ]
    return {
        "block_rows": statistics.mean(p.rows.numel() / p.shape[0] for p in patterns),
        "block_cols": statistics.mean(p.cols.numel() / p.shape[1] for p in patterns),
        "gradient_block": statistics.mean(p.block_fraction for p in patterns),
    }


def method_record(trainee: Trainee, times: dict, baseline_times: Mapping, device: str = "cpu") -> dict:
    """Trainable state, step times, paired ratios to each of ``baseline_times``, memory and fc1 pattern."""
    state = M.trainable_state(trainee.trainable(), trainee.optimizer)
    record = {
        "description": VISION_METHODS.get(trainee.name) or TEXT_METHODS.get(trainee.name),
        "trainable_params": state["params"],
        "trainable_state": state,
        "adapter_buffer_bytes": sum(b.numel() * b.element_size() for b in trainee.adapter_buffers),
        "step_s": M.time_summaries({trainee.name: times})[trainee.name],
        "memory": step_memory(trainee, device),
    }
    for name in baseline_times:
        record[f"step_ratio_vs_{name}"] = {
            clock: M.paired_ratio({"a": times, "b": baseline_times[name]}, "a", "b", clock)
            for clock in ("cpu", "wall")
        }
    pattern = _fc1_patterns(trainee)
    if pattern is not None:
        record["fc1_pattern"] = pattern
    return record


def vision_methods(plan: Plan) -> tuple[dict, dict[str, Trainee]]:
    """Every vision method on the main shape and batch: step time, memory, trainable state."""
    base = vision_model(plan.vision, plan.seed)
    batch = vision_batch(plan.vision, plan.batch, seed=plan.seed)
    trainees: dict[str, Trainee] = {}
    for name in VISION_METHODS:
        logger.info("building %s", name)
        selection = trainees["lorsu"].config if name == "dense_masked" else None
        trainees[name] = build_vision(name, base, batch, plan.knobs, selection, plan.device)
    times = M.interleave(
        {n: t.step for n, t in trainees.items()}, plan.repeats, plan.warmup, "vision steps", plan.device
    )
    baselines = {n: times[n] for n in ("lora", "full", "backprop_floor")}
    records = {}
    for name, trainee in trainees.items():
        records[name] = record = method_record(trainee, times[name], baselines, plan.device)
        logger.info(
            "%s: step %.2f s (%.3fx LoRA), peak %.0f MiB",
            name,
            record["step_s"]["cpu"]["median"],
            record["step_ratio_vs_lora"]["cpu"]["median"],
            record["memory"]["peak_bytes"] / 2**20,
        )
    return records, {**trainees, "_base": base.to(plan.device)}


def step_profile(trainees: Mapping[str, Trainee], names: tuple[str, ...], top: int = 14) -> dict:
    """torch.profiler's ops with the most self CPU time in one step of each method (milliseconds; on CUDA the host
    time of launching them)."""
    out = {}
    for name in names:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainees[name].step()
        rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in rows)
        out[name] = {
            "total_ms": total / 1e3,
            "ops": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in rows[:top]],
        }
    return out


def probe_cost(plan: Plan, trainees: Mapping[str, Trainee]) -> dict:
    """Probe time per batch from ``T(3 batches) - T(1 batch)``, against one LoRSU training step in the same round."""
    base, lorsu = trainees["_base"], trainees["lorsu"]
    batch = lorsu.batch

    def probe(n: int) -> Callable[[], object]:
        return lambda: probe_lorsu(
            base, plan.knobs.config(), [batch] * n, loss_fn=image_class_loss, num_batches=n, show_progress=False
        )

    fns = {"one": probe(1), "three": probe(3), "step": lorsu.step}
    times = M.interleave(fns, plan.probe_repeats, 0, "probe", plan.device)
    out: dict = {"step_s": M.time_summaries({"s": times["step"]})["s"]}
    for clock in ("cpu", "wall"):
        per_batch = [(c - a) / 2 for a, c in zip(times["one"][clock], times["three"][clock])]
        fixed = [a - p for a, p in zip(times["one"][clock], per_batch)]
        out[f"per_batch_{clock}"] = M.summary(per_batch)
        out[f"fixed_{clock}"] = M.summary(fixed)
        out[f"ratio_to_step_{clock}"] = {
            **M.summary([p / s for p, s in zip(per_batch, times["step"][clock])]),
            "of_fastest": min(per_batch) / min(times["step"][clock]),
        }
    return out


def inference(plan: Plan, trainees: Mapping[str, Trainee]) -> dict:
    """Forward time (no grad, eval) of the base model, LoRSU and LoRA unmerged and merged."""
    batch = {"pixel_values": trainees["lorsu"].batch["pixel_values"]}
    models = {"base": trainees["_base"]}
    for name in ("lorsu", "lora"):
        unmerged = trainees[name].model
        merged = copy.deepcopy(unmerged)
        merged.base_model.merge_adapter()
        models[f"{name}_unmerged"], models[f"{name}_merged"] = unmerged, merged
    for model in models.values():
        model.eval()

    def forward(model: torch.nn.Module) -> Callable[[], object]:
        def run() -> None:
            with torch.no_grad():
                model(**batch)

        return run

    fns = {n: forward(m) for n, m in models.items()}
    times = M.interleave(fns, plan.repeats, plan.warmup, "inference", plan.device)
    out = {"forward_s": M.time_summaries(times)}
    for name in models:
        if name != "base":
            out[f"{name}_vs_base"] = {c: M.paired_ratio(times, name, "base", c) for c in ("cpu", "wall")}
    for name in ("lorsu", "lora"):
        trainees[name].model.train()
    return out


def fc1_kernels(plan: Plan, trainees: Mapping[str, Trainee]) -> dict:
    """The ways to get S entries of fc1's weight gradient ``g^T x`` at this shape, timed on their own.

    ``dense``: the full `(m, d)` product and a gather (the kernel before this benchmark); ``kernel_*``: LoRSU's kernel
    (row-chunked product over the block of rows and columns the selection uses) for a random and for the probe's
    selection; ``sampled_addmm``: torch's sampled dense-dense product on a CSR pattern; for scale, ``input_grad`` is
    the `(N, m) x (m, d)` product every method pays.
    """
    layer = next(m for m in trainees["lorsu"].model.modules() if isinstance(m, SparseLinear))
    m, d = layer.out_features, layer.in_features
    n = plan.batch * plan.vision.tokens
    g = torch.Generator().manual_seed(plan.seed)
    grad, x, weight = torch.randn(n, m, generator=g), torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    grad, x, weight = grad.to(plan.device), x.to(plan.device), weight.to(plan.device)
    probe_indices = layer.lorsu_indices["default"]
    random_indices = torch.randperm(m * d, generator=g)[: probe_indices.numel()].sort().values
    random_indices = random_indices.to(plan.device, probe_indices.dtype)
    probe_pattern = sparse_pattern([probe_indices], (m, d))
    random_pattern = sparse_pattern([random_indices], (m, d))
    crow = torch.zeros(m + 1, dtype=torch.long)
    crow[1:] = torch.bincount((random_indices // d).cpu(), minlength=m).cumsum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        csr = torch.sparse_csr_tensor(
            crow.to(plan.device), (random_indices % d).long(), torch.zeros(random_indices.numel()), (m, d)
        ).to(plan.device)
    fns = {
        "input_grad": lambda: grad @ weight,
        "dense": lambda: (grad.t() @ x).reshape(-1).index_select(0, random_indices),
        "kernel_random_selection": lambda: sampled_weight_grad(grad, x, random_indices, random_pattern),
        "kernel_probe_selection": lambda: sampled_weight_grad(grad, x, probe_indices, probe_pattern),
        "sampled_addmm": lambda: torch.sparse.sampled_addmm(csr, grad.t(), x, beta=0.0),
    }
    times = M.interleave(fns, plan.kernel_repeats, 1, "fc1 kernels", plan.device)
    out = {"shape": {"N": n, "m": m, "d": d, "S": probe_indices.numel()}, "time_s": M.time_summaries(times)}
    out["vs_dense"] = {name: M.paired_ratio(times, name, "dense") for name in fns if name != "dense"}
    out["probe_block_fraction"] = probe_pattern.block_fraction
    return out


def _against_lora(plan: Plan, lora: Trainee, lorsu: Trainee, desc: str) -> dict:
    """LoRSU and LoRA timed interleaved, the paired ratio, and LoRSU's memory."""
    times = M.interleave({"lora": lora.step, "lorsu": lorsu.step}, plan.scaling_repeats, 1, desc, plan.device)
    return {
        "lorsu_step_s": M.summary(times["lorsu"]["cpu"]),
        "lora_step_s": M.summary(times["lora"]["cpu"]),
        "ratio_vs_lora": M.paired_ratio(times, "lorsu", "lora"),
        "lorsu_memory": step_memory(lorsu, plan.device),
    }


def _sweep(plan: Plan, base, batch, lora: Trainee, points: dict[str, LoRSUKnobs], desc: str) -> list[dict]:
    """LoRSU at each setting against ``lora``, with its memory, trainable state and fc1 pattern."""
    rows = []
    for label, knobs in points.items():
        lorsu = build_vision("lorsu", base, batch, knobs, device=plan.device)
        timed = _against_lora(plan, lora, lorsu, f"{desc} {label}")
        state = M.trainable_state(lorsu.trainable(), lorsu.optimizer)  # after steps: Adam's moments exist
        rows.append(
            {
                "setting": label,
                **timed,
                "trainable_params": state["params"],
                "trainable_state_bytes": state["total_bytes"],
                "fc1_pattern": _fc1_patterns(lorsu),
            }
        )
        del lorsu
        gc.collect()
    return rows


def scaling(plan: Plan) -> dict | None:
    """Step time and memory against batch size (LoRSU and LoRA), selected heads and sparsity (LoRSU vs LoRA);
    ``None`` when the plan has no sweep."""
    if not (plan.batches or plan.heads or plan.sparsities):
        return None
    base = vision_model(plan.vision, plan.seed)
    batch = vision_batch(plan.vision, plan.scaling_batch, seed=plan.seed)
    lora = build_vision("lora", base, batch, plan.knobs, device=plan.device)
    lorsu = build_vision("lorsu", base, batch, plan.knobs, device=plan.device)
    lora_batch = lora.batch
    by_batch = []
    for size in plan.batches:
        sized = {k: v.to(plan.device) for k, v in vision_batch(plan.vision, size, seed=plan.seed).items()}
        lora.batch, lorsu.batch = sized, sized
        memory = step_memory(lora, plan.device)
        by_batch.append({"batch": size, **_against_lora(plan, lora, lorsu, f"batch {size}"), "lora_memory": memory})
    del lorsu
    lora.batch = lora_batch
    knobs = plan.knobs
    heads = {str(k): LoRSUKnobs(knobs.r, k, knobs.sparsity) for k in plan.heads}
    sparsities = {str(s): LoRSUKnobs(knobs.r, knobs.top_k_heads, s) for s in plan.sparsities}
    return {
        "batch_size_of_sweeps": plan.scaling_batch,
        "reference_memory": step_memory(lora, plan.device),
        "batch": by_batch,
        "heads": _sweep(plan, base, batch, lora, heads, "heads"),
        "sparsity": _sweep(plan, base, batch, lora, sparsities, "sparsity"),
    }


def text_methods(plan: Plan) -> dict:
    """RLP against CoOp on the text tower: step time, memory, trainable state."""
    base = text_model(plan.text, plan.seed)
    batch = prompt_batch(plan.text, plan.text_classes, plan.batch, seed=plan.seed)
    trainees = {name: build_text(name, base, batch, plan.device) for name in TEXT_METHODS}
    fns = {n: t.step for n, t in trainees.items()}
    times = M.interleave(fns, plan.text_repeats, plan.warmup, "text steps", plan.device)
    return {name: method_record(t, times[name], {"coop": times["coop"]}, plan.device) for name, t in trainees.items()}


def large_model(plan: Plan) -> dict | None:
    """One row at a larger shape: LoRSU against LoRA (step time and memory)."""
    if plan.large is None:
        return None
    base = vision_model(plan.large, plan.seed)
    batch = vision_batch(plan.large, plan.large_batch, seed=plan.seed)
    trainees = {name: build_vision(name, base, batch, plan.knobs, device=plan.device) for name in ("lorsu", "lora")}
    fns = {n: t.step for n, t in trainees.items()}
    times = M.interleave(fns, plan.large_repeats, 1, plan.large.name, plan.device)
    return {
        "shape": plan.large.name,
        "batch": plan.large_batch,
        "methods": {
            name: method_record(t, times[name], {"lora": times["lora"]}, plan.device) for name, t in trainees.items()
        },
    }
