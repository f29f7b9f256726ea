"""LoRSU's sparse update of the first MLP layer (fc1): ``W + scatter(values, indices)`` on S fixed entries.

Symbols: fc1 weight `(m, d)`, ``S = floor(sparsity * m * d)``.

- ``lorsu_values``: `(S,)` trainable values.
- ``lorsu_indices``: `(S,)` ascending flat indices into the `(m, d)` weight, from the probe; int32 in memory (int64
  when ``m * d >= 2**31``), saved as int64 (the format every version reads) and checked on load.
- ``lorsu_bias``: `(m,)` dense bias delta (``train_biases``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..compat import BufferDict
from ..utils import check_index_tensor
from .functional import SparsePattern, index_dtype, scatter_delta, sparse_delta_linear, sparse_pattern
from .layer import LoRSULinear


def check_ascending(indices: torch.Tensor, what: str) -> torch.Tensor:
    """Refuse repeated (or unsorted) fc1 indices: each entry is updated once, and the kernels rely on the order."""
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise ValueError(f"{what}: must be strictly ascending (each fc1 entry once); these repeat or are out of order")
    return indices


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
        # (active adapters, device) -> where their indices fall in fc1. Derived from lorsu_indices, which change only
        # in update_layer and on load (both clear it); saves recomputing the pattern (a sort-sized pass over S
        # indices and a host sync) in every training forward.
        self.patterns: dict[tuple, SparsePattern] = {}
        self._active_adapter = adapter_name
        self._register_load_state_dict_pre_hook(self._check_loaded_indices)
        self.register_load_state_dict_post_hook(self._narrow_loaded_indices)
        self._register_state_dict_hook(self._save_indices_as_int64)
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
                indices = torch.full((num_values,), -1, dtype=index_dtype(numel))
                self.indices_pending[adapter_name] = True
            else:
                check_ascending(check_index_tensor("fc1 indices", indices, (num_values,), numel), "fc1 indices")
                # kept as given when already narrow, so a probe's int32 selection is held once, not copied
                indices = indices.to(index_dtype(numel))
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
        self.patterns.clear()

    def _check_loaded_indices(self, state_dict, prefix, *args) -> None:
        # Runs before load_state_dict copies tensors in: validate what a saved adapter brings, then mark it loaded.
        for adapter in list(self.lorsu_indices.keys()):
            key = f"{prefix}lorsu_indices.{adapter}"
            if key in state_dict:
                shape = tuple(self.lorsu_indices[adapter].shape)
                what = f"lorsu_indices[{adapter!r}] of {self.get_base_layer()}"
                loaded = check_index_tensor(what, state_dict[key], shape, self.in_features * self.out_features)
                check_ascending(loaded, what)
                self.indices_pending.pop(adapter, None)

    def _narrow_loaded_indices(self, module: nn.Module, incompatible_keys) -> None:
        # a load with assign=True (peft's low_cpu_mem_usage) installs the file's int64 tensors as they are
        for adapter, indices in list(self.lorsu_indices.items()):
            self.lorsu_indices[adapter] = indices.to(index_dtype(self.in_features * self.out_features))
        self.patterns.clear()

    @staticmethod
    def _save_indices_as_int64(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
        # saved files keep the int64 indices every earlier version of the package wrote and reads
        for adapter in module.lorsu_indices:
            key = f"{prefix}lorsu_indices.{adapter}"
            if key in state_dict:
                state_dict[key] = state_dict[key].long()

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

    def pattern(self, adapters: list[str]) -> SparsePattern:
        """Where the indices of ``adapters`` fall in fc1 (see :class:`SparsePattern`), computed once per set."""
        indices = [self.lorsu_indices[a] for a in adapters if a in self.lorsu_values]
        key = (tuple(adapters), indices[0].device)
        if key not in self.patterns:
            self.patterns[key] = sparse_pattern(indices, (self.out_features, self.in_features))
        return self.patterns[key]

    def _adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        deltas = self._deltas(self.active_adapters)
        if not deltas:
            return self._base_forward(x, *args, **kwargs).view(*x.shape[:-1], self.out_features)
        training = torch.is_grad_enabled()
        pattern = self.pattern(self.active_adapters) if training else None
        norm = self.input_norm.input_for(x) if training and self.input_norm is not None else None
        base = self.get_base_layer()
        return sparse_delta_linear(x, base.weight, self._biased(base.bias), deltas, pattern=pattern, norm=norm)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        # a sparse delta is generally full-rank
        return False
