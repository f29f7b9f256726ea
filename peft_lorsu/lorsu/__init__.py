"""LoRSU: Low-Rank Structured Updates of CLIP-style encoders (arXiv 2407.16526)."""

from ..registry import register
from .config import LoRSUConfig
from .layer import HeadLoRALinear, LoRSULayer, SparseLinear
from .model import LoRSUModel
from .probe import probe_lorsu
from .targets import find_sites

register("lorsu", LoRSUConfig, LoRSUModel, prefix="lorsu_")

__all__ = ["HeadLoRALinear", "LoRSUConfig", "LoRSULayer", "LoRSUModel", "SparseLinear", "find_sites", "probe_lorsu"]
