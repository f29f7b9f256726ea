"""What LoRSU's fc1 layers hold in memory: int32 indices (saved as int64, the format every version reads), one copy
of them shared with the probe's config, a pattern with nothing S-sized in it, and only the selected columns of fc1's
input kept for backward."""

from __future__ import annotations

import torch
from conftest import clip_batches, tiny_clip
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from peft_lorsu import LoRSUConfig, SparseLinear, probe_lorsu
from peft_lorsu.lorsu.functional import index_dtype

M, D = 40, 12


def layer(device: str = "cpu") -> SparseLinear:
    indices = torch.tensor([r * D + c for r in (1, 5, 6, 30) for c in (0, 3, 4, 11)])
    fc1 = SparseLinear(nn.Linear(D, M), "default", num_values=16, indices=indices, init=False).to(device)
    fc1.get_base_layer().requires_grad_(False)  # frozen, as get_peft_model leaves it
    return fc1


def test_indices_are_int32_in_memory_and_int64_in_the_state_dict():
    fc1 = layer()
    assert index_dtype(M * D) == torch.int32 and index_dtype(2**31) == torch.int64
    assert fc1.lorsu_indices["default"].dtype == torch.int32
    saved = fc1.state_dict()["lorsu_indices.default"]
    assert saved.dtype == torch.int64 and saved.tolist() == fc1.lorsu_indices["default"].tolist()
    x = torch.randn(3, D)
    expected = fc1(x)
    for assign in (False, True):  # assign=True: what peft's low_cpu_mem_usage load does
        other = layer()
        with torch.no_grad():
            other.lorsu_values["default"].zero_()
        other.load_state_dict({k: v.clone() for k, v in fc1.state_dict().items()}, assign=assign)
        assert other.lorsu_indices["default"].dtype == torch.int32
        torch.testing.assert_close(other(x), expected)


def test_saved_adapter_holds_int64_indices_and_loads_back(tmp_path):
    batches = clip_batches()
    model = tiny_clip()
    config = probe_lorsu(model, LoRSUConfig(r=2, init_weights=False), batches, show_progress=False)
    peft_model = get_peft_model(model, config)
    fc1 = peft_model.base_model.model.vision_model.encoder.layers[0].mlp.fc1
    name = "vision_model.encoder.layers.0.mlp.fc1"
    # the probe's selection is int32 already and the layer keeps that very tensor: one copy in memory
    assert config.fc1_indices[name].dtype == torch.int32
    assert fc1.lorsu_indices["default"].data_ptr() == config.fc1_indices[name].data_ptr()
    peft_model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert all(v.dtype == torch.int64 for k, v in weights.items() if "lorsu_indices" in k)
    with torch.no_grad():
        expected = peft_model(**batches[0]).logits_per_image
    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        loaded_fc1 = loaded.base_model.model.vision_model.encoder.layers[0].mlp.fc1
        assert loaded_fc1.lorsu_indices["default"].dtype == torch.int32
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batches[0]).logits_per_image, expected)


def test_pattern_holds_nothing_per_entry_and_backward_keeps_the_selected_columns(device):
    fc1 = layer(device)
    x = torch.randn(2, 7, D, device=device)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fc1(x).sum().backward()
    pattern = next(iter(fc1.patterns.values()))
    per_pattern = [
        pattern.rows,
        pattern.cols,
        pattern.row_pos,
        pattern.col_pos,
        *(o for o in pattern.order if o is not None),
    ]
    assert sum(t.numel() for t in per_pattern) == 4 + 4 + M + D  # rows, columns and their positions: no S-sized part
    # fc1's input is kept as its 4 selected columns (0, 3, 4, 11) of the 12, for the 14 positions
    inputs = [t for t in saved if t.dim() == 2 and t.shape[0] == 14]
    assert [tuple(t.shape) for t in inputs] == [(14, 4)]
    torch.testing.assert_close(inputs[0], x.reshape(14, D)[:, [0, 3, 4, 11]])
