"""The accuracy benchmark runs end to end in smoke mode and writes complete, self-consistent results.

Real datasets are used where installed (scripts/install_data.sh); where one is missing it is replaced by random
28x28 stand-ins with the same class names, so the pipeline is still exercised. No timing is asserted.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import accuracy  # noqa: E402
from peft_lorsu.app.data import LabeledImages  # noqa: E402

RUN_FIELDS = ("seed", "columns", "rows", "target_improvement", "control_change", "trainable_params", "seconds")
SUMMARY_FIELDS = ("rows", "target_final", "controls_final", "target_improvement", "control_change", "trainable_params")


def stand_in(name: str, split: str) -> LabeledImages:
    """Random images of the dataset's classes (30 train / 10 test per class), seeded by name and split."""
    from peft_lorsu.app.data import ANIMAL_MNIST_CLASSES, DIGIT_CLASSES, FASHION_MNIST_CLASSES

    source = name.partition(":")[0]
    names = {"digits": DIGIT_CLASSES, "animal_mnist": ANIMAL_MNIST_CLASSES}.get(source, FASHION_MNIST_CLASSES)
    per_class = 30 if split == "train" else 10
    g = torch.Generator().manual_seed(len(name) * 7 + (split == "train"))
    labels = torch.arange(len(names)).repeat_interleave(per_class)
    images = torch.randint(0, 256, (len(labels), 28, 28), generator=g, dtype=torch.uint8)
    return LabeledImages(images, labels, list(names))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, dict]:
    real = accuracy.load_labeled
    missing = []

    def load(name: str, split: str) -> LabeledImages:
        try:
            return real(name, split)
        except (FileNotFoundError, ImportError) as exc:
            missing.append(f"{name}: {exc}")
            return stand_in(name, split)

    out = tmp_path_factory.mktemp("accuracy")
    mp = pytest.MonkeyPatch()
    mp.setattr(accuracy, "load_labeled", load)
    try:
        assert accuracy.main(["--smoke", "--out", str(out)]) == 0
    finally:
        mp.undo()
    if missing:
        print("stand-ins used for:", *missing, sep="\n  ")
    return out, json.loads((out / "accuracy.json").read_text())


def expected_methods() -> list[str]:
    return [m for m, spec in accuracy.METHODS.items() if not spec.head_scoring or accuracy.head_scoring_available()]


def test_every_setting_has_every_method_and_field(smoke):
    _, res = smoke
    plan = res["plan"]
    assert res["mode"] == "smoke" and res["command"].startswith("python -m benchmarks.accuracy --smoke")
    assert len(res["continual"]) == len(plan["targets"]) * len(plan["shots"])
    for setting in res["continual"]:
        assert list(setting["methods"]) == expected_methods()
        assert setting["columns"] == ["target", *plan["controls"]]
        for name, entry in setting["methods"].items():
            seeds = plan["seeds"] if name != "zero_shot" else plan["seeds"][:1]
            assert [run["seed"] for run in entry["runs"]] == seeds
            for run in entry["runs"]:
                assert all(field in run for field in RUN_FIELDS)
                assert len(run["rows"]) == (1 if name == "zero_shot" else plan["sessions"] + 1)
            assert all(field in entry["summary"] for field in SUMMARY_FIELDS)
            if name == "zero_shot":
                assert entry["lr_selection"] is None and entry["summary"]["trainable_params"] == 0
            else:
                grid = plan["grids"][accuracy.METHODS[name].grid]
                assert [row[0] for row in entry["lr_selection"]["grid"]] == grid
                assert entry["lr"] == entry["lr_selection"]["chosen"] in grid
                assert entry["summary"]["trainable_params"] > 0
                # the second operating point: lr by TI_val + CC_val, same seeds
                balanced = entry["balanced"]
                assert balanced["lr"] == entry["lr_selection"]["chosen_balanced"] in grid
                assert [run["seed"] for run in balanced["runs"]] == seeds
                assert all(field in balanced["summary"] for field in SUMMARY_FIELDS)


