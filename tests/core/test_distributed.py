"""LoRSU and RLP across 2 real CPU processes (gloo): the probe's reduction, DDP (accelerate loop and Trainer), FSDP.

One module-scoped fixture spawns the two ranks once (tests/core/distributed_scenarios.py plays every scenario on both);
the tests then compare what the ranks wrote with each other and with single-process references computed here.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_clip
from distributed_scenarios import (
    EXAMPLES,
    WORLD,
    _probe_config,
    clip_samples,
    launch_env,
    probe_batches,
    reference_train,
    rlp_model,
    rlp_samples,
    run,
    selection,
)
from safetensors.torch import load_file

from peft_lorsu import probe_lorsu

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

# Only guards against a deadlock hanging the suite; the ranks normally finish in a fraction of it.
HANG_GUARD_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    """Run all scenarios on 2 spawned gloo processes; the folder holds ``rank0/``, ``rank1/`` and ``shared/``."""
    out = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(
        run, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + HANG_GUARD_S
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {HANG_GUARD_S} s (deadlock?)")
    return out


def _load(out: Path, rank: int, name: str) -> Any:
    """A scenario's result, with its tensor dicts read back from safetensors."""

    def restore(value: Any, path: str) -> Any:
        if isinstance(value, str) and value == f"<tensors {path}>":
            return load_file(str(out / f"rank{rank}" / f"{name}.{path}.safetensors"))
        if isinstance(value, dict):
            return {k: restore(v, f"{path}.{k}" if path else k) for k, v in value.items()}
        return value

    return restore(json.loads((out / f"rank{rank}" / f"{name}.json").read_text()), "")


def _both(out: Path, name: str) -> tuple[Any, Any]:
    return _load(out, 0, name), _load(out, 1, name)


def _assert_same_selection(got: dict, expected: dict, exact_scores: bool = False) -> None:
    assert got["heads"] == expected["heads"]
    assert got["fc1"] == expected["fc1"]
    assert got["scores"].keys() == expected["scores"].keys()
    for block, scores in got["scores"].items():
        if exact_scores:
            assert scores == expected["scores"][block], block
        else:  # summation order differs between one process and an all-reduce
            expected_scores = torch.tensor(expected["scores"][block])
            torch.testing.assert_close(torch.tensor(scores), expected_scores, rtol=1e-5, atol=0)


def _assert_tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _assert_tensors_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=2e-6, msg=key)


def _reference(model: torch.nn.Module, samples: list) -> dict[str, torch.Tensor]:
    from distributed_scenarios import adapter_state

    reference_train(model, samples)
    return adapter_state(model)


def _moved(trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> None:
    """Every trained float tensor moved from its initial value: each got a gradient under DDP.

    Except the key-bias deltas: adding the same vector to every key shifts each query's attention scores by one
    constant, which softmax ignores, so their gradient is zero up to rounding.
    """
    for key, value in trained.items():
        if value.is_floating_point() and not key.endswith("k_proj.lorsu_bias"):
            assert (value - initial[key]).abs().max() > 1e-4, key


def _assert_saved_safely(files: list[str]) -> None:
    """Adapter weights in safetensors only (Trainer adds its own training_args.bin, which holds no weights)."""
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".pth")) for f in set(files) - {"training_args.bin"})


