"""The PNG plots of ``python -m benchmarks.perf`` (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MIB = 2**20


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _errorbars(ratios: list[dict]) -> tuple[list[float], list[list[float]]]:
    med = [r["median"] for r in ratios]
    return med, [[m - r["min"] for m, r in zip(med, ratios)], [r["max"] - m for m, r in zip(med, ratios)]]


def methods(res: dict, path: Path) -> None:
    """Step time and peak memory of every vision method, relative to LoRA."""
    names = list(res["methods"])
    lora_peak = res["methods"]["lora"]["memory"]["peak_bytes"]
    step, err = _errorbars([res["methods"][n]["step_ratio_vs_lora"]["cpu"] for n in names])
    peak = [res["methods"][n]["memory"]["peak_bytes"] / lora_peak for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(names, step, yerr=err, color="tab:blue", capsize=3)
    axes[0].set_ylabel("step time / LoRA step time (CPU)")
    axes[1].bar(names, peak, color="tab:orange")
    axes[1].set_ylabel("peak tensor memory / LoRA's")
    for ax in axes:
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.tick_params(axis="x", rotation=35)
    _save(fig, path)


def scaling_batch(res: dict, path: Path) -> None:
    rows = res["scaling"]["batch"]
    batch = [r["batch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, color in (("lorsu", "tab:blue"), ("lora", "tab:green")):
        axes[0].plot(batch, [r[f"{name}_step_s"]["median"] for r in rows], "o-", color=color, label=name)
        axes[1].plot(batch, [r[f"{name}_memory"]["peak_bytes"] / MIB for r in rows], "o-", color=color, label=name)
    axes[0].set_ylabel("step CPU s")
    axes[1].set_ylabel("peak tensor memory MiB")
    for ax in axes:
        ax.set_xlabel("batch size")
        ax.legend()
    _save(fig, path)


def scaling_setting(res: dict, key: str, path: Path) -> None:
    """LoRSU step ratio and peak memory vs LoRA (and trainable state) against top_k_heads or sparsity."""
    s = res["scaling"]
    rows = s[key]
    x = [float(r["setting"]) for r in rows]
    ratio, err = _errorbars([r["ratio_vs_lora"] for r in rows])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].errorbar(x, ratio, yerr=err, fmt="o-", capsize=3)
    axes[0].set_ylabel("LoRSU step / LoRA step (CPU)")
    axes[1].plot(x, [r["lorsu_memory"]["peak_bytes"] / s["reference_memory"]["peak_bytes"] for r in rows], "o-")
    axes[1].set_ylabel("LoRSU peak memory / LoRA's")
    axes[2].plot(x, [r["trainable_state_bytes"] / MIB for r in rows], "o-", label="LoRSU")
    dense = res["methods"]["dense_masked"]["trainable_state"]["total_bytes"] / MIB
    axes[2].axhline(dense / 10, color="tab:red", ls="--", label="1/10 of dense-masked")
    axes[2].set_ylabel("trainable state MiB")
    axes[2].legend()
    for ax in axes[:2]:
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    for ax in axes:
        ax.set_xlabel("top_k_heads" if key == "heads" else "sparsity")
        if key == "sparsity":
            ax.set_xscale("log")
    _save(fig, path)


def write_all(res: dict, out: Path) -> None:
    methods(res, out / "perf_methods.png")
    if res.get("scaling"):  # absent with --no-scaling
        scaling_batch(res, out / "perf_scaling_batch.png")
        scaling_setting(res, "heads", out / "perf_scaling_heads.png")
        scaling_setting(res, "sparsity", out / "perf_scaling_sparsity.png")
