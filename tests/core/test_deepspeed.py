"""LoRSU under DeepSpeed ZeRO-2 / ZeRO-3: one process on DeepSpeed's CPU accelerator (gloo), two SGD steps of a tiny
CLIP, gradients and updated adapter tensors equal to the same steps without DeepSpeed.

ZeRO-3 gathers a partitioned parameter that a module's forward reads directly (SparseLinear reads its base
``weight``, q/k/v read the shared ``lorsu_V`` of a sibling): DeepSpeedEngine.forward marks every module "in forward",
and its ``ZeROOrderedDict`` parameter store all-gathers a NOT_AVAILABLE parameter on access and registers it as an
external parameter of the running module, so that module's backward hook gathers it again for backward.
Tested with deepspeed 0.19.8 (pip install --no-build-isolation deepspeed, DS_BUILD_OPS=0), torch 2.13.0+cpu.
"""

from __future__ import annotations

import os

import pytest
import torch
from peft import get_peft_model
from transformers import CLIPModel

from peft_lorsu import LoRSUConfig
from peft_lorsu.app.models import tiny_clip_config

os.environ.setdefault("DS_ACCELERATOR", "cpu")
deepspeed = pytest.importorskip("deepspeed", reason="deepspeed is not installed")

LR, STEPS = 0.1, 2


@pytest.fixture(scope="module", autouse=True)
def process_group():
    for key, value in dict(
        MASTER_ADDR="127.0.0.1", MASTER_PORT="29555", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    ).items():
        os.environ.setdefault(key, value)
    if deepspeed.get_accelerator().device_name() != "cpu":
        pytest.skip("these checks run on DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu)")
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    torch.distributed.destroy_process_group()  # later tests expect no process group


@pytest.fixture(autouse=True)
def restore_linear(monkeypatch):
    # ZeRO-3 replaces torch.nn.functional.linear for the whole process (its version keeps every input for backward,
    # frozen weights' too) and leaves it replaced; later tests measure what plain torch keeps
    monkeypatch.setattr(torch.nn.functional, "linear", torch.nn.functional.linear)


def ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # the default is 1.0 in deepspeed 0.19
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": stage,
            # partition every tensor: by default ZeRO-3 keeps tensors under 1e5 elements whole (all of a tiny CLIP)
            "stage3_param_persistence_threshold": 0,
            "stage3_model_persistence_threshold": 0,
            "stage3_prefetch_bucket_size": 0,
        },
    }


def tiny_clip() -> CLIPModel:
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config())
    # deepspeed 0.19.8 broadcasts parameters as p.data.view(torch.uint8), which fails on CLIP's 0-d logit_scale (also
    # in zero.Init): a (1,) copy gives the same loss. Not LoRSU's: LLaVA's CLIPVisionModel has no logit_scale.
    model.logit_scale = torch.nn.Parameter(model.logit_scale.detach().reshape(1))
    return model


def lorsu(model: torch.nn.Module):
    return get_peft_model(model, LoRSUConfig(r=4, selection="random", init_weights=False, train_biases=True))


def batch(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(3, 99, (4, 7), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    return {"pixel_values": torch.randn(4, 3, 16, 16, generator=g), "input_ids": ids, "return_loss": True}


def plain_steps():
    model = lorsu(tiny_clip()).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    grads = []
    for step in range(STEPS):
        model(**batch(step)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        optimizer.step()
        optimizer.zero_grad()
    return grads, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "stage, partition_first",
    [(2, False), (3, False), (3, True)],
    ids=["zero2", "zero3", "zero3-base-partitioned-before-get_peft_model"],
)
def test_matches_plain_training(stage, partition_first):
    from deepspeed.utils import safe_get_full_grad

    expected_grads, expected = plain_steps()
    config = ds_config(stage)
    base = tiny_clip()
    if partition_first:
        # as transformers' from_pretrained does under ZeRO-3 (HfDeepSpeedConfig): the base weights are already
        # partitioned (shape (0,), full shape in ds_shape) when get_peft_model builds the LoRSU layers
        deepspeed.zero.Init(module=base, config_dict_or_path=config)
        assert base.vision_model.encoder.layers[0].mlp.fc1.weight.numel() == 0
    model = lorsu(base)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.train()
    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    assert params.keys() == expected.keys()
    if stage == 3:
        fc1 = engine.module.base_model.model.vision_model.encoder.layers[0].mlp.fc1
        assert fc1.base_layer.weight.numel() == 0, "the base weight must be partitioned for this test to mean anything"
        assert fc1.lorsu_values["default"].numel() == 0
    for step in range(STEPS):
        loss = engine(**batch(step)).loss
        engine.backward(loss)
        for name, param in params.items():
            grad = safe_get_full_grad(param)
            torch.testing.assert_close(grad, expected_grads[step][name], atol=1e-5, rtol=1e-4, msg=name)
        engine.step()
    for name, param in params.items():
        with deepspeed.zero.GatheredParameters([param], enabled=stage == 3):
            torch.testing.assert_close(param.detach().clone(), expected[name], atol=1e-5, rtol=1e-4, msg=name)
