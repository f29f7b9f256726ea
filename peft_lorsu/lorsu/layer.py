"""LoRSU's tuner layers: the shared base, and the head-masked low-rank linear of q/k/v and the projection.

The sparse-delta linear of fc1 is in :mod:`.sparse`, the fused q/k/v in-projection in :mod:`.fused`.

Symbols for one attention block: width ``d``, ``H`` heads of size ``d_h``, ``k = top_k_heads``, rank ``r``.
Head ``h`` owns output rows ``[h * d_h, (h + 1) * d_h)`` of each of q, k and v. The paper writes the update of the
stacked ``[W_q; W_k; W_v]`` (3d x d) as ``(alpha / r) * M * (U V)`` with a row mask ``M``; here each projection keeps
only the rows of the selected heads, so ``U`` has ``k * d_h`` rows per projection instead of a masked ``d``:

- ``lorsu_U``: `(k * d_h, r)`, output-side factor, rows of the selected heads only (`(d_out, r)` for the projection).
- ``lorsu_V``: `(r, d)`, input-side factor; with ``share_qkv_factor`` it lives on one projection of the block (the
  *owner*) and the two others read it, so q, k and v share it as in the paper (each computes its own ``x V^T``).
- ``lorsu_rows``: `(k * d_h,)` int64, the output rows the update writes to (absent for the projection: all rows);
  saved with the adapter and checked on load against the config's ``selected_heads``.
- ``lorsu_values`` / ``lorsu_indices``: `(S,)` values and int64 flat indices into fc1's `(m, d)` weight.
- ``lorsu_bias``: `(d_out,)` dense bias delta (``train_biases``).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..compat import BufferDict, full_shape, get_base_weight, move_adapter_to_base_device, set_base_weight
from ..utils import check_index_tensor
from .saved_inputs import ForwardScope, NormTap, add_to_columns, normed_linear


class LoRSULayer(BaseTunerLayer):
    """State and merge logic shared by LoRSU's layers: per-adapter bias deltas and the merge bookkeeping.

    Layers implement ``get_delta_weight(adapter) -> (d_out, d_in) | None`` and ``_adapted_forward``.
    """

    adapter_layer_names: tuple[str, ...] = ("lorsu_bias",)
    other_param_names: tuple[str, ...] = ()
    base_layer_type: type[nn.Module] = nn.Linear

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.lorsu_bias = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        if not isinstance(self.get_base_layer(), self.base_layer_type):
            raise TypeError(
                f"{type(self).__name__} wraps {self.base_layer_type.__name__} layers, "
                f"got {type(self.get_base_layer()).__name__}"
            )
        self.out_features, self.in_features = full_shape(self.base_weight_parameter())
        self.kwargs = kwargs

    def base_weight_parameter(self) -> torch.Tensor:
        """The base weight as the module holds it (a DeepSpeed ZeRO-3 partition keeps its full shape there)."""
        return self.get_base_layer().weight

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        weight = get_base_weight(self)
        move_adapter_to_base_device(self, adapter_name, weight.device, weight.dtype, device)

    def base_bias(self) -> torch.Tensor | None:
        return self.get_base_layer().bias

    def _update_bias(self, adapter_name: str, train_bias: bool, random_init: bool) -> None:
        if not train_bias:
            return
        if self.base_bias() is None:
            raise ValueError(f"train_biases: {self.get_base_layer()} has no bias to train")
        bias = torch.zeros(self.out_features)
        if random_init:
            nn.init.normal_(bias, std=0.02)
        self.lorsu_bias[adapter_name] = nn.Parameter(bias)

    def _biased(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """`(d_out,)` base ``bias`` plus the active adapters' bias deltas, to hand to the matmul as one bias.

        Adding the deltas to the bias vector instead of to the `(..., d_out)` output saves a pass over the output in
        forward and in backward; the bias gradient is the same sum over positions.
        """
        for adapter in self.active_adapters:
            if adapter in self.lorsu_bias:
                bias = bias + self.lorsu_bias[adapter].to(bias.dtype)
        return bias

    def _check_loaded_rows(self, state_dict, prefix, *args) -> None:
        # The rows are derived from the config's selected_heads; a saved adapter must agree with its own config.
        for adapter in list(self.lorsu_rows.keys()):
            key = f"{prefix}lorsu_rows.{adapter}"
            if key not in state_dict:
                continue
            current = self.lorsu_rows[adapter]
            what = f"lorsu_rows[{adapter!r}] of {self.get_base_layer()}"
            loaded = check_index_tensor(what, state_dict[key], tuple(current.shape), self.out_features)
            if not torch.equal(loaded.cpu(), current.cpu()):
                raise ValueError(
                    f"{what} disagree with the selected_heads {self.heads[adapter]} of the adapter config: "
                    "weights and config do not belong together. To resume a run, load the saved adapter with "
                    "PeftModel.from_pretrained(base, folder, is_trainable=True) instead of probing again; to start "
                    "over, save the new probe's adapter to a new folder"
                )

    def get_delta_weight(self, adapter: str) -> torch.Tensor | None:
        raise NotImplementedError

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the deltas of ``adapter_names`` (default: active adapters) to the base weight and bias.

        Args:
            safe_merge: build the merged tensors out of place and refuse them if they hold NaN/inf.
            adapter_names: adapters to merge.
        """
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self._all_available_adapter_names():
                continue
            self._add_deltas(adapter, sign=1, check=safe_merge)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract every merged adapter's deltas again, newest first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            self._add_deltas(self.merged_adapters.pop(), sign=-1, check=False)

    @torch.no_grad()
    def _add_deltas(self, adapter: str, sign: int, check: bool) -> None:
        delta_w = self.get_delta_weight(adapter)
        bias = self.base_bias()
        new_w = new_b = None
        if delta_w is not None:
            weight = get_base_weight(self)
            new_w = weight + sign * delta_w.to(weight.dtype)
        if adapter in self.lorsu_bias:
            new_b = bias.data + sign * self.lorsu_bias[adapter].detach().to(bias.dtype)
        if check and any(t is not None and not torch.isfinite(t).all() for t in (new_w, new_b)):
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems broken")
        if new_w is not None:
            set_base_weight(self, new_w)
        if new_b is not None:
            bias.data = new_b


