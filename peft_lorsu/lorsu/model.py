"""LoRSUModel: the PEFT tuner that swaps a CLIP encoder's q/k/v, fc1 and projection linears for LoRSU layers."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..loading import check_before_injection
from ..utils import PluginTuner, check_modules_to_save
from .config import LoRSUConfig
from .fused import HeadLoRAInProjection
from .layer import HeadLoRALinear, LoRSULayer
from .scoring import check_top_k_heads, num_sparse_values, random_selection
from .sparse import SparseLinear
from .targets import QKV, Site, as_linear, attention_blocks, find_sites, trains_bias

LAYER_CLASSES = {"fc1": SparseLinear, "qkv": HeadLoRAInProjection}


def prepare_lorsu(config: LoRSUConfig, model: nn.Module) -> dict[str, Site]:
    """The sites LoRSU wraps in ``model``, after checking ``config``'s selection against them (nothing is changed
    in ``model``; a ``selection="random"`` config gets its draw here)."""
    config.validate()
    sites = find_sites(model, config)
    check_top_k_heads(config, attention_blocks(sites))
    if config.selection == "random" and not config.has_selection:
        random_selection(model, config, sites)
    check_selection(config, sites)
    check_modules_to_save(config, sites)
    return sites


def check_selection(config: LoRSUConfig, sites: dict[str, Site]) -> None:
    """Raise unless ``config`` holds heads and fc1 indices for every site it adapts."""
    if config.adapt_attention:
        blocks = attention_blocks(sites)
        if config.selected_heads is None:
            raise ValueError(
                "LoRSUConfig.selected_heads is missing: run peft_lorsu.probe_lorsu(model, config, dataloader) "
                "before get_peft_model, or set selection='random'"
            )
        missing = sorted(set(blocks) - set(config.selected_heads))
        if missing:
            raise ValueError(f"LoRSUConfig.selected_heads has no entry for {missing[:3]}{'...' * (len(missing) > 3)}")
        for block, heads in config.selected_heads.items():
            if block in blocks and not all(0 <= h < blocks[block][0] for h in heads):
                raise ValueError(
                    f"LoRSUConfig.selected_heads[{block!r}]={heads} lies outside 0..{blocks[block][0] - 1}"
                )
    if config.adapt_mlp and config.fc1_indices is not None:
        missing = sorted(s.name for s in sites.values() if s.role == "fc1" and s.name not in config.fc1_indices)
        if missing:
            raise ValueError(f"the probe's fc1 indices have no entry for {missing[:3]}")


def create_lorsu_layer(
    tuner: BaseTuner,
    config: LoRSUConfig,
    adapter_name: str,
    target: nn.Module,
    target_name: str,
    parent: nn.Module,
    site: Site,
) -> None:
    """Wrap ``target`` (the module at ``site``) in its LoRSU layer, or add ``adapter_name`` to an existing one."""
    kwargs = layer_kwargs(config, adapter_name, site, parent)
    kwargs["inference_mode"] = config.inference_mode
    if isinstance(target, LoRSULayer):
        target.update_layer(adapter_name, **kwargs)
        return
    new_module = LAYER_CLASSES.get(site.role, HeadLoRALinear)(target, adapter_name, **kwargs)
    if adapter_name not in tuner.active_adapters:
        # adding an additional adapter: it is not automatically trainable
        new_module.requires_grad_(False)
    if site.norm and site.role != "qkv":  # a fused attention takes the norm's output through its own code
        new_module.tap_input_norm(tuner.model.get_submodule(site.norm))
    if site.role in QKV:
        new_module.share_inputs_within(tuner.model.get_submodule(site.block))
    tuner._replace_module(parent, target_name, new_module, target)


def layer_kwargs(config: LoRSUConfig, adapter_name: str, site: Site, parent: nn.Module) -> dict:
    """The ``update_layer`` arguments of the layer at ``site``."""
    init = config.resolved_init
    if site.role == "fc1":
        num_values, indices = 0, None
        if config.adapt_mlp:
            fc1 = getattr(parent, site.name.rpartition(".")[2])
            num_values = num_sparse_values(as_linear(fc1).weight, config.sparsity)
            if config.fc1_indices is not None:
                indices = config.fc1_indices[site.name]
        return {"num_values": num_values, "indices": indices, "train_bias": trains_bias(config, "mlp"), "init": init}
    common = {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout, "init": init}
    if site.role == "projection":
        return {**common, "init": config.resolved_projection_init, "heads": None, "train_bias": False}
    heads = {
        **common,
        "heads": config.selected_heads[site.block] if config.adapt_attention else None,
        "head_dim": site.head_dim,
        "low_rank": config.adapt_attention,
        "train_bias": trains_bias(config, "attention"),
    }
    if site.role == "qkv":  # one fused in-projection: the factor is shared inside the layer
        return {**heads, "shared_factor": config.share_qkv_factor}
    owner = shared_factor_owner(config, adapter_name, site, parent) if config.adapt_attention else None
    return {**heads, "factor_owner": owner}


def shared_factor_owner(
    config: LoRSUConfig, adapter_name: str, site: Site, parent: nn.Module
) -> HeadLoRALinear | None:
    """The sibling q/k/v layer that already holds this adapter's shared ``V``, if any (else this layer owns it)."""
    if not config.share_qkv_factor:
        return None
    for path in site.qkv:
        sibling = getattr(parent, path.rpartition(".")[2], None)
        if path != site.name and isinstance(sibling, HeadLoRALinear) and adapter_name in sibling.lorsu_V:
            return sibling
    return None


class LoRSUModel(PluginTuner):
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

    def _prepare_model(self, peft_config: LoRSUConfig, model: nn.Module) -> None:
        """Resolve the sites to wrap and check the selection against the model before anything is replaced."""
        check_before_injection(self, peft_config, model)  # rehearses loading a config just read from disk
        self._lorsu_sites = prepare_lorsu(peft_config, model)

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
        create_lorsu_layer(self, lorsu_config, adapter_name, target, target_name, parent, site)

