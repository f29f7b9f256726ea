"""The documentation site builds with ``mkdocs build --strict``.

Strict mode turns every warning into a failure: a link or anchor that points nowhere, a ``nav`` entry whose page is
missing, an API page (``::: peft_lorsu.X``) whose object no longer exists, a docstring mkdocstrings cannot parse.
The test is skipped where the docs tools are not installed; the ``dev`` extra installs them, so CI runs it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# page of the built site -> anchors that must be on it (one per documented object): catches API pages that build but
# come out empty, e.g. after a rename that mkdocstrings resolves to an alias with nothing in it.
API_ANCHORS = {
    "api/lorsu": ["peft_lorsu.LoRSUConfig", "peft_lorsu.probe_lorsu", "peft_lorsu.LoRSUModel",
                  "peft_lorsu.HeadLoRALinear", "peft_lorsu.SparseLinear", "peft_lorsu.lorsu.EncoderFamily"],
    "api/rlp": ["peft_lorsu.RLPConfig", "peft_lorsu.RLPModel", "peft_lorsu.RLPTextEmbedding"],
    "api/objectives": ["peft_lorsu.objectives.ZeroShotClassifier", "peft_lorsu.objectives.class_cross_entropy"],
    "api/trainer": ["peft_lorsu.trainer.ImageTextCollator", "peft_lorsu.trainer.get_lorsu_model"],
    "api/continual": ["peft_lorsu.app.continual.ContinualConfig", "peft_lorsu.app.continual.ContinualRunner"],
    "api/hub": ["peft_lorsu.hub.record_card_info"],
    "api/joint": ["peft_lorsu.joint.LoRSURLPConfig", "peft_lorsu.joint.LoRSURLPModel"],
    "api/io": ["peft_lorsu.safe_load_adapter", "peft_lorsu.save_adapter_atomic"],
    "api/distributed": ["peft_lorsu.distributed.fully_shard_clip", "peft_lorsu.distributed.shard_batches"],
    "api/cli": ["peft_lorsu.app.cli.main"],
    "api/resources": ["peft_lorsu.app.models.tiny_random_clip"],
}


def _omitted_pages(log: str) -> list[str]:
    """Pages MkDocs reports as present in docs/ but missing from `nav` (an INFO message, not a failure)."""
    match = re.search(r"not included in the \"nav\" configuration:\n((?:\s+- .+\n?)+)", log)
    return re.findall(r"- (\S+)", match.group(1)) if match else []


def test_site_builds_in_strict_mode(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason='the docs tools are not installed (pip install -e ".[docs]")')
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
               "--site-dir", str(site)]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{log[-6000:]}"

    for page, anchors in API_ANCHORS.items():
        html = (site / page / "index.html").read_text()
        missing = [a for a in anchors if f'id="{a}"' not in html]
        assert not missing, f"{page}: the API page lacks {missing}"
    cli = (site / "api" / "cli" / "index.html").read_text()
    assert "usage: peft-lorsu probe" in cli, "the --help reference was not generated (docs/_hooks/cli_help.py)"
    assert (site / "img" / "trained-parts.svg").exists()

    omitted = _omitted_pages(log)
    if omitted:
        warnings.warn(f"pages in docs/ that are not in mkdocs.yml's nav: {omitted}", stacklevel=1)