@pytest.fixture(scope="module")
def lorsu_reference(ranks: Path) -> dict[str, torch.Tensor]:
    """Single-process SGD from the initial adapter rank 0 saved before training."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_clip(), ranks / "shared" / "lorsu-initial", is_trainable=True)
    return _reference(model, clip_samples())


# ------------------------------------------------------------------------------------------------ probe


def test_probe_is_identical_on_both_ranks_and_equals_one_process_on_all_data(ranks):
    """Even shards, uneven shards (5 + 3 batches) and a DDP-wrapped model all give the single-process choice."""
    expected = selection(probe_lorsu(tiny_clip(), _probe_config(), probe_batches(), show_progress=False))
    first, second = _both(ranks, "probe")
    for case in ("even", "uneven", "ddp"):
        _assert_same_selection(first[case], second[case], exact_scores=True)
        _assert_same_selection(first[case], expected)
    # the example script's probe, on this rank's batches (shard_batches)
    _assert_same_selection(_load(ranks, 0, "example_probe"), _load(ranks, 1, "example_probe"), exact_scores=True)
    _assert_same_selection(_load(ranks, 0, "example_probe"), expected)
    assert sum(len(h) for h in expected["heads"].values()) == 2 * len(expected["heads"])
    assert all(len(v) == int(0.1 * 64 * 32) for v in expected["fc1"].values())


def test_probe_stopping_rule_counts_samples_over_all_ranks(ranks):
    """probe_samples=12 with 4 samples per batch and rank: both ranks stop after 2 batches (16 samples in total)."""
    first, second = _both(ranks, "probe")
    assert first["early_stop"]["local_batches"] == second["early_stop"]["local_batches"] == 2
    _assert_same_selection(first["early_stop"], second["early_stop"], exact_scores=True)
    # the 4 batches consumed were 0, 2 (rank 0) and 1, 3 (rank 1)
    consumed = selection(probe_lorsu(tiny_clip(), _probe_config(), probe_batches()[:4], show_progress=False))
    _assert_same_selection(first["early_stop"], consumed)


def test_probe_failure_on_one_rank_is_raised_on_every_rank(ranks):
    first, second = _both(ranks, "probe")
    assert second["failure"] == "ValueError: synthetic failure on rank 1"
    assert first["failure"].startswith("RuntimeError: probe_lorsu: 1 other process(es) failed at batch 1")


# ------------------------------------------------------------------------------------------------ DDP


@pytest.mark.parametrize("runner", ["accelerate", "trainer"])
def test_lorsu_ddp_trains_identical_adapters_equal_to_one_process(ranks, lorsu_reference, runner):
    first, second = _both(ranks, f"lorsu_{runner}")
    if runner == "accelerate":  # examples/accelerate/train_clip.py's loop; accelerate wraps in DDP on MULTI_CPU
        assert first["distributed_type"] == "MULTI_CPU" and first["num_processes"] == 2
    else:  # Trainer, with ddp_find_unused_parameters=False
        assert first["wrapper"] == second["wrapper"] == "DistributedDataParallel"
        assert first["world_size"] == 2 and first["steps"] == 4
    _assert_tensors_equal(first["trained"], second["trained"])
    assert first["unchanged"] == [] and any("lorsu_values" in k for k in first["trained"])
    _moved(first["trained"], first["initial"])
    _assert_tensors_close(first["trained"], lorsu_reference)
    assert first["loaded_equals_trained"] and second["loaded_equals_trained"]
    _assert_saved_safely(first["saved_files"])


@pytest.mark.parametrize("runner", ["accelerate", "trainer"])
def test_rlp_ddp_trains_identical_prompts_equal_to_one_process(ranks, runner):
    error = json.loads((ranks / "rank0" / "rlp_import.json").read_text())["error"]
    if error is not None:
        pytest.skip(f"peft_lorsu.rlp is not importable: {error.strip().splitlines()[-1]}")
    first, second = _both(ranks, f"rlp_{runner}")
    if runner == "trainer":
        assert first["wrapper"] == second["wrapper"] == "DistributedDataParallel"
    _assert_tensors_equal(first["trained"], second["trained"])
    assert first["unchanged"] == ["base_model.model.text_model.embeddings.rlp_P_fr"]  # the frozen initial context
    _moved({k: v for k, v in first["trained"].items() if k not in first["unchanged"]}, first["initial"])
    model = rlp_model()
    from distributed_scenarios import adapter_state

    _assert_tensors_equal(adapter_state(model), first["initial"])  # same seed, same start
    _assert_tensors_close(first["trained"], _reference(model, rlp_samples()))
    assert first["loaded_equals_trained"] and second["loaded_equals_trained"]
    _assert_saved_safely(first["saved_files"])


# ------------------------------------------------------------------------------------------------ FSDP


def test_fsdp2_keeps_the_shared_factor_and_trains_like_one_process(ranks, lorsu_reference):
    first, second = _both(ranks, "fsdp2")
    # 2 layers: one owner of the shared V and two readers per block, all reading the DTensor FSDP registered
    assert first["factor"] == {
        "owners": 2,
        "readers": 4,
        "shared_factor_is_dtensor": True,
        "values_are_dtensors": True,
    }
    _assert_tensors_equal(first["initial"], _load(ranks, 0, "lorsu_accelerate")["initial"])
    _assert_tensors_equal(first["loaded"], second["loaded"])
    _assert_tensors_close(first["loaded"], lorsu_reference)
    _assert_saved_safely(first["saved_files"])
    assert first["probe_error"].startswith("probe_lorsu: the model is sharded by FSDP")


def test_fsdp1_with_clip_layer_policy_trains_like_one_process(ranks, lorsu_reference):
    first, second = _both(ranks, "fsdp1")
    assert first["units"] == 5  # the root and one unit per CLIPEncoderLayer (2 vision + 2 text)
    _assert_tensors_equal(first["trained"], second["trained"])
    # full state dict keys carry the adapter name; the saved adapter's keys do not
    trained = {k.replace(".default", ""): v for k, v in first["trained"].items()}
    _assert_tensors_close({k: v for k, v in trained.items() if k in lorsu_reference}, lorsu_reference)
    assert set(lorsu_reference) <= set(trained)


def test_example_fsdp2_branch_trains_like_one_process(ranks, lorsu_reference):
    """examples/accelerate/train_clip.py under FSDP2: shard, train, gather, save on rank 0, load on both."""
    first, second = _both(ranks, "example_fsdp2")
    assert first["sharded"] == "FSDPPeftModel"
    _assert_tensors_equal(first["loaded"], second["loaded"])
    _assert_tensors_close(first["loaded"], lorsu_reference)
    _assert_saved_safely(first["saved_files"])


# ------------------------------------------------------------------------------------------------ configs


def test_accelerate_config_files_load_and_wrap_clip_encoder_layers(monkeypatch):
    """The example configs go through accelerate's launcher; the FSDP units are exactly the CLIPEncoderLayers."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from peft import get_peft_model
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    from peft_lorsu import LoRSUConfig
    from peft_lorsu.distributed import clip_encoder_layer_classes

    ddp = launch_env(EXAMPLES / "ddp.yaml")
    assert "ACCELERATE_USE_FSDP" not in ddp
    fsdp = launch_env(EXAMPLES / "fsdp.yaml")
    assert fsdp["ACCELERATE_USE_FSDP"] == "true" and fsdp["FSDP_VERSION"] == "2"
    assert fsdp["FSDP_AUTO_WRAP_POLICY"] == "NO_WRAP"  # train_clip.py shards with fully_shard_clip itself
    for key, value in fsdp.items():
        monkeypatch.setenv(key, value)
    assert FullyShardedDataParallelPlugin().fsdp_version == 2

    model = get_peft_model(tiny_clip(), LoRSUConfig(r=2, selection="random"))
    layers = {name for name, module in model.named_modules() if isinstance(module, CLIPEncoderLayer)}
    assert len(layers) == 4  # 2 vision + 2 text layers
    assert clip_encoder_layer_classes(model) == {CLIPEncoderLayer}
    # accelerate's transformer-based policy naming CLIPEncoderLayer picks the units fully_shard_clip makes
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "CLIPEncoderLayer")
    policy = fsdp2_prepare_auto_wrap_policy(FullyShardedDataParallelPlugin(), model)
    assert {name for name, module in model.named_modules() if policy(module)} == layers


