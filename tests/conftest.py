"""Shared fixtures: tiny random CLIP models built in code (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import CLIPConfig, CLIPModel  # noqa: E402

VOCAB = 99


def tiny_clip_config(
    width: int = 32,
    layers: int = 2,
    heads: int = 4,
    image_size: int = 16,
    text_width: int = 32,
    projection_dim: int = 16,
    real_vocab: bool = False,
) -> CLIPConfig:
    """A CLIP config small enough for a unit test: vision `width` x `layers`, `heads` heads, 4 image patches.

    ``real_vocab`` sizes the text tower for the real CLIP BPE tokenizer (:func:`clip_tokenizer`).
    """
    if real_vocab:
        ids = dict(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    else:
        ids = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    text = dict(
        hidden_size=text_width,
        intermediate_size=2 * text_width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32 if real_vocab else 16,
        **ids,
    )
    vision = dict(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=image_size // 2,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


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


def clip_tokenizer():
    """The real CLIP BPE tokenizer shipped in the package assets."""
    from transformers import CLIPTokenizer

    from peft_lorsu import __file__ as package_file

    return CLIPTokenizer.from_pretrained(os.path.join(os.path.dirname(package_file), "assets", "clip-tokenizer"))


@pytest.fixture
def clip_model() -> CLIPModel:
    return tiny_clip()


@pytest.fixture
def batches() -> list[dict]:
    return clip_batches()
