"""Turning labelled images into CLIP inputs: domain shifts, pixel values, captions from templates, a captioned
Dataset."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

SHIFT_KINDS = ("inverted", "rotated", "low_contrast")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CAPTION_TEMPLATES = (
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a small grayscale image of the {}.",
    "a picture of a {}.",
)


def to_pixel_values(
    images: torch.Tensor,
    image_size: int | None = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """Turn uint8 grey images (N, H, W) or (H, W) into CLIP ``pixel_values`` float32 (N, 3, S, S).

    The grey channel is replicated to RGB, scaled to [0, 1], resized to ``image_size`` (bicubic, only when it
    differs from H) and normalised per channel with ``mean`` / ``std`` (OpenAI CLIP's by default).
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.dim() == 2:
        images = images[None]
    if images.dim() != 3:
        raise ValueError(f"images must have shape (N, H, W) or (H, W), got {tuple(images.shape)}")
    x = images.float().div(255.0)[:, None]
    if image_size is not None and image_size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False)
        x = x.clamp(0, 1)
    x = x.expand(-1, 3, -1, -1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).contiguous()


def fill_template(template: str, class_name: str) -> str:
    """Format a caption template with a class name, using "an" before a vowel ("an elephant")."""
    return re.sub(r"\ba (?=[aeiou])", "an ", template.format(class_name))


def class_prompts(class_names: Sequence[str], templates: Sequence[str] = CAPTION_TEMPLATES) -> list[list[str]]:
    """Prompts for zero-shot classification: ``result[c][t]`` is template t filled with class c."""
    return [[fill_template(t, c) for t in templates] for c in class_names]


def random_captions(
    labels: Sequence[int] | torch.Tensor,
    class_names: Sequence[str],
    seed: int,
    templates: Sequence[str] = CAPTION_TEMPLATES,
) -> list[str]:
    """One caption per label: a template drawn with ``seed`` (in order), filled with the class name."""
    rng = random.Random(seed)
    return [fill_template(rng.choice(templates), class_names[int(label)]) for label in labels]


class CaptionedImages(Dataset):
    """A torch Dataset over :class:`~peft_lorsu.app.data.LabeledImages`, for the core's ``ImageTextCollator``.

    Item i is ``{"pixel_values": (3, S, S), "label": int, "caption": str}``; captions come from
    :func:`random_captions` with ``seed`` (fixed per item), pixel values from :func:`to_pixel_values`.
    """

    def __init__(self, data: Any, image_size: int | None = None, seed: int = 0) -> None:
        if len(data.images) != len(data.labels):
            raise ValueError(f"{len(data.images)} images but {len(data.labels)} labels")
        self.data, self.image_size = data, image_size
        self.captions = random_captions(data.labels, data.class_names, seed)

    def __len__(self) -> int:
        return len(self.data.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pixel_values = to_pixel_values(self.data.images[index], self.image_size)[0]
        return {"pixel_values": pixel_values, "label": int(self.data.labels[index]), "caption": self.captions[index]}


def shift_domain(images: torch.Tensor, kind: str, angle: float = 90.0, contrast: float = 0.3) -> torch.Tensor:
    """Return a domain-shifted copy of uint8 images (N, H, W): same shape and dtype, same labels apply.

    Args:
        kind: ``"inverted"`` (255 - x), ``"rotated"`` (by ``angle`` degrees counter-clockwise about the centre;
            exact for multiples of 90) or ``"low_contrast"`` (pixel values pulled towards mid-grey:
            ``127.5 + contrast * (x - 127.5)``).
    """
    if kind not in SHIFT_KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {SHIFT_KINDS}")
    if kind == "inverted":
        return 255 - images
    if kind == "low_contrast":
        if not 0.0 < contrast <= 1.0:
            raise ValueError(f"contrast={contrast} must lie in (0, 1]")
        return (127.5 + contrast * (images.float() - 127.5)).round().clamp(0, 255).to(torch.uint8)
    if angle % 90 == 0:
        return torch.rot90(images, k=int(angle // 90) % 4, dims=(-2, -1)).contiguous()
    theta = torch.deg2rad(torch.tensor(angle, dtype=torch.float32))
    cos, sin = torch.cos(theta), torch.sin(theta)
    affine = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]]).expand(len(images), 2, 3)
    grid = torch.nn.functional.affine_grid(affine, [len(images), 1, *images.shape[-2:]], align_corners=False)
    rotated = torch.nn.functional.grid_sample(images[:, None].float(), grid, align_corners=False)
    return rotated[:, 0].round().clamp(0, 255).to(torch.uint8)
