"""Models, batches, losses and the methods the cost benchmark compares (``python -m benchmarks.perf``).

Vision side: a random-weight ``CLIPVisionModelWithProjection`` (weights do not change the cost) trained with a
CLIP zero-shot-style loss, ``cross_entropy(s * norm(image_embeds) @ norm(T)^T, labels)`` against fixed random class
embeddings ``T``; the frozen text tower is left out, so every method's extra work is measured against the image
encoder alone (the most demanding ratio). Text side: a random ``CLIPTextModelWithProjection`` whose class prompts
``[SOS] a photo of a <class tokens> . [EOS]`` are scored against fixed image embeddings (CoOp's setting).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from peft_lorsu import LoRSUConfig, RLPConfig, probe_lorsu

from .perf_dense_masked import apply_dense_masked

LOGIT_SCALE = 100.0  # CLIP's trained exp(logit_scale)
CONTEXT_IDS = [320, 1125, 539, 320]  # "a photo of a" in OpenAI's CLIP BPE (peft_lorsu/assets/clip-tokenizer)
SOS, EOS = 49406, 49407

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass(frozen=True)
class VisionShape:
    """A CLIP image-encoder shape: ``layers`` blocks of width ``width`` with ``heads`` heads, fc1 width ``mlp``."""

    name: str
    layers: int
    width: int
    heads: int
    mlp: int
    image_size: int
    patch: int
    projection: int

    @property
    def tokens(self) -> int:
        """Sequence length: patches plus the class token."""
        return (self.image_size // self.patch) ** 2 + 1

    def config(self) -> CLIPVisionConfig:
        return CLIPVisionConfig(
            hidden_size=self.width,
            intermediate_size=self.mlp,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            image_size=self.image_size,
            patch_size=self.patch,
            projection_dim=self.projection,
        )


@dataclass(frozen=True)
class TextShape:
    """A CLIP text-encoder shape; ``context`` is the prompt length (77 in CLIP)."""

    name: str
    layers: int
    width: int
    heads: int
    mlp: int
    context: int
    projection: int

    def config(self) -> CLIPTextConfig:
        return CLIPTextConfig(
            hidden_size=self.width,
            intermediate_size=self.mlp,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            max_position_embeddings=self.context,
            projection_dim=self.projection,
            bos_token_id=SOS,
            eos_token_id=EOS,
        )


VISION_SHAPES = {
    "tiny": VisionShape("tiny", layers=2, width=64, heads=4, mlp=256, image_size=32, patch=8, projection=32),
    "ViT-B/16": VisionShape(
        "ViT-B/16", layers=12, width=768, heads=12, mlp=3072, image_size=224, patch=16, projection=512
    ),
    # the CPU's compiled rows: ViT-B/16's layers, fewer of them (inductor's compile time grows with the depth)
    "ViT-B/16 x 4 layers": VisionShape(
        "ViT-B/16 x 4 layers", layers=4, width=768, heads=12, mlp=3072, image_size=224, patch=16, projection=512
    ),
    # the CPU's bf16 rows: this shape keeps emulated bf16 matmuls (about 30x fp32's time on a CPU without bf16
    # units) to seconds per step
    "small": VisionShape("small", layers=4, width=128, heads=4, mlp=512, image_size=112, patch=16, projection=64),
    "ViT-L/14": VisionShape(
        "ViT-L/14", layers=24, width=1024, heads=16, mlp=4096, image_size=224, patch=14, projection=768
    ),
}
TEXT_SHAPES = {
    "tiny": TextShape("tiny", layers=2, width=64, heads=4, mlp=256, context=16, projection=32),
    "ViT-B/16": TextShape("ViT-B/16", layers=12, width=512, heads=8, mlp=2048, context=77, projection=512),
}


def vision_model(shape: VisionShape, seed: int = 0) -> CLIPVisionModelWithProjection:
    """Random-weight image encoder with its projection, fp32, eval mode."""
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(shape.config()).eval()


def text_model(shape: TextShape, seed: int = 0) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(shape.config()).eval()


def vision_batch(shape: VisionShape, batch_size: int, num_classes: int = 10, seed: int = 0) -> Batch:
    """``pixel_values`` `(B, 3, H, W)`, ``labels`` `(B,)` and unit ``class_embeds`` `(num_classes, projection)`."""
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(batch_size, 3, shape.image_size, shape.image_size, generator=g),
        "labels": torch.randint(0, num_classes, (batch_size,), generator=g),
        "class_embeds": F.normalize(torch.randn(num_classes, shape.projection, generator=g), dim=-1),
    }


def image_class_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of ``s * cos(image embedding, class embedding)``: CLIP's zero-shot head as a training loss."""
    image = F.normalize(model(pixel_values=batch["pixel_values"]).image_embeds, dim=-1)
    return F.cross_entropy(LOGIT_SCALE * image @ batch["class_embeds"].t(), batch["labels"])