class LoRSUModule(nn.Module, LoRSULayer):
    """Base of LoRSU's layers: the three-way forward (disabled / merged / base plus the active adapters)."""

    def __init__(self, base_layer: nn.Module) -> None:
        nn.Module.__init__(self)
        LoRSULayer.__init__(self, base_layer)

    def forward(self, *args, **kwargs):
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        if self.merged:
            return self.base_layer(*args, **kwargs)
        return self._adapted_forward(*args, **kwargs)

    def _adapted_forward(self, *args, **kwargs):
        """The base module's output with the active adapters' deltas applied."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return "lorsu." + super().__repr__()


class LoRSULinear(LoRSUModule):
    """A LoRSU layer around an ``nn.Linear``."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.input_norm: NormTap | None = None  # set by tap_input_norm

    def tap_input_norm(self, norm: nn.LayerNorm) -> None:
        """Let training recompute this layer's input from ``norm``, the LayerNorm whose output it receives (see
        :class:`NormTap`), instead of keeping an `(N, C)` activation for backward. Idempotent."""
        if self.input_norm is None:
            self.input_norm = NormTap(norm)

    def remove_hooks(self) -> None:
        """Take this layer's hooks off the model (when the layer is unloaded)."""
        if self.input_norm is not None:
            self.input_norm.remove()
            self.input_norm = None

    def _base_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """`(N, d_out)` base output over the flattened positions `(N, d_in)`, bias deltas folded into the bias.

        A plain ``nn.Linear`` base is computed here so that the result is a fresh matrix, not a view: in-place adds to
        it stay cheap in backward (autograd turns an in-place op on a view into a full-size copy). A base with hooks
        runs its own forward.
        """
        base = self.base_layer
        if type(base) is nn.Linear and not (args or kwargs or base._forward_hooks or base._forward_pre_hooks):
            return F.linear(x.reshape(-1, x.shape[-1]), base.weight, self._biased(base.bias))
        out = base(x, *args, **kwargs)
        for adapter in self.active_adapters:
            if adapter in self.lorsu_bias:
                out = out + self.lorsu_bias[adapter].to(out.dtype)
        return out.reshape(-1, out.shape[-1]).clone()  # a fresh matrix, like the fast path


