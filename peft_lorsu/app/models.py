"""Files shipped with the package (CLIP tokenizer, the pretrained mini-CLIP) and loading a CLIP by name or path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

ASSETS = Path(__file__).resolve().parents[1] / "assets"  # data shipped with the package (no code)
CLIP_TOKENIZER = ASSETS / "clip-tokenizer"
MINI_CLIP = ASSETS / "mini-clip"


def default_model() -> str:
    """The packaged mini-CLIP (see its model card), the default of every command-line model option."""
    if not (MINI_CLIP / "config.json").exists():
        raise FileNotFoundError(f"the packaged mini-CLIP is missing from {MINI_CLIP}; pass --model NAME_OR_PATH")
    return str(MINI_CLIP)


def load_clip(name_or_path: str | None = None) -> tuple[Any, Any]:
    """``(CLIPModel, CLIPTokenizer)`` from a hub name or local folder (default: the packaged mini-CLIP), in eval mode.

    Folders without tokenizer files (the packaged mini-CLIP among them) get the packaged OpenAI CLIP BPE tokenizer,
    its ``model_max_length`` set to the text tower's positions.
    """
    path = name_or_path or default_model()
    model = CLIPModel.from_pretrained(path).eval()
    if not Path(path).is_dir() or (Path(path) / "vocab.json").exists():
        return model, CLIPTokenizer.from_pretrained(path)
    positions = model.config.text_config.max_position_embeddings
    return model, CLIPTokenizer.from_pretrained(CLIP_TOKENIZER, model_max_length=positions)


def tiny_clip_config(
    width: int = 32,
    layers: int = 2,
    heads: int = 4,
    image_size: int = 16,
    text_width: int = 32,
    projection_dim: int = 16,
    real_vocab: bool = False,
) -> CLIPConfig:
    """A CLIP config small enough for smoke tests and unit tests: vision ``width`` x ``layers`` with ``heads`` heads
    and 4 image patches, a 2-layer text tower of ``text_width``.

    ``real_vocab`` sizes the text tower for the real CLIP BPE tokenizer (``CLIP_TOKENIZER``); otherwise it has 99
    tokens with start / pad / end ids 0 / 1 / 2.
    """
    if real_vocab:
        ids = dict(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    else:
        ids = dict(vocab_size=99, bos_token_id=0, eos_token_id=2, pad_token_id=1)
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


def tiny_random_clip(image_size: int = 28, seed: int = 0) -> tuple[CLIPModel, CLIPTokenizer]:
    """``(CLIPModel, CLIPTokenizer)``: a random CLIP from :func:`tiny_clip_config` with the real CLIP vocabulary, and
    the packaged tokenizer. Nothing is downloaded."""
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(image_size=image_size, real_vocab=True)).eval()
    return model, CLIPTokenizer.from_pretrained(CLIP_TOKENIZER)
