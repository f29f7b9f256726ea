"""Registration of the plugin's tuners with PEFT.

PEFT only registers methods whose name is a member of its closed ``PeftType`` enum, so this module first adds the
members, then calls :func:`peft.register_peft_method`. It is the one place that touches PEFT internals, which is why
the project pins ``peft>=0.21,<0.22``. Both steps are idempotent: importing the package twice, or reloading it, leaves
exactly one registration per method, always pointing at the newest classes.
"""

from __future__ import annotations

import logging

from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.utils import register_peft_method
from peft.utils.peft_types import PeftType

logger = logging.getLogger(__name__)


def add_peft_type(name: str) -> PeftType:
    """Add ``name`` (upper case) to ``peft.PeftType`` and return the member; return the existing one if present.

    ``PeftType`` is a ``str`` enum, so the new member compares and hashes equal to its string value, which is what
    ``adapter_config.json`` stores and what PEFT's mappings are keyed by.
    """
    if not name.isupper() or not name.isidentifier():
        raise ValueError(f"PEFT type names are upper-case identifiers, got {name!r}")
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    # Enum keeps members in three places; iteration uses _member_names_, lookups by value _value2member_map_.
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


def register(name: str, config_cls: type, model_cls: type, prefix: str) -> PeftType:
    """Register a tuner with PEFT under ``name`` (lower case); re-registering replaces the previous classes.

    Replacing (instead of skipping) matters after ``importlib.reload``: the reloaded module defines new classes, and
    ``PeftModel.from_pretrained`` must build instances of those, not of the stale ones.
    """
    peft_type = add_peft_type(name.upper())
    if model_cls.prefix != prefix:
        raise ValueError(f"{model_cls.__name__}.prefix is {model_cls.prefix!r} but registration uses {prefix!r}")
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        previous = PEFT_TYPE_TO_PREFIX_MAPPING.get(peft_type)
        if previous != prefix:
            raise ValueError(f"PEFT type {peft_type.value} is already registered with prefix {previous!r}")
        for mapping in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
            mapping.pop(peft_type, None)
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING.pop(peft_type, None)
        logger.debug("re-registering PEFT method %s", name)
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    return peft_type
