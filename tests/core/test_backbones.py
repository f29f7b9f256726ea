"""LoRSU beyond one CLIP class: every encoder family through probe, wrap, a training step, save/load and merge.

Each case is a tiny random model built in code: transformers' CLIP (two-tower, bare towers, text tower), SigLIP and
SigLIP2 (vision and text towers), ViT, DINOv2 (also with the SwiGLU MLP), LLaVA's vision tower, and an encoder laid
out like OpenCLIP's ViT (``torch.nn.MultiheadAttention`` with a fused in-projection). The real OpenCLIP class runs
too when ``open_clip`` imports.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import transformers as tf
from conftest import VOCAB, tiny_clip
from peft import PeftModel, get_peft_model
from torch import nn

from peft_lorsu import LoRSUConfig, LoRSULayer, probe_lorsu
from peft_lorsu.compat import pooled_features
from peft_lorsu.lorsu import EncoderFamily, HeadLoRAInProjection, register_encoder_family, unregister_encoder_family
from peft_lorsu.lorsu.families import FAMILIES
from peft_lorsu.lorsu.targets import HEAD_ROLES, find_sites

WIDTH, HEADS, LAYERS, MLP = 32, 4, 3, 64
VISION = dict(
    hidden_size=WIDTH,
    intermediate_size=MLP,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    image_size=16,
    patch_size=8,
)
TEXT = dict(
    hidden_size=WIDTH,
    intermediate_size=MLP,
    num_hidden_layers=2,
    num_attention_heads=HEADS,
    vocab_size=VOCAB,
    max_position_embeddings=16,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pixels(n: int = 3, batch: int = 4, **extra) -> list[dict]:
    g = _gen()
    return [{"pixel_values": torch.randn(batch, 3, 16, 16, generator=g), **extra} for _ in range(n)]


def image_text(n: int = 3, batch: int = 4) -> list[dict]:
    g = _gen(1)
    return [
        {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g), "input_ids": torch.randint(3, VOCAB, (batch, 7))}
        for _ in range(n)
    ]


def labelled(n: int = 3, batch: int = 4) -> list[dict]:
    g = _gen(2)
    return [
        {
            "pixel_values": torch.randn(batch, 3, 16, 16, generator=g),
            "labels": torch.randint(0, 3, (batch,), generator=g),
        }
        for _ in range(n)
    ]


def siglip2_batches(n: int = 3, batch: int = 4) -> list[dict]:
    """Siglip2 takes flattened patches `(B, N, 3 * p * p)` with a patch mask and the patch grid shape."""
    g = _gen(3)
    return [
        {
            "pixel_values": torch.randn(batch, 4, 3 * 8 * 8, generator=g),
            "pixel_attention_mask": torch.ones(batch, 4, dtype=torch.long),
            "spatial_shapes": torch.tensor([[2, 2]] * batch),
            "input_ids": torch.randint(3, VOCAB, (batch, 7), generator=g),
        }
        for _ in range(n)
    ]


def pooled_regression(model: nn.Module, batch: dict) -> torch.Tensor:
    """A loss for towers without one: pull the pooled output towards a fixed random target."""
    out = model(**batch)
    pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0]
    target = torch.linspace(-1, 1, pooled.shape[-1])
    return (pooled - target).pow(2).mean()


# ------------------------------------------------------------------------------- an encoder laid out like OpenCLIP


class ResidualAttentionBlock(nn.Module):
    """open_clip.transformer.ResidualAttentionBlock's layout: ``attn`` (fused MHA), ``mlp.c_fc`` / ``mlp.c_proj``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 2 * width), gelu=nn.GELU(), c_proj=nn.Linear(2 * width, width))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ToyOpenCLIPVisual(nn.Module):
    """open_clip's VisionTransformer in miniature: patches + class token -> ``transformer.resblocks`` -> ``@ proj``."""

    def __init__(self, width: int = WIDTH, heads: int = HEADS, layers: int = LAYERS, output_dim: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=8, stride=8, bias=False)
        self.class_embedding = nn.Parameter(0.1 * torch.randn(width))
        self.positional_embedding = nn.Parameter(0.1 * torch.randn(5, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(width**-0.5 * torch.randn(width, output_dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixel_values).flatten(2).transpose(1, 2)  # (B, 4, d)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_post(x[:, 0]) @ self.proj  # (B, output_dim)


def embedding_regression(model: nn.Module, batch: dict) -> torch.Tensor:
    return (model(**batch) - torch.linspace(-1, 1, 16)).pow(2).mean()


@pytest.fixture(scope="module", autouse=True)
def toy_openclip_family():
    """The built-in OpenCLIP description, pointed at the miniature class (open_clip needs torchvision to import)."""
    family = dataclasses.replace(FAMILIES["openclip"], name="toy-openclip", towers={"ToyOpenCLIPVisual": "vision"})
    register_encoder_family(family)
    yield family
    unregister_encoder_family("toy-openclip")


# ----------------------------------------------------------------------------------------------------- the cases


def seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return build().eval()

    return make


def tiny_llava_model():
    from peft_lorsu.app.tiny_llava import tiny_llava, tiny_llava_processor

    return tiny_llava(tiny_llava_processor(), vision_layers=LAYERS)


def llava_batches() -> list[dict]:
    from peft_lorsu.app.tiny_llava import color_vqa, tiny_llava_processor
    from peft_lorsu.lorsu.ppl import VQACollator

    collate, data = VQACollator(tiny_llava_processor()), color_vqa(12)
    return [collate(data[i : i + 4]) for i in range(0, 12, 4)]


@dataclass
class Case:
    build: Callable[[], nn.Module]
    batches: Callable[[], list[dict]]
    output: Callable[[nn.Module, dict], torch.Tensor]
    # Paths of the encoder's layer list, the attention block inside a layer (its path is a key of selected_heads)
    # and the MLP's first linear inside a layer. A tuple lists the layouts of several transformers releases (4.x wraps
    # CLIPVisionModel / CLIPTextModel in .vision_model / .text_model, ViT and DINOv2 nest attention.attention, DINOv2's
    # SwiGLU MLP has a fused weights_in); the first one the model has is expected.
    layer_list: str | tuple[str, ...]
    attention: str | tuple[str, ...] = "self_attn"
    fc1: str | tuple[str, ...] = "mlp.fc1"
    layers: int = LAYERS  # layers LoRSU adapts
    loss: Callable | None = None
    config: dict = field(default_factory=dict)
    projection: str | None = None
    fused: bool = False

    def blocks(self, model: nn.Module) -> list[str]:
        layers = _present(model, self.layer_list)
        attention = _present(model, self.attention, f"{layers}.0.")
        return [f"{layers}.{i}.{attention}" for i in range(self.layers)]

    def fc1s(self, model: nn.Module) -> list[str]:
        layers = _present(model, self.layer_list)
        return [f"{layers}.{i}.{_present(model, self.fc1, f'{layers}.0.')}" for i in range(self.layers)]


def _present(model: nn.Module, options: str | tuple[str, ...], prefix: str = "") -> str:
    """The first of ``options`` that names a submodule of ``model`` (under ``prefix``)."""
    options = (options,) if isinstance(options, str) else options
    names = {name for name, _ in model.named_modules()}
    return next((o for o in options if f"{prefix}{o}" in names), options[0])


CLIP_CONFIG = tf.CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16)
SIGLIP_CONFIG = tf.SiglipConfig(vision_config=VISION, text_config=TEXT)
SIGLIP2_CONFIG = tf.Siglip2Config(vision_config={**VISION, "num_patches": 4}, text_config=TEXT)


def siglip_cases(name: str, model_cls: type, config, batches: Callable[[], list[dict]]) -> dict[str, Case]:
    """A SigLIP-style model's vision tower (no projection) and text tower (its ``head`` is the projection)."""
    build, logits = seeded(lambda: model_cls(config)), lambda m, b: m(**b).logits_per_image
    text = {"layers": 2, "config": {"tower": "text"}, "projection": "text_model.head"}
    return {
        name: Case(build, batches, logits, "vision_model.encoder.layers"),
        f"{name}-text": Case(build, batches, logits, "text_model.encoder.layers", **text),
    }


CASES = {
    "clip": Case(
        seeded(lambda: tf.CLIPModel(CLIP_CONFIG)),
        image_text,
        lambda m, b: m(**b).logits_per_image,
        "vision_model.encoder.layers",
        projection="visual_projection",
    ),
    "clip-vision": Case(
        seeded(lambda: tf.CLIPVisionModel(CLIP_CONFIG.vision_config)),
        pixels,
        lambda m, b: m(**b).pooler_output,
        ("encoder.layers", "vision_model.encoder.layers"),
        loss=pooled_regression,
    ),
    "clip-vision-projection": Case(
        seeded(lambda: tf.CLIPVisionModelWithProjection(CLIP_CONFIG.vision_config)),
        pixels,
        lambda m, b: m(**b).image_embeds,
        "vision_model.encoder.layers",
        loss=lambda m, b: m(**b).image_embeds.pow(2).mean(),
        projection="visual_projection",
    ),
    "clip-text": Case(
        seeded(lambda: tf.CLIPTextModel(CLIP_CONFIG.text_config)),
        lambda: [{"input_ids": b["input_ids"]} for b in image_text()],
        lambda m, b: m(**b).pooler_output,
        ("encoder.layers", "text_model.encoder.layers"),
        layers=2,
        loss=pooled_regression,
        config={"tower": "text"},
    ),
    **siglip_cases("siglip", tf.SiglipModel, SIGLIP_CONFIG, image_text),
    **siglip_cases("siglip2", tf.Siglip2Model, SIGLIP2_CONFIG, siglip2_batches),
    "vit": Case(
        seeded(lambda: tf.ViTForImageClassification(tf.ViTConfig(**VISION, num_labels=3))),
        labelled,
        lambda m, b: m(**b).logits,
        ("vit.layers", "vit.encoder.layer"),
        attention=("attention.attention", "attention"),
        fc1=("mlp.fc1", "intermediate.dense"),
    ),
    "dinov2": Case(
        seeded(lambda: tf.Dinov2ForImageClassification(tf.Dinov2Config(**VISION, num_labels=3))),
        labelled,
        lambda m, b: m(**b).logits,
        "dinov2.encoder.layer",
        attention=("attention.attention", "attention"),
    ),
    "dinov2-swiglu": Case(
        seeded(lambda: tf.Dinov2Model(tf.Dinov2Config(**VISION, use_swiglu_ffn=True))),
        pixels,
        lambda m, b: m(**b).pooler_output,
        "encoder.layer",
        attention=("attention.attention", "attention"),
        fc1=("mlp.up_proj", "mlp.weights_in"),
        loss=pooled_regression,
    ),
    "llava": Case(
        tiny_llava_model,
        llava_batches,
        lambda m, b: m(**b).logits,
        ("model.vision_tower.encoder.layers", "model.vision_tower.vision_model.encoder.layers"),
        layers=LAYERS - 1,  # vision_feature_layer=-2: the last layer's output is never read
        config={"share_qkv_factor": False, "init_weights": "lora", "adapt_projection": False, "train_biases": False},
    ),
    "openclip-layout": Case(
        seeded(ToyOpenCLIPVisual),
        pixels,
        lambda m, b: m(**b),
        "transformer.resblocks",
        attention="attn",
        fc1="mlp.c_fc",
        loss=embedding_regression,
        fused=True,
    ),
    "openclip-layout-separate-factors": Case(
        seeded(ToyOpenCLIPVisual),
        pixels,
        lambda m, b: m(**b),
        "transformer.resblocks",
        attention="attn",
        fc1="mlp.c_fc",
        loss=embedding_regression,
        config={"share_qkv_factor": False},
        fused=True,
    ),
}


def make_config(case: Case, **kwargs) -> LoRSUConfig:
    return LoRSUConfig(**{"r": 4, "lora_alpha": 8, "top_k_heads": 2, "sparsity": 0.1, **case.config, **kwargs})


def run_output(case: Case, model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return case.output(model, batch)


def train_steps(case: Case, model: nn.Module, batches: list[dict], steps: int = 2) -> None:
    from peft_lorsu.lorsu.probe import default_loss

    loss_fn = case.loss or default_loss
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        loss = loss_fn(model, batches[step % len(batches)])
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def assert_only_structured_changes(base: nn.Module, merged: nn.Module, config: LoRSUConfig, sites: dict) -> None:
    """After merging, q/k/v weights differ only in the selected heads' rows, fc1 only at the probed entries,
    biases only where LoRSU trains them, and nothing else at all."""
    before, after = base.state_dict(), merged.state_dict()
    assert before.keys() == after.keys()
    allowed: dict[str, torch.Tensor] = {}
    for site in sites.values():
        if site.role in HEAD_ROLES:
            rows = torch.cat(
                [torch.arange(h * site.head_dim, (h + 1) * site.head_dim) for h in config.selected_heads[site.block]]
            )
            if site.role == "qkv":
                width = site.num_heads * site.head_dim
                rows = torch.cat([rows + part * width for part in range(3)])
                weight, bias = f"{site.name}.in_proj_weight", f"{site.name}.in_proj_bias"
            else:
                weight, bias = f"{site.name}.weight", f"{site.name}.bias"
            mask = torch.zeros_like(before[weight], dtype=torch.bool)
            mask[rows] = True
            allowed[weight] = mask
        elif site.role == "fc1":
            weight, bias = f"{site.name}.weight", f"{site.name}.bias"
            mask = torch.zeros(before[weight].numel(), dtype=torch.bool)
            mask[config.fc1_indices[site.name]] = True
            allowed[weight] = mask.view_as(before[weight])
        else:
            weight, bias = f"{site.name}.weight", f"{site.name}.bias"
            allowed[weight] = torch.ones_like(before[weight], dtype=torch.bool)
        if config.train_biases and bias in before and site.role != "projection":
            allowed[bias] = torch.ones_like(before[bias], dtype=torch.bool)
    for name, tensor in before.items():
        changed = after[name] != tensor
        if name in allowed:
            assert not changed[~allowed[name]].any(), f"{name} changed outside LoRSU's structure"
        else:
            assert not changed.any(), f"{name} is not LoRSU's to change"
    weights = [n for n in allowed if n.endswith(("weight", "in_proj_weight"))]
    assert any((after[n] != before[n]).any() for n in weights), "training changed no weight"


@pytest.mark.parametrize("name", list(CASES))
def test_sites_follow_the_family(name):
    case = CASES[name]
    model = case.build()
    sites = find_sites(model, make_config(case, selection="random"))
    blocks = sorted({s.block for s in sites.values() if s.role in HEAD_ROLES})
    assert blocks == case.blocks(model)
    assert sorted(s.name for s in sites.values() if s.role == "fc1") == case.fc1s(model)
    roles = {s.role for s in sites.values()}
    assert roles == ({"qkv", "fc1"} if case.fused else {"q", "k", "v", "fc1"}) | (
        {"projection"} if case.projection else set()
    )
    if case.projection:
        assert [s.name for s in sites.values() if s.role == "projection"] == [case.projection]


@pytest.mark.parametrize("name", list(CASES))
def test_probe_wrap_train_save_merge(name, tmp_path):
    case = CASES[name]
    model, batches = case.build(), case.batches()
    config = probe_lorsu(model, make_config(case), batches, loss_fn=case.loss, show_progress=False)
    sites = find_sites(model, config)
    assert sorted(config.selected_heads) == case.blocks(model)
    assert all(
        len(h) == 2 and len(s) == HEADS for h, s in zip(config.selected_heads.values(), config.head_scores.values())
    )
    base = copy.deepcopy(model)
    reference = run_output(case, base, batches[0])

    peft_model = get_peft_model(model, config)
    assert torch.allclose(run_output(case, peft_model, batches[0]), reference, atol=1e-5), "init must be the base"
    wrapped = {n for n, m in peft_model.named_modules() if isinstance(m, LoRSULayer)}
    assert len(wrapped) == len(sites)
    assert all(
        isinstance(peft_model.get_submodule(n), HeadLoRAInProjection) == case.fused for n in wrapped if "attn" in n
    )
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lorsu_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}

    train_steps(case, peft_model, batches)
    assert all(torch.equal(p, frozen[n]) for n, p in peft_model.named_parameters() if n in frozen)
    adapted = run_output(case, peft_model, batches[0])
    assert not torch.allclose(adapted, reference, atol=1e-4), "training did not change the output"

    peft_model.save_pretrained(tmp_path)
    for low_cpu_mem_usage in (False, True):  # adapter tensors built on the meta device, then filled by the load
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        assert torch.equal(run_output(case, reloaded, batches[0]), adapted)
        assert reloaded.peft_config["default"].selected_heads == config.selected_heads

    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, LoRSULayer) for m in merged.modules())
    assert torch.allclose(run_output(case, merged, batches[0]), adapted, atol=1e-5)
    assert_only_structured_changes(base, merged, config, sites)


