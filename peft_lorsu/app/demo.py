"""``peft-lorsu demo``: fix a pretrained CLIP's mistakes on real images with LoRSU, and keep what it knew.

The packaged mini-CLIP (pretrained here on Fashion-MNIST and Animal-MNIST, see its model card) has never seen
handwritten digits, so it classifies them near chance. The demo adapts it with LoRSU on a few real digit images and
shows the target accuracy rise while the control accuracy (Fashion-MNIST) stays, the heads the probe chose, the
adapter saved and reloaded, and a plot. Everything it needs ships with the package.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model

from ..compat import pooled_features
from ..hub import record_card_info
from ..lorsu import LoRSUConfig, probe_lorsu
from ..objectives import build_class_prompts, zero_shot_accuracy
from ..saving import save_adapter_atomic
from .data import DEMO_SPLITS, load_demo
from .inputs import to_pixel_values
from .models import load_clip
from .plots import MATPLOTLIB_MISSING, has_matplotlib, heads_table, plot_demo
from .sessions import ClassificationSet, EpochBatches, make_batches
from .training import fit

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Settings of the demo; the defaults take about a minute on 2 CPU cores."""

    epochs: int | None = None
    lr: float = 1e-3
    batch_size: int = 16
    r: int = 16
    lora_alpha: float = 16
    top_k_heads: int = 2
    sparsity: float = 0.1
    seed: int = 0
    output_dir: str = "lorsu-demo"
    default_epochs: int = 8


def _demo_sets(image_size: int) -> dict[str, ClassificationSet]:
    sets = {}
    for split in DEMO_SPLITS:
        data = load_demo(split)
        sets[split] = ClassificationSet(to_pixel_values(data.images, image_size), data.labels, list(data.class_names))
    return sets


def _accuracy(model, data: ClassificationSet, tokenizer) -> float:
    return zero_shot_accuracy(model, data.eval_batches(), build_class_prompts(data.class_names), tokenizer)


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo; print each step and return its figures."""

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_clip()
    sets = _demo_sets(model.config.vision_config.image_size)
    target_train, target_test, control = sets["target_train"], sets["target_test"], sets["control"]
    print(
        f"mini-CLIP ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters); target: "
        f"{len(target_train.labels)} training / {len(target_test.labels)} test handwritten digits; control: "
        f"{len(control.labels)} Fashion-MNIST images"
    )

    before = {"target": _accuracy(model, target_test, tokenizer), "control": _accuracy(model, control, tokenizer)}
    print(f"1/5 zero-shot accuracy: target {100 * before['target']:.1f}%, control {100 * before['control']:.1f}%")

    epochs = cfg.epochs or cfg.default_epochs
    everything = torch.arange(len(target_train.labels))
    # a fresh caption draw and order per epoch; the probe sees the first epoch's batches
    epoch_batches = [
        make_batches(target_train, everything, tokenizer, "contrastive", cfg.batch_size, True, seed=cfg.seed + e)
        for e in range(epochs)
    ]
    config = LoRSUConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, top_k_heads=cfg.top_k_heads, sparsity=cfg.sparsity)
    print("2/5 gradient probe: which heads matter for the new data")
    probe_lorsu(model, config, epoch_batches[0])
    print(heads_table(config))

    base = copy.deepcopy(model)
    peft_model = get_peft_model(model, config)
    lorsu_params = peft_model.get_nb_trainable_parameters()[0]
    full_params = sum(p.numel() for p in base.vision_model.parameters()) + base.visual_projection.weight.numel()
    print(
        f"3/5 LoRSU trains {lorsu_params:,} parameters, {100 * lorsu_params / full_params:.1f}% of the "
        f"{full_params:,} a full fine-tuning of the image encoder would"
    )
    result = fit(peft_model, EpochBatches(epoch_batches), epochs=epochs, lr=cfg.lr)
    print("    mean loss per epoch: " + " -> ".join(f"{v:.3f}" for v in result.epoch_losses))

    after = {
        "target": _accuracy(peft_model, target_test, tokenizer),
        "control": _accuracy(peft_model, control, tokenizer),
    }
    print(
        f"4/5 after LoRSU: target {100 * before['target']:.1f}% -> {100 * after['target']:.1f}%, control "
        f"{100 * before['control']:.1f}% -> {100 * after['control']:.1f}%"
    )

    out = Path(cfg.output_dir)
    record_card_info(
        peft_model,
        dataset=f"{len(target_train.labels)} handwritten digits (packaged demo set)",
        results={
            "target accuracy before": before["target"],
            "target accuracy after": after["target"],
            "control accuracy before": before["control"],
            "control accuracy after": after["control"],
        },
    )
    save_adapter_atomic(peft_model, out / "adapter")
    reloaded = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        sample = {"pixel_values": target_test.pixel_values[:8]}
        trained = pooled_features(peft_model.get_image_features(**sample))
        diff = (trained - pooled_features(reloaded.get_image_features(**sample))).abs().max().item()
    plot = out / "demo.png"
    if has_matplotlib():
        plot_demo(before, after, config, plot)
        plot_note = f"plot: {plot}"
    else:  # the demo's command installs no plotting library; everything else is printed above
        plot, plot_note = None, f"no plot: {MATPLOTLIB_MISSING}"
    seconds = time.perf_counter() - start
    print(
        f"5/5 adapter saved to {out / 'adapter'} and reloaded (max difference {diff:.1e}); {plot_note}"
        f"; {seconds:.0f} s in all"
    )
    return {
        "before": before,
        "after": after,
        "lorsu_params": lorsu_params,
        "full_params": full_params,
        "epoch_losses": result.epoch_losses,
        "reload_max_abs_diff": diff,
        "seconds": seconds,
        "selected_heads": config.selected_heads,
        "plot": None if plot is None else str(plot),
    }
