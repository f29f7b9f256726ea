"""Plots (matplotlib, Agg backend, imported only when a plot is drawn: the demo runs without it) and text tables."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from ..lorsu import LoRSUConfig

MATPLOTLIB_MISSING = "matplotlib is not installed (pip install 'peft-lorsu[plots]' to draw it)"


def has_matplotlib() -> bool:
    """Whether plots can be drawn (matplotlib is an optional dependency: the ``plots`` extra)."""
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ModuleNotFoundError(f"cannot draw the plot: {MATPLOTLIB_MISSING}", name="matplotlib") from error

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sessions(results: dict[str, Any], path: str | Path) -> None:
    """One panel per evaluation set, accuracy against session, one line per method."""
    plt = _pyplot()
    columns = next(iter(results.values())).columns
    fig, axes = plt.subplots(1, len(columns), figsize=(4 * len(columns), 3.2), squeeze=False)
    for j, column in enumerate(columns):
        ax = axes[0][j]
        for name, result in results.items():
            ax.plot(range(len(result.rows)), [100 * row[j] for row in result.rows], marker="o", label=name)
        ax.set_title(column)
        ax.set_xlabel("session (0 = zero-shot)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _draw_head_scores(ax, config: LoRSUConfig, fig) -> None:
    """Head scores (rows: layers, columns: heads), each row scaled to its maximum; selected heads outlined."""
    import numpy as np

    if not config.head_scores:
        raise ValueError("the config holds no head_scores: run probe_lorsu with selection='gradient' first")
    blocks = list(config.head_scores)
    scores = np.array([config.head_scores[b] for b in blocks], dtype=float)
    scores = scores / np.maximum(scores.max(axis=1, keepdims=True), 1e-30)
    image = ax.imshow(scores, cmap="viridis", aspect="auto", vmin=0, vmax=1)
    for row, block in enumerate(blocks):
        for head in (config.selected_heads or {}).get(block, []):
            ax.add_patch(_pyplot().Rectangle((head - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_yticks(range(len(blocks)), [b.replace(".self_attn", "").split("layers.")[-1] for b in blocks])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("head importance (row-normalised; red = selected)")
    fig.colorbar(image, ax=ax)


def plot_head_scores(config: LoRSUConfig, path: str | Path) -> None:
    """Heat map of the probe's head scores; the selected heads are outlined."""
    plt = _pyplot()
    rows = len(config.head_scores or {})
    width = len(next(iter((config.head_scores or {"": []}).values())))
    fig, ax = plt.subplots(figsize=(0.5 * width + 2.5, 0.35 * rows + 1.5))
    _draw_head_scores(ax, config, fig)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_demo(before: dict[str, float], after: dict[str, float], config: LoRSUConfig, path: str | Path) -> None:
    """The demo's picture: accuracy before / after LoRSU on target and control, next to the head heat map."""
    import numpy as np

    plt = _pyplot()
    fig, (bars, heat) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.4]})
    names = list(before)
    x = np.arange(len(names))
    bars.bar(x - 0.2, [100 * before[n] for n in names], 0.4, label="zero-shot")
    bars.bar(x + 0.2, [100 * after[n] for n in names], 0.4, label="after LoRSU")
    bars.set_xticks(x, names)
    bars.set_ylabel("accuracy (%)")
    bars.set_ylim(0, 100)
    bars.legend()
    bars.set_title("target (digits) vs control (Fashion-MNIST)")
    _draw_head_scores(heat, config, fig)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def heads_table(config) -> str:
    """The probe's choice as a text table: layer, selected heads, every head's score."""
    lines = [f"{'attention block':<48} {'heads':<10} scores (x max of the layer)"]
    for block, heads in (config.selected_heads or {}).items():
        scores = (config.head_scores or {}).get(block, [])
        top = max(scores) if scores and max(scores) > 0 else 1.0
        lines.append(f"{block:<48} {str(heads):<10} " + " ".join(f"{s / top:.2f}" for s in scores))
    return "\n".join(lines)
