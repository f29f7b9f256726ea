"""LoRSU-Ppl: LoRSU on the vision tower of a LLaVA-style model, trained through the language model's next-token loss.

In the LoRSU paper's VLM experiments the image encoder is adapted *inside* the VLM on image-question-answer data, with
the loss the VLM was trained with (the perplexity of the answer). That variant differs from the CLIP-loss recipe:

- separate q/k/v input factors (``share_qkv_factor=False``) with PEFT's init (``V`` random, ``U`` zero);
- no projection adapter; fc1's bias trained, the q/k/v biases frozen (``train_biases=["mlp"]``), as in the
  authors' LLaVA code;
- only the layers whose output the VLM reads: LLaVA feeds its language model ``hidden_states[vision_feature_layer]``
  (default ``-2``), so the last layer is computed but unused. LoRSU's targeting leaves such layers out by itself
  (:func:`peft_lorsu.lorsu.targets.vlm_read_layers`).

The language model and the multimodal projector are frozen like every module PEFT does not wrap.

Example::

    config = lorsu_ppl_config(r=64, lora_alpha=64, top_k_heads=2, sparsity=0.1)
    loader = DataLoader(examples, batch_size=8, collate_fn=VQACollator(processor))
    probe_lorsu(llava, config, loader)          # the model's own loss: `labels` cover the answer tokens only
    model = get_peft_model(llava, config)       # then train with any loop on the same batches
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import LoRSUConfig

IGNORE_INDEX = -100

# The variant's settings; everything else keeps LoRSUConfig's defaults.
PPL_DEFAULTS: dict[str, Any] = {
    "tower": "vision",
    "share_qkv_factor": False,
    "init_weights": "lora",
    "adapt_projection": False,
    "train_biases": ["mlp"],
}

# A LLaVA-1.5 style single-image chat: "USER: <image>\n{question} ASSISTANT: {answer}</s>". Real checkpoints ship
# their own template with the processor; this one serves processors built in code.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% else %} ASSISTANT: {% for part in message['content'] %}{{ part['text'] }}{% endfor %}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def lorsu_ppl_config(**overrides: Any) -> LoRSUConfig:
    """A :class:`LoRSUConfig` for the perplexity-loss (VLM) variant; ``overrides`` set any field, e.g. ``r``."""
    return LoRSUConfig(**{**PPL_DEFAULTS, **overrides})


def vqa_messages(question: str, answer: str | None = None) -> list[dict[str, Any]]:
    """One image-question turn (and the answer turn when given) in the chat-message format of processors."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


@dataclass
class VQACollator:
    """Image-question-answer examples -> batches of a LLaVA-style model whose ``labels`` score only the answer.

    Each example is a mapping with ``image`` (anything the processor's image processor takes), ``question`` and
    ``answer``. The prompt (with the processor's chat template and generation prompt) goes through the processor,
    which expands the image placeholder into the model's image tokens; the answer turn is the rest of the rendered
    conversation, tokenised on its own, so prompt and answer split exactly.

    Args:
        processor: a ``LlavaProcessor`` (or any processor with ``apply_chat_template``, ``__call__(images=, text=)``
            and ``tokenizer``).
        max_length: cut the answer so a sequence has at most this many tokens (the prompt is never cut).

    Returns (per call), for batch size ``B`` and longest sequence ``T``:
        ``input_ids`` `(B, T)`, ``attention_mask`` `(B, T)`, ``labels`` `(B, T)` (``-100`` on prompt and padding),
        ``pixel_values`` `(B, 3, H, W)` and any other tensor the processor returns per image.
    """

    processor: Any
    max_length: int | None = None

    def _split(self, question: str, answer: str) -> tuple[str, str]:
        prompt = self.processor.apply_chat_template(vqa_messages(question), add_generation_prompt=True)
        full = self.processor.apply_chat_template(vqa_messages(question, answer))
        if not full.startswith(prompt):
            raise ValueError(
                "VQACollator: the chat template's generation prompt is not a prefix of the rendered answer turn "
                f"({prompt!r} vs {full!r}); use a template whose assistant turn starts with the generation prompt"
            )
        return prompt, full[len(prompt) :]

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("VQACollator: empty batch")
        tokenizer = self.processor.tokenizer
        ids, labels, extras = [], [], []
        for example in examples:
            missing = [k for k in ("image", "question", "answer") if k not in example]
            if missing:
                raise KeyError(f"VQACollator: example lacks {missing}; it needs image, question and answer")
            prompt, answer = self._split(example["question"], example["answer"])
            encoded = self.processor(images=[example["image"]], text=[prompt], return_tensors="pt")
            prompt_ids = encoded.pop("input_ids")[0].tolist()
            encoded.pop("attention_mask", None)
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            if self.max_length is not None:
                if len(prompt_ids) >= self.max_length:
                    raise ValueError(
                        f"VQACollator.max_length={self.max_length} leaves no room for the answer: the prompt "
                        f"alone has {len(prompt_ids)} tokens"
                    )
                answer_ids = answer_ids[: self.max_length - len(prompt_ids)]
            ids.append(prompt_ids + answer_ids)
            labels.append([IGNORE_INDEX] * len(prompt_ids) + answer_ids)
            extras.append(encoded)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        length = max(len(row) for row in ids)
        batch = {
            "input_ids": torch.tensor([row + [pad] * (length - len(row)) for row in ids]),
            "attention_mask": torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in ids]),
            "labels": torch.tensor([row + [IGNORE_INDEX] * (length - len(row)) for row in labels]),
        }
        for key in extras[0]:
            batch[key] = torch.cat([torch.as_tensor(extra[key]) for extra in extras])
        return batch