def test_accuracies_are_fractions_and_ti_cc_match_the_rows(smoke):
    _, res = smoke
    for setting in res["continual"]:
        for entry in setting["methods"].values():
            for run in entry["runs"]:
                rows = run["rows"]
                assert all(0.0 <= v <= 1.0 for row in rows for v in row)
                assert math.isclose(run["target_improvement"], rows[-1][0] - rows[0][0], abs_tol=1e-9)
                changes = [rows[-1][j] - rows[0][j] for j in range(1, len(rows[0]))]
                assert math.isclose(run["control_change"], sum(changes) / len(changes), abs_tol=1e-9)
            summary, runs = entry["summary"], entry["runs"]
            mean_ti = sum(r["target_improvement"] for r in runs) / len(runs)
            assert math.isclose(summary["target_improvement"][0], mean_ti, abs_tol=1e-9)
            assert math.isclose(summary["target_final"][0], sum(r["rows"][-1][0] for r in runs) / len(runs))
            assert summary["target_improvement"][1] >= 0 and summary["control_change"][1] >= 0
        # every method starts from the same zero-shot evaluation
        first_rows = {tuple(run["rows"][0]) for e in setting["methods"].values() for run in e["runs"]}
        assert len(first_rows) == 1


def test_base_to_new_and_parameter_counts(smoke):
    _, res = smoke
    assert res["base_to_new"]
    for setting in res["base_to_new"]:
        assert set(setting["methods"]) == {"zero_shot", "rlp", "coop"}
        for entry in setting["methods"].values():
            for run in entry["runs"]:
                b, n, h = run["base"], run["new"], run["harmonic"]
                assert all(0.0 <= v <= 1.0 for v in (b, n, h))
                assert math.isclose(h, 0.0 if b + n == 0 else 2 * b * n / (b + n), abs_tol=1e-9)
        rlp, coop = (setting["methods"][m]["summary"]["trainable_params"] for m in ("rlp", "coop"))
        assert 0 < rlp < coop
    lorsu = res["continual"][0]["methods"]["lorsu"]["summary"]["trainable_params"]
    assert lorsu == res["continual"][0]["methods"]["lorsu_random"]["summary"]["trainable_params"]
    # the user-scorer row is recorded by name and trains as many parameters as LoRSU
    assert res["methods"]["lorsu_custom"]["head_scorer"] == "value_heads_score"
    assert res["continual"][0]["methods"]["lorsu_custom"]["summary"]["trainable_params"] == lorsu
    # the joint row holds exactly LoRSU's parameters (same probe, class-prompt loss) plus RLP's
    for setting in res["continual"]:
        params = {m: setting["methods"][m]["summary"]["trainable_params"] for m in ("lorsu_ce", "lorsu_rlp", "rlp")}
        assert params["lorsu_rlp"] == params["lorsu_ce"] + params["rlp"]
        assert setting["methods"]["lorsu_rlp_x10"]["summary"]["trainable_params"] == params["lorsu_rlp"]


def test_investigation_uses_validation_data_only(smoke):
    out, res = smoke
    plan = res["plan"]
    assert [s["target"] for s in res["investigation"]] == plan["investigate_targets"]
    for study in res["investigation"]:
        assert list(study["methods"]) == plan["investigate_methods"]
        for name, entry in study["methods"].items():
            grid = plan["investigate_grids"][accuracy.ALL_METHODS[name].grid]
            assert [pt["lr"] for pt in entry["points"]] == grid
            assert all(-1.0 <= pt["ti_val"][0] <= 1.0 and -1.0 <= pt["cc_val"][0] <= 1.0 for pt in entry["points"])
    splits = {json.loads(json.loads(line)["key"])["split"] for line in (out / "accuracy_runs.jsonl").open()}
    assert splits == {"val", "val+controls", "test", "val_b2n"}


