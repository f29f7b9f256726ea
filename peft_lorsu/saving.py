"""Saving an adapter so that a folder never loads as a mix of two saves, and nothing else in it is touched.

:func:`save_adapter_atomic` saves the model into a private temporary folder, then moves each adapter file into the
target folder with an atomic rename, the config last (it records the SHA-256 of the weights saved with it). So:

- a reader sees each file either whole and old or whole and new; a kill between the renames leaves new weights
  beside the old config, which :mod:`peft_lorsu.loading` refuses by the hash instead of loading a mix;
- the target folder keeps everything else it holds (checkpoints, logs), its permissions, and a symbolic link stays
  a link: only the adapter's own files are replaced;
- writers to one folder take an exclusive lock on it; a second writer fails at once with a clear error instead of
  interleaving its files with the first one's;
- nothing is left behind after a kill: the temporary folder lives in the system's temporary directory, and a
  temporary file left in the target folder (a kill during a move) is removed by the next save.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from .hub import CARD

# The order of the renames: weights first, the config (which records the weights' hash) last.
ORDER = (SAFETENSORS_WEIGHTS_NAME, CARD, CONFIG_NAME)
TEMP_MARK = ".peft-lorsu-tmp-"


def save_adapter_atomic(model: Any, path: str | os.PathLike, **kwargs: Any) -> str:
    """``model.save_pretrained(path, **kwargs)`` that never leaves ``path`` holding a mix of two saves.

    Args:
        model: a ``PeftModel`` (anything with ``save_pretrained``).
        path: the adapter folder, created if missing. Only the adapter files in it (and in the subfolders peft uses
            for non-default adapters) are replaced.
        kwargs: passed to ``save_pretrained``; ``safe_serialization=False`` (pickle) is refused.

    Returns:
        The absolute path of the folder.

    Raises:
        ValueError: an empty path, a filesystem root, a path that is a file, or ``safe_serialization=False``.
        RuntimeError: another process is saving to the same folder.
    """
    if kwargs.get("safe_serialization", True) is False:
        raise ValueError("save_adapter_atomic writes safetensors only; safe_serialization=False would write a pickle")
    raw = os.fspath(path)
    if not raw.strip():
        raise ValueError("save_adapter_atomic: path is empty; give the adapter folder")
    target = os.path.abspath(raw)
    if os.path.dirname(target) == target:
        raise ValueError(f"save_adapter_atomic: refusing to save into the filesystem root {target!r}")
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"save_adapter_atomic: {target} exists and is not a folder")
    os.makedirs(target, exist_ok=True)
    with _exclusive(target), tempfile.TemporaryDirectory(prefix="peft-lorsu-save-") as staging:
        if os.path.isfile(os.path.join(target, CARD)):  # peft updates an existing card instead of replacing it
            shutil.copy2(os.path.join(target, CARD), os.path.join(staging, CARD))
        model.save_pretrained(staging, **kwargs)
        for folder, _, files in sorted(os.walk(staging)):
            destination = os.path.join(target, os.path.relpath(folder, staging))
            os.makedirs(destination, exist_ok=True)
            _remove_stale_temporaries(destination)
            for name in sorted(files, key=lambda n: ORDER.index(n) if n in ORDER else -1):
                _replace(os.path.join(folder, name), os.path.join(destination, name))
            stale_pickle = os.path.join(destination, WEIGHTS_NAME)  # peft would prefer nothing, we refuse it
            if os.path.isfile(stale_pickle) and WEIGHTS_NAME not in files:
                os.remove(stale_pickle)
            _fsync(destination)
    return target


@contextmanager
def _exclusive(folder: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on ``folder`` (released by the kernel if the process dies)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RuntimeError(
                    f"another process is saving an adapter to {folder} right now; this save was not started, and the "
                    "folder holds the other process's adapter once it finishes"
                ) from exc
            raise
        yield
    finally:
        os.close(fd)


def _replace(source: str, destination: str) -> None:
    """Copy ``source`` next to ``destination``, flush it to disk, then rename it over ``destination``."""
    folder, name = os.path.split(destination)
    temporary = os.path.join(folder, f"{TEMP_MARK}{os.getpid()}-{name}")
    shutil.copyfile(source, temporary)
    if os.path.exists(destination):
        shutil.copymode(destination, temporary)  # keep the mode the user gave the file
    _fsync(temporary)
    os.replace(temporary, destination)


def _remove_stale_temporaries(folder: str) -> None:
    """Delete the temporary files a killed save left in ``folder`` (safe: this process holds the target's lock)."""
    for name in os.listdir(folder):
        if name.startswith(TEMP_MARK):
            os.remove(os.path.join(folder, name))


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)
