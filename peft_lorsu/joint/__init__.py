"""LoRSU on the image tower and RLP on the text tower of one CLIP model, trained, saved and loaded as one adapter."""

from .config import LoRSURLPConfig
from .model import LoRSURLPModel, save_parts, trainable_parameters_by_part

__all__ = ["LoRSURLPConfig", "LoRSURLPModel", "save_parts", "trainable_parameters_by_part"]
