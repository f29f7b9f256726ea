"""Draws docs/img/trained-parts.svg: which parts of a CLIP model LoRSU and RLP train.

Run from the repository root after changing the picture: python docs/img/trained_parts.py
(needs matplotlib; the output is deterministic, so an unchanged picture gives an unchanged file).
"""

from __future__ import annotations

import random
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Rectangle  # noqa: E402

TRAINED = "#e8590c"
TRAINED_LIGHT = "#ffd8a8"
FROZEN = "#ced4da"
FROZEN_EDGE = "#868e96"
TEXT = "#212529"
OUT = Path(__file__).resolve().parent / "trained-parts.svg"


def box(ax, x, y, w, h, label="", color=FROZEN, edge=FROZEN_EDGE, fontsize=10, bold=False, lw=1.0, round_=True):
    style = "round,pad=0,rounding_size=0.08" if round_ else "square,pad=0"
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, facecolor=color, edgecolor=edge, linewidth=lw))
    if label:
        ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", fontsize=fontsize, color=TEXT,
                fontweight="bold" if bold else "normal")


def arrow(ax, x0, y0, x1, y1):
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="-|>", color=FROZEN_EDGE, lw=1.0))


def lorsu_panel(ax) -> None:
    ax.set_title("LoRSU: structured updates inside the image encoder", fontsize=13, color=TEXT, loc="left")
    # image encoder layer, expanded
    box(ax, 0.2, 0.4, 6.4, 6.9, color="#f8f9fa", edge=FROZEN_EDGE)
    ax.text(0.35, 7.0, "one image-encoder layer (all L layers alike)", fontsize=10, color=TEXT, va="center")

    # attention: q, k, v, each with H = 6 head row-blocks; heads 1 and 4 selected
    selected = {1, 4}
    for j, name in enumerate(("q", "k", "v")):
        x0 = 0.5 + j * 1.25
        ax.text(x0 + 0.5, 6.45, f"W_{name}", ha="center", fontsize=10, color=TEXT)
        for h in range(6):
            color = TRAINED if h in selected else FROZEN
            box(ax, x0, 5.95 - (h + 1) * 0.42, 1.0, 0.36, color=color, round_=False, lw=0.6)
        ax.text(x0 + 0.5, 3.25, "+ bias Δ", ha="center", fontsize=9, color=TRAINED)
    ax.text(0.5, 2.85, "rank-r update U·V on the rows of the top-k heads\n(chosen per layer by the gradient probe)",
            fontsize=9, color=TEXT, va="top")
    box(ax, 4.35, 4.3, 1.0, 0.5, "out_proj", fontsize=9)
    arrow(ax, 4.1, 4.55, 4.35, 4.55)

    # MLP: fc1 as a grid with sparse trained entries, fc2 frozen
    gx, gy, cols, rows, cell = 0.5, 0.65, 12, 3, 0.2
    rng = random.Random(3)
    hot = set(rng.sample(range(cols * rows), 6))
    for i in range(rows):
        for j in range(cols):
            k = i * cols + j
            color = TRAINED if k in hot else FROZEN
            ax.add_patch(Rectangle((gx + j * cell, gy + i * cell), cell, cell, facecolor=color, edgecolor="white",
                                   linewidth=0.4))
    ax.text(gx, gy + rows * cell + 0.12, "fc1: top-S entries by |gradient|, + bias Δ", fontsize=9, color=TEXT)
    box(ax, 3.35, 0.7, 0.9, 0.5, "fc2", fontsize=9)
    box(ax, 4.45, 0.7, 1.3, 0.5, "LayerNorms", fontsize=9)
    arrow(ax, 2.95, 0.95, 3.35, 0.95)

    # outside the layer
    box(ax, 6.9, 5.6, 2.0, 0.8, "visual_projection\n(rank-r update)", color=TRAINED_LIGHT, edge=TRAINED, fontsize=9)
    box(ax, 6.9, 4.3, 2.0, 0.8, "patch + position\nembeddings", fontsize=9)
    box(ax, 6.9, 2.6, 2.0, 1.2, "text encoder\n(frozen)", fontsize=10)
    box(ax, 6.9, 1.5, 2.0, 0.6, "logit_scale", fontsize=9)
    ax.text(6.9, 0.75, "≈ 4% of the image encoder\n(CLIP ViT-B/16, r = 64)", fontsize=9, color=TEXT)


def rlp_panel(ax) -> None:
    ax.set_title("RLP: a learned prompt context for the text encoder", fontsize=13, color=TEXT, loc="left")
    tokens = ["[SOS]", "p1", "p2", "p3", "p4", "cat", ".", "[EOS]"]
    for i, t in enumerate(tokens):
        trained = t.startswith("p")
        box(ax, 0.3 + i * 1.05, 5.6, 0.9, 0.7, t, color=TRAINED if trained else FROZEN, fontsize=10,
            bold=trained)
    ax.text(1.35, 6.65, 'context: starts as "a photo of a"', fontsize=9, color=TEXT)
    ax.text(1.2, 4.9, "P = P_fr + P_A · P_B", fontsize=13, color=TRAINED, fontweight="bold")
    ax.text(1.2, 4.35, "P_fr (n_ctx × d): frozen embeddings of the init text\n"
            "P_A (n_ctx × rank), P_B (rank × d): trained, ≈ 0.5K values", fontsize=9, color=TEXT, va="top")
    box(ax, 0.3, 1.9, 3.9, 1.2, "text encoder\n(frozen)", fontsize=10)
    box(ax, 4.7, 1.9, 3.9, 1.2, "image encoder\n(frozen)", fontsize=10)
    arrow(ax, 0.75, 5.55, 0.75, 3.15)
    ax.text(0.3, 1.2, "logits = logit_scale · cos(image, text of each class prompt)", fontsize=9, color=TEXT)


def main() -> None:
    plt.rcParams["svg.hashsalt"] = "peft-lorsu"
    plt.rcParams["svg.fonttype"] = "none"  # text stays text: searchable, sharp, small
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8.4, 9.6), gridspec_kw={"height_ratios": [7.6, 4.6]})
    lorsu_panel(top)
    rlp_panel(bottom)
    top.set_ylim(0.3, 7.6)
    bottom.set_ylim(0.9, 7.0)
    for ax in (top, bottom):
        ax.set_xlim(0, 9.2)
        ax.set_aspect("equal")
        ax.axis("off")
    handles = [Rectangle((0, 0), 1, 1, facecolor=TRAINED), Rectangle((0, 0), 1, 1, facecolor=FROZEN)]
    fig.legend(handles, ["trained", "frozen"], loc="lower center", ncol=2, frameon=False, fontsize=11)
    fig.tight_layout(rect=(0, 0.03, 1, 1), h_pad=0.5)
    fig.savefig(OUT, metadata={"Date": None})
    plt.close(fig)
    print(OUT)


if __name__ == "__main__":
    main()
