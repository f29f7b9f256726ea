"""Finding what LoRSU adapts in a model: attention q/k/v, MLP fc1 and the output projection of encoder towers.

Towers are found through the registered encoder families (:mod:`.families`): every module whose class a family names
is a tower, and inside it the family's names lead to the encoder layers, each layer's attention block and MLP, and the
projection. Site keys are module paths, so ``vision_model.encoder.layers.3.self_attn`` names the same block in a probe
result, a saved ``adapter_config.json`` and the model.

Per encoder layer of width ``d`` with ``H`` heads of size ``d_h``, the sites are

- ``q`` / ``k`` / ``v``: three linears `(H * d_h, d)`, keyed by their own paths; or
- ``qkv``: one ``torch.nn.MultiheadAttention`` whose ``in_proj_weight`` `(3 * H * d_h, d)` stacks them (OpenCLIP),
  keyed by the attention module's path;
- ``fc1``: the MLP's first linear `(m, d)`;

plus one ``projection`` linear per tower when the family names one.

Vision-language models that feed the language model a hidden state from the *middle* of their vision tower
(LLaVA's ``vision_feature_layer``, default ``-2``) never use the layers after it; those layers get no gradient and
are left out (see :func:`vlm_read_layers`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .families import EncoderFamily, family_of, supported_summary


class TargetSpec(Protocol):
    """The fields of a :class:`~peft_lorsu.lorsu.config.LoRSUConfig` that decide which modules LoRSU wraps (the
    finder needs no more, so it does not depend on the config class)."""

    tower: str
    layers_to_transform: list[int] | None
    target_modules: list[str] | str | None

Role = Literal["q", "k", "v", "qkv", "fc1", "projection"]
# What `train_biases` may list: "attention" (the q/k/v biases, or a fused in-projection's) and "mlp" (fc1's bias).
BIAS_PARTS = ("attention", "mlp")
QKV = ("q", "k", "v")
HEAD_ROLES = ("q", "k", "v", "qkv")
# Config fields through which a VLM names the hidden state(s) of its `vision_tower` that it reads.
FEATURE_LAYER_FIELDS = ("vision_feature_layer", "vision_feature_layers")


def trains_bias(config: Any, part: str) -> bool:
    """Whether ``config.train_biases`` (``True``, ``False`` or a list of :data:`BIAS_PARTS`) trains ``part``'s bias."""
    value = config.train_biases
    return value if isinstance(value, bool) else part in value


@dataclass(frozen=True)
class Site:
    """One module LoRSU wraps.

    Attributes:
        name: full module path in the model.
        role: ``"q"``, ``"k"``, ``"v"`` (separate linears), ``"qkv"`` (a fused multi-head attention), ``"fc1"`` or
            ``"projection"``.
        block: path of the attention module (the key of ``selected_heads``) for q/k/v/qkv, else ``name``.
        layer: encoder layer index, ``None`` for the projection.
        num_heads / head_dim: ``H`` and ``d_h`` of the attention block (0 for other roles).
        qkv: paths of the modules holding the block's q, k and v weights: three linears, or the fused attention
            module alone. Empty for other roles.
        norm: for q/k/v and fc1, the path of the ``torch.nn.LayerNorm`` whose output is the module's input (the
            family's ``attention_norm`` / ``fc1_norm``), ``""`` when the layer has none of that exact class.
    """

    name: str
    role: Role
    block: str
    layer: int | None
    num_heads: int = 0
    head_dim: int = 0
    qkv: tuple[str, ...] = ()
    norm: str = ""


class Tower(NamedTuple):
    path: str
    family: EncoderFamily
    kind: str


def _unwrap(module: nn.Module | None) -> nn.Module | None:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def as_linear(module: nn.Module | None) -> nn.Linear | None:
    """``module`` if it is a linear, the linear it wraps if it is a PEFT tuner layer around one, else ``None``."""
    module = _unwrap(module)
    return module if isinstance(module, nn.Linear) else None


