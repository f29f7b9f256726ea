"""The cost benchmark runs end to end in smoke mode and writes complete results (no timing is asserted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.perf import TARGETS  # noqa: E402
from benchmarks.perf_setup import TEXT_METHODS, VISION_METHODS  # noqa: E402

STAT_KEYS = ("min", "median", "max")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("perf")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.perf", "--smoke", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "perf.json").read_text())


def numbers(value, path="") -> list[tuple[str, float]]:
    """Every number in a JSON tree with its path."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [(path, value)]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in numbers(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in numbers(v, f"{path}[{i}]")]
    return []


def check_positive_stats(stats: dict, where: str) -> None:
    for key in STAT_KEYS:
        assert stats[key] > 0 and math.isfinite(stats[key]), f"{where}.{key} = {stats[key]}"
    assert stats["min"] <= stats["median"] <= stats["max"], where


def test_writes_every_output(smoke):
    out, _ = smoke
    for name in (
        "perf.json",
        "perf.md",
        "perf_methods.png",
        "perf_scaling_batch.png",
        "perf_scaling_heads.png",
        "perf_scaling_sparsity.png",
    ):
        assert (out / name).stat().st_size > 0, name
    report = (out / "perf.md").read_text()
    assert "python -m benchmarks.perf --smoke" in report and "## Targets" in report


def test_every_number_is_finite_and_machine_recorded(smoke):
    _, res = smoke
    bad = [(p, v) for p, v in numbers(res) if not math.isfinite(v)]
    assert not bad, bad[:5]
    machine = res["machine"]
    assert machine["threads"] == 1 and machine["torch"] and machine["cpu"] and machine["logical_cores"] >= 1
    assert res["mode"] == "smoke" and res["date"] and res["command"].startswith("python -m benchmarks.perf")


def test_every_vision_method_has_every_field(smoke):
    _, res = smoke
    assert set(res["methods"]) == set(VISION_METHODS)
    for name, m in res["methods"].items():
        check_positive_stats(m["step_s"]["cpu"], f"{name}.step_s.cpu")
        check_positive_stats(m["step_s"]["wall"], f"{name}.step_s.wall")
        for baseline in ("lora", "full", "backprop_floor"):
            check_positive_stats(m[f"step_ratio_vs_{baseline}"]["cpu"], f"{name} vs {baseline}")
        for key in ("static_bytes", "transient_peak_bytes", "peak_bytes"):
            assert m["memory"][key] > 0, (name, key)
        assert m["memory"]["peak_bytes"] == m["memory"]["static_bytes"] + m["memory"]["transient_peak_bytes"]
        state = m["trainable_state"]
        assert state["total_bytes"] == state["param_bytes"] + state["grad_bytes"] + state["optimizer_bytes"]
        if name != "backprop_floor":
            assert state["moment_bytes"] == 2 * state["param_bytes"]  # Adam's two moments, no step counters
        assert m["adapter_buffer_bytes"] >= 0 and m["description"]
        if name == "backprop_floor":
            assert m["trainable_params"] == 0
        else:
            assert m["trainable_params"] > 0 and state["optimizer_bytes"] >= 2 * state["param_bytes"]  # Adam moments
    assert res["methods"]["lorsu"]["adapter_buffer_bytes"] > 0  # fc1 indices and head rows
    assert 0 < res["methods"]["lorsu"]["fc1_pattern"]["gradient_block"] <= 1


def test_probe_inference_text_kernels_and_scaling(smoke):
    _, res = smoke
    probe = res["probe"]
    for key in ("per_batch_cpu", "ratio_to_step_cpu", "step_s"):
        assert probe[key]
    check_positive_stats(probe["step_s"]["cpu"], "probe step")
    inference = res["inference"]
    assert set(inference["forward_s"]) == {"base", "lorsu_unmerged", "lorsu_merged", "lora_unmerged", "lora_merged"}
    for name in ("lorsu_unmerged", "lorsu_merged"):
        check_positive_stats(inference[f"{name}_vs_base"]["cpu"], name)
    assert set(res["text"]) == set(TEXT_METHODS)
    check_positive_stats(res["text"]["rlp"]["step_ratio_vs_coop"]["cpu"], "rlp vs coop")
    assert res["text"]["rlp"]["trainable_params"] < res["text"]["coop"]["trainable_params"]
    kernels = res["fc1_kernels"]
    assert {"dense", "kernel_random_selection", "kernel_probe_selection", "sampled_addmm", "input_grad"} == set(
        kernels["time_s"]
    )
    scaling = res["scaling"]
    plan = res["plan"]
    assert [row["batch"] for row in scaling["batch"]] == list(plan["batches"])
    assert [row["setting"] for row in scaling["heads"]] == [str(k) for k in plan["heads"]]
    assert [row["setting"] for row in scaling["sparsity"]] == [str(s) for s in plan["sparsities"]]
    for row in scaling["heads"] + scaling["sparsity"]:
        check_positive_stats(row["ratio_vs_lora"], f"scaling {row['setting']}")
        assert row["lorsu_memory"]["peak_bytes"] > 0 and row["trainable_state_bytes"] > 0


def test_targets_carry_the_measured_ratio(smoke):
    _, res = smoke
    assert [t["key"] for t in res["targets"]] == [key for key, *_ in TARGETS]
    for t in res["targets"]:
        check_positive_stats(t["measured"], t["key"])
        if t["key"] == "state_exact":  # the paper's count of trainable numbers, four copies each, to the byte
            assert t["measured"]["median"] == 1.0 and t["met"]
        else:
            assert t["met"] == (t["measured"]["median"] <= t["limit"])
    assert res["machine"]["device"] == "cpu" and not any(t["informational"] for t in res["targets"])


def test_bf16_rows_and_no_compiled_rows_in_smoke_mode(smoke):
    _, res = smoke
    assert res["compiled"] is None  # inductor takes minutes; tests/core/test_compile.py covers the compiled step
    methods = res["bf16"]["methods"]
    assert set(methods) == {f"{n}{mode}" for n in ("lorsu", "lora") for mode in ("", "_autocast", "_bf16")}
    for name, m in methods.items():
        lora = "lora" + name.removeprefix("lorsu").removeprefix("lora")
        check_positive_stats(m[f"step_ratio_vs_{lora}"]["cpu"], f"{name} vs {lora}")
        assert m["memory"]["peak_bytes"] > 0
    # a bf16 model holds its adapters in bf16: half the trainable bytes of the fp32 one
    assert (
        methods["lorsu_bf16"]["trainable_state"]["param_bytes"] * 2
        == methods["lorsu"]["trainable_state"]["param_bytes"]
    )
