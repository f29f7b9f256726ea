"""The README's main job: the real-image demo on the packaged mini-CLIP (shortened to two epochs)."""

from __future__ import annotations

import sys

import pytest

from peft_lorsu.app.demo import DemoConfig, run_demo
from peft_lorsu.app.models import MINI_CLIP


@pytest.mark.skipif(not (MINI_CLIP / "model.safetensors").exists(), reason="packaged mini-CLIP missing")
def test_demo_learns_digits_and_keeps_fashion(tmp_path, capsys):
    result = run_demo(DemoConfig(epochs=2, output_dir=str(tmp_path)))
    assert result["before"]["target"] < 0.2  # digits are new to the model
    assert result["after"]["target"] >= result["before"]["target"] + 0.15
    assert result["after"]["control"] >= result["before"]["control"] - 0.05
    assert result["reload_max_abs_diff"] == 0.0
    assert 0 < result["lorsu_params"] < 0.1 * result["full_params"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "1/5 zero-shot accuracy" in printed and "5/5 adapter saved" in printed


@pytest.mark.skipif(not (MINI_CLIP / "model.safetensors").exists(), reason="packaged mini-CLIP missing")
def test_demo_without_matplotlib_says_so_and_finishes(tmp_path, capsys, monkeypatch):
    """The README's demo command installs the package without extras: no matplotlib, and the demo still finishes."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a)
    )
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # any import of it fails, as in a bare install
    result = run_demo(DemoConfig(epochs=1, output_dir=str(tmp_path)))
    printed = capsys.readouterr().out
    assert result["plot"] is None and not (tmp_path / "demo.png").exists()
    assert "no plot: matplotlib is not installed (pip install 'peft-lorsu[plots]'" in printed
    assert "5/5 adapter saved" in printed and (tmp_path / "adapter" / "adapter_config.json").exists()
    assert result["after"]["target"] > result["before"]["target"]


def test_plots_name_the_missing_library(monkeypatch):
    from peft_lorsu.app import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'peft-lorsu\[plots\]'"):
        plots.plot_sessions({}, "x.png")
