"""Encoder families: where LoRSU finds the towers, attention blocks, MLPs and projections of a model.

A *family* describes one kind of transformer encoder by names, never by a fixed path, so the same description serves
a bare tower (``CLIPVisionModel``), a two-tower model (``CLIPModel``) and a tower nested inside a larger model (the
vision tower of ``LlavaForConditionalGeneration``). Every name field is a tuple of candidates, tried in order, so one
family covers several releases of a library (transformers renamed ViT's ``attention.attention.query`` to
``attention.q_proj`` in version 5).

An attention block has either three linears ``q``, ``k``, ``v`` (each `(H * d_h, d)`) or is a
``torch.nn.MultiheadAttention`` whose fused ``in_proj_weight`` `(3 * d, d)` stacks ``[W_q; W_k; W_v]``, the layout in
which the LoRSU paper writes its update (OpenCLIP). Both are recognised by structure.

Add a family without editing the package::

    register_encoder_family(EncoderFamily(
        name="my-vit", towers={"MyViTModel": "vision"}, layers=("blocks",), attention=("attn",),
        qkv=(("wq", "wk", "wv"),), num_heads=("n_heads",), head_dim=("d_head",), fc1=("ffn.w1",),
    ))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

KINDS = ("vision", "text")


def _as_tuple(value: str | tuple | list) -> tuple:
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class EncoderFamily:
    """How to find LoRSU's targets in one kind of encoder.

    Attributes:
        name: short identifier used in messages and in :data:`FAMILIES` (``"clip"``, ``"siglip"``, ...).
        towers: tower class -> ``"vision"`` or ``"text"``. A class is named by ``type(m).__name__`` or, to tell
            apart classes of the same name from different libraries, by ``f"{type(m).__module__}.{__qualname__}"``.
            The outermost matching module is the tower.
        layers: names of the ``nn.ModuleList`` of encoder layers inside the tower (the first one found is used).
        attention: paths of the attention block inside one encoder layer.
        qkv: ``(q, k, v)`` attribute names of the three linears inside the attention block. Ignored when the block is a
            ``torch.nn.MultiheadAttention`` (fused ``in_proj_weight``).
        num_heads: attribute names holding the block's number of heads ``H``.
        head_dim: attribute names holding the head size ``d_h``; ``q.out_features // H`` when none is present.
        fc1: paths of the MLP's first linear (``m x d``, the one LoRSU updates sparsely) inside one encoder layer.
        attention_norm / fc1_norm: paths of the ``torch.nn.LayerNorm`` whose output is the input of q/k/v / of fc1,
            inside one encoder layer. Optional: with them, training recomputes that input from the norm's input (which
            the norm keeps for its own backward anyway) instead of keeping an `(N, d)` activation per layer for the
            factor ``V``'s and fc1's value gradients. Each call checks that the layer really receives the norm's
            unmodified output, and keeps its input as usual otherwise.
        projections: tower kind -> paths of the linear that projects the tower's pooled output into the joint
            embedding space. Relative to the tower; ``"../name"`` is a sibling of the tower (``visual_projection`` next
            to ``vision_model`` in ``CLIPModel``). Kinds without an entry have no projection.
        notes: one line for the supported-models table and error messages.
    """

    name: str
    towers: Mapping[str, str]
    layers: tuple[str, ...] = ("layers",)
    attention: tuple[str, ...] = ("self_attn",)
    qkv: tuple[tuple[str, str, str], ...] = (("q_proj", "k_proj", "v_proj"),)
    num_heads: tuple[str, ...] = ("num_heads",)
    head_dim: tuple[str, ...] = ("head_dim",)
    fc1: tuple[str, ...] = ("mlp.fc1",)
    attention_norm: tuple[str, ...] = ("layer_norm1",)
    fc1_norm: tuple[str, ...] = ("layer_norm2",)
    projections: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self) -> None:
        # Accept a plain string where a tuple of candidates is expected, and check everything once, here.
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"EncoderFamily.name must be a non-empty string, got {self.name!r}")
        for attr in ("layers", "attention", "num_heads", "head_dim", "fc1", "attention_norm", "fc1_norm"):
            object.__setattr__(self, attr, _as_tuple(getattr(self, attr)))
            if not all(isinstance(v, str) and v for v in getattr(self, attr)):
                raise ValueError(f"EncoderFamily({self.name!r}).{attr} must be strings, got {getattr(self, attr)!r}")
        qkv = (self.qkv,) if self.qkv and isinstance(self.qkv[0], str) else self.qkv
        object.__setattr__(self, "qkv", tuple(tuple(names) for names in qkv))
        if not all(len(names) == 3 and all(isinstance(n, str) for n in names) for names in self.qkv):
            raise ValueError(f"EncoderFamily({self.name!r}).qkv must hold (q, k, v) name triples, got {self.qkv!r}")
        if not self.towers or any(kind not in KINDS for kind in self.towers.values()):
            raise ValueError(
                f"EncoderFamily({self.name!r}).towers must map class names to one of {KINDS}, "
                f"got {dict(self.towers)!r}"
            )
        object.__setattr__(self, "towers", dict(self.towers))
        if any(kind not in KINDS for kind in self.projections):
            raise ValueError(f"EncoderFamily({self.name!r}).projections keys must be in {KINDS}")
        object.__setattr__(self, "projections", {k: _as_tuple(v) for k, v in self.projections.items()})
        if not self.layers:
            raise ValueError(f"EncoderFamily({self.name!r}).layers must name at least one module list")

    def tower_kind(self, module: nn.Module) -> str | None:
        """``"vision"`` / ``"text"`` if ``module`` is one of this family's towers, else ``None``."""
        cls = type(module)
        return self.towers.get(cls.__name__) or self.towers.get(f"{cls.__module__}.{cls.__qualname__}")

    def kinds(self) -> list[str]:
        return sorted(set(self.towers.values()))


