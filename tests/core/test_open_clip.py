"""LoRSU on a real OpenCLIP model (open_clip.CLIP with its VisionTransformer: fused torch.nn.MultiheadAttention).

open_clip imports torchvision at module level (transforms, ops.misc.FrozenBatchNorm2d), and torchvision has no CPU
build for torch 2.13 (PyPI's torchvision 0.28.0 pins torch==2.13.0 but is a CUDA build: its _C.so needs
libtorch_cuda.so, and `import torchvision` fails with "operator torchvision::nms does not exist"). The model classes
themselves use only torch, so when torchvision is not installed the import goes through a stand-in package that is
removed again right after. Tested with open-clip-torch 3.3.0 (installed --no-deps) + timm 1.0.31 + ftfy 6.3.1.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import types
from importlib.machinery import ModuleSpec

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_lorsu import LoRSUConfig, LoRSULayer
from peft_lorsu.lorsu import HeadLoRAInProjection


class _Meta(type):
    def __getattr__(cls, name):  # InterpolationMode.BICUBIC and the like, used in class bodies and as dict keys
        if name.startswith("__"):
            raise AttributeError(name)
        member = _Meta(f"{cls.__name__}.{name}", (), {})  # a distinct object per name (timm maps them to strings)
        setattr(cls, name, member)
        return member


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Meta(name, (), {"__init__": lambda self, *a, **k: None})


class _TorchvisionStub:
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _import_open_clip():
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip(
            "open-clip-torch is not installed (pip install --no-deps open-clip-torch timm ftfy)",
            allow_module_level=True,
        )
    if importlib.util.find_spec("torchvision") is not None:
        return pytest.importorskip("open_clip")
    finder = _TorchvisionStub()
    sys.meta_path.insert(0, finder)
    try:
        import open_clip
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    return open_clip


open_clip = _import_open_clip()
WIDTH, HEADS, LAYERS = 32, 4, 2


def tiny_open_clip() -> nn.Module:
    torch.manual_seed(0)
    vision = dict(image_size=16, patch_size=8, width=WIDTH, layers=LAYERS, head_width=WIDTH // HEADS, mlp_ratio=2.0)
    text = dict(context_length=8, vocab_size=99, width=WIDTH, heads=HEADS, layers=LAYERS, mlp_ratio=2.0)
    return open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 16, 16, generator=g), torch.randint(1, 99, (4, 8), generator=g)


def clip_loss(model: nn.Module, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    image_features, text_features, logit_scale = model(images, texts)[:3]
    logits = logit_scale * image_features @ text_features.t()
    labels = torch.arange(len(images))
    return (nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(logits.t(), labels)) / 2


def config(**kwargs) -> LoRSUConfig:
    return LoRSUConfig(**{"r": 4, "lora_alpha": 8, "top_k_heads": 2, "sparsity": 0.1, "selection": "random", **kwargs})


def test_wraps_the_vision_tower():
    peft_model = get_peft_model(tiny_open_clip(), config())
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, LoRSULayer)}
    attn = sorted(n for n, m in layers.items() if isinstance(m, HeadLoRAInProjection))
    fc1 = sorted(n for n, m in layers.items() if n.endswith("mlp.c_fc"))
    assert [n.removeprefix("base_model.model.") for n in attn] == [
        f"visual.transformer.resblocks.{i}.attn" for i in range(LAYERS)
    ]
    assert [n.removeprefix("base_model.model.") for n in fc1] == [
        f"visual.transformer.resblocks.{i}.mlp.c_fc" for i in range(LAYERS)
    ]
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lorsu_" in n for n in trainable)


@pytest.mark.parametrize("share_qkv_factor", [True, False])
def test_output_gradients_and_merge(share_qkv_factor):
    base = tiny_open_clip()
    images, texts = batch()
    with torch.no_grad():
        reference = base.encode_image(images)
    cfg = config(share_qkv_factor=share_qkv_factor)
    peft_model = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        assert torch.allclose(peft_model.encode_image(images), reference, atol=1e-6), "init must be the base"

    # gradients reach every LoRSU tensor of the vision tower and nothing else
    peft_model.train()
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        loss = clip_loss(peft_model, *batch(step))
        optimizer.zero_grad()
        loss.backward()
        grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        assert all(p.grad is None for n, p in peft_model.named_parameters() if not p.requires_grad)
        optimizer.step()
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lorsu_U" in n)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lorsu_values" in n)
    assert all(torch.equal(p, frozen[n]) for n, p in peft_model.named_parameters() if n in frozen)
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model.encode_image(images)
    assert not torch.allclose(adapted, reference, atol=1e-4)

    # the fused delta touches only the selected heads' rows of q, k and v
    for block, heads in cfg.selected_heads.items():
        attn = peft_model.base_model.model.get_submodule(block if block.endswith("attn") else f"{block}.attn")
        delta = attn.get_delta_weight("default")
        rows = torch.cat([torch.arange(h * WIDTH // HEADS, (h + 1) * WIDTH // HEADS) for h in heads])
        mask = torch.zeros(3 * WIDTH, dtype=torch.bool)
        for part in range(3):
            mask[rows + part * WIDTH] = True
        assert delta[~mask].abs().max() == 0 and delta[mask].abs().max() > 0

    # merged model: plain open_clip modules, same output
    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, LoRSULayer) for m in merged.modules())
    assert type(merged.visual.transformer.resblocks[0].attn) is nn.MultiheadAttention
    with torch.no_grad():
        assert torch.allclose(merged.encode_image(images), adapted, atol=1e-5)
