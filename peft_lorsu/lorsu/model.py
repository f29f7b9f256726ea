"""LoRSUModel: the PEFT tuner that swaps a CLIP encoder's q/k/v, fc1 and projection linears for LoRSU layers."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..loading import before_injection
from .config import LoRSUConfig
from .fused import HeadLoRAInProjection
from .layer import HeadLoRALinear, LoRSULayer, SparseLinear
from .selection import check_top_k_heads, num_sparse_values, random_selection
from .targets import Site, as_linear, attention_blocks, find_sites

LAYER_CLASSES = {"fc1": SparseLinear, "qkv": HeadLoRAInProjection}


class LoRSUModel(BaseTuner):
    """Creates a LoRSU model from a CLIP-style model; built by ``peft.get_peft_model`` after ``import peft_lorsu``.

    Args:
        model (`torch.nn.Module`): the model to adapt (``CLIPModel``, ``CLIPVisionModel``, ...).
        config (`LoRSUConfig`): the adapter's configuration, with the probe's selection filled in.
        adapter_name (`str`): name of the adapter, ``"default"`` by default.
        low_cpu_mem_usage (`bool`): create the adapter weights on the meta device (loading).

    Example:

        ```py
        >>> import peft_lorsu
        >>> from peft import get_peft_model
        >>> config = peft_lorsu.LoRSUConfig(r=8, top_k_heads=1)
        >>> peft_lorsu.probe_lorsu(model, config, dataloader)
        >>> peft_model = get_peft_model(model, config)
        ```
    """

    prefix: str = "lorsu_"
    tuner_layer_cls = LoRSULayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: LoRSUConfig, model_config: dict) -> LoRSUConfig:
        # Targets are found by structure in _prepare_model; nothing to look up by model_type.
        return peft_config

    def _prepare_model(self, peft_config: LoRSUConfig, model: nn.Module) -> None:
        """Resolve the sites to wrap and check the selection against the model before anything is replaced."""
        before_injection(self, peft_config, model)  # re-validate; rehearse loading a config just read from disk
        sites = find_sites(model, peft_config)
        blocks = attention_blocks(sites)
        check_top_k_heads(peft_config, blocks)
        if peft_config.selection == "random" and not peft_config.has_selection:
            random_selection(model, peft_config, sites)
        self._check_selection(peft_config, sites)
        self._lorsu_sites = sites

    @staticmethod
    def _check_selection(config: LoRSUConfig, sites: dict[str, Site]) -> None:
        if config.adapt_attention:
            blocks = attention_blocks(sites)
            if config.selected_heads is None:
                raise ValueError(
                    "LoRSUConfig.selected_heads is missing: run peft_lorsu.probe_lorsu(model, config, dataloader) "
                    "before get_peft_model, or set selection='random'"
                )
            missing = sorted(set(blocks) - set(config.selected_heads))
            if missing:
                raise ValueError(
                    f"LoRSUConfig.selected_heads has no entry for {missing[:3]}{'...' * (len(missing) > 3)}"
                )
            for block, heads in config.selected_heads.items():
                if block in blocks and not all(0 <= h < blocks[block][0] for h in heads):
                    raise ValueError(
                        f"LoRSUConfig.selected_heads[{block!r}]={heads} lies outside 0..{blocks[block][0] - 1}"
                    )
        if config.adapt_mlp and config.fc1_indices is not None:
            missing = sorted(s.name for s in sites.values() if s.role == "fc1" and s.name not in config.fc1_indices)
            if missing:
                raise ValueError(f"the probe's fc1 indices have no entry for {missing[:3]}")

    def _check_target_module_exists(self, peft_config: LoRSUConfig, key: str) -> bool:
        return key in self._lorsu_sites

    def _create_and_replace(
        self,
        lorsu_config: LoRSUConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        site = self._lorsu_sites[current_key]
        kwargs = self._layer_kwargs(lorsu_config, adapter_name, site, parent)
        kwargs["inference_mode"] = lorsu_config.inference_mode
        if isinstance(target, LoRSULayer):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = LAYER_CLASSES.get(site.role, HeadLoRALinear)(target, adapter_name, **kwargs)
        if adapter_name not in self.active_adapters:
            # adding an additional adapter: it is not automatically trainable
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _layer_kwargs(self, config: LoRSUConfig, adapter_name: str, site: Site, parent: nn.Module) -> dict:
        init = config.resolved_init
        if site.role == "fc1":
            num_values = 0
            indices = None
            if config.adapt_mlp:
                fc1 = getattr(parent, site.name.rpartition(".")[2])
                num_values = num_sparse_values(as_linear(fc1).weight, config.sparsity)
                if config.fc1_indices is not None:
                    indices = config.fc1_indices[site.name]
            return {"num_values": num_values, "indices": indices, "train_bias": config.train_biases, "init": init}
        common = {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout, "init": init}
        if site.role == "projection":
            return {**common, "heads": None, "train_bias": False}
        heads = {
            **common,
            "heads": config.selected_heads[site.block] if config.adapt_attention else None,
            "head_dim": site.head_dim,
            "low_rank": config.adapt_attention,
            "train_bias": config.train_biases,
        }
        if site.role == "qkv":  # one fused in-projection: the factor is shared inside the layer
            return {**heads, "shared_factor": config.share_qkv_factor}
        owner = self._shared_factor_owner(config, adapter_name, site, parent) if config.adapt_attention else None
        return {**heads, "factor_owner": owner}

    @staticmethod
    def _shared_factor_owner(config: LoRSUConfig, adapter_name: str, site: Site, parent: nn.Module):
        """The sibling q/k/v layer that already holds this adapter's shared ``V``, if any (else this layer owns it)."""
        if not config.share_qkv_factor:
            return None
        for path in site.qkv:
            sibling = getattr(parent, path.rpartition(".")[2], None)
            if path != site.name and isinstance(sibling, HeadLoRALinear) and adapter_name in sibling.lorsu_V:
                return sibling
        return None

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if isinstance(new_module, nn.MultiheadAttention):
            # unloading a fused layer: the attention module comes back as it is; peft's default would try to copy a
            # `.weight` it does not have
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    @torch.no_grad()
    def trainable_parameter_count(self, adapter_name: str = "default") -> int:
        """Trainable parameters of ``adapter_name`` (the closed-form count of the paper when all parts are on)."""
        total = 0
        for module in self.model.modules():
            if isinstance(module, LoRSULayer):
                for attr in module.adapter_layer_names:
                    container = getattr(module, attr)
                    if adapter_name in container:
                        total += container[adapter_name].numel()
        return total
