"""peft-lorsu: LoRSU and RLP as PEFT tuner types for CLIP-style models.

Importing the package registers both methods with PEFT, after which ``get_peft_model``,
``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` handle them like PEFT's own methods.
"""

from .lorsu import HeadLoRALinear, LoRSUConfig, LoRSULayer, LoRSUModel, SparseLinear, probe_lorsu

__version__ = "0.1.0"

__all__ = [
    "HeadLoRALinear",
    "LoRSUConfig",
    "LoRSULayer",
    "LoRSUModel",
    "SparseLinear",
    "__version__",
    "probe_lorsu",
]
