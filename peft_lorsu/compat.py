"""The one module that reaches into peft and transformers where they offer no public way, with the versions named.

Everything else in the package uses public names only. Each entry says why it is here; ``tests/core/test_compat.py``
checks every one of them against the installed versions, and CI runs that test with the oldest and the newest
peft / transformers pair the package declares.

peft:

- ``PeftType`` is a closed enum and ``register_peft_method`` accepts only its members, so a plugin must add its
  members first (:func:`add_peft_type`). Enum offers no public way to grow; the members are added the way ``Enum``
  itself stores them.
- ``register_peft_method`` raises when a name is registered twice; :func:`register` makes re-registration (an
  ``importlib.reload``) replace the old classes by dropping them from peft's mapping tables first.
- ``BufferDict`` (``peft.tuners._buffer_dict``): the container peft's own tuners use for per-adapter buffers; peft
  saves and deletes it with the adapter, which a container of our own would not get.
- Moving an adapter to its base layer's device: peft calls its layers' ``_move_adapter_to_device_of_base_layer``.
  peft < 0.21 casts *every* adapter tensor to the base weight's dtype (integer index buffers became floats) and,
  in 0.18, finds no device for a base without ``.weight`` (CLIP's text embeddings). The plugin's layers use
  :func:`move_adapter_to_base_device`, the 0.21 behaviour, on every version.
- The base-weight accessors ``get_base_weight`` / ``set_base_weight`` (which dequantise) exist from peft 0.20;
  :func:`get_base_weight` / :func:`set_base_weight` fall back to ``weight.data`` before that.
- peft < 0.20 returns from ``get_peft_model_state_dict(model, adapter_name=name)``, for a tuner that is not built
  in, the tensors of *every* adapter of the model: the other adapters' keep their adapter name at the end of the key
  (``...lorsu_U.other``), and ``save_pretrained`` writes them into each adapter's file (peft 0.20 filters them out).
  :func:`adapter_state_dict` drops them, the 0.20 way, and drops them from a file such a peft wrote, so the
  plugin's loading check compares only the adapter's own tensors.
- peft < 0.21 selects a tuner's tensors (to freeze, and to save) by its prefix appearing in their names. The joint
  LoRSU + RLP tuner's tensors keep the names of its two parts, so it needs peft >= 0.21
  (:data:`STRUCTURAL_STATE_DICT`); it says so when used on an older peft.

transformers:

- ``CLIPModel.get_image_features`` / ``get_text_features`` return a tensor in 4.x and a ``ModelOutput`` in 5.x
  (:func:`pooled_features`).
"""

from __future__ import annotations

import logging
from importlib.metadata import version

import torch
from packaging.version import Version
from peft import mapping as _peft_mapping
from peft.tuners._buffer_dict import BufferDict
from peft.utils import get_peft_model_state_dict, register_peft_method
from peft.utils.peft_types import PeftType
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "PEFT_VERSION",
    "STRUCTURAL_STATE_DICT",
    "BufferDict",
    "PeftType",
    "adapter_state_dict",
    "add_peft_type",
    "get_base_weight",
    "move_adapter_to_base_device",
    "pooled_features",
    "register",
    "set_base_weight",
]

PEFT_VERSION = Version(version("peft"))
# peft >= 0.21 finds a tuner's tensors structurally (every tensor of a tuner layer but its base layer)
STRUCTURAL_STATE_DICT = PEFT_VERSION >= Version("0.21")
# peft < 0.20 returns (and saves) every adapter's tensors as the state dict of one adapter of a plugin tuner
OTHER_ADAPTERS_IN_STATE_DICT = PEFT_VERSION < Version("0.20")


def add_peft_type(name: str) -> PeftType:
    """Add ``name`` (upper case) to ``peft.PeftType`` and return the member; return the existing one if present.

    ``PeftType`` is a ``str`` enum, so the member compares and hashes equal to its string value, which is what
    ``adapter_config.json`` stores and what peft's mappings are keyed by.
    """
    if not name.isupper() or not name.isidentifier():
        raise ValueError(f"PEFT type names are upper-case identifiers, got {name!r}")
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    # Enum keeps members in three places: iteration reads _member_names_, lookups by value _value2member_map_.
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


def _mapping(name: str) -> dict:
    return getattr(_peft_mapping, name, {})


