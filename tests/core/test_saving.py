"""save_adapter_atomic under hostile conditions: other files in the folder, links, bad paths, a concurrent writer,
and real processes killed with SIGKILL in the middle of saves."""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import clip_batches, tiny_clip
from peft import PeftModel, get_peft_model

from peft_lorsu import LoRSUConfig, save_adapter_atomic
from peft_lorsu.saving import TEMP_MARK

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}


def adapter(seed: int, alpha: float):
    """A LoRSU model whose every output depends on ``seed`` and ``alpha`` (random selection and init)."""
    torch.manual_seed(seed)
    config = LoRSUConfig(r=4, lora_alpha=alpha, selection="random", seed=seed, init_weights=False)
    return get_peft_model(tiny_clip(), config)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits_per_image


def which(folder: Path, candidates: dict[str, torch.Tensor]) -> str:
    """The name of the candidate adapter ``folder`` loads as (raises if it loads as none of them)."""
    batch = clip_batches(n=1)[0]
    out = logits(PeftModel.from_pretrained(tiny_clip(), folder), batch)
    matches = [name for name, expected in candidates.items() if torch.allclose(out, expected, atol=1e-6)]
    assert len(matches) == 1, f"{folder} loads as none of {sorted(candidates)}: a mix"
    return matches[0]


def test_only_the_adapter_files_change(tmp_path):
    folder = tmp_path / "out"
    checkpoint = folder / "checkpoint-100"
    checkpoint.mkdir(parents=True)
    old = adapter(1, 8.0)
    old.save_pretrained(checkpoint)  # a Trainer checkpoint kept inside the output folder
    (folder / "notes.txt").write_text("kept")
    (folder / "trainer_state.json").write_text("{}")
    os.chmod(folder, 0o755)
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}

    new = adapter(2, 4.0)
    assert save_adapter_atomic(new, folder) == str(folder)
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before
    assert (folder / "notes.txt").read_text() == "kept" and (folder / "trainer_state.json").exists()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert ADAPTER_FILES <= {p.name for p in folder.iterdir()}
    assert not [p for p in tmp_path.rglob("*") if TEMP_MARK in p.name or "saving" in p.name]
    batch = clip_batches(n=1)[0]
    assert which(folder, {"new": logits(new, batch), "old": logits(old, batch)}) == "new"
    assert which(checkpoint, {"new": logits(new, batch), "old": logits(old, batch)}) == "old"


def test_a_symbolic_link_stays_a_link_and_the_card_is_updated(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    model = adapter(3, 8.0)
    save_adapter_atomic(model, link)
    save_adapter_atomic(model, link)
    assert link.is_symlink() and ADAPTER_FILES <= {p.name for p in real.iterdir()}
    assert (real / "README.md").read_text().count("<!-- peft-lorsu:start -->") == 1


@pytest.mark.parametrize("path", ["", "   ", "/"])
def test_empty_path_and_root_are_refused(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="empty|root"):
        save_adapter_atomic(adapter(4, 8.0), path)
    assert list(tmp_path.iterdir()) == []


def test_a_file_path_and_pickles_are_refused(tmp_path):
    file = tmp_path / "adapter"
    file.write_text("not a folder")
    with pytest.raises(ValueError, match="is not a folder"):
        save_adapter_atomic(adapter(4, 8.0), file)
    with pytest.raises(ValueError, match="safetensors only"):
        save_adapter_atomic(adapter(4, 8.0), tmp_path / "x", safe_serialization=False)


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path):
    folder = tmp_path / "out"
    first = adapter(5, 8.0)
    save_adapter_atomic(first, folder)
    fd = os.open(folder, os.O_RDONLY)  # another writer, in the middle of its save
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(RuntimeError, match="another process is saving an adapter to"):
            save_adapter_atomic(adapter(6, 2.0), folder)
    finally:
        os.close(fd)
    batch = clip_batches(n=1)[0]
    assert which(folder, {"first": logits(first, batch)}) == "first"


def test_stale_temporary_files_are_removed_by_the_next_save(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    stale = folder / f"{TEMP_MARK}12345-adapter_model.safetensors"
    stale.write_bytes(b"half a file")
    save_adapter_atomic(adapter(7, 8.0), folder)
    assert not stale.exists()


WRITER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_clip
    from peft import get_peft_model
    from peft_lorsu import LoRSUConfig, save_adapter_atomic

    seed, alpha, folder, rounds = int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    torch.manual_seed(seed)
    config = LoRSUConfig(r=4, lora_alpha=alpha, selection="random", seed=seed, init_weights=False)
    model = get_peft_model(tiny_clip(), config)
    print("ready", flush=True)
    saved = refused = 0
    for _ in range(rounds):
        try:
            save_adapter_atomic(model, folder)
            saved += 1
        except RuntimeError as exc:
            assert "another process is saving" in str(exc), exc
            refused += 1
    print("done", saved, refused, flush=True)
    """
)


def writer(tmp_path: Path, name: str, seed: int, alpha: float, folder: Path, rounds: int) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(Path(__file__).resolve().parents[1])))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script), name, str(seed), str(alpha), str(folder), str(rounds)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_concurrent_writers_leave_one_complete_adapter(tmp_path):
    folder = tmp_path / "out"
    batch = clip_batches(n=1)[0]
    expected = {"a": logits(adapter(11, 8.0), batch), "b": logits(adapter(12, 2.0), batch)}
    procs = [writer(tmp_path, "a", 11, 8.0, folder, 40), writer(tmp_path, "b", 12, 2.0, folder, 40)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]
    counts = [tuple(int(n) for n in out.split("done")[1].split()) for out, _ in outputs]
    assert all(saved + refused == 40 for saved, refused in counts) and sum(s for s, _ in counts) >= 1
    assert which(folder, expected) in {"a", "b"}


@pytest.mark.slow
def test_kill_9_during_saves_never_leaves_a_mix(tmp_path):
    folder = tmp_path / "out"
    batch = clip_batches(n=1)[0]
    expected = {"a": logits(adapter(21, 8.0), batch), "b": logits(adapter(22, 2.0), batch)}
    save_adapter_atomic(adapter(21, 8.0), folder)
    outcomes = []
    for kill in range(6):
        name, seed, alpha = ("b", 22, 2.0) if kill % 2 == 0 else ("a", 21, 8.0)
        proc = writer(tmp_path, name, seed, alpha, folder, 1000)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.1 * kill)  # somewhere inside one of its saves
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        try:
            outcomes.append(which(folder, expected))
        except ValueError as exc:  # killed between the renames: refused by the hash, never loaded as a mix
            assert "another save" in str(exc)
            outcomes.append("refused")
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or "saving" in p.name]
    save_adapter_atomic(adapter(21, 8.0), folder)  # the next save repairs the folder and its leftovers
    assert not [p for p in folder.iterdir() if p.name.startswith(TEMP_MARK)]
    assert which(folder, expected) == "a"
    assert set(outcomes) <= {"a", "b", "refused"}
