"""``peft-lorsu demo``: probe, adapt, save and reload a CLIP model with LoRSU, end to end on CPU."""

from __future__ import annotations

import copy
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import CLIPConfig, CLIPModel

from .lorsu import LoRSUConfig, probe_lorsu
from .training import fit

logger = logging.getLogger(__name__)


@dataclass
class SyntheticDemoConfig:
    """Settings of the synthetic demo (a tiny random CLIP on class-patterned images)."""

    num_classes: int = 8
    samples_per_class: int = 16
    batch_size: int = 16
    epochs: int = 5
    lr: float = 3e-3
    seed: int = 0
    output_dir: str | None = None


def synthetic_pairs(num_classes: int, per_class: int, image_size: int, vocab: int, seed: int) -> list[dict]:
    """Image-caption pairs: each class is a fixed random pattern plus noise, captioned ``[BOS, class token, EOS]``.

    Returns a list of samples with ``pixel_values`` `(3, S, S)` and ``input_ids`` `(3,)`.
    """
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(num_classes, 3, image_size, image_size, generator=g)
    samples = []
    for c in range(num_classes):
        for _ in range(per_class):
            image = patterns[c] + 0.5 * torch.randn(3, image_size, image_size, generator=g)
            samples.append({"pixel_values": image, "input_ids": torch.tensor([0, 3 + c, 2]), "label": c})
    order = torch.randperm(len(samples), generator=g).tolist()
    return [samples[i] for i in order]


def collate(samples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "input_ids": torch.stack([s["input_ids"] for s in samples]),
    }


def tiny_random_clip(seed: int) -> CLIPModel:
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=64,
            max_position_embeddings=8,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=8,
            image_size=16,
            patch_size=4,
        ),
        projection_dim=32,
    )
    return CLIPModel(config).eval()


def run_synthetic_demo(cfg: SyntheticDemoConfig) -> dict:
    """Run the synthetic demo and return its figures (losses, parameter counts, reload difference)."""
    model = tiny_random_clip(cfg.seed)
    data = synthetic_pairs(cfg.num_classes, cfg.samples_per_class, 16, 64, cfg.seed)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=cfg.batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    base = copy.deepcopy(model)
    config = LoRSUConfig(r=8, lora_alpha=8, top_k_heads=2, sparsity=0.1)
    print("1/4 probing gradients to choose heads and fc1 entries")
    probe_lorsu(model, config, loader)
    print(_heads_table(config))
    peft_model = get_peft_model(model, config)
    lorsu_params = peft_model.get_nb_trainable_parameters()[0]
    full_params = sum(p.numel() for p in base.vision_model.parameters()) + base.visual_projection.weight.numel()
    print(
        f"2/4 trainable parameters: LoRSU {lorsu_params:,} vs full fine-tuning of the vision encoder "
        f"{full_params:,} ({100 * lorsu_params / full_params:.1f}%)"
    )
    print("3/4 training with the CLIP contrastive loss")
    result = fit(peft_model, loader, epochs=cfg.epochs, lr=cfg.lr)
    print("    mean loss per epoch: " + " -> ".join(f"{loss:.3f}" for loss in result.epoch_losses))
    out_dir = Path(cfg.output_dir or tempfile.mkdtemp(prefix="lorsu-demo-"))
    peft_model.save_pretrained(out_dir)
    reloaded = PeftModel.from_pretrained(base, out_dir).eval()
    batch = collate(data[: cfg.batch_size])
    with torch.no_grad():
        diff = (peft_model(**batch).logits_per_image - reloaded(**batch).logits_per_image).abs().max().item()
    files = sorted(p.name for p in out_dir.iterdir())
    print(f"4/4 adapter saved to {out_dir} ({', '.join(files)}); reloaded outputs differ by {diff:.1e}")
    return {
        "epoch_losses": result.epoch_losses,
        "lorsu_params": lorsu_params,
        "full_params": full_params,
        "reload_max_abs_diff": diff,
        "output_dir": str(out_dir),
    }


def _heads_table(config: LoRSUConfig) -> str:
    lines = ["    layer  selected heads  head scores"]
    for block, heads in (config.selected_heads or {}).items():
        layer = block.split(".layers.")[-1].split(".")[0]
        scores = " ".join(f"{s:.2e}" for s in config.head_scores[block])
        lines.append(f"    {layer:>5}  {str(heads):<14}  {scores}")
    return "\n".join(lines)