def register(name: str, config_cls: type, model_cls: type, prefix: str) -> PeftType:
    """Register a tuner with peft under ``name`` (lower case); registering again replaces the previous classes.

    Replacing (instead of skipping) matters after ``importlib.reload``: the reloaded module defines new classes, and
    ``PeftModel.from_pretrained`` must build instances of those.
    """
    peft_type = add_peft_type(name.upper())
    if model_cls.prefix != prefix:
        raise ValueError(f"{model_cls.__name__}.prefix is {model_cls.prefix!r} but registration uses {prefix!r}")
    prefixes = _mapping("PEFT_TYPE_TO_PREFIX_MAPPING")
    if peft_type in _mapping("PEFT_TYPE_TO_TUNER_MAPPING"):
        if prefixes.get(peft_type) != prefix:
            raise ValueError(f"PEFT type {peft_type.value} is already registered with prefix {prefixes[peft_type]!r}")
        for table in ("CONFIG", "TUNER", "PREFIX", "MIXED_MODEL"):
            _mapping(f"PEFT_TYPE_TO_{table}_MAPPING").pop(peft_type, None)
        logger.debug("re-registering PEFT method %s", name)
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    return peft_type


def pooled_features(output: object) -> torch.Tensor:
    """The projected features of ``CLIPModel.get_image_features`` / ``get_text_features``, `(B, D)`.

    transformers 4.x returns the tensor; 5.x returns a ``ModelOutput`` whose ``pooler_output`` holds it.
    """
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def get_base_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight a tuner layer's delta applies to: peft's accessor (>= 0.20, dequantises), else ``.weight``."""
    accessor = getattr(layer, "get_base_weight", None)
    return accessor() if accessor is not None else layer.get_base_layer().weight.data


def full_shape(weight: torch.Tensor) -> torch.Size:
    """Shape of a weight, also while DeepSpeed ZeRO-3 partitions it (``.shape`` is then `(0,)`; ``ds_shape`` is the
    full one). Tested with deepspeed 0.19.8."""
    return torch.Size(getattr(weight, "ds_shape", weight.shape))


def is_partitioned(param: torch.Tensor | None) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions ``param`` (its data is gathered only inside its module's forward and
    backward). Tested with deepspeed 0.19.8."""
    return hasattr(param, "ds_id")


def set_base_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Write a merged base weight: peft's accessor (>= 0.20, re-quantises), else ``.weight.data``."""
    accessor = getattr(layer, "set_base_weight", None)
    if accessor is not None:
        accessor(weight)
    else:
        layer.get_base_layer().weight.data = weight


def move_adapter_to_base_device(
    layer: nn.Module, adapter_name: str, base_device: torch.device, base_dtype: torch.dtype, device=None
) -> None:
    """Move ``adapter_name``'s tensors of ``layer`` to ``device`` (default: the base's), floating ones to the base's
    floating dtype; integer buffers keep their dtype. Adapters on the meta device (being loaded) are left alone."""
    target = device if device is not None else base_device
    dtype = base_dtype if base_dtype.is_floating_point else None
    for name in layer.adapter_layer_names + layer.other_param_names:
        container = getattr(layer, name, None)
        if not isinstance(container, (nn.ModuleDict, nn.ParameterDict, BufferDict)) or adapter_name not in container:
            continue
        if any(p.device.type == "meta" for p in container.parameters()):
            continue
        item = container[adapter_name]
        floating = getattr(item, "dtype", torch.float32).is_floating_point
        container[adapter_name] = item.to(target, dtype=dtype) if dtype is not None and floating else item.to(target)


def adapter_state_dict(model: nn.Module, adapter_name: str, saved: dict | None = None) -> tuple[dict, dict | None]:
    """``get_peft_model_state_dict(model, adapter_name=adapter_name)`` without other adapters' tensors, and ``saved``
    (an adapter file's tensors, optional) without the other adapters' tensors a peft < 0.20 wrote into it.

    peft < 0.20 returns the model's other adapters' tensors too, their keys ending in ``.<their name>`` (or holding
    ``.<their name>.``); they are dropped the way peft 0.20 does. In a file it wrote, they are one of this adapter's
    keys followed by ``.<another name>``. On peft >= 0.20 nothing is dropped: such a key in a file is refused.
    """
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    if OTHER_ADAPTERS_IN_STATE_DICT:
        others = tuple(f".{name}" for name in model.peft_config if name != adapter_name)
        state = {k: v for k, v in state.items() if not k.endswith(others) and not any(f"{o}." in k for o in others)}
        saved = saved and {k: v for k, v in saved.items() if k in state or k.rpartition(".")[0] not in state}
    return state, saved