def test_helpers_without_a_process_group():
    """Single-process answers, and clear errors where FSDP would go wrong."""
    from peft import get_peft_model

    from peft_lorsu import LoRSUConfig
    from peft_lorsu.distributed import (
        all_reduce_sum_,
        any_rank,
        distributed_info,
        fsdp_ignored_parameters,
        fully_shard_clip,
        is_fsdp_wrapped,
        shard_batches,
    )

    assert distributed_info() == (0, 1)
    assert shard_batches(10, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert shard_batches(10, 4, rank=0, world_size=2) == [[0, 1, 2, 3], [8, 9]]
    assert shard_batches(10, 4, rank=1, world_size=2) == [[4, 5, 6, 7]]
    assert shard_batches(3, 4, rank=1, world_size=2) == []  # a rank may get nothing; the probe copes
    with pytest.raises(ValueError, match="rank 2 outside 0..1"):
        shard_batches(10, 4, rank=2, world_size=2)
    assert any_rank(True) and not any_rank(False)
    assert torch.equal(all_reduce_sum_(torch.ones(3)), torch.ones(3))
    clip = tiny_clip()
    with pytest.raises(ValueError, match=r"0-d parameter\(s\) \['logit_scale'\] and they require grad"):
        fsdp_ignored_parameters(clip)  # a plain CLIPModel trains its logit_scale
    model = get_peft_model(clip, LoRSUConfig(r=2, selection="random"))
    assert fsdp_ignored_parameters(model) == {model.base_model.model.logit_scale}  # frozen by the adapter
    assert not is_fsdp_wrapped(model)
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group"):
        fully_shard_clip(model)