# ---------------------------------------------------------------------------------------------- fused attention


def test_fused_count_rows_and_zero_grad_outside_selection():
    """Stacked-q/k/v update: 3 * k * d_h * r + r * d per layer (shared V), rows in all three parts."""
    case = CASES["openclip-layout"]
    model = case.build()
    config = make_config(case, selection="random", adapt_mlp=False, train_biases=False)
    peft_model = get_peft_model(model, config)
    d_h, k, r = WIDTH // HEADS, 2, 4
    assert peft_model.get_nb_trainable_parameters()[0] == LAYERS * (3 * k * d_h * r + r * WIDTH)
    layer = peft_model.base_model.model.transformer.resblocks[0].attn
    heads = config.selected_heads["transformer.resblocks.0.attn"]
    rows = torch.cat([torch.arange(h * d_h, (h + 1) * d_h) for h in heads])
    assert torch.equal(layer.lorsu_rows["default"], torch.cat([rows, rows + WIDTH, rows + 2 * WIDTH]))
    with torch.no_grad():
        layer.lorsu_V["default"].normal_()
    delta = layer.get_delta_weight("default")
    outside = torch.ones(3 * WIDTH, dtype=torch.bool)
    outside[layer.lorsu_rows["default"]] = False
    assert delta.shape == (3 * WIDTH, WIDTH) and not delta[outside].any() and delta[~outside].abs().sum() > 0
    # the frozen in-projection gets no gradient, the factors do
    embedding_regression(peft_model, pixels(n=1)[0]).backward()
    assert layer.base_layer.in_proj_weight.grad is None and layer.lorsu_U["default"].grad.abs().sum() > 0


