"""Runs that diverge or are interrupted: nothing good is overwritten, the exit code says so, and a continual run
resumes after its last finished session."""

from __future__ import annotations

import pytest
import torch
from test_cli import tiny_assets  # noqa: F401  (fixture: a tiny CLIP on disk and a tiny demo set)
from test_continual import runner

from peft_lorsu.app import continual
from peft_lorsu.app.cli import main
from peft_lorsu.app.continual import ContinualConfig
from peft_lorsu.app.training import TrainingDiverged


def test_a_diverged_train_exits_non_zero_and_keeps_the_good_adapter(tiny_assets, tmp_path, capsys):  # noqa: F811
    adapter = tmp_path / "adapter"
    common = ["train", "--model", str(tiny_assets), "--r", "4", "--lora-alpha", "4", "--epochs", "2"]
    assert main([*common, "--lr", "1e-3", "--output-dir", str(adapter)]) == 0
    good = {p.name: p.read_bytes() for p in adapter.iterdir()}
    capsys.readouterr()
    assert main([*common, "--lr", "1e30", "--output-dir", str(adapter)]) == 3
    err = capsys.readouterr().err
    assert "peft-lorsu train: training diverged: the loss was" in err
    assert "at step" in err and "learning rate 1e+30" in err and "nothing was saved" in err
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == good


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), 0.0])
def test_a_non_finite_learning_rate_is_refused(lr):
    with pytest.raises(ValueError, match="ContinualConfig.lr must be a finite number > 0"):
        ContinualConfig(method="lorsu", lr=lr)


def test_a_diverging_continual_run_names_the_session_and_keeps_the_finished_ones(tmp_path, monkeypatch):
    real_fit = continual.fit
    calls = []

    def fit_that_diverges_in_session_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            kwargs["lr"] = 1e30
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(continual, "fit", fit_that_diverges_in_session_2)
    with pytest.raises(TrainingDiverged, match=r"lorsu, session 2: training diverged.*learning rate 1e\+30"):
        runner("lorsu").run(show_progress=False, checkpoint_dir=tmp_path)
    assert (tmp_path / "progress.json").exists()  # session 1 is kept


@pytest.mark.parametrize("method", ["lorsu", "full", "rlp"])
def test_an_interrupted_continual_run_resumes_where_it_stopped(method, tmp_path, monkeypatch):
    uninterrupted = runner(method).run(show_progress=False)

    real_evaluate = continual.ContinualRunner.evaluate
    evaluations = []

    def interrupted_after_session_1(self, model):
        evaluations.append(1)
        if len(evaluations) == 3:  # zero-shot, session 1, then Ctrl-C while session 2 is evaluated
            raise KeyboardInterrupt
        return real_evaluate(self, model)

    with monkeypatch.context() as patch:
        patch.setattr(continual.ContinualRunner, "evaluate", interrupted_after_session_1)
        with pytest.raises(KeyboardInterrupt):
            runner(method).run(show_progress=False, checkpoint_dir=tmp_path)
    trained = []
    real_fit = continual.fit
    monkeypatch.setattr(continual, "fit", lambda *a, **k: trained.append(1) or real_fit(*a, **k))
    resumed = runner(method).run(show_progress=False, checkpoint_dir=tmp_path)
    assert len(trained) == 1  # only session 2 is trained again
    torch.testing.assert_close(torch.tensor(resumed.rows), torch.tensor(uninterrupted.rows))
    assert resumed.trainable_params == uninterrupted.trainable_params
    assert resumed.adapter_bytes == uninterrupted.adapter_bytes


def test_a_checkpoint_of_other_settings_is_not_mixed_in(tmp_path):
    runner("lorsu").run(show_progress=False, checkpoint_dir=tmp_path)
    other = runner("lorsu")
    other.config.lr = 5e-3
    with pytest.raises(ValueError, match=r"holds sessions of a run with other settings \(\['lr'\]\)"):
        other.run(show_progress=False, checkpoint_dir=tmp_path)


def test_ctrl_c_in_the_cli_keeps_finished_sessions_and_the_same_command_resumes(
    tiny_assets, tmp_path, monkeypatch, capsys  # noqa: F811
):
    out = tmp_path / "out"
    command = ["continual", "--model", str(tiny_assets), "--target", "demo", "--control", "demo:inverted",
               "--method", "lorsu", "--sessions", "2", "--shots", "1", "--epochs", "1", "--r", "4",
               "--output-dir", str(out)]  # fmt: skip
    real_evaluate = continual.ContinualRunner.evaluate
    evaluations = []

    def interrupted(self, model):
        evaluations.append(1)
        if len(evaluations) == 3:
            raise KeyboardInterrupt
        return real_evaluate(self, model)

    with monkeypatch.context() as patch:
        patch.setattr(continual.ContinualRunner, "evaluate", interrupted)
        assert main(command) == 130
    err = capsys.readouterr().err
    assert "run the same command again to resume" in err and str(out / "checkpoints" / "lorsu") in err
    assert main(command) == 0
    assert (out / "lorsu.json").exists()