# Built-in families. Tower classes of older transformers releases (the *Transformer modules) are listed too, so a
# model built with them is still found; the outermost match wins when one tower class nests another.
_BUILTIN = (
    EncoderFamily(
        name="clip",
        towers={
            "CLIPVisionModel": "vision",
            "CLIPVisionTransformer": "vision",
            "CLIPTextModel": "text",
            "CLIPTextTransformer": "text",
        },
        projections={"vision": ("../visual_projection",), "text": ("../text_projection",)},
        notes="CLIPModel, CLIPVisionModel(WithProjection), CLIPTextModel(WithProjection), CLIP towers inside VLMs",
    ),
    *(
        EncoderFamily(
            name=name,
            towers={
                f"{prefix}VisionModel": "vision",
                f"{prefix}VisionTransformer": "vision",
                f"{prefix}TextModel": "text",
                f"{prefix}TextTransformer": "text",
            },
            projections={"text": ("head", "text_model.head")},
            notes=f"{prefix}Model and its towers; the vision tower's attention-pooling head is not adapted",
        )
        for name, prefix in (("siglip", "Siglip"), ("siglip2", "Siglip2"))
    ),
    EncoderFamily(
        name="vit",
        towers={"ViTModel": "vision"},
        layers=("layers", "layer"),
        attention=("attention", "attention.attention"),
        qkv=(("q_proj", "k_proj", "v_proj"), ("query", "key", "value")),
        num_heads=("num_attention_heads", "num_heads"),
        head_dim=("head_dim", "attention_head_size"),
        fc1=("mlp.fc1", "intermediate.dense"),
        attention_norm=("layernorm_before",),
        fc1_norm=("layernorm_after",),
        notes="ViTModel, ViTForImageClassification (transformers 5 names and the older attention.attention.query)",
    ),
    EncoderFamily(
        name="dinov2",
        towers={
            "Dinov2Model": "vision",
            "Dinov2Backbone": "vision",
            "Dinov2WithRegistersModel": "vision",
            "Dinov2WithRegistersBackbone": "vision",
        },
        layers=("layer", "layers"),
        attention=("attention", "attention.attention"),
        qkv=(("q_proj", "k_proj", "v_proj"), ("query", "key", "value")),
        num_heads=("num_attention_heads", "num_heads"),
        head_dim=("head_dim", "attention_head_size"),
        fc1=("mlp.fc1", "mlp.up_proj", "mlp.weights_in"),
        attention_norm=("norm1",),
        fc1_norm=("norm2",),
        notes="Dinov2Model, Dinov2Backbone, Dinov2ForImageClassification, DINOv2 with registers; the SwiGLU MLP's "
        "up_proj plays fc1 (before transformers 5, its fused gate-and-up weights_in)",
    ),
    EncoderFamily(
        name="openclip",
        towers={
            "open_clip.transformer.VisionTransformer": "vision",
            "open_clip.transformer.TextTransformer": "text",
        },
        layers=("resblocks",),
        attention=("attn",),
        fc1=("mlp.c_fc",),
        attention_norm=("ln_1",),
        fc1_norm=("ln_2",),
        projections={"text": ("text_projection",)},
        notes="OpenCLIP ViT towers (torch.nn.MultiheadAttention, fused in_proj_weight); the raw `proj` parameter is "
        "not adapted",
    ),
)

FAMILIES: dict[str, EncoderFamily] = {family.name: family for family in _BUILTIN}


def register_encoder_family(family: EncoderFamily, replace: bool = False) -> EncoderFamily:
    """Make LoRSU (``probe_lorsu``, ``get_peft_model``) recognise the encoders described by ``family``.

    Args:
        family: the description; its tower classes must not belong to another registered family.
        replace: overwrite a registered family of the same name.

    Raises:
        ValueError: the name or a tower class is taken and ``replace`` is False.
    """
    if not isinstance(family, EncoderFamily):
        raise TypeError(f"register_encoder_family expects an EncoderFamily, got {type(family).__name__}")
    if family.name in FAMILIES and not replace:
        raise ValueError(f"an encoder family named {family.name!r} is already registered; pass replace=True")
    for other in FAMILIES.values():
        taken = sorted(set(other.towers) & set(family.towers))
        if other.name != family.name and taken:
            raise ValueError(f"tower classes {taken} already belong to the encoder family {other.name!r}")
    FAMILIES[family.name] = family
    return family


def unregister_encoder_family(name: str) -> None:
    """Forget the family ``name`` (for tests and for replacing a built-in description)."""
    if name not in FAMILIES:
        raise KeyError(f"no encoder family named {name!r}; registered: {sorted(FAMILIES)}")
    del FAMILIES[name]


def family_of(module: nn.Module) -> tuple[EncoderFamily, str] | None:
    """``(family, kind)`` if ``module`` is a registered tower, else ``None``."""
    for family in FAMILIES.values():
        kind = family.tower_kind(module)
        if kind is not None:
            return family, kind
    return None


def supported_summary() -> str:
    """One line per registered family, for error messages: ``name (kinds): tower classes``."""
    return "; ".join(
        f"{f.name} ({'/'.join(f.kinds())}): {', '.join(f.towers)}"
        for f in FAMILIES.values()
    )
