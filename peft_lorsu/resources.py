"""Files shipped with the package (CLIP tokenizer, the pretrained mini-CLIP) and loading a CLIP by name or path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent / "assets"
CLIP_TOKENIZER = ASSETS / "clip-tokenizer"
MINI_CLIP = ASSETS / "mini-clip"


def default_model() -> str:
    """The packaged mini-CLIP (see its model card), the default of every command-line model option."""
    if not (MINI_CLIP / "config.json").exists():
        raise FileNotFoundError(f"the packaged mini-CLIP is missing from {MINI_CLIP}; pass --model NAME_OR_PATH")
    return str(MINI_CLIP)


def load_clip(name_or_path: str | None = None) -> tuple[Any, Any]:
    """``(CLIPModel, CLIPTokenizer)`` from a hub name or local folder (default: the packaged mini-CLIP), in eval mode.

    Folders without tokenizer files get the packaged OpenAI CLIP BPE tokenizer.
    """
    from transformers import CLIPModel, CLIPTokenizer

    path = name_or_path or default_model()
    model = CLIPModel.from_pretrained(path).eval()
    has_tokenizer = Path(path).is_dir() and (Path(path) / "vocab.json").exists()
    tokenizer = CLIPTokenizer.from_pretrained(path if has_tokenizer or not Path(path).is_dir() else CLIP_TOKENIZER)
    return model, tokenizer


def tiny_random_clip(image_size: int = 28, seed: int = 0) -> tuple[Any, Any]:
    """``(CLIPModel, CLIPTokenizer)``: a random CLIP small enough for smoke tests (2 + 2 layers of width 32, 4 heads)
    with the real CLIP vocabulary, and the packaged tokenizer. Nothing is downloaded."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    torch.manual_seed(seed)
    config = CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=image_size // 2),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=32, vocab_size=49408, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        projection_dim=16,
    )
    return CLIPModel(config).eval(), CLIPTokenizer.from_pretrained(CLIP_TOKENIZER)
