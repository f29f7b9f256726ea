"""The cost benchmark's variant rows: LoRSU against peft LoRA compiled with ``torch.compile`` (inductor), and in bf16
(the forward under ``torch.autocast``, and a model held in bf16), each against the eager fp32 step of the same run.

Every function returns JSON-ready data; ratios are paired per repetition (see ``perf_measure``).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from . import perf_measure as M
from .perf_sections import Plan, method_record
from .perf_setup import Trainee, build_vision, vision_batch, vision_model

logger = logging.getLogger("benchmarks.perf")
PAIR = ("lorsu", "lora")


def _records(plan: Plan, trainees: dict[str, Trainee], desc: str, baselines: tuple[str, ...]) -> dict:
    fns = {n: t.step for n, t in trainees.items()}
    times = M.interleave(fns, plan.variant_repeats, 1, desc, plan.device)
    base_times = {b: times[b] for b in baselines}
    return {n: method_record(t, times[n], base_times, plan.device) for n, t in trainees.items()}


def compiled(plan: Plan) -> dict | None:
    """Eager and ``torch.compile``-d steps of LoRSU and LoRA on ``plan.compile_shape`` at the main batch, and the
    compile time.

    The compiled model is the eager one wrapped (same parameters and optimizer); its first step compiles forward and
    backward, the compile time is that step's wall time less a compiled step's. Each trainee's fc1 patterns are
    computed by an eager step first, outside the compiled graph, as in training.
    """
    if not (plan.variant_repeats and plan.compiled):
        return None
    shape = plan.compile_shape or plan.vision
    base = vision_model(shape, plan.seed)
    batch = vision_batch(shape, plan.batch, seed=plan.seed)
    trainees = {n: build_vision(n, base, batch, plan.knobs, device=plan.device) for n in PAIR}
    compile_s = {}
    for name in PAIR:
        trainees[name].step()
        fast = dataclasses.replace(trainees[name], name=f"{name}_compiled", model=torch.compile(trainees[name].model))
        logger.info("compiling %s", name)
        _, first = M.timed(fast.step, plan.device)
        _, again = M.timed(fast.step, plan.device)
        compile_s[name] = first - again
        trainees[fast.name] = fast
    records = _records(plan, trainees, "compiled steps", ("lora", "lora_compiled", "lorsu"))
    for name in PAIR:
        records[f"{name}_compiled"]["compile_wall_s"] = compile_s[name]
    return {"shape": shape.name, "batch": plan.batch, "methods": records}


def bf16(plan: Plan) -> dict | None:
    """LoRSU and LoRA in fp32, under ``torch.autocast(bfloat16)`` and as bf16 models, on ``plan.bf16_shape``."""
    if not plan.variant_repeats:
        return None
    shape = plan.bf16_shape or plan.vision
    size = plan.bf16_batch or plan.batch
    base = vision_model(shape, plan.seed)
    batch = vision_batch(shape, size, seed=plan.seed)
    trainees = {}
    for name in PAIR:
        trainees[name] = build_vision(name, base, batch, plan.knobs, device=plan.device)
        autocast = build_vision(name, base, batch, plan.knobs, device=plan.device)
        trainees[f"{name}_autocast"] = dataclasses.replace(autocast, autocast=torch.bfloat16)
        trainees[f"{name}_bf16"] = build_vision(
            name, base, batch, plan.knobs, device=plan.device, dtype=torch.bfloat16
        )
    baselines = ("lora", "lora_autocast", "lora_bf16")
    return {"shape": shape.name, "batch": size, "methods": _records(plan, trainees, "bf16 steps", baselines)}