def test_fused_probe_scores_each_of_q_k_v():
    """A loss that only touches head 3's rows in the *key* part of layer 0's in-projection selects head 3 there."""
    case = CASES["openclip-layout"]
    model = case.build()
    d_h = WIDTH // HEADS
    attn = model.transformer.resblocks[0].attn

    def planted(m, batch):
        key_rows = attn.in_proj_weight[WIDTH + 3 * d_h : WIDTH + 4 * d_h]
        return embedding_regression(m, batch) + 100 * key_rows.pow(2).sum()

    config = probe_lorsu(model, make_config(case, top_k_heads=1), pixels(), loss_fn=planted, show_progress=False)
    assert config.selected_heads["transformer.resblocks.0.attn"] == [3]
    scores = config.head_scores["transformer.resblocks.0.attn"]
    assert max(scores) == scores[3]


def test_fused_refuses_dropout_and_disables_cleanly():
    case = CASES["openclip-layout"]
    with pytest.warns(UserWarning, match="lora_dropout > 0 with a shared q/k/v factor"):
        config = make_config(case, selection="random", lora_dropout=0.1)
    with pytest.raises(ValueError, match="lora_dropout=0.1: a fused in-projection"):
        get_peft_model(case.build(), config)
    model = case.build()
    base = copy.deepcopy(model)
    peft_model = get_peft_model(model, make_config(case, selection="random", init_weights=False))
    batch = pixels(n=1)[0]
    assert not torch.allclose(run_output(case, peft_model, batch), run_output(case, base, batch), atol=1e-4)
    with peft_model.disable_adapter():
        assert torch.allclose(run_output(case, peft_model, batch), run_output(case, base, batch), atol=1e-6)


