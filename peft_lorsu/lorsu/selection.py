"""Turning importance statistics into LoRSU's structure: top-k heads per layer and top-S fc1 entries.

Both choices are deterministic: ties are broken by the lower index, and fc1 indices are stored in ascending order.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import LoRSUConfig
from .targets import Site, as_linear, attention_blocks


def num_sparse_values(weight: torch.Tensor, sparsity: float) -> int:
    """``S = floor(sparsity * numel(weight))``, at least 1 so a tiny layer still gets an update."""
    return max(1, math.floor(sparsity * weight.numel()))


def head_scores(grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Score of every head: ``s_h = ||G_q^h||_F^2 + ||G_k^h||_F^2 + ||G_v^h||_F^2``.

    Args:
        grad_q, grad_k, grad_v: mean gradients of the q/k/v weights, `(d, d_in)`; head ``h`` owns rows
            ``[h * d_h, (h + 1) * d_h)``.
        num_heads: ``H``.

    Returns:
        `(H,)` float32 scores.
    """
    return sum(g.float().reshape(num_heads, -1).pow(2).sum(1) for g in (grad_q, grad_k, grad_v))


def top_k_indices(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest entries of a 1-d tensor, ascending; ties go to the lower index."""
    order = torch.sort(-scores.float(), stable=True).indices
    return sorted(order[:k].tolist())


def top_s_entries(grad: torch.Tensor, num_values: int) -> torch.Tensor:
    """Flat indices (int64, ascending) of the ``num_values`` entries of ``grad`` with the largest magnitude.

    Keeping the S largest ``|G|`` entries is the mask that maximises the first-order loss decrease of an S-sparse
    update (Lemma 3.2 of the LoRSU paper).
    """
    magnitude = grad.float().abs().reshape(-1)
    order = torch.sort(-magnitude, stable=True).indices
    return order[:num_values].sort().values


def check_top_k_heads(config: LoRSUConfig, blocks: dict[str, tuple[int, int]]) -> None:
    """Raise if ``config.top_k_heads`` exceeds the heads of any attention block `{path: (num_heads, head_dim)}`."""
    if not config.adapt_attention:
        return
    for block, (num_heads, _) in blocks.items():
        if config.top_k_heads > num_heads:
            raise ValueError(
                f"LoRSUConfig.top_k_heads={config.top_k_heads} exceeds the {num_heads} heads of {block} "
                f"(allowed: 1..{num_heads})"
            )


def random_selection(model: nn.Module, config: LoRSUConfig, sites: dict[str, Site]) -> None:
    """Fill what ``config`` lacks with heads and fc1 entries drawn at random from ``config.seed`` (ablation; needs
    no data). A part that is already there is kept: when a saved random adapter is loaded, its heads come from
    ``adapter_config.json`` and its fc1 entries from the weights file, never from a new draw."""
    generator = torch.Generator().manual_seed(config.seed)
    heads = {
        block: sorted(torch.randperm(num_heads, generator=generator)[: config.top_k_heads].tolist())
        for block, (num_heads, _) in attention_blocks(sites).items()
    }
    if config.adapt_attention and config.selected_heads is None:
        config.selected_heads = heads
    if config.adapt_mlp and config.fc1_indices is None:
        config.fc1_indices = {}
        for site in sites.values():
            if site.role == "fc1":
                weight = as_linear(model.get_submodule(site.name)).weight
                chosen = torch.randperm(weight.numel(), generator=generator)[
                    : num_sparse_values(weight, config.sparsity)
                ]
                config.fc1_indices[site.name] = chosen.sort().values