def prompt_batch(shape: TextShape, num_classes: int, batch_size: int, seed: int = 0) -> Batch:
    """Class prompts ``input_ids`` `(C, context)` carrying the context tokens, image embeddings `(B, o)`, labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(num_classes, shape.context, dtype=torch.long)
    for c in range(num_classes):
        name = torch.randint(1000, 40000, (1 + c % 3,), generator=g).tolist()
        tokens = [SOS, *CONTEXT_IDS, *name, 269, EOS]  # 269: "."
        ids[c, : len(tokens)] = torch.tensor(tokens[: shape.context])
    return {
        "input_ids": ids,
        "image_embeds": F.normalize(torch.randn(batch_size, shape.projection, generator=g), dim=-1),
        "labels": torch.randint(0, num_classes, (batch_size,), generator=g),
    }


def prompt_class_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """CoOp's loss: every class prompt is encoded each step and scored against the (fixed) image embeddings."""
    text = F.normalize(model(input_ids=batch["input_ids"]).text_embeds, dim=-1)
    return F.cross_entropy(LOGIT_SCALE * batch["image_embeds"] @ text.t(), batch["labels"])


@dataclass
class Trainee:
    """One method ready to train: its model, optimizer, batch and loss.

    ``step()`` runs forward, backward and the optimizer step, then frees the gradients, so that between steps only
    weights, buffers and optimizer state are alive (what :func:`perf_measure.static_bytes` counts).
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    batch: Batch
    loss_fn: LossFn
    adapter_buffers: list[torch.Tensor] = field(default_factory=list)
    config: LoRSUConfig | None = None
    autocast: torch.dtype | None = None  # the forward runs under torch.autocast to this dtype

    def step(self) -> None:
        device_type = next(iter(self.batch.values())).device.type
        with torch.autocast(device_type, dtype=self.autocast, enabled=self.autocast is not None):
            loss = self.loss_fn(self.model, self.batch)
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        for value in self.batch.values():
            value.grad = None

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def _adam(model: nn.Module) -> torch.optim.Adam:
    """Adam without weight decay, as in the reference run (masked-out fc1 entries of ``dense_masked`` stay put)."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)


@dataclass(frozen=True)
class LoRSUKnobs:
    """LoRSU's settings in the benchmark (the paper's example run by default)."""

    r: int = 64
    top_k_heads: int = 2
    sparsity: float = 0.1

    def config(self, selection: str = "gradient") -> LoRSUConfig:
        return LoRSUConfig(
            r=self.r, lora_alpha=self.r, top_k_heads=self.top_k_heads, sparsity=self.sparsity, selection=selection
        )


def probed_config(base: nn.Module, batch: Batch, knobs: LoRSUKnobs, selection: str) -> LoRSUConfig:
    """A LoRSU config with heads and fc1 entries chosen by the gradient probe on ``batch`` (or at random)."""
    config = knobs.config(selection)
    probe_lorsu(base, config, [batch], loss_fn=image_class_loss, num_batches=1, show_progress=False)
    return config


