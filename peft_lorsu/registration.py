"""Registers LORSU, RLP and LORSU_RLP with peft, once, when ``peft_lorsu`` is imported.

After that, ``get_peft_model``, ``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` handle the three
methods like peft's own. peft looks a saved adapter's type up in its own tables only, so a process that loads a
LoRSU / RLP adapter must ``import peft_lorsu`` first (peft offers no entry point through which it would find the
plugin by itself).
"""

from __future__ import annotations

from .compat import register
from .joint.config import LoRSURLPConfig
from .joint.model import LoRSURLPModel
from .lorsu.config import LoRSUConfig
from .lorsu.model import LoRSUModel
from .rlp.config import RLPConfig
from .rlp.model import RLPModel

METHODS = (
    ("lorsu", LoRSUConfig, LoRSUModel),
    ("rlp", RLPConfig, RLPModel),
    ("lorsu_rlp", LoRSURLPConfig, LoRSURLPModel),
)

for _name, _config_cls, _model_cls in METHODS:
    register(_name, _config_cls, _model_cls, prefix=_model_cls.prefix)
