"""torch.compile: a LoRSU training step traces into whole graphs, with no graph break caused by the package."""

from __future__ import annotations

import pytest
import torch
from conftest import clip_batches, tiny_clip, to_device
from peft import LoraConfig, get_peft_model

from peft_lorsu import LoRSUConfig, probe_lorsu


def breaks(model, batch) -> tuple[int, list[str]]:
    def step(pixel_values, input_ids):
        return model(pixel_values=pixel_values, input_ids=input_ids, return_loss=True).loss

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(batch["pixel_values"], batch["input_ids"])
    return explained.graph_break_count, [str(reason.reason)[:200] for reason in explained.break_reasons]


@pytest.mark.parametrize("share_qkv_factor", [True, False])
def test_lorsu_step_has_no_graph_break(share_qkv_factor):
    batches = clip_batches()
    model = tiny_clip()
    config = probe_lorsu(model, LoRSUConfig(r=4, share_qkv_factor=share_qkv_factor), batches, show_progress=False)
    peft_model = get_peft_model(model, config)
    peft_model(**batches[0], return_loss=True)  # the fc1 patterns are computed once, outside the compiled step
    count, reasons = breaks(peft_model, batches[0])
    assert count == 0, reasons
    # the same measure finds peft LoRA's step whole too (the baseline the issue compares against)
    lora = get_peft_model(tiny_clip(), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "fc1"]))
    assert breaks(lora, batches[0])[0] == 0


@pytest.mark.slow  # inductor compiles forward and backward: about 25 s on one idle CPU core, minutes on a busy one
def test_compiled_step_gives_the_eager_gradients(device):
    """A LoRSU training step through ``torch.compile`` (inductor) gives the loss and every adapter gradient of the
    eager step (the sparse fc1 values, the head factors, the bias deltas) up to fp32 rounding: inductor fuses and
    reorders sums, so each tensor may differ by a few 1e-6 of its largest entry."""
    batches = [to_device(b, device) for b in clip_batches()]
    model = tiny_clip().to(device)
    config = probe_lorsu(model, LoRSUConfig(r=4, init_weights=False), batches, show_progress=False)
    peft_model = get_peft_model(model, config).train()

    def step(module) -> dict[str, torch.Tensor]:
        peft_model.zero_grad(set_to_none=True)
        loss = module(**batches[0], return_loss=True).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        return {"loss": loss.detach(), **grads}

    eager = step(peft_model)  # also computes the fc1 patterns, outside the compiled graph
    torch._dynamo.reset()
    compiled = step(torch.compile(peft_model, backend="inductor"))
    assert compiled.keys() == eager.keys() and any("lorsu_values" in n for n in eager)
    for name, grad in eager.items():
        assert grad.abs().sum() > 0, name
        # k's bias gradient is zero up to rounding (softmax ignores a shift of every score), hence the 1e-6 floor
        error, scale = float((compiled[name] - grad).abs().max()), float(grad.abs().max())
        assert error <= 1e-5 * scale + 1e-6, (name, error, scale)
