"""LoRSU tuner layers: a head-masked low-rank linear (q/k/v, projection) and a sparse-delta linear (fc1).

Symbols for one attention block: width ``d``, ``H`` heads of size ``d_h``, ``k = top_k_heads``, rank ``r``.
Head ``h`` owns output rows ``[h * d_h, (h + 1) * d_h)`` of each of q, k and v. The paper writes the update of the
stacked ``[W_q; W_k; W_v]`` (3d x d) as ``(alpha / r) * M * (U V)`` with a row mask ``M``; here each projection keeps
only the rows of the selected heads, so ``U`` has ``k * d_h`` rows per projection instead of a masked ``d``:

- ``lorsu_U``: `(k * d_h, r)`, output-side factor, rows of the selected heads only (`(d_out, r)` for the projection).
- ``lorsu_V``: `(r, d)`, input-side factor; with ``share_qkv_factor`` it lives on one projection of the block (the
  *owner*) and the two others read it, so q, k and v share it as in the paper.
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
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn

from .functional import SparsePattern, scatter_delta, sparse_delta_linear, sparse_pattern
from .sharing import SharedFactorInput, version_of


class LoRSULayer(BaseTunerLayer):
    """State and merge logic shared by LoRSU's linears: per-adapter bias deltas and the merge bookkeeping.

    Layers implement ``get_delta_weight(adapter) -> (d_out, d_in) | None`` and ``_adapted_forward(x)``.
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
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())
        self.kwargs = kwargs

    def base_weight_and_bias(self) -> tuple[nn.Parameter, nn.Parameter | None]:
        """The frozen `(d_out, d_in)` weight and `(d_out,)` bias that the deltas apply to (merge target)."""
        base = self.get_base_layer()
        return base.weight, base.bias

    def _check_index_buffer(self, name: str, adapter: str, loaded: torch.Tensor, upper: int) -> torch.Tensor:
        """Validate an int64 index buffer that a saved adapter brings: same shape as built, values in [0, upper)."""
        current = getattr(self, name)[adapter]
        if loaded.dtype not in (torch.int32, torch.int64) or loaded.shape != current.shape:
            raise ValueError(
                f"{name}[{adapter!r}] of {self.base_layer}: expected an int64 tensor of shape {tuple(current.shape)}, "
                f"the adapter holds {loaded.dtype} {tuple(loaded.shape)}"
            )
        if loaded.numel() and (int(loaded.min()) < 0 or int(loaded.max()) >= upper):
            raise ValueError(
                f"{name}[{adapter!r}] of {self.base_layer}: values must lie in [0, {upper}), "
                f"the adapter holds [{int(loaded.min())}, {int(loaded.max())}]"
            )
        return loaded.long()

    def _update_bias(self, adapter_name: str, train_bias: bool, random_init: bool) -> None:
        if not train_bias:
            return
        if self.base_weight_and_bias()[1] is None:
            raise ValueError(f"train_biases: {self.get_base_layer()} has no bias to train")
        bias = torch.zeros(self.out_features)
        if random_init:
            nn.init.normal_(bias, std=0.02)
        self.lorsu_bias[adapter_name] = nn.Parameter(bias)

    def _add_bias_deltas(self, result: torch.Tensor) -> torch.Tensor:
        """`(..., d_out)` ``result`` plus the active adapters' bias deltas (one pass over ``result`` per delta)."""
        for adapter in self.active_adapters:
            if adapter in self.lorsu_bias:
                result = result + self.lorsu_bias[adapter].to(result.dtype)
        return result

    def _biased(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """`(d_out,)` base ``bias`` plus the active adapters' bias deltas, to hand to the matmul as one bias.

        Adding the deltas to the bias vector instead of to the `(..., d_out)` output saves a pass over the output in
        forward and in backward; the bias gradient is the same sum over positions.
        """
        for adapter in self.active_adapters:
            if adapter in self.lorsu_bias:
                bias = bias + self.lorsu_bias[adapter].to(bias.dtype)
        return bias

    def get_delta_weight(self, adapter: str) -> torch.Tensor | None:
        raise NotImplementedError

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the deltas of ``adapter_names`` (default: active adapters) to the base weight and bias.

        Args:
            safe_merge: build the merged tensors out of place and refuse them if they hold NaN/inf.
            adapter_names: adapters to merge.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight, bias = self.base_weight_and_bias()
        for adapter in adapter_names:
            if adapter not in self._all_available_adapter_names():
                continue
            delta_w = self.get_delta_weight(adapter)
            delta_b = self.lorsu_bias[adapter].detach() if adapter in self.lorsu_bias else None
            new_w = weight.data + delta_w.to(weight.dtype) if delta_w is not None else None
            new_b = bias.data + delta_b.to(bias.dtype) if delta_b is not None else None
            if safe_merge:
                for t in (new_w, new_b):
                    if t is not None and not torch.isfinite(t).all():
                        raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems broken")
            if new_w is not None:
                weight.data = new_w
            if new_b is not None:
                bias.data = new_b
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract every merged adapter's deltas again, newest first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight, bias = self.base_weight_and_bias()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            delta_w = self.get_delta_weight(adapter)
            if delta_w is not None:
                weight.data = weight.data - delta_w.to(weight.dtype)
            if adapter in self.lorsu_bias:
                bias.data = bias.data - self.lorsu_bias[adapter].detach().to(bias.dtype)


class LoRSULinear(nn.Module, LoRSULayer):
    """Base of LoRSU's linears: the three-way forward (disabled / merged / base plus active adapters)."""

    def __init__(self, base_layer: nn.Module) -> None:
        nn.Module.__init__(self)
        LoRSULayer.__init__(self, base_layer)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self._adapted_forward(x, *args, **kwargs)

    def _adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Base output plus the active adapters' deltas (bias deltas included), `(..., d_out)`."""
        raise NotImplementedError

    def _base_forward(self, x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, bool]:
        """Base output with the active bias deltas added, and whether it is a fresh `(N, d_out)` matrix.

        A plain ``nn.Linear`` base is computed here over the flattened positions `(N, d_in)`, with the bias deltas
        folded into its bias: the result is a new tensor and no view, so in-place adds to it stay cheap in backward
        (autograd turns an in-place op on a view into a full-size copy). A base with hooks or another module type runs
        its own forward and gives `(..., d_out)`.
        """
        base = self.base_layer
        if type(base) is nn.Linear and not (args or kwargs or base._forward_hooks or base._forward_pre_hooks):
            return F.linear(x.reshape(-1, x.shape[-1]), base.weight, self._biased(base.bias)), True
        return self._add_bias_deltas(base(x, *args, **kwargs)), False

    def __repr__(self) -> str:
        return "lorsu." + super().__repr__()


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
        # z = x V^T for the projections that read this layer's V (runtime only, never saved)
        self._shared_inputs = SharedFactorInput()
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
                self._shared_inputs.reset(adapter_name)
            owner._shared_inputs.add_reader(adapter_name, self)
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

    def _check_loaded_rows(self, state_dict, prefix, *args) -> None:
        # The rows are derived from the config's selected_heads; a saved adapter must agree with its own config.
        for adapter in list(self.lorsu_rows.keys()):
            key = f"{prefix}lorsu_rows.{adapter}"
            if key in state_dict:
                loaded = self._check_index_buffer("lorsu_rows", adapter, state_dict[key], self.out_features)
                if not torch.equal(loaded.cpu(), self.lorsu_rows[adapter].cpu()):
                    raise ValueError(
                        f"lorsu_rows[{adapter!r}] of {self.base_layer} disagree with the selected_heads "
                        f"{self.heads[adapter]} of the adapter config: weights and config do not belong together"
                    )

    def reset_lorsu_parameters(self, adapter_name: str, init: str | bool) -> None:
        U = self.lorsu_U[adapter_name]
        own_V = adapter_name in self.lorsu_V
        with torch.no_grad():
            if init in ("lorsu", False):
                # Kaiming-uniform with a = sqrt(5) on a (rows, r) tensor is U(-1/sqrt(r), 1/sqrt(r)).
                nn.init.kaiming_uniform_(U, a=math.sqrt(5))
            else:
                nn.init.zeros_(U)
            if own_V:
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

    def _factor_input(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """``z = dropout(x) V^T`` `(N, r)` over the flattened positions of ``x`` `(..., d_in)`.

        Projections that share ``V`` (without dropout) compute it once per input.
        """
        V = self.factor(adapter)
        dropout = self.lorsu_dropout[adapter]

        def compute() -> torch.Tensor:
            return F.linear(dropout(self._cast_input_dtype(x.reshape(-1, x.shape[-1]), V.dtype)), V)

        if not isinstance(dropout, nn.Identity):
            return compute()  # each projection draws its own dropout mask, so z differs between them
        return self.factor_owner[adapter]._shared_inputs.get(adapter, self, x, V, compute)

    def _adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result, fresh = self._base_forward(x, *args, **kwargs)
        for adapter in self.active_adapters:
            if adapter not in self.lorsu_U:
                continue
            delta = F.linear(self._factor_input(adapter, x), self.lorsu_U[adapter])  # (N, n_rows)
            if self.scaling[adapter] != 1:
                delta = delta * self.scaling[adapter]
            delta = delta.to(result.dtype) if fresh else delta.to(result.dtype).view(*result.shape[:-1], -1)
            if adapter in self.lorsu_rows:
                rows = self.lorsu_rows[adapter]
                result = result.index_add_(-1, rows, delta) if fresh else result.index_add(-1, rows, delta)
            else:
                result = result.add_(delta) if fresh else result + delta
        return result.view(*x.shape[:-1], result.shape[-1]) if fresh else result

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True


class SparseLinear(LoRSULinear):
    """Sparse additive update of S fixed entries of the weight (fc1): ``W + scatter(values, indices)``.

    The indices come from the probe (or from the saved adapter); until one of the two provides them the layer
    refuses to run, so a placeholder can never be trained by mistake.
    """

    adapter_layer_names = ("lorsu_values", "lorsu_bias")
    other_param_names = ("lorsu_indices", "indices_pending")

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        super().__init__(base_layer)
        self.lorsu_values = nn.ParameterDict({})
        self.lorsu_indices = BufferDict({}, persistent=True)
        self.indices_pending: dict[str, bool] = {}
        # (index tensors with their versions, their SparsePattern): runtime only, never saved
        self._pattern_cache: tuple[list[tuple[torch.Tensor, int]], SparsePattern] | None = None
        self._active_adapter = adapter_name
        self._register_load_state_dict_pre_hook(self._check_loaded_indices)
        self.update_layer(adapter_name, **kwargs)

    def update_layer(
        self,
        adapter_name: str,
        num_values: int = 0,
        indices: torch.Tensor | None = None,
        train_bias: bool = False,
        init: str | bool = "lorsu",
        inference_mode: bool = False,
    ) -> None:
        """Add adapter ``adapter_name`` with ``num_values`` (S) trainable entries at ``indices`` `(S,)`.

        ``indices=None`` creates a placeholder that a saved adapter's ``lorsu_indices`` must fill before use.
        """
        numel = self.in_features * self.out_features
        if num_values:
            if indices is None:
                indices = torch.full((num_values,), -1, dtype=torch.long)
                self.indices_pending[adapter_name] = True
            else:
                indices = self._validated_indices(indices, num_values)
            values = torch.zeros(num_values)
            if init is False:
                nn.init.normal_(values, std=0.02)
            self.lorsu_values[adapter_name] = nn.Parameter(values)
            self.lorsu_indices[adapter_name] = indices
        elif indices is not None:
            raise ValueError(f"indices given for {numel} entries but num_values is 0")
        self._update_bias(adapter_name, train_bias, random_init=init is False)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _validated_indices(self, indices: torch.Tensor, num_values: int) -> torch.Tensor:
        numel = self.in_features * self.out_features
        if indices.dtype not in (torch.int32, torch.int64) or indices.shape != (num_values,):
            raise ValueError(
                f"fc1 indices must be an int64 tensor of shape ({num_values},), got {indices.dtype} "
                f"{tuple(indices.shape)}"
            )
        if num_values and (int(indices.min()) < 0 or int(indices.max()) >= numel):
            raise ValueError(f"fc1 indices must lie in [0, {numel}), got [{int(indices.min())}, {int(indices.max())}]")
        return indices.long()

    def _check_loaded_indices(self, state_dict, prefix, *args) -> None:
        # Runs before load_state_dict copies tensors in: validate what a saved adapter brings, then mark it loaded.
        for adapter in list(self.lorsu_indices.keys()):
            key = f"{prefix}lorsu_indices.{adapter}"
            if key in state_dict:
                numel = self.in_features * self.out_features
                self._check_index_buffer("lorsu_indices", adapter, state_dict[key], numel)
                self.indices_pending.pop(adapter, None)

    def _deltas(self, adapters: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pending = [a for a in adapters if self.indices_pending.get(a)]
        if pending:
            raise RuntimeError(
                f"LoRSU adapter(s) {pending}: the fc1 indices of {self.base_layer} were neither chosen by probe_lorsu "
                "nor loaded from a saved adapter; call probe_lorsu before get_peft_model"
            )
        return [(self.lorsu_values[a], self.lorsu_indices[a]) for a in adapters if a in self.lorsu_values]

    def get_delta_weight(self, adapter: str) -> torch.Tensor | None:
        """Dense `(m, d)` delta of ``adapter`` in the adapter's dtype, or ``None`` if it has no sparse part."""
        deltas = self._deltas([adapter])
        if not deltas:
            return None
        zeros = deltas[0][0].new_zeros(self.out_features, self.in_features)
        return scatter_delta(zeros, deltas)

    def _pattern(self, indices: list[torch.Tensor]) -> SparsePattern:
        """Rows / columns of fc1 that ``indices`` touch, cached while the same index tensors stay unchanged."""
        key = [(t, version_of(t)) for t in indices]
        cached = self._pattern_cache
        if cached is None or len(cached[0]) != len(key) or any(
            a is not b or va != vb for (a, va), (b, vb) in zip(cached[0], key)
        ):
            self._pattern_cache = cached = (key, sparse_pattern(indices, (self.out_features, self.in_features)))
        return cached[1]

    def _adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        deltas = self._deltas(self.active_adapters)
        if not deltas:
            result, fresh = self._base_forward(x, *args, **kwargs)
            return result.view(*x.shape[:-1], result.shape[-1]) if fresh else result
        weight, bias = self.base_weight_and_bias()
        pattern = self._pattern([indices for _, indices in deltas]) if torch.is_grad_enabled() else None
        return sparse_delta_linear(x, weight, self._biased(bias), deltas, pattern=pattern)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        # a sparse delta is generally full-rank
        return False
