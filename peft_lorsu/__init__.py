"""peft-lorsu: LoRSU and RLP as PEFT tuner types for CLIP-style models.

Importing the package registers LoRSU, RLP and the joint LoRSU + RLP adapter with PEFT (``peft_lorsu.registration``),
after which ``get_peft_model``, ``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` handle them like
PEFT's own methods. This package is the plugin core; the command line, the continual runner, the demo and the data
sources live in ``peft_lorsu.app``, which builds on it.
"""

from . import registration  # noqa: F401  (registers the three methods with peft, once)
from .hub import push_adapter_to_hub, record_card_info
from .joint import LoRSURLPConfig, LoRSURLPModel
from .loading import safe_load_adapter
from .lorsu import HeadLoRALinear, LoRSUConfig, LoRSULayer, LoRSUModel, SparseLinear, probe_lorsu
from .objectives import (
    BaseToNewResult,
    ZeroShotClassifier,
    base_to_new_split,
    build_class_prompts,
    class_cross_entropy,
    class_prompt_probe_loss,
    clip_contrastive_loss,
    evaluate_base_to_new,
    harmonic_mean,
    zero_shot_accuracy,
)
from .rlp import RLPConfig, RLPModel, RLPTextEmbedding
from .saving import save_adapter_atomic

__version__ = "0.1.0"

__all__ = [
    "BaseToNewResult",
    "HeadLoRALinear",
    "LoRSUConfig",
    "LoRSULayer",
    "LoRSUModel",
    "LoRSURLPConfig",
    "LoRSURLPModel",
    "RLPConfig",
    "RLPModel",
    "RLPTextEmbedding",
    "SparseLinear",
    "ZeroShotClassifier",
    "__version__",
    "base_to_new_split",
    "build_class_prompts",
    "class_cross_entropy",
    "class_prompt_probe_loss",
    "clip_contrastive_loss",
    "evaluate_base_to_new",
    "harmonic_mean",
    "probe_lorsu",
    "push_adapter_to_hub",
    "record_card_info",
    "safe_load_adapter",
    "save_adapter_atomic",
    "zero_shot_accuracy",
]
