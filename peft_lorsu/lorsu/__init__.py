"""LoRSU: Low-Rank Structured Updates of CLIP-style encoders (arXiv 2407.16526)."""

from .config import LoRSUConfig
from .families import EncoderFamily, register_encoder_family, unregister_encoder_family
from .fused import HeadLoRAInProjection
from .layer import HeadLoRALinear, LoRSULayer
from .model import LoRSUModel
from .ppl import VQACollator, lorsu_ppl_config
from .probe import probe_lorsu
from .sparse import SparseLinear
from .targets import find_sites

__all__ = [
    "EncoderFamily",
    "HeadLoRAInProjection",
    "HeadLoRALinear",
    "LoRSUConfig",
    "LoRSULayer",
    "LoRSUModel",
    "SparseLinear",
    "VQACollator",
    "find_sites",
    "lorsu_ppl_config",
    "probe_lorsu",
    "register_encoder_family",
    "unregister_encoder_family",
]
