"""LoRSU on a fused multi-head attention: the head-masked update of ``torch.nn.MultiheadAttention.in_proj_weight``.

OpenCLIP's ViT (and any model built on ``torch.nn.MultiheadAttention``) keeps q, k and v in one stacked matrix
``in_proj_weight = [W_q; W_k; W_v]`` of shape `(3d, d)`: exactly the matrix the LoRSU paper updates,
``delta = (alpha / r) * M * (U V)`` with the row mask ``M`` of the selected heads. Plain LoRA targeting cannot reach
it (it is a parameter, not a linear); here the whole attention module is wrapped, and its forward runs the module's
own code with ``in_proj_weight + delta`` (and ``in_proj_bias + bias delta``) substituted through
``torch.func.functional_call``, so masks, ``batch_first`` and every other option behave as in the base module.

Symbols: width ``d``, ``H`` heads of size ``d_h``, ``k = top_k_heads``, ``n = k * d_h``, rank ``r``.

- ``lorsu_U``: `(3, n, r)`, output-side factors of the selected rows of q, k and v (the only rows that change).
- ``lorsu_V``: `(1, r, d)` shared by q, k and v as in the paper (``share_qkv_factor``), or `(3, r, d)`.
- ``lorsu_rows``: `(3 * n,)` int64 rows of ``in_proj_weight`` the update writes (q rows, then k rows ``+ d``, then v
  rows ``+ 2d``), saved with the adapter and checked on load against ``selected_heads``.
- ``lorsu_bias``: `(3d,)` dense delta of ``in_proj_bias`` (``train_biases``).

Only ``U``, ``V`` and the bias delta receive gradients; the dense `(3d, d)` delta exists only transiently.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from ..compat import BufferDict
from .layer import LoRSUModule


class HeadLoRAInProjection(LoRSUModule):
    """Head-masked low-rank update of the fused q/k/v in-projection of a ``torch.nn.MultiheadAttention``."""

    adapter_layer_names = ("lorsu_U", "lorsu_V", "lorsu_bias")
    other_param_names = ("lorsu_rows", "r", "scaling", "heads")
    base_layer_type = nn.MultiheadAttention

    def __init__(self, base_layer: nn.MultiheadAttention, adapter_name: str, **kwargs) -> None:
        super().__init__(base_layer)
        if not base_layer._qkv_same_embed_dim:
            raise ValueError("LoRSU adapts a MultiheadAttention only with a fused in_proj_weight (kdim == vdim == d)")
        self.lorsu_U = nn.ParameterDict({})
        self.lorsu_V = nn.ParameterDict({})
        self.lorsu_rows = BufferDict({}, persistent=True)
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.heads: dict[str, list[int] | None] = {}
        self._active_adapter = adapter_name
        self._register_load_state_dict_pre_hook(self._check_loaded_rows)
        self.update_layer(adapter_name, **kwargs)

    # The stacked q/k/v weight is a parameter of the attention module, not a linear's `.weight`, so peft's base-weight
    # accessors do not reach it; a quantised MultiheadAttention does not exist to need them.
    def get_base_weight(self) -> torch.Tensor:
        return self.get_base_layer().in_proj_weight.data

    def base_weight_parameter(self) -> torch.Tensor:
        return self.get_base_layer().in_proj_weight

    def set_base_weight(self, weight: torch.Tensor) -> None:
        self.get_base_layer().in_proj_weight.data = weight

    def base_bias(self) -> torch.Tensor | None:
        return self.get_base_layer().in_proj_bias

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        heads: list[int] | None = None,
        head_dim: int = 0,
        low_rank: bool = True,
        train_bias: bool = False,
        init: str | bool = "lorsu",
        shared_factor: bool = True,
        inference_mode: bool = False,
    ) -> None:
        """Add adapter ``adapter_name``.

        Args:
            heads: selected head indices; ``low_rank`` needs them.
            low_rank: ``False`` gives only the bias delta (``adapt_attention=False``).
            shared_factor: one ``V`` `(r, d)` for q, k and v (the paper), else one per projection.
            init: ``"lorsu"`` (U Kaiming, V zero), ``"lora"`` (V Kaiming, U zero) or ``False`` (both random).
        """
        if r < 1:
            raise ValueError(f"r must be >= 1, got {r}")
        if lora_dropout:
            raise ValueError(
                f"lora_dropout={lora_dropout}: a fused in-projection takes its update as a weight delta, which has no "
                "input to drop; use lora_dropout=0.0"
            )
        self.heads[adapter_name] = None if heads is None else list(heads)
        if low_rank:
            width = self.in_features
            if not heads or head_dim * (max(heads) + 1) > width or min(heads) < 0:
                raise ValueError(f"heads {heads} with head_dim {head_dim} do not fit the {width} rows of q, k and v")
            head_rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])
            self.lorsu_rows[adapter_name] = torch.cat([head_rows + part * width for part in range(3)])
            self.r[adapter_name] = r
            self.scaling[adapter_name] = lora_alpha / r
            self.lorsu_U[adapter_name] = nn.Parameter(torch.empty(3, head_rows.numel(), r))
            self.lorsu_V[adapter_name] = nn.Parameter(torch.empty(1 if shared_factor else 3, r, width))
            self.reset_lorsu_parameters(adapter_name, init)
        self._update_bias(adapter_name, train_bias, random_init=init is False)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def reset_lorsu_parameters(self, adapter_name: str, init: str | bool) -> None:
        # The bounds of kaiming_uniform_(a=sqrt(5)) on the 2-d factors, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with
        # fan_in = r for U and d for V, as in HeadLoRALinear (torch would take a wrong fan-in from the 3-d shapes).
        with torch.no_grad():
            for factor, random in (
                (self.lorsu_U[adapter_name], init in ("lorsu", False)),
                (self.lorsu_V[adapter_name], init in ("lora", False)),
            ):
                if random:
                    bound = 1 / math.sqrt(factor.shape[-1])
                    factor.uniform_(-bound, bound)
                else:
                    factor.zero_()

    def get_delta_weight(self, adapter: str) -> torch.Tensor | None:
        """Dense `(3d, d)` delta of ``in_proj_weight`` for ``adapter`` (adapter dtype), or ``None``."""
        if adapter not in self.lorsu_U:
            return None
        block = torch.matmul(self.lorsu_U[adapter], self.lorsu_V[adapter]) * self.scaling[adapter]  # (3, n, d)
        delta = block.new_zeros(3 * self.in_features, self.in_features)
        return delta.index_add(0, self.lorsu_rows[adapter], block.reshape(-1, self.in_features))

    def _adapted_weights(self) -> dict[str, torch.Tensor]:
        """``in_proj_weight`` / ``in_proj_bias`` plus the deltas of the active adapters (only those that change)."""
        base = self.get_base_layer()
        weight, bias = base.in_proj_weight, base.in_proj_bias
        out: dict[str, torch.Tensor] = {}
        for adapter in self.active_adapters:
            delta = self.get_delta_weight(adapter)
            if delta is not None:
                out["in_proj_weight"] = out.get("in_proj_weight", weight) + delta.to(weight.dtype)
            if adapter in self.lorsu_bias:
                out["in_proj_bias"] = out.get("in_proj_bias", bias) + self.lorsu_bias[adapter].to(bias.dtype)
        return out

    def _adapted_forward(self, *args, **kwargs):
        """Same signature and outputs as ``torch.nn.MultiheadAttention.forward``."""
        substitutes = self._adapted_weights()
        if not substitutes:
            return self.base_layer(*args, **kwargs)
        return functional_call(self.base_layer, substitutes, args, kwargs, strict=False)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False
