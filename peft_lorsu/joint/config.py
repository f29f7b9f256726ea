"""Configuration of the joint tuner: LoRSU on the image tower and RLP on the text tower, one adapter."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig

from ..compat import add_peft_type
from ..config import PluginConfig
from ..lorsu.config import LoRSUConfig
from ..rlp.config import RLPConfig

PEFT_TYPE = add_peft_type("LORSU_RLP")


@dataclass
class LoRSURLPConfig(PluginConfig):
    """One adapter that holds a LoRSU part (image encoder) and an RLP part (text prompts) of the same CLIP model.

    ``get_peft_model(clip, LoRSURLPConfig(lorsu=..., rlp=...))`` wraps both towers at once: both parts train together,
    ``save_pretrained`` writes one ``adapter_config.json`` (the two part configs nested under ``"lorsu"`` and
    ``"rlp"``) and one ``adapter_model.safetensors`` (the ``lorsu_*`` and ``rlp_*`` tensors under their usual
    names), and ``PeftModel.from_pretrained`` loads them back. Trainable parameters: the LoRSU count plus the RLP
    count. :func:`peft_lorsu.joint.save_parts` also writes each part as a standalone LoRSU / RLP adapter.

    Why not peft's mixed adapters: see docs/advanced.md. In short, ``PeftMixedModel`` in peft 0.21 accepts only
    peft's own LoRA-family types (a fixed list), dispatches layer creation on their config classes, and cannot save.

    Args:
        lorsu (`LoRSUConfig` or `dict`):
            The LoRSU part, with the probe's selection filled in (run ``probe_lorsu(model, config.lorsu, ...)``
            first) or ``selection="random"``. A dict (as read from JSON) is turned back into a ``LoRSUConfig``.
        rlp (`RLPConfig` or `dict`):
            The RLP part; a dict is turned back into an ``RLPConfig``.
    """

    lorsu: LoRSUConfig | dict | None = field(default=None, metadata={"help": "The LoRSU part (image encoder)."})
    rlp: RLPConfig | dict | None = field(default=None, metadata={"help": "The RLP part (text prompts)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        self.lorsu = _part(LoRSUConfig, self.lorsu, "lorsu")
        self.rlp = _part(RLPConfig, self.rlp, "rlp")
        self.check_plugin_fields()
        for name in ("lorsu", "rlp"):
            if getattr(self, name).modules_to_save:
                raise ValueError(
                    f"LoRSURLPConfig.{name}.modules_to_save={getattr(self, name).modules_to_save!r}: not supported in "
                    "the joint adapter; leave it None"
                )

    def validate(self) -> None:
        """Check both parts again (``get_peft_model`` calls this)."""
        self.check_plugin_fields()
        self.lorsu.validate()
        self.rlp.validate()

    @property
    def target_modules(self) -> None:
        """Unused: each part finds its own modules (peft reads the attribute only in error messages)."""
        return None

    @property
    def parts(self) -> dict[str, PeftConfig]:
        """``{"lorsu": LoRSUConfig, "rlp": RLPConfig}``."""
        return {"lorsu": self.lorsu, "rlp": self.rlp}

    def sync_parts(self) -> None:
        """Copy the fields peft sets on the outer config (inference mode, base model) into both parts."""
        for part in self.parts.values():
            part.inference_mode = self.inference_mode
            part.base_model_name_or_path = self.base_model_name_or_path
            part.revision = self.revision

    def part_config(self, name: str) -> PeftConfig:
        """A standalone copy of part ``name`` (``"lorsu"`` or ``"rlp"``), e.g. to save it as its own adapter."""
        if name not in self.parts:
            raise ValueError(f"LoRSURLPConfig has parts 'lorsu' and 'rlp', got {name!r}")
        self.sync_parts()
        return copy.deepcopy(self.parts[name])

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for name, part in self.parts.items():  # nested sets (RLP's found target modules) are not JSON
            out[name] = {k: sorted(v) if isinstance(v, set) else v for k, v in part.to_dict().items()}
        return out


def _part(cls: type[PeftConfig], value: PeftConfig | dict | None, name: str) -> PeftConfig:
    """``value`` as a ``cls`` instance; a dict from JSON goes through ``from_peft_type`` (which warns about fields
    this version does not know)."""
    if isinstance(value, cls):
        return value
    expected = {"lorsu": "LORSU", "rlp": "RLP"}[name]
    if isinstance(value, dict):
        if value.get("peft_type", expected) != expected:
            raise ValueError(f"LoRSURLPConfig.{name} holds a {value['peft_type']} config, expected {expected}")
        return cls.from_peft_type(**{**value, "peft_type": expected})
    raise ValueError(f"LoRSURLPConfig.{name} must be a {cls.__name__} (or its dict), got {type(value).__name__}")
