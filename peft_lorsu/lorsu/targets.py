"""Finding what LoRSU adapts in a model: attention q/k/v, MLP fc1 and the output projection of an encoder tower.

Modules are found by structure, not by a fixed path, so the same code serves ``CLIPModel``
(``vision_model.encoder.layers.N``), a bare ``CLIPVisionModel`` and a CLIP tower nested inside a larger model. An
*attention block* is any module with ``q_proj`` / ``k_proj`` / ``v_proj`` linears and ``num_heads`` / ``head_dim``
attributes (transformers' ``CLIPAttention`` and its relatives); the *MLP* is the sibling module owning ``fc1``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import LoRSUConfig

Role = Literal["q", "k", "v", "fc1", "projection"]
QKV = ("q", "k", "v")

# Tower module class names (transformers' CLIP family) -> tower kind, and the projection that follows each tower.
# transformers 5 nests CLIPVisionModel / CLIPTextModel in CLIPModel; older releases a *Transformer module.
TOWER_CLASSES = {
    "CLIPVisionModel": "vision",
    "CLIPVisionTransformer": "vision",
    "CLIPTextModel": "text",
    "CLIPTextTransformer": "text",
}
PROJECTIONS = {"vision": "visual_projection", "text": "text_projection"}
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Site:
    """One linear layer LoRSU wraps.

    Attributes:
        name: full module path of the linear in the model.
        role: ``"q"``, ``"k"``, ``"v"``, ``"fc1"`` or ``"projection"``.
        block: path of the attention module (q/k/v; the key of ``selected_heads``), or the linear itself.
        layer: encoder layer index, ``None`` for the projection.
        num_heads / head_dim: of the attention block (0 for other roles).
    """

    name: str
    role: Role
    block: str
    layer: int | None
    num_heads: int = 0
    head_dim: int = 0


def _unwrap(model: nn.Module) -> nn.Module:
    # PeftModel -> LoraModel/LoRSUModel -> base model: the probe may be called on any of them.
    while hasattr(model, "base_model") and model.base_model is not model and hasattr(model.base_model, "model"):
        model = model.base_model.model
    return model


def find_towers(model: nn.Module, tower: str) -> list[tuple[str, str]]:
    """(module path, kind) of every CLIP encoder tower of the requested kind(s) in ``model``."""
    kinds = ("vision", "text") if tower == "both" else (tower,)
    found: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        kind = TOWER_CLASSES.get(type(module).__name__)
        # keep the outermost tower when one tower class nests another
        if kind in kinds and not any(_is_under(name, outer) for outer, _ in found):
            found.append((name, kind))
    return found


def _is_under(name: str, outer: str) -> bool:
    return outer == "" or name == outer or name.startswith(outer + ".")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def as_linear(module: nn.Module | None) -> nn.Linear | None:
    """``module`` if it is a linear, the linear it wraps if it is a PEFT tuner layer around one, else ``None``."""
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return module if isinstance(module, nn.Linear) else None


def is_attention_block(module: nn.Module) -> bool:
    return (
        all(as_linear(getattr(module, p, None)) is not None for p in ("q_proj", "k_proj", "v_proj"))
        and isinstance(getattr(module, "num_heads", None), int)
        and isinstance(getattr(module, "head_dim", None), int)
    )


def _projection_site(model: nn.Module, tower_path: str, kind: str) -> Site | None:
    # The projection is a sibling of the tower: `visual_projection` next to `vision_model` in CLIPModel.
    # A bare CLIPVisionModel (tower at the root) has no projection; CLIPVisionModelWithProjection holds it.
    if not tower_path:
        return None
    parent_path = tower_path.rpartition(".")[0]
    parent = model.get_submodule(parent_path)
    if as_linear(getattr(parent, PROJECTIONS[kind], None)) is None:
        return None
    name = _join(parent_path, PROJECTIONS[kind])
    return Site(name=name, role="projection", block=name, layer=None)


def _name_allowed(config: LoRSUConfig, name: str) -> bool:
    if config.target_modules is None:
        return True
    if isinstance(config.target_modules, str):
        return re.fullmatch(config.target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in config.target_modules)


def find_sites(model: nn.Module, config: LoRSUConfig) -> dict[str, Site]:
    """Every linear LoRSU would wrap in ``model`` under ``config``, keyed by module path (in model order).

    Raises:
        ValueError: the model has no CLIP tower of the requested kind, or nothing is left after the filters.
    """
    towers = find_towers(model, config.tower)
    if not towers:
        raise ValueError(
            f"LoRSUConfig.tower={config.tower!r}: no matching encoder found in {type(model).__name__}; supported "
            f"towers are the transformers modules {sorted(TOWER_CLASSES)} (CLIPModel, CLIPVisionModel, "
            "CLIPVisionModelWithProjection, CLIPTextModel and models that contain them)"
        )
    layers = None if config.layers_to_transform is None else set(config.layers_to_transform)
    sites: dict[str, Site] = {}
    for tower_path, kind in towers:
        tower = model.get_submodule(tower_path)
        seen_layers = set()
        for rel, module in tower.named_modules():
            match = _LAYER_INDEX.search(f".{rel}.")
            if match is None:
                continue
            layer = int(match.group(1))
            seen_layers.add(layer)
            if layers is not None and layer not in layers:
                continue
            path = _join(tower_path, rel)
            if config.adapt_attention or config.train_biases:
                if is_attention_block(module):
                    for role in QKV:
                        sites[f"{path}.{role}_proj"] = Site(
                            f"{path}.{role}_proj", role, path, layer, module.num_heads, module.head_dim
                        )
            if (config.adapt_mlp or config.train_biases) and as_linear(getattr(module, "fc1", None)) is not None:
                sites[f"{path}.fc1"] = Site(f"{path}.fc1", "fc1", f"{path}.fc1", layer)
        if layers is not None and not layers <= seen_layers:
            raise ValueError(
                f"LoRSUConfig.layers_to_transform={sorted(layers)} names layers the {kind} tower does not have "
                f"(it has layers 0..{max(seen_layers, default=-1)})"
            )
        if config.adapt_projection:
            proj = _projection_site(model, tower_path, kind)
            if proj is not None:
                sites[proj.name] = proj
    sites = {name: site for name, site in sites.items() if _name_allowed(config, name)}
    if not sites:
        raise ValueError(
            f"LoRSUConfig matches no modules in {type(model).__name__} (tower={config.tower!r}, "
            f"layers_to_transform={config.layers_to_transform}, target_modules={config.target_modules!r})"
        )
    return sites


def attention_blocks(sites: dict[str, Site]) -> dict[str, tuple[int, int]]:
    """Attention block path -> (num_heads, head_dim), for blocks that have at least one q/k/v site."""
    return {s.block: (s.num_heads, s.head_dim) for s in sites.values() if s.role in QKV}
