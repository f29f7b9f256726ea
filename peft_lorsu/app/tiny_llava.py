"""A tiny random LLaVA, its processor and a synthetic colour-VQA set, all built in code (no downloads).

For dry runs of LoRSU-Ppl and for tests: a CLIP vision tower of ``vision_layers`` layers (16 px images in 8 px patches,
so 4 image tokens), a 2-layer Llama language model and a word-level tokenizer over a few dozen words, wired together by
a real ``LlavaProcessor`` with :data:`~peft_lorsu.lorsu.ppl.LLAVA_CHAT_TEMPLATE`.
"""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from ..lorsu.ppl import LLAVA_CHAT_TEMPLATE

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
COLORS = {"red": (220, 40, 40), "green": (40, 200, 70), "blue": (40, 70, 220), "yellow": (230, 220, 50)}
QUESTION = "what color is the square ?"
WORDS = ("USER", "ASSISTANT", ":", *QUESTION.split(), *COLORS, "a", "photo", "of", "yes", "no")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over :data:`WORDS` (split at whitespace and punctuation) plus the special tokens."""
    vocab = {token: i for i, token in enumerate(dict.fromkeys((*SPECIAL_TOKENS, *WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )


def _image_processor(image_size: int):
    # transformers 5 picks a torchvision backend for CLIPImageProcessor when it can; the PIL one needs nothing extra
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:  # older transformers: the plain class is the PIL/numpy one
        from transformers import CLIPImageProcessor as Processor
    return Processor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def tiny_llava_processor(image_size: int = 16, patch_size: int = 8) -> LlavaProcessor:
    """A ``LlavaProcessor`` for :func:`tiny_llava`: ``(image_size / patch_size)^2`` image tokens per image."""
    return LlavaProcessor(
        image_processor=_image_processor(image_size),
        tokenizer=tiny_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, which the "default" strategy drops again
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def tiny_llava(
    processor: LlavaProcessor,
    seed: int = 0,
    vision_layers: int = 3,
    width: int = 32,
    heads: int = 4,
    vision_feature_layer: int | list[int] = -2,
) -> LlavaForConditionalGeneration:
    """A random LLaVA matching ``processor``: CLIP vision tower ``width`` x ``vision_layers``, 2-layer Llama."""
    tokenizer = processor.tokenizer
    image_size = processor.image_processor.crop_size["height"]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=vision_layers,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=processor.patch_size,
        ),
        text_config=LlamaConfig(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,
            vocab_size=len(tokenizer),
            max_position_embeddings=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def color_vqa(n: int, image_size: int = 16, seed: int = 0) -> list[dict]:
    """``n`` examples: a grey noise image `(S, S, 3)` uint8 with a coloured square; answer: the colour's name."""
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    examples = []
    for i in range(n):
        image = rng.integers(90, 150, size=(image_size, image_size, 3), dtype=np.uint8)
        side = image_size // 2
        y, x = rng.integers(0, image_size - side + 1, size=2)
        color = names[i % len(names)]
        image[y : y + side, x : x + side] = COLORS[color]
        examples.append({"image": image, "question": QUESTION, "answer": color})
    return examples
