"""Atomic adapter saves: a folder holds either the old adapter or the new one, never a mix.

``PeftModel.save_pretrained`` writes ``adapter_model.safetensors`` and then ``adapter_config.json`` in place. If it is
interrupted between the two (or halfway through the first), the folder holds a mix; after ``import peft_lorsu`` such
a folder is refused on load (truncated file, or weights whose SHA-256 the config does not record), but the old
adapter is lost. :func:`save_adapter_atomic` keeps it: the new adapter is written into a temporary sibling folder,
flushed to disk, and only then swapped in with two renames.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from typing import Any

from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

# Never carried over from the old folder: the new save decides which adapter files exist.
ADAPTER_FILES = frozenset({CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME})
CARD = "README.md"


def save_adapter_atomic(model: Any, path: str | os.PathLike, **kwargs: Any) -> str:
    """``model.save_pretrained(path, **kwargs)``, but an interruption leaves the previous ``path`` intact.

    The adapter is saved into ``.<name>.saving-*`` next to ``path``. Files of the old folder that are not adapter
    files (``adapter_config.json``, ``adapter_model.safetensors``, ``adapter_model.bin``) are carried over as hard
    links (copies across file systems), and ``README.md`` is copied first so PEFT updates the card instead of
    replacing it. Everything is flushed to disk; then the old folder is renamed away, the new one renamed into place,
    and the old one deleted. An interruption before the first rename leaves the old folder untouched (and a stray
    ``.saving-*`` folder); between the two renames, ``path`` is briefly absent and the old adapter sits in
    ``.<name>.old-*``. ``path`` never holds a mix of two adapters.

    Args:
        model: a ``PeftModel`` (anything with ``save_pretrained``).
        path: the adapter folder to create or replace.
        kwargs: passed to ``save_pretrained``; ``safe_serialization=False`` (pickle) is refused.

    Returns:
        The absolute path of the saved folder.
    """
    if kwargs.get("safe_serialization", True) is False:
        raise ValueError("save_adapter_atomic writes safetensors only; safe_serialization=False would write a pickle")
    target = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(target)
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"{target} exists and is not a folder")
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.saving-", dir=parent)
    try:
        old_card = os.path.join(target, CARD)
        if os.path.isfile(old_card):
            shutil.copy2(old_card, os.path.join(staging, CARD))
        model.save_pretrained(staging, **kwargs)
        if os.path.isdir(target):
            _carry_over(target, staging)
        _fsync_tree(staging)
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _carry_over(old: str, new: str) -> None:
    """Link into ``new`` every entry of ``old`` that ``new`` lacks, recursively, except adapter files."""
    for entry in os.scandir(old):
        destination = os.path.join(new, entry.name)
        if entry.name in ADAPTER_FILES:
            continue
        if entry.is_symlink():
            if not os.path.lexists(destination):
                os.symlink(os.readlink(entry.path), destination)
        elif entry.is_dir():
            if not os.path.exists(destination):
                os.mkdir(destination)
            if os.path.isdir(destination):
                _carry_over(entry.path, destination)
        elif not os.path.exists(destination):
            _link_or_copy(entry.path, destination)


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _fsync_tree(root: str) -> None:
    """Flush every file and folder under ``root`` to disk (so a crash after the rename cannot lose their data)."""
    for folder, _, files in os.walk(root):
        for file_name in files:
            path = os.path.join(folder, file_name)
            if not os.path.islink(path):
                _fsync(path, os.O_RDONLY)
        _fsync(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: str, flags: int) -> None:
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. folders cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _swap_in(staging: str, target: str) -> None:
    """Move ``staging`` to ``target``, replacing an existing ``target`` folder."""
    parent, name = os.path.split(target)
    if not os.path.exists(target):
        os.rename(staging, target)
    else:
        retired = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, retired)
        os.rename(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    _fsync(parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
