"""Each entry of peft_lorsu/compat.py, checked against the installed peft / transformers (CI runs this file with the
oldest and the newest pair the package declares)."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import tiny_clip
from packaging.version import Version
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

import peft_lorsu
from peft_lorsu import compat
from peft_lorsu.compat import PeftType
from peft_lorsu.joint import model as joint_model
from peft_lorsu.lorsu.layer import HeadLoRALinear
from peft_lorsu.lorsu.sparse import SparseLinear


def test_plugin_types_are_members_of_peft_type_and_registered_once():
    for name, prefix in (("LORSU", "lorsu_"), ("RLP", "rlp_"), ("LORSU_RLP", "lorsu_rlp_")):
        member = PeftType[name]
        assert member == name and PeftType(name) is member and name in list(PeftType)
        assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == prefix
        assert compat.add_peft_type(name) is member  # adding again returns the same member
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LORSU] is peft_lorsu.LoRSUConfig
    with pytest.raises(ValueError, match="upper-case identifiers"):
        compat.add_peft_type("lorsu")


def test_reregistering_replaces_the_classes_and_refuses_another_prefix():
    module = importlib.reload(importlib.import_module("peft_lorsu.registration"))
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LORSU] is module.LoRSUModel
    with pytest.raises(ValueError, match="prefix"):
        compat.register("lorsu", peft_lorsu.LoRSUConfig, peft_lorsu.LoRSUModel, prefix="other_")
    model = get_peft_model(tiny_clip(), peft_lorsu.LoRSUConfig(r=2, selection="random"))
    assert isinstance(model.base_model, peft_lorsu.LoRSUModel)


def test_buffer_dict_buffers_are_saved():
    layer = SparseLinear(nn.Linear(4, 3), "default", num_values=2, indices=torch.tensor([0, 5]))
    assert isinstance(layer.lorsu_indices, compat.BufferDict)
    assert torch.equal(layer.state_dict()["lorsu_indices.default"], torch.tensor([0, 5]))


def test_base_weight_accessors_round_trip_with_and_without_peft_accessors():
    layer = HeadLoRALinear(nn.Linear(4, 4), "default", r=2, lora_alpha=2, heads=[1], head_dim=2)
    weight = compat.get_base_weight(layer)
    assert torch.equal(weight, layer.get_base_layer().weight)
    compat.set_base_weight(layer, weight + 1)
    assert torch.equal(layer.get_base_layer().weight, weight + 1)

    class Old:  # a tuner layer of a peft without get_base_weight / set_base_weight (< 0.20)
        def __init__(self):
            self.base = nn.Linear(2, 2)

        def get_base_layer(self):
            return self.base

    old = Old()
    compat.set_base_weight(old, torch.zeros(2, 2))
    assert torch.equal(compat.get_base_weight(old), torch.zeros(2, 2))


def test_moving_an_adapter_keeps_integer_buffers_and_casts_floats():
    layer = SparseLinear(nn.Linear(8, 6), "default", num_values=3, indices=torch.tensor([1, 7, 40]), train_bias=True)
    layer.get_base_layer().to(torch.bfloat16)
    layer._move_adapter_to_device_of_base_layer("default")
    assert layer.lorsu_values["default"].dtype == torch.bfloat16
    assert layer.lorsu_bias["default"].dtype == torch.bfloat16
    assert layer.lorsu_indices["default"].dtype == torch.int32  # the layer's in-memory index dtype, kept
    assert layer.lorsu_indices["default"].tolist() == [1, 7, 40]


def test_pooled_features_of_both_transformers_forms():
    features = torch.randn(2, 4)
    assert compat.pooled_features(features) is features
    assert compat.pooled_features(BaseModelOutputWithPooling(pooler_output=features)) is features
    out = tiny_clip().get_image_features(pixel_values=torch.randn(1, 3, 16, 16))
    assert compat.pooled_features(out).shape == (1, 16)


def test_adapter_state_dict_holds_one_adapter_and_files_of_old_peft_are_read_without_the_others():
    model = get_peft_model(tiny_clip(), peft_lorsu.LoRSUConfig(r=2, selection="random"), adapter_name="ad")
    model.add_adapter("ad2", peft_lorsu.LoRSUConfig(r=2, selection="random", seed=1))
    own, _ = compat.adapter_state_dict(model, "ad")
    assert own and not any(k.endswith((".ad", ".ad2")) or ".ad2." in k for k in own)
    assert set(own) == set(compat.adapter_state_dict(model, "ad2")[0])
    # peft < 0.20 also returns (and saves) the other adapter's tensors, under <key>.ad2
    returned = set(get_peft_model_state_dict(model, adapter_name="ad"))
    assert returned == (set(own) | {f"{k}.ad2" for k in own} if compat.OTHER_ADAPTERS_IN_STATE_DICT else set(own))
    leaked = {**own, **{f"{k}.ad2": v for k, v in own.items()}}  # a file written by such a peft
    _, kept = compat.adapter_state_dict(model, "ad", leaked)
    assert set(kept) == (set(own) if compat.OTHER_ADAPTERS_IN_STATE_DICT else set(leaked))
    assert compat.OTHER_ADAPTERS_IN_STATE_DICT == (compat.PEFT_VERSION < Version("0.20"))


def test_joint_adapter_names_the_peft_version_it_needs(monkeypatch):
    monkeypatch.setattr(joint_model, "STRUCTURAL_STATE_DICT", False)
    config = peft_lorsu.LoRSURLPConfig(
        lorsu=peft_lorsu.LoRSUConfig(r=2, selection="random"),
        rlp=peft_lorsu.RLPConfig(init_token_ids=[5, 6], rank=1),
    )
    base = tiny_clip()
    with pytest.raises(ValueError, match=r"needs peft >= 0\.21, found peft"):
        get_peft_model(base, config)
    assert not any("lorsu" in name or "rlp_" in name for name, _ in base.named_parameters())


def test_installed_versions_are_within_the_declared_ranges():
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    declared = {Requirement(r).name: Requirement(r).specifier for r in requires("peft-lorsu") if "extra" not in r}
    for package in ("peft", "transformers", "torch"):
        assert declared[package].contains(version(package), prereleases=True), (package, version(package))
    assert isinstance(PeftModel, type)