def as_attention(module: nn.Module | None) -> nn.MultiheadAttention | None:
    """``module`` (or the module a tuner layer wraps) if it is a ``torch.nn.MultiheadAttention``, else ``None``."""
    module = _unwrap(module)
    return module if isinstance(module, nn.MultiheadAttention) else None


def _child(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _is_under(name: str, outer: str) -> bool:
    return outer == "" or name == outer or name.startswith(outer + ".")


def find_towers(model: nn.Module, tower: str) -> list[Tower]:
    """Every encoder tower of the requested kind(s) (``"vision"``, ``"text"`` or ``"both"``) in ``model``."""
    kinds = ("vision", "text") if tower == "both" else (tower,)
    found: list[Tower] = []
    for name, module in model.named_modules():
        match = family_of(module)
        # keep the outermost tower when one tower class nests another (CLIPVisionModel > CLIPVisionTransformer)
        if match is not None and not any(_is_under(name, outer.path) for outer in found):
            found.append(Tower(name, *match))
    return [t for t in found if t.kind in kinds]


def _no_tower_error(model: nn.Module, config: TargetSpec) -> ValueError:
    present = find_towers(model, "both")
    if present:
        have = ", ".join(f"{t.family.name} {t.kind} tower at {t.path or '<root>'}" for t in present)
        detail = f"it has: {have}"
    else:
        detail = "it contains no module of a registered encoder family"
    return ValueError(
        f"LoRSUConfig.tower={config.tower!r}: no matching encoder found in {type(model).__name__} ({detail}). "
        f"Supported encoder families: {supported_summary()}. Describe another architecture with "
        "peft_lorsu.lorsu.register_encoder_family(EncoderFamily(...))."
    )


def _layer_list(tower: nn.Module, family: EncoderFamily) -> tuple[str, nn.ModuleList] | None:
    for rel, module in tower.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and rel.rpartition(".")[2] in family.layers:
            return rel, module
    return None


def _int_attr(module: nn.Module, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _attention(layer: nn.Module, layer_path: str, family: EncoderFamily) -> Site | None:
    """The attention block of one encoder layer as a template site (role ``"qkv"`` or ``"q"``), or ``None``."""
    for rel in family.attention:
        block = _child(layer, rel)
        if block is None:
            continue
        path = _join(layer_path, rel)
        mha = as_attention(block)
        if mha is not None:
            if not mha._qkv_same_embed_dim:
                raise ValueError(
                    f"{path}: LoRSU adapts a torch.nn.MultiheadAttention only with a fused in_proj_weight "
                    "(kdim == vdim == embed_dim)"
                )
            return Site(path, "qkv", path, None, mha.num_heads, mha.head_dim, (path,))
        for names in family.qkv:
            linears = [as_linear(getattr(block, n, None)) for n in names]
            num_heads = _int_attr(block, family.num_heads)
            if any(lin is None for lin in linears) or num_heads is None:
                continue
            head_dim = _int_attr(block, family.head_dim) or linears[0].out_features // num_heads
            rows = {lin.out_features for lin in linears}
            if rows != {num_heads * head_dim}:
                raise ValueError(
                    f"{path}: q/k/v have {sorted(rows)} output rows, LoRSU needs num_heads * head_dim = "
                    f"{num_heads} * {head_dim} rows in each"
                )
            return Site(path, "q", path, None, num_heads, head_dim, tuple(f"{path}.{n}" for n in names))
    return None


def _first_linear(layer: nn.Module, layer_path: str, paths: tuple[str, ...]) -> str | None:
    for rel in paths:
        if as_linear(_child(layer, rel)) is not None:
            return _join(layer_path, rel)
    return None


def _input_norm(layer: nn.Module, layer_path: str, paths: tuple[str, ...]) -> str:
    # exactly nn.LayerNorm: a subclass may compute something else (OpenCLIP's casts to float32 and back)
    for rel in paths:
        if type(_child(layer, rel)) is nn.LayerNorm:
            return _join(layer_path, rel)
    return ""


def _projection_site(model: nn.Module, tower: Tower) -> Site | None:
    for rel in tower.family.projections.get(tower.kind, ()):
        if rel.startswith("../"):
            if not tower.path:  # a tower at the root has no siblings (a bare CLIPVisionModel)
                continue
            path = _join(tower.path.rpartition(".")[0], rel[3:])
        else:
            path = _join(tower.path, rel)
        if as_linear(_child(model, path)) is not None:
            return Site(name=path, role="projection", block=path, layer=None)
    return None


def vlm_read_layers(model: nn.Module, tower_path: str, num_layers: int) -> tuple[int, str] | None:
    """How many leading layers of a VLM's vision tower the language model reads, or ``None`` if not a VLM's tower.

    LLaVA-style models (``LlavaForConditionalGeneration`` and relatives) feed the language model
    ``hidden_states[i]`` of their ``vision_tower`` for ``i`` in ``config.vision_feature_layer(s)``. ``hidden_states``
    holds ``L + 1`` entries: the embedding output, then the output of each layer, so ``i`` (taken modulo ``L + 1``)
    reads layers ``0 .. i - 1``; with the default ``-2`` the last layer is computed but unused.

    Returns:
        ``(count, reason)``: layers ``0 .. count - 1`` are read; ``reason`` names the config field, for messages.
    """
    parent_path, _, attr = tower_path.rpartition(".")
    if attr != "vision_tower":
        return None
    parent = model.get_submodule(parent_path)
    config = getattr(parent, "config", None)
    for field_name in FEATURE_LAYER_FIELDS:
        value = getattr(config, field_name, None)
        if value is None:
            continue
        indices = [value] if isinstance(value, int) else list(value)
        total = num_layers + 1
        if not indices or not all(isinstance(i, int) and -total <= i < total for i in indices):
            raise ValueError(
                f"{type(parent).__name__}.config.{field_name}={value!r} does not index the {total} hidden states of "
                f"its {num_layers}-layer vision tower"
            )
        count = max(i % total for i in indices)
        reason = f"{type(parent).__name__} reads hidden state {value!r} (config.{field_name})"
        if count == 0:
            raise ValueError(f"{reason}: the embedding output only, so no encoder layer of its vision tower matters")
        return count, reason
    return None


def _tower_sites(model: nn.Module, tower: Tower, config: TargetSpec) -> dict[str, Site]:
    module = model.get_submodule(tower.path)
    found = _layer_list(module, tower.family)
    where = f"the {tower.family.name} {tower.kind} tower {tower.path or type(module).__name__}"
    if found is None:
        raise ValueError(f"{where} has no encoder layer list named {list(tower.family.layers)}")
    list_path, layers = found
    read = vlm_read_layers(model, tower.path, len(layers))
    usable = range(len(layers) if read is None else read[0])
    if config.layers_to_transform is None:
        chosen = list(usable)
    else:
        chosen = sorted(set(config.layers_to_transform))
        if chosen[-1] >= len(layers):
            raise ValueError(
                f"LoRSUConfig.layers_to_transform={chosen} names layers the {tower.kind} tower does not have "
                f"({where} has layers 0..{len(layers) - 1})"
            )
        unread = [i for i in chosen if i not in usable]
        if unread:
            raise ValueError(
                f"LoRSUConfig.layers_to_transform={chosen} names layers {unread} whose output is never used: "
                f"{read[1]}, i.e. layers 0..{read[0] - 1}"
            )
    sites: dict[str, Site] = {}
    for index in chosen:
        layer_path = _join(tower.path, list_path, str(index))
        layer = layers[index]
        if config.adapt_attention or trains_bias(config, "attention"):
            block = _attention(layer, layer_path, tower.family)
            if block is None:
                raise ValueError(
                    f"{layer_path}: no attention block of the {tower.family.name} family (looked for "
                    f"{list(tower.family.attention)} holding q/k/v {[list(n) for n in tower.family.qkv]} and a head "
                    f"count in {list(tower.family.num_heads)}, or a torch.nn.MultiheadAttention)"
                )
            roles = ("qkv",) if block.role == "qkv" else QKV
            norm = _input_norm(layer, layer_path, tower.family.attention_norm)
            for role, path in zip(roles, block.qkv):
                sites[path] = Site(path, role, block.block, index, block.num_heads, block.head_dim, block.qkv, norm)
        if config.adapt_mlp or trains_bias(config, "mlp"):
            fc1 = _first_linear(layer, layer_path, tower.family.fc1)
            if fc1 is None:
                raise ValueError(
                    f"{layer_path}: no MLP first linear of the {tower.family.name} family at {list(tower.family.fc1)}"
                )
            sites[fc1] = Site(fc1, "fc1", fc1, index, norm=_input_norm(layer, layer_path, tower.family.fc1_norm))
    if config.adapt_projection:
        projection = _projection_site(model, tower)
        if projection is not None:
            sites[projection.name] = projection
    return sites


def _name_allowed(config: TargetSpec, name: str) -> bool:
    if config.target_modules is None:
        return True
    if isinstance(config.target_modules, str):
        return re.fullmatch(config.target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in config.target_modules)


def find_sites(model: nn.Module, config: TargetSpec) -> dict[str, Site]:
    """Every module LoRSU would wrap in ``model`` under ``config``, keyed by module path (tower by tower, in order).

    Raises:
        ValueError: no tower of the requested kind (the message lists the supported families), a layer the family
            description does not fit, ``layers_to_transform`` outside the tower or the layers a VLM reads, or nothing
            left after the filters.
    """
    towers = find_towers(model, config.tower)
    if not towers:
        raise _no_tower_error(model, config)
    sites: dict[str, Site] = {}
    for tower in towers:
        sites.update(_tower_sites(model, tower, config))
    sites = {name: site for name, site in sites.items() if _name_allowed(config, name)}
    if not sites:
        raise ValueError(
            f"LoRSUConfig matches no modules in {type(model).__name__} (tower={config.tower!r}, "
            f"layers_to_transform={config.layers_to_transform}, target_modules={config.target_modules!r})"
        )
    return sites


def attention_blocks(sites: dict[str, Site]) -> dict[str, tuple[int, int]]:
    """Attention block path -> (num_heads, head_dim), for blocks that have at least one q/k/v site."""
    return {s.block: (s.num_heads, s.head_dim) for s in sites.values() if s.role in HEAD_ROLES}


def qkv_weights(model: nn.Module, sites: dict[str, Site]) -> dict[str, nn.Parameter]:
    """The weights whose gradients score the heads, keyed by module path.

    Every q, k and v of a targeted block is included, even when ``target_modules`` keeps only some of them: a linear's
    ``weight`` `(H * d_h, d)`, or a fused attention's ``in_proj_weight`` `(3 * H * d_h, d)`.
    """
    weights: dict[str, nn.Parameter] = {}
    for site in sites.values():
        for path in site.qkv if site.role in HEAD_ROLES else ():
            module = model.get_submodule(path)
            mha = as_attention(module)
            weights[path] = mha.in_proj_weight if mha is not None else as_linear(module).weight
    return weights


def qkv_gradients(
    sites: dict[str, Site], grads: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Block path -> the gradients `(H * d_h, d)` of its q, k and v, from the sums keyed as in :func:`qkv_weights`."""
    out = {}
    for site in sites.values():
        if site.role in HEAD_ROLES and site.block not in out:
            parts = [grads[path] for path in site.qkv]
            out[site.block] = tuple(parts[0].chunk(3, dim=0)) if len(parts) == 1 else tuple(parts)
    return out