def test_fused_load_refuses_heads_edited_in_the_config(tmp_path):
    import json

    case = CASES["openclip-layout"]
    model = case.build()
    config = probe_lorsu(model, make_config(case), case.batches(), loss_fn=case.loss, show_progress=False)
    get_peft_model(model, config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    block = "transformer.resblocks.0.attn"
    saved["selected_heads"][block] = [h for h in range(HEADS) if h not in saved["selected_heads"][block]][:2]
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="(?s)lorsu_rows.* disagree with the selected_heads"):
        PeftModel.from_pretrained(case.build(), tmp_path)


def test_real_openclip_vision_transformer():
    open_clip = pytest.importorskip(
        "open_clip",
        reason="open_clip (open-clip-torch) not importable here; it needs torchvision, which has no build "
        "for this torch",
    )
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    visual = VisionTransformer(
        image_size=16, patch_size=8, width=WIDTH, layers=2, heads=HEADS, mlp_ratio=2.0, output_dim=16
    ).eval()
    assert open_clip is not None
    config = probe_lorsu(
        visual,
        LoRSUConfig(r=4, top_k_heads=1),
        [{"x": b["pixel_values"]} for b in pixels()],
        loss_fn=lambda m, b: m(b["x"]).pow(2).mean(),
        show_progress=False,
    )
    assert sorted(config.selected_heads) == [f"transformer.resblocks.{i}.attn" for i in range(2)]
    peft_model = get_peft_model(visual, config)
    assert isinstance(peft_model.base_model.model.transformer.resblocks[0].attn, HeadLoRAInProjection)


