"""How the cost benchmark measures: interleaved timings, peak tensor memory, bytes of state, the machine.

Time. Each repetition runs every compared function once, in an order rotated from one repetition to the next, and
records both the process CPU time (``time.process_time``: the cycles this process got, which other processes on a
shared machine disturb far less than wall time) and the wall time. Ratios are formed per repetition, against the
baseline run in the same round, and summarised as min / median / max.

Memory. ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of a tensor (the raw
``[memory]`` records, in time order); the peak of their running sum over one step is the step's *transient* peak: the
most tensor memory alive at once beyond what was alive when the step began. Adding the tensors alive between steps
(weights, buffers, optimizer state: :func:`static_bytes`) gives the step's peak tensor memory. It counts what torch
allocates for tensors, not allocator slack or the Python heap, so it does not depend on other processes.

On CUDA (``device="cuda"``) the clocks are device time: the ``"cpu"`` clock is the time between two CUDA events around
the call (what the GPU spent, the figure ratios are formed from), ``"wall"`` the host time with the device synchronised
before and after. The transient peak is ``torch.cuda.max_memory_allocated`` over the call, less what was allocated
when it began (after ``torch.cuda.reset_peak_memory_stats``).
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from tqdm.auto import tqdm

Clock = str  # "cpu" or "wall"


def summary(values: list[float]) -> dict[str, float | list[float]]:
    """``{"min", "median", "max", "values"}`` of a non-empty list."""
    if not values:
        raise ValueError("summary of an empty list")
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "values": list(values)}


def timed(fn: Callable[[], object], device: str = "cpu") -> tuple[float, float]:
    """(process CPU seconds, wall seconds) of one call; on CUDA (CUDA-event seconds, synchronised wall seconds)."""
    if device == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        wall0 = time.perf_counter()
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / 1e3, time.perf_counter() - wall0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu0, time.perf_counter() - wall0


def interleave(
    fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1, desc: str = "timing", device: str = "cpu"
) -> dict[str, dict[str, list[float]]]:
    """Time every function ``repeats`` times, interleaved, after ``warmup`` untimed calls each (on ``device``).

    Returns:
        name -> {"cpu": [seconds per repetition], "wall": [...]}, repetitions in the same order for every name.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times = {name: {"cpu": [0.0] * repeats, "wall": [0.0] * repeats} for name in names}
    with tqdm(total=repeats * len(names), desc=desc, unit="run", leave=False) as bar:
        for rep in range(repeats):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                cpu, wall = timed(fns[name], device)
                times[name]["cpu"][rep], times[name]["wall"][rep] = cpu, wall
                bar.update()
    return times


def paired_ratio(times: Mapping[str, Mapping[str, list[float]]], name: str, baseline: str, clock: Clock = "cpu"):
    """min / median / max over repetitions of ``time[name] / time[baseline]`` in the same repetition, and
    ``of_fastest``: the ratio of the two fastest runs (other processes only ever add time, so the fastest run of
    each is the least disturbed)."""
    a, b = times[name][clock], times[baseline][clock]
    return {**summary([x / y for x, y in zip(a, b)]), "of_fastest": min(a) / min(b)}


def time_summaries(times: Mapping[str, Mapping[str, list[float]]]) -> dict[str, dict[str, dict]]:
    """name -> {"cpu": summary, "wall": summary}."""
    return {name: {clock: summary(v) for clock, v in per.items()} for name, per in times.items()}


def transient_peak_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Most tensor bytes alive at once during ``fn()`` beyond those alive when it started (torch.profiler records on
    the CPU, the CUDA allocator's peak statistics on CUDA)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = _memory_records(prof)
    live = peak = 0
    for _, nbytes in sorted(records):
        live += nbytes
        peak = max(peak, live)
    return peak


def _memory_records(prof: profile) -> list[tuple[int, int]]:
    """(time ns, +allocated / -freed bytes) of every CPU tensor allocation and free in the profile."""
    results = getattr(prof.profiler, "kineto_results", None)
    if results is not None:
        return [(e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]"]
    # older torch: per-op net memory, attributed to the innermost op (peaks inside an op are missed)
    return [(int(e.time_range.start * 1000), e.self_cpu_memory_usage) for e in prof.events()]


def _unique_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _optimizer_tensors(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    if optimizer is None:
        return []
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def static_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None, extra: Iterable[torch.Tensor] = ()) -> int:
    """Tensor bytes alive between steps: weights and buffers of ``model``, optimizer state and ``extra`` tensors
    (run-time caches), each storage counted once."""
    tensors = [*model.parameters(), *model.buffers(), *_optimizer_tensors(optimizer), *extra]
    return _unique_storage_bytes(tensors)


def trainable_state(params: list[nn.Parameter], optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """Parameters, and bytes of trainable state: the parameters, their gradients (same size) and the optimizer state.

    ``moment_bytes`` is the part of the optimizer state shaped like the parameters (Adam's two moments), without
    Adam's per-tensor step counters. Call after at least one optimizer step, so that Adam's moments exist.
    """
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    optimizer_bytes = sum(t.numel() * t.element_size() for t in _optimizer_tensors(optimizer))
    moments = [
        t
        for p in params
        for t in (optimizer.state.get(p, {}).values() if optimizer is not None else ())
        if isinstance(t, torch.Tensor) and t.shape == p.shape
    ]
    return {
        "params": sum(p.numel() for p in params),
        "param_bytes": param_bytes,
        "grad_bytes": param_bytes,
        "optimizer_bytes": optimizer_bytes,
        "moment_bytes": sum(t.numel() * t.element_size() for t in moments),
        "total_bytes": 2 * param_bytes + optimizer_bytes,
    }


def machine_info(threads: int, device: str = "cpu") -> dict[str, object]:
    """CPU model, cores, threads used, the device and its name, and library versions."""
    import peft
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "load_average_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
    }