class HeadLoRALinear(LoRSULinear):
    """Low-rank update confined to the output rows of selected attention heads (all rows for a projection).

    ``delta_W = (lora_alpha / r) * scatter_rows(U @ V)`` with ``U``: `(n_rows, r)`, ``V``: `(r, d_in)`.
    Compute and parameters exist only for the selected rows.
    """

    adapter_layer_names = ("lorsu_U", "lorsu_V", "lorsu_bias")
    other_param_names = ("lorsu_rows", "lorsu_dropout", "r", "scaling", "heads", "factor_owner")

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        super().__init__(base_layer)
        self.lorsu_U = nn.ParameterDict({})
        self.lorsu_V = nn.ParameterDict({})
        # persistent: a saved adapter is self-contained, and a load is checked against the config's heads
        self.lorsu_rows = BufferDict({}, persistent=True)
        self.lorsu_dropout = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.heads: dict[str, list[int] | None] = {}
        # adapter -> layer holding V (self, or the sibling projection that owns the shared factor). A plain dict, so
        # the owner is not registered as a submodule twice.
        self.factor_owner: dict[str, HeadLoRALinear] = {}
        # z = x V^T shared with the sibling projections during one call of the attention block (share_inputs_within)
        self.z_scope: ForwardScope | None = None
        self._active_adapter = adapter_name
        self._register_load_state_dict_pre_hook(self._check_loaded_rows)
        self.update_layer(adapter_name, **kwargs)

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
        factor_owner: HeadLoRALinear | None = None,
        inference_mode: bool = False,
    ) -> None:
        """Add adapter ``adapter_name``.

        Args:
            heads: selected head indices (rows ``h * head_dim ...``); ``None`` adapts every output row.
            low_rank: ``False`` gives only a bias delta (q/k/v with ``adapt_attention=False``).
            factor_owner: a sibling whose ``lorsu_V[adapter_name]`` this layer reads instead of owning one.
            init: ``"lorsu"`` (U Kaiming, V zero), ``"lora"`` (V Kaiming, U zero) or ``False`` (both random).
        """
        if r < 1:
            raise ValueError(f"r must be >= 1, got {r}")
        self.heads[adapter_name] = None if heads is None else list(heads)
        if low_rank:
            if heads is None:
                n_rows = self.out_features
            else:
                if head_dim * (max(heads) + 1) > self.out_features or min(heads) < 0:
                    raise ValueError(
                        f"heads {heads} with head_dim {head_dim} exceed the {self.out_features} rows of "
                        f"{self.base_layer}"
                    )
                rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])
                self.lorsu_rows[adapter_name] = rows
                n_rows = rows.numel()
            self.r[adapter_name] = r
            self.scaling[adapter_name] = lora_alpha / r
            self.lorsu_U[adapter_name] = nn.Parameter(torch.empty(n_rows, r))
            owner = factor_owner if factor_owner is not None else self
            self.factor_owner[adapter_name] = owner
            if owner is self:
                self.lorsu_V[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))
            elif owner.lorsu_V[adapter_name].shape != (r, self.in_features):
                raise ValueError(
                    f"shared factor of {adapter_name} has shape {tuple(owner.lorsu_V[adapter_name].shape)}"
                )
            self.lorsu_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
            self.reset_lorsu_parameters(adapter_name, init)
        self._update_bias(adapter_name, train_bias, random_init=init is False)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def reset_lorsu_parameters(self, adapter_name: str, init: str | bool) -> None:
        U = self.lorsu_U[adapter_name]
        with torch.no_grad():
            # Kaiming-uniform with a = sqrt(5) on a (rows, r) tensor is U(-1/sqrt(r), 1/sqrt(r)).
            if init in ("lorsu", False):
                nn.init.kaiming_uniform_(U, a=math.sqrt(5))
            else:
                nn.init.zeros_(U)
            if adapter_name in self.lorsu_V:
                V = self.lorsu_V[adapter_name]
                if init in ("lora", False):
                    nn.init.kaiming_uniform_(V, a=math.sqrt(5))
                else:
                    nn.init.zeros_(V)

    def factor(self, adapter: str) -> torch.Tensor:
        """The input-side factor ``V`` `(r, d_in)` this layer uses for ``adapter`` (its own or the shared one)."""
        return self.factor_owner[adapter].lorsu_V[adapter]

    def get_delta_weight(self, adapter: str) -> torch.Tensor | None:
        """Dense `(d_out, d_in)` delta of ``adapter`` (adapter dtype), or ``None`` if it has no low-rank part."""
        if adapter not in self.lorsu_U:
            return None
        block = (self.lorsu_U[adapter] @ self.factor(adapter)) * self.scaling[adapter]
        if adapter not in self.lorsu_rows:
            return block
        delta = block.new_zeros(self.out_features, self.in_features)
        return delta.index_add(0, self.lorsu_rows[adapter], block)

    def _adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self._base_forward(x, *args, **kwargs)  # (N, d_out), a fresh tensor: in-place adds are safe
        for adapter in self.active_adapters:
            if adapter not in self.lorsu_U:
                continue
            z = self._low_rank_input(adapter, x)  # (N, r)
            delta = F.linear(z, self.lorsu_U[adapter])  # (N, n_rows)
            if self.scaling[adapter] != 1:
                delta = delta * self.scaling[adapter]
            if adapter in self.lorsu_rows:
                result = add_to_columns(result, self.lorsu_rows[adapter], delta.to(result.dtype))
            else:
                result = result.add_(delta.to(result.dtype))
        return result.view(*x.shape[:-1], result.shape[-1])

    def share_inputs_within(self, block: nn.Module) -> None:
        """Let the projections that share this layer's ``V`` reuse its ``z = x V^T`` during each call of ``block``,
        their attention block (see :meth:`_low_rank_input`). Idempotent."""
        if self.z_scope is None:
            self.z_scope = ForwardScope(block)

    def remove_hooks(self) -> None:
        super().remove_hooks()
        if self.z_scope is not None:
            self.z_scope.remove()
            self.z_scope = None

    def _low_rank_input(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """`(N, r)` ``z = dropout(x) V^T`` over the `(N, d_in)` flattened positions of ``x``.

        Without dropout, ``z`` depends on ``x`` and ``V`` alone, so the projections that share ``V`` (q, k and v)
        compute it once per call of their attention block: the first keeps it in the scope of ``V``'s owner and the
        others reuse it when they receive the same, unmodified ``x``. Autograd then sums their gradients into ``z`` and
        computes ``V``'s and ``x``'s gradients once instead of three times. In training, backward recomputes ``x``
        from the attention's LayerNorm instead of keeping it (:class:`NormTap`).
        """
        V = self.factor(adapter)
        x2 = self._cast_input_dtype(x.reshape(-1, x.shape[-1]), V.dtype)
        dropout = self.lorsu_dropout[adapter]
        if not isinstance(dropout, nn.Identity) or torch.compiler.is_compiling():
            return F.linear(dropout(x2), V)  # a mask per projection; compiled graphs share what they can themselves
        scope = self.factor_owner[adapter].z_scope
        shared = scope is not None and scope.open
        modes = (torch.is_grad_enabled(), torch.is_autocast_enabled(x.device.type))
        if shared and adapter in scope.values:
            x_seen, x_version, z, v_version, z_modes = scope.values[adapter]
            if x_seen is x and x._version == x_version and V._version == v_version and z_modes == modes:
                return z
        norm = self.input_norm.input_for(x) if self.input_norm is not None else None
        z = normed_linear(x2, V, norm)
        if shared:
            scope.values[adapter] = (x, x._version, z, V._version, modes)
        return z

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True