# ----------------------------------------------------------------------------------------- LLaVA's vision tower


def test_llava_targets_only_the_layers_its_language_model_reads():
    from peft_lorsu.app.tiny_llava import tiny_llava, tiny_llava_processor

    processor = tiny_llava_processor()

    def read_layers(**kwargs) -> list[int]:
        model = tiny_llava(processor, vision_layers=4, **kwargs)
        return sorted({s.layer for s in find_sites(model, LoRSUConfig(selection="random")).values()})

    assert read_layers() == [0, 1, 2]  # vision_feature_layer=-2 (default): the last layer is unused
    assert read_layers(vision_feature_layer=-1) == [0, 1, 2, 3]
    assert read_layers(vision_feature_layer=2) == [0, 1]  # hidden_states[2] is the output of layer 1
    assert read_layers(vision_feature_layer=[-4, -3]) == [0, 1]
    llava = tiny_llava(processor, vision_layers=4)
    with pytest.raises(
        ValueError, match=r"layers_to_transform=\[1, 3\] names layers \[3\] whose output is never used"
    ):
        find_sites(llava, LoRSUConfig(selection="random", layers_to_transform=[1, 3]))
    with pytest.raises(ValueError, match="the embedding output only"):
        find_sites(tiny_llava(processor, vision_feature_layer=0), LoRSUConfig(selection="random"))
    with pytest.raises(ValueError, match=r"tower='text': no matching encoder found in LlavaForConditionalGeneration"):
        find_sites(llava, LoRSUConfig(selection="random", tower="text"))