VISION_METHODS = {
    "lorsu": "LoRSU, default parts (heads q/k/v low-rank, fc1 sparse, biases, projection); probe selection",
    "lorsu_random": "LoRSU as above with selection='random' (fc1 entries spread over the whole matrix)",
    "lora": "peft LoRA on q/k/v of every layer, same rank",
    "lora_mlp": "peft LoRA on q/k/v and fc1 of every layer, same rank (trains the MLP like LoRSU)",
    "full": "full fine-tuning of the image encoder and its projection",
    "dense_masked": "LoRSU written plainly: full-size U with a row mask, fc1 weight trained with its gradient masked",
    "backprop_floor": "no trainable weight, input gradients through every layer: the floor of any adapter",
}


def build_vision(
    name: str,
    base: nn.Module,
    batch: Batch,
    knobs: LoRSUKnobs,
    selection: LoRSUConfig | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Trainee:
    """A :class:`Trainee` for method ``name`` (see ``VISION_METHODS``) on a copy of ``base``, on ``device``, its
    weights (adapters included) and floating inputs in ``dtype``.

    ``selection`` (a probed LoRSU config) is reused by ``dense_masked`` so both train the same entries. The method is
    built (and LoRSU probed) on ``base`` as given, then moved.
    """
    model = copy.deepcopy(base)
    config = None
    buffers: list[torch.Tensor] = []
    if name in ("lorsu", "lorsu_random"):
        config = probed_config(base, batch, knobs, "gradient" if name == "lorsu" else "random")
        model = get_peft_model(model, config)
        buffers = [b for n, b in model.named_buffers() if "lorsu_" in n]
    elif name in ("lora", "lora_mlp"):
        targets = ["q_proj", "k_proj", "v_proj"] + (["fc1"] if name == "lora_mlp" else [])
        model = get_peft_model(model, LoraConfig(r=knobs.r, lora_alpha=knobs.r, target_modules=targets))
    elif name == "full":
        model.requires_grad_(True)
    elif name == "dense_masked":
        config = selection or probed_config(base, batch, knobs, "gradient")
        buffers = apply_dense_masked(model, config)
    elif name == "backprop_floor":
        model.requires_grad_(False)
    else:
        raise ValueError(f"unknown vision method {name!r}; known: {sorted(VISION_METHODS)}")
    model.train().to(device, dtype)
    batch = {k: v.detach().to(device, dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}
    if name == "backprop_floor":
        batch["pixel_values"].requires_grad_(True)
    if name in ("lorsu", "lorsu_random"):  # the buffers as they are now, on the device
        buffers = [b for n, b in model.named_buffers() if "lorsu_" in n]
    optimizer = _adam(model) if any(p.requires_grad for p in model.parameters()) else None
    return Trainee(name, model, optimizer, batch, image_class_loss, buffers, config)


TEXT_METHODS = {
    "rlp": "RLP: context P = P_fr + P_A @ P_B (rank 1), n_ctx = 4",
    "coop": "CoOp: RLPConfig(mode='full_rank'), the (n_ctx, d) context itself",
}


def build_text(name: str, base: nn.Module, batch: Batch, device: str = "cpu") -> Trainee:
    if name not in TEXT_METHODS:
        raise ValueError(f"unknown text method {name!r}; known: {sorted(TEXT_METHODS)}")
    mode = "low_rank" if name == "rlp" else "full_rank"
    model = get_peft_model(copy.deepcopy(base), RLPConfig(init_token_ids=list(CONTEXT_IDS), mode=mode)).train()
    model.to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    buffers = [b for n, b in model.named_buffers() if "rlp_" in n]
    return Trainee(name, model, _adam(model), batch, prompt_class_loss, buffers)
