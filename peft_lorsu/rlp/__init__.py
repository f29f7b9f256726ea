"""RLP: re-parameterised low-rank prompts (arXiv 2312.10813) for CLIP's text encoder, as a PEFT tuner."""

from .config import RLPConfig
from .layer import RLPLayer, RLPTextEmbedding
from .model import RLPModel

__all__ = ["RLPConfig", "RLPLayer", "RLPModel", "RLPTextEmbedding"]
