"""The "dense-masked" LoRSU baseline: the update written the straightforward way, for the cost comparison.

What a direct implementation of the paper does (and the authors' code does): per attention block a full-size
output-side factor for q, k and v (``d`` rows each, rank ``r``) and one shared input-side factor, with the gradient of
the rows of unselected heads multiplied by a 0/1 row mask after backward; fc1's whole weight trainable, its gradient
multiplied by a weight-sized 0/1 mask after backward; q/k/v and fc1 biases trained directly; an unmasked rank-``r``
update of the projection. With Adam and no weight decay it trains exactly the entries LoRSU trains, but the
optimizer holds state for every fc1 entry and every row of the factors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peft_lorsu import LoRSUConfig


def _mask_gradient(param: nn.Parameter, mask: torch.Tensor) -> None:
    """Multiply ``param``'s gradient by ``mask`` (broadcast) each time backward has accumulated it."""

    def hook(p: torch.Tensor) -> None:
        p.grad.mul_(mask)

    param.register_post_accumulate_grad_hook(hook)


class MaskedLowRank(nn.Module):
    """``base(x) + scale * (x V^T) U^T`` with a full `(d_out, r)` ``U`` whose gradient rows are masked.

    Args:
        base: the frozen linear `(d_out, d_in)`.
        V: `(r, d_in)` input-side factor (shared between q, k and v of one block).
        row_mask: `(d_out,)` 1 for rows that train, 0 for rows whose gradient is zeroed; ``None`` trains all rows.
        scale: ``lora_alpha / r``.
    """

    def __init__(self, base: nn.Linear, V: nn.Parameter, row_mask: torch.Tensor | None, scale: float) -> None:
        super().__init__()
        self.base = base
        self.V = V
        self.U = nn.Parameter(torch.empty(base.out_features, V.shape[0]))
        nn.init.kaiming_uniform_(self.U, a=math.sqrt(5))
        self.scale = scale
        if row_mask is not None:
            self.register_buffer("row_mask", row_mask.float().unsqueeze(1))  # (d_out, 1)
            _mask_gradient(self.U, self.row_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.V), self.U) * self.scale


def apply_dense_masked(model: nn.Module, config: LoRSUConfig) -> list[torch.Tensor]:
    """Turn ``model`` (a CLIP image encoder) into the dense-masked LoRSU in place; return its mask buffers.

    ``config`` must hold a selection (``selected_heads`` and ``fc1_indices``, e.g. from ``probe_lorsu``); every encoder
    layer named there is adapted.
    """
    if config.selected_heads is None or config.fc1_indices is None:
        raise ValueError("apply_dense_masked needs a probed LoRSUConfig (selected_heads and fc1_indices)")
    model.requires_grad_(False)
    scale = config.lora_alpha / config.r
    masks: list[torch.Tensor] = []
    for block_name, heads in config.selected_heads.items():
        attention = model.get_submodule(block_name)
        width, head_dim = attention.q_proj.in_features, attention.head_dim
        V = nn.Parameter(torch.zeros(config.r, width))
        rows = torch.zeros(attention.q_proj.out_features)
        for h in heads:
            rows[h * head_dim : (h + 1) * head_dim] = 1
        for role in ("q_proj", "k_proj", "v_proj"):
            base = getattr(attention, role)
            wrapped = MaskedLowRank(base, V, rows, scale)
            setattr(attention, role, wrapped)
            masks.append(wrapped.row_mask)
            base.bias.requires_grad_(True)
    for fc1_name, indices in config.fc1_indices.items():
        fc1 = model.get_submodule(fc1_name)
        mask = torch.zeros(fc1.weight.numel())
        mask[indices] = 1
        mask = mask.view_as(fc1.weight)
        fc1.weight.requires_grad_(True)
        fc1.bias.requires_grad_(True)
        _mask_gradient(fc1.weight, mask)
        masks.append(mask)
    projection = getattr(model, "visual_projection", None)
    if config.adapt_projection and isinstance(projection, nn.Linear):
        V = nn.Parameter(torch.zeros(config.r, projection.in_features))
        model.visual_projection = MaskedLowRank(projection, V, None, scale)
    return masks