# ------------------------------------------------------------------------------------------------- the registry


class _LegacyViTModel(nn.Module):
    """transformers 4's ViTModel layout: ``encoder.layer.N.attention.attention.{query,key,value}`` with
    ``num_attention_heads`` / ``attention_head_size``, and ``intermediate.dense`` as the MLP's first linear."""

    def __init__(self, width: int = WIDTH, heads: int = HEADS, layers: int = 2) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([self._layer(width, heads) for _ in range(layers)])

    @staticmethod
    def _layer(width: int, heads: int) -> nn.Module:
        layer, attention, inner = nn.Module(), nn.Module(), nn.Module()
        for name in ("query", "key", "value"):
            setattr(inner, name, nn.Linear(width, width))
        inner.num_attention_heads, inner.attention_head_size = heads, width // heads
        attention.attention, attention.output = inner, nn.Linear(width, width)
        layer.attention, layer.intermediate = attention, nn.Module()
        layer.intermediate.dense = nn.Linear(width, 2 * width)
        return layer


def test_builtin_vit_family_also_reads_the_older_layout():
    legacy = type("ViTModel", (_LegacyViTModel,), {})()  # detected by class name, like transformers 4's ViTModel
    sites = find_sites(legacy, LoRSUConfig(selection="random"))
    assert sorted(sites) == sorted(
        [f"encoder.layer.{i}.attention.attention.{p}" for i in range(2) for p in ("query", "key", "value")]
        + [f"encoder.layer.{i}.intermediate.dense" for i in range(2)]
    )
    assert {(s.num_heads, s.head_dim) for s in sites.values() if s.role in HEAD_ROLES} == {(HEADS, WIDTH // HEADS)}


class TinyEncoder(nn.Module):
    """A home-made encoder with its own names: ``blocks.N.mix.{wq,wk,wv}``, ``n_heads``, ``ffn.w1``."""

    def __init__(self, width: int = WIDTH, heads: int = HEADS, layers: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.mix = nn.Module()
            block.mix.wq, block.mix.wk, block.mix.wv = (nn.Linear(width, width) for _ in range(3))
            block.mix.n_heads = heads
            block.ffn = nn.Sequential(
                OrderedDict(w1=nn.Linear(width, 2 * width), act=nn.GELU(), w2=nn.Linear(2 * width, width))
            )
            self.blocks.append(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            q, k, v = (
                w(x).unflatten(-1, (block.mix.n_heads, -1)).transpose(1, 2)
                for w in (block.mix.wq, block.mix.wk, block.mix.wv)
            )
            x = x + nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            x = x + block.ffn(x)
        return x


def test_register_encoder_family_for_a_new_architecture():
    x = torch.randn(2, 5, WIDTH, generator=_gen(4))
    with pytest.raises(
        ValueError, match=r"no matching encoder found in TinyEncoder .*Supported encoder families: clip"
    ):
        find_sites(TinyEncoder(), LoRSUConfig(selection="random"))
    family = EncoderFamily(
        name="tiny",
        towers={"TinyEncoder": "vision"},
        layers="blocks",
        attention="mix",
        qkv=("wq", "wk", "wv"),
        num_heads="n_heads",
        fc1="ffn.w1",
    )
    assert family.qkv == (("wq", "wk", "wv"),) and family.head_dim == ("head_dim",)
    register_encoder_family(family)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_encoder_family(family)
        with pytest.raises(
            ValueError, match=r"tower classes \['TinyEncoder'\] already belong to the encoder family 'tiny'"
        ):
            register_encoder_family(dataclasses.replace(family, name="tiny-again"))
        torch.manual_seed(0)
        model = TinyEncoder()
        base = copy.deepcopy(model)
        config = probe_lorsu(
            model,
            LoRSUConfig(r=2, top_k_heads=1),
            [{"x": x}],
            loss_fn=lambda m, b: m(b["x"]).pow(2).mean(),
            show_progress=False,
        )
        assert sorted(config.selected_heads) == ["blocks.0.mix", "blocks.1.mix"]
        peft_model = get_peft_model(model, config)
        assert peft_model.get_nb_trainable_parameters()[0] == 2 * (
            math.floor(0.1 * 2 * WIDTH * WIDTH) + 2 * WIDTH + 3 * WIDTH + 2 * (3 * WIDTH // HEADS + WIDTH)
        )
        with torch.no_grad():
            assert torch.allclose(peft_model(x), base(x), atol=1e-6)
    finally:
        unregister_encoder_family("tiny")


def test_family_descriptions_are_checked():
    with pytest.raises(ValueError, match=r"towers must map class names to one of \('vision', 'text'\)"):
        EncoderFamily(name="bad", towers={"X": "audio"})
    with pytest.raises(ValueError, match=r"qkv must hold \(q, k, v\) name triples"):
        EncoderFamily(name="bad", towers={"X": "vision"}, qkv=("q", "k"))
    with pytest.raises(TypeError, match="expects an EncoderFamily"):
        register_encoder_family({"name": "bad"})
    with pytest.raises(
        ValueError, match=r"ViTModel has no text tower|no matching encoder found in ViTModel \(it has: vit vision"
    ):
        find_sites(tf.ViTModel(tf.ViTConfig(**VISION)), LoRSUConfig(selection="random", tower="text"))


def test_existing_clip_adapter_keys_are_unchanged(tmp_path):
    """Site keys stay module paths: an adapter saved for CLIPModel loads into a fresh CLIPModel as before."""
    model = tiny_clip()
    config = LoRSUConfig(r=2, selection="random")
    assert sorted(config_sites := find_sites(model, config))[:3] == [
        "vision_model.encoder.layers.0.mlp.fc1",
        "vision_model.encoder.layers.0.self_attn.k_proj",
        "vision_model.encoder.layers.0.self_attn.q_proj",
    ]
    assert "visual_projection" in config_sites


# ------------------------------------------------------------------------------------ RLP on SigLIP's text tower

CTX = [5, 6, 7]  # init text ids; SigLIP's tokenizer writes `text </s> <pad> ...` with no start token


def siglip_prompts() -> torch.Tensor:
    """Two prompts starting with the context ids at position 0 (SigLIP has no start token), and one that does not."""
    return torch.tensor([[5, 6, 7, 40, 1, 0, 0], [5, 6, 7, 41, 42, 1, 0], [9, 5, 6, 7, 40, 1, 0]])


def test_rlp_on_siglip_text_tower(tmp_path):
    from peft_lorsu import RLPConfig

    model = seeded(lambda: tf.SiglipModel(SIGLIP_CONFIG))()
    base = copy.deepcopy(model)
    peft_model = get_peft_model(model, RLPConfig(init_token_ids=CTX, rank=2))
    layer = peft_model.base_model.model.text_model.embeddings
    assert layer.context_start == 0
    ids = siglip_prompts()
    text = lambda m: pooled_features(m.get_text_features(input_ids=ids))  # noqa: E731
    with torch.no_grad():
        assert torch.allclose(text(peft_model), text(base), atol=1e-6)  # P starts at the init text's embeddings
        layer.rlp_B["default"].normal_()
        embedded = layer(input_ids=ids)
        plain = base.text_model.embeddings(input_ids=ids)
    context = layer.get_context("default") + base.text_model.embeddings.position_embedding.weight[:3]
    assert torch.allclose(embedded[:2, :3], context.expand(2, -1, -1), atol=1e-6)  # positions 0..2 hold the context
    assert torch.equal(embedded[:2, 3:], plain[:2, 3:]) and torch.equal(embedded[2], plain[2])  # the rest as before

    batch = {"input_ids": ids, "pixel_values": torch.randn(3, 3, 16, 16, generator=_gen(5))}
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    peft_model(**batch, return_loss=True).loss.backward()
    optimizer.step()
    assert sorted(n.rsplit(".", 2)[-2] for n, p in peft_model.named_parameters() if p.requires_grad) == [
        "rlp_A",
        "rlp_B",
    ]
    with torch.no_grad():
        adapted = text(peft_model)
    peft_model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(text(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)), adapted)
        folded = text(peft_model.merge_and_unload(fold_into_position_embedding=True))
    assert torch.allclose(folded[:2], adapted[:2], atol=1e-5)  # exact for the prompts that start with the init text


def test_rlp_refuses_siglip2_text_tower_with_the_reason():
    from peft_lorsu import RLPConfig

    with pytest.raises(ValueError, match="RLP cannot adapt Siglip2Model's Siglip2TextEmbeddings: SigLIP2's Gemma"):
        get_peft_model(tf.Siglip2Model(SIGLIP2_CONFIG), RLPConfig(init_token_ids=CTX))
