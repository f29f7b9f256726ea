"""Shared fixtures: tiny random CLIP models built in code (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import CLIPModel, CLIPTokenizer  # noqa: E402

from peft_lorsu import compat  # noqa: E402
from peft_lorsu.app.models import CLIP_TOKENIZER, tiny_clip_config  # noqa: E402  (the one tiny-CLIP builder)

VOCAB = 99  # the small vocabulary of tiny_clip_config(real_vocab=False)

# The joint LoRSU + RLP tuner is refused on peft < 0.21 (compat.STRUCTURAL_STATE_DICT); tests/core/test_compat.py
# checks that refusal, the tests that use the joint adapter skip there.
needs_structural_peft = pytest.mark.skipif(
    not compat.STRUCTURAL_STATE_DICT,
    reason=f"the joint LoRSU+RLP adapter needs peft >= 0.21, found peft {compat.PEFT_VERSION}",
)


# Tests about numbers (kernels, gradients, merge equality, compiled steps, host synchronisation) take the `device`
# fixture: they run on the CPU, and again on CUDA where a GPU is present (skipped with the reason otherwise).
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def to_device(batch: dict, device: str) -> dict:
    """``batch`` with every tensor on ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def tiny_clip(seed: int = 0, **kwargs) -> CLIPModel:
    torch.manual_seed(seed)
    return CLIPModel(tiny_clip_config(**kwargs)).eval()


def clip_batches(n: int = 3, batch_size: int = 4, image_size: int = 16, seq_len: int = 7, seed: int = 0) -> list[dict]:
    """``n`` dict batches of random pixel_values `(B, 3, S, S)` and input_ids `(B, T)` ending in the EOS id 2."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=g)
        ids[:, 0], ids[:, -1] = 0, 2
        batches.append(
            {"pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=g), "input_ids": ids}
        )
    return batches


def clip_tokenizer() -> CLIPTokenizer:
    """The real CLIP BPE tokenizer shipped in the package assets."""
    return CLIPTokenizer.from_pretrained(CLIP_TOKENIZER)


@pytest.fixture
def clip_model() -> CLIPModel:
    return tiny_clip()


@pytest.fixture
def batches() -> list[dict]:
    return clip_batches()