def test_base_to_new_investigation(smoke):
    out, res = smoke
    plan = res["plan"]
    assert [s["dataset"] for s in res["investigation_b2n"]] == plan["investigate_b2n_datasets"]
    for study in res["investigation_b2n"]:
        assert list(study["methods"]) == plan["investigate_b2n_methods"]
        for entry in study["methods"].values():
            assert [pt["lr"] for pt in entry["points"]] == plan["investigate_b2n_grid"]
            for pt in entry["points"]:
                b, n, h = pt["base"][0], pt["new"][0], pt["harmonic"][0]
                assert 0.0 <= b <= 1.0 and 0.0 <= n <= 1.0 and 0.0 <= h <= max(b, n)
        params = {name: e["trainable_params"] for name, e in study["methods"].items()}
        assert params["rlp_drop25"] == params["rlp"] < params["coop"]  # dropout adds no parameter
    assert res["variants"]["rlp_drop25"]["config_fields"] == {"prompt_dropout": 0.25}
    md = (out / "accuracy.md").read_text()
    assert "### Base-to-new on validation images: RLP dropout and the lr grid" in md and "| `rlp_drop25` |" in md


def test_targets_report_and_plots(smoke):
    out, res = smoke
    assert res["targets"] and all(
        set(c) == {"setting", "selection", "target", "met", "detail"} for c in res["targets"]
    )
    assert {c["selection"] for c in res["targets"]} == {"headline", "balanced"}
    assert all(isinstance(c["met"], bool) for c in res["targets"])
    md = (out / "accuracy.md").read_text()
    assert "CPU-size" in md and "--model" in md and "## Targets" in md and "## Learning rates" in md
    assert "## Investigation (validation data only)" in md
    assert "## LoRSU + RLP in one model" in md and "| `lorsu_rlp` |" in md
    for png in ("accuracy_sessions.png", "accuracy_ti_cc.png", "accuracy_b2n.png", "accuracy_tradeoff.png"):
        assert (out / png).stat().st_size > 1000
    (out / "accuracy.md").unlink()
    assert accuracy.main(["--report-only", "--out", str(out)]) == 0
    assert (out / "accuracy.md").read_text() == md


def test_resume_reuses_finished_runs(smoke, monkeypatch, tmp_path):
    out, res = smoke
    copy = tmp_path / "resumed"
    copy.mkdir()
    (copy / "accuracy_runs.jsonl").write_text((out / "accuracy_runs.jsonl").read_text())

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(accuracy.Bench, "_run", no_training)
    monkeypatch.setattr(accuracy, "load_labeled", stand_in)  # data is only read, never trained on
    assert accuracy.main(["--smoke", "--resume", "--out", str(copy)]) == 0
    resumed = json.loads((copy / "accuracy.json").read_text())
    assert resumed["continual"] == res["continual"] and resumed["base_to_new"] == res["base_to_new"]


def test_value_heads_score_ranks_heads_by_their_v_rows():
    from peft_lorsu.lorsu.scoring import HeadStatistics

    H, d_h, d = 3, 2, 4
    grad_v = torch.zeros(H * d_h, d)
    grad_v[2:4] = 1.0  # head 1: 8 entries of 1
    grad_v[4:6, 0] = 3.0  # head 2: 2 entries of 3
    big_q = torch.full((H * d_h, d), 100.0)  # q and k are ignored by this scorer
    stats = HeadStatistics("block", H, d_h, big_q, big_q, grad_v, num_samples=4)
    assert accuracy.value_heads_score(stats).tolist() == [0.0, 8.0, 18.0]


@pytest.mark.parametrize("mode", sorted(accuracy.PLANS))
def test_every_plan_names_known_methods_with_a_grid(mode):
    """The full plan is only run by hand (minutes): check here that each of its method lists fits its grids."""
    from types import SimpleNamespace

    plan = accuracy.PLANS[mode]
    for name in [*plan.methods, *plan.b2n_methods]:
        method = accuracy.ALL_METHODS[name]
        assert not method.grid or method.grid in plan.grids, name
    for name in plan.investigate_methods:
        assert accuracy.ALL_METHODS[name].grid in plan.investigate_grids, name
    for name in plan.investigate_b2n_methods:
        assert accuracy.ALL_METHODS[name].grid == "prompt", name
    assert accuracy.Bench.total_runs(SimpleNamespace(plan=plan)) > 0
