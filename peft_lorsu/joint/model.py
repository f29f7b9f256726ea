"""LoRSURLPModel: LoRSU layers in the image tower and the RLP prompt in the text tower, as one PEFT tuner.

The tuner owns no layer type of its own: it calls the functions with which LoRSU and RLP prepare a model and create
their layers (:mod:`peft_lorsu.lorsu.model`, :mod:`peft_lorsu.rlp.model`) on the two parts of its config, so the
layers, their saved tensors and their checks are exactly those of a LoRSU and an RLP adapter.

Its prefix ``lorsu_rlp_`` names no tensor: the layers' tensors keep the names ``lorsu_*`` and ``rlp_*`` of the two
methods (so each part also loads as a standalone adapter). peft finds a tuner's tensors structurally (every tensor
of a tuner layer but its base layer), not by the prefix.
"""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import get_peft_model_state_dict
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file
from torch import nn

from ..compat import PEFT_VERSION, STRUCTURAL_STATE_DICT
from ..loading import check_before_injection
from ..lorsu.layer import LoRSULayer
from ..lorsu.model import LoRSUModel, create_lorsu_layer, prepare_lorsu
from ..rlp.layer import RLPLayer
from ..rlp.model import FOLD_REFUSAL, RLPModel, create_rlp_layer, fold_contexts, prepare_rlp
from ..utils import PluginTuner
from .config import LoRSURLPConfig

PART_PREFIXES = {"lorsu": LoRSUModel.prefix, "rlp": RLPModel.prefix}


class LoRSURLPModel(PluginTuner):
    """Adds a LoRSU adapter to the image encoder and an RLP prompt to the text encoder of one CLIP model.

    Built by ``get_peft_model(clip, LoRSURLPConfig(lorsu=..., rlp=...))`` after ``import peft_lorsu``. Everything
    peft offers for a single tuner works on the pair: training both parts at once, ``save_pretrained`` /
    ``PeftModel.from_pretrained`` (one folder), ``disable_adapter()``, ``merge_adapter()``, ``unload()``, several
    named adapters. ``merge_and_unload`` follows RLP: the prompt can only be folded into the position embeddings,
    so it needs ``fold_into_position_embedding=True``.

    Example:

        ```py
        >>> lorsu = probe_lorsu(clip, LoRSUConfig(r=8, top_k_heads=2), batches, loss_fn=class_prompt_probe_loss)
        >>> rlp = RLPConfig(init_text="a photo of a", tokenizer_name_or_path=path, rank=1)
        >>> model = get_peft_model(clip, LoRSURLPConfig(lorsu=lorsu, rlp=rlp))
        ```
    """

    prefix: str = "lorsu_rlp_"
    tuner_layer_cls = (LoRSULayer, RLPLayer)

    def _prepare_model(self, peft_config: LoRSURLPConfig, model: nn.Module) -> None:
        if not STRUCTURAL_STATE_DICT:
            raise ValueError(
                f"LoRSURLPConfig (LoRSU + RLP in one adapter) needs peft >= 0.21, found peft {PEFT_VERSION}: older "
                "versions find an adapter's tensors by the tuner's prefix, which the joint adapter's tensors do not "
                "carry. Upgrade peft, or train LoRSU and RLP as two adapters"
            )
        check_before_injection(self, peft_config, model)  # rehearses loading a config just read from disk
        peft_config.sync_parts()
        self._lorsu_sites = prepare_lorsu(peft_config.lorsu, model)
        prepare_rlp(peft_config.rlp, model)  # fills peft_config.rlp.target_modules
        shared = sorted(n for n in self._lorsu_sites if check_target_module_exists(peft_config.rlp, n))
        if shared:
            raise ValueError(f"LoRSURLPConfig: the LoRSU and RLP parts both target {shared[:3]}")

    def _check_target_module_exists(self, peft_config: LoRSURLPConfig, key: str) -> bool:
        return key in self._lorsu_sites or bool(check_target_module_exists(peft_config.rlp, key))

    def _create_and_replace(
        self,
        peft_config: LoRSURLPConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        site = self._lorsu_sites.get(current_key)
        if site is not None:
            create_lorsu_layer(self, peft_config.lorsu, adapter_name, target, target_name, parent, site)
        else:
            create_rlp_layer(self, peft_config.rlp, adapter_name, target, target_name, parent)

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        fold_into_position_embedding: bool = False,
    ) -> nn.Module:
        """Merge LoRSU into the image encoder's weights and fold the RLP prompt into the position embeddings.

        The fold is exact only for prompts that start with the RLP init text (see ``RLPModel.merge_and_unload``),
        so it must be confirmed with ``fold_into_position_embedding=True``; otherwise this raises before anything is
        merged. ``unload()`` returns the untouched base model.
        """
        if not fold_into_position_embedding:  # checked before anything is merged
            raise ValueError(FOLD_REFUSAL)
        for module in self.model.modules():
            if isinstance(module, LoRSULayer):
                module.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        fold_contexts(self.model, adapter_names, safe_merge)
        return self.unload()  # the LoRSU layers leave their merged base layers behind


def save_parts(model: PeftModel, save_directory: str | Path, adapter_name: str = "default") -> dict[str, Path]:
    """Write each part of a joint adapter as its own standalone adapter: ``<dir>/lorsu`` and ``<dir>/rlp``.

    Each folder holds ``adapter_model.safetensors`` (that part's tensors, under the names a LoRSU / RLP adapter
    uses) and ``adapter_config.json`` (that part's config), so ``PeftModel.from_pretrained(clip, "<dir>/lorsu")``
    gives the image-side adaptation alone and ``"<dir>/rlp"`` the prompt alone.

    Returns:
        ``{"lorsu": folder, "rlp": folder}``.
    """
    config = model.peft_config[adapter_name]
    if not isinstance(config, LoRSURLPConfig):
        raise ValueError(f"save_parts: adapter {adapter_name!r} is a {type(config).__name__}, not a LoRSURLPConfig")
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    folders = {}
    for name, prefix in PART_PREFIXES.items():
        folder = Path(save_directory) / name
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().clone().contiguous() for k, v in state.items() if f".{prefix}" in k}
        save_file(tensors, str(folder / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        config.part_config(name).save_pretrained(str(folder))  # after the weights: the config records their hash
        folders[name] = folder
    unclaimed = sorted(k for k in state if not any(f".{p}" in k for p in PART_PREFIXES.values()))
    if unclaimed:
        raise ValueError(f"save_parts: tensors of neither part: {unclaimed[:3]}")
    return folders


def trainable_parameters_by_part(model: nn.Module) -> dict[str, int]:
    """``{"lorsu": n, "rlp": n}``: parameters that require grad, by the part whose tensors they are."""
    counts = dict.fromkeys(PART_PREFIXES, 0)
    for name, param in model.named_parameters():
        for part, prefix in PART_PREFIXES.items():
            if param.requires_grad and f".{prefix}" in name:
                counts[part] += param.numel()
    return counts
