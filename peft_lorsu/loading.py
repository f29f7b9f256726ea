"""Guarded loading of the plugin's adapters: refuse what does not fit *before* the base model is touched.

``PeftModel.from_pretrained`` first wraps the base model's modules (injection) and only then reads the weights, so an
adapter that belongs to another base model, or whose files were edited or half-written, used to fail halfway and
leave a half-wrapped model behind. The plugin closes that gap in three steps, all run before any module is replaced:

1. The plugin's configs remember the local folder they were read from (:class:`AdapterFileGuard`) and, when saved
   next to their weights, the SHA-256 of ``adapter_model.safetensors`` (field ``weights_sha256``).
2. The tuners' ``_prepare_model`` (``LoRSUModel``, ``RLPModel``, the joint ``LoRSURLPModel``) calls
   :func:`before_injection`, which re-validates the config and, for a config just read from a folder, checks the
   folder: no ``adapter_model.bin`` (PEFT would unpickle it), a readable safetensors file whose hash matches the
   config, finite values.
3. It then *rehearses* the load on a shadow copy of the model whose weights are zero-stride views (no memory): PEFT
   wraps the shadow with the same config, and the saved tensors must have exactly the keys, shapes and kinds the
   shadow expects and pass the layers' own load checks. Only then does the real injection start.

:func:`safe_load_adapter` is the strict entry point: it also refuses any pickle file in the folder, fetches only the
two safetensors-era files from the Hub, and undoes the injection if anything still fails afterwards.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import SafetensorError, safe_open
from torch import nn

logger = logging.getLogger(__name__)

PLUGIN_TYPES = ("LORSU", "RLP", "LORSU_RLP")
# File endings of Python pickles (and of the formats built on them: torch.save, joblib, Lightning checkpoints).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
_SOURCE_ATTR = "_peft_lorsu_source"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KEY_PREFIX = "base_model.model."


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256_field(name: str, value: Any) -> None:
    """Validate a ``weights_sha256`` config field: ``None`` or 64 lower-case hex digits."""
    if value is not None and not (isinstance(value, str) and _SHA256.fullmatch(value)):
        raise ValueError(f"{name} must be None or 64 lower-case hex digits (a SHA-256), got {value!r}")


class AdapterFileGuard:
    """Mixin of the plugin's configs (LoRSU, RLP, joint) that ties a config to the weights file saved next to it.

    - ``from_pretrained`` remembers the local folder the config was read from (and the config as read), so the next
      injection with this config, the one ``PeftModel.from_pretrained`` / ``load_adapter`` performs, can check the
      folder's weights first (:func:`before_injection`). The mark is used once, and ignored if the config was edited.
    - ``save_pretrained`` records the SHA-256 of the ``adapter_model.safetensors`` already written in the same folder
      (PEFT writes the weights, then the config). A folder whose weights come from another save, e.g. one interrupted
      between the two files, or whose weights were edited, no longer matches and is refused on load.
    """

    weights_sha256: str | None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs):
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = os.fspath(pretrained_model_name_or_path)
        if subfolder:
            folder = os.path.join(folder, subfolder)
        if isinstance(config, AdapterFileGuard) and os.path.isdir(folder):
            vars(config)[_SOURCE_ATTR] = (os.path.abspath(folder), _as_read(config))
        return config

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        weights = os.path.join(save_directory, SAFETENSORS_WEIGHTS_NAME)
        self.weights_sha256 = file_sha256(weights) if os.path.isfile(weights) else None
        super().save_pretrained(save_directory, **kwargs)


def _as_read(config: PeftConfig) -> dict:
    """The config's fields except ``inference_mode`` (which ``from_pretrained`` sets after reading)."""
    fields = config.to_dict()
    fields.pop("inference_mode", None)
    return fields


# ------------------------------------------------------------------------------------------------ folder checks


def refuse_pickles(folder: str, strict: bool) -> None:
    """Raise if ``folder`` holds ``adapter_model.bin`` (any pickle file at all when ``strict``).

    PEFT reads ``adapter_model.bin`` with ``torch.load`` when no safetensors file is present; the plugin never does.
    """
    names = sorted(os.listdir(folder))
    found = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)] if strict else []
    if WEIGHTS_NAME in names and WEIGHTS_NAME not in found:
        found.insert(0, WEIGHTS_NAME)
    if found:
        raise ValueError(
            f"refusing to load the adapter in {folder}: it contains pickle file(s) {found}. peft-lorsu adapters are "
            f"loaded from {SAFETENSORS_WEIGHTS_NAME} only and never unpickled; delete the pickle files (or re-save "
            "the adapter with save_pretrained, which writes safetensors) if you trust them"
        )


def check_weights_file(folder: str, expected_sha256: str | None) -> str:
    """Path of ``folder``'s safetensors file after checking that it exists, parses, and matches its config's hash."""
    path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no {SAFETENSORS_WEIGHTS_NAME}; peft-lorsu loads adapter weights only from it")
    try:
        with safe_open(path, framework="pt") as f:
            list(f.keys())
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path} is not a valid safetensors file (truncated or edited?): {exc}") from exc
    if expected_sha256 is not None:
        found = file_sha256(path)
        if found != expected_sha256:
            raise ValueError(
                f"{path} is not the file that was saved with {CONFIG_NAME} (SHA-256 {found[:12]}..., the config "
                f"records {expected_sha256[:12]}...): the weights come from another save (an interrupted "
                "save_pretrained?) or were edited. If you replaced them on purpose, set weights_sha256 to null in "
                f"{CONFIG_NAME}"
            )
    return path


def read_adapter_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file on the CPU; raise if a floating-point tensor holds NaN or inf."""
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path} could not be read (truncated or edited?): {exc}") from exc
    broken = sorted(k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if broken:
        raise ValueError(f"{path}: tensor(s) {_short(broken)} hold NaN or inf; the saved adapter is broken")
    return tensors


# --------------------------------------------------------------------------------------------------- rehearsal


def before_injection(tuner: nn.Module, config: PeftConfig, model: nn.Module) -> None:
    """Checks the plugin's tuners run in ``_prepare_model``, before any module of ``model`` is replaced.

    Re-validates ``config`` (its fields may have been edited since construction) and, when ``config`` was just read
    from a local folder by ``from_pretrained`` and not edited since, checks that folder's weights against ``model``
    by rehearsing the load on a shadow copy (:func:`rehearse_load`).
    """
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    source = vars(config).pop(_SOURCE_ATTR, None)
    if source is None:
        return
    folder, as_read = source
    if _as_read(config) != as_read:
        logger.debug("config read from %s was edited before injection; its folder is not checked", folder)
        return
    refuse_pickles(folder, strict=False)
    path = check_weights_file(folder, getattr(config, "weights_sha256", None))
    names = [name for name, c in getattr(tuner, "peft_config", {}).items() if c is config]
    rehearse_load(model, config, read_adapter_tensors(path), where=folder, adapter_name=names[0] if names else None)


def shadow_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are zero-stride views of one zero (no weight memory).

    Shapes, dtypes, devices, module types and attributes are those of ``model``; values are all zero. Adapter layers
    built on the copy get real (adapter-sized) tensors, so a saved adapter can be loaded into them as a rehearsal.
    """
    memo: dict[int, Any] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) in memo:
            continue
        empty = torch.zeros((), dtype=tensor.dtype, device=tensor.device).expand(tensor.shape)
        if isinstance(tensor, nn.Parameter):
            empty = nn.Parameter(empty, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = empty
    return copy.deepcopy(model, memo)


def rehearse_load(
    model: nn.Module,
    config: PeftConfig,
    tensors: dict[str, torch.Tensor],
    where: str,
    adapter_name: str | None = None,
) -> None:
    """Raise ``ValueError`` unless ``tensors`` (a saved adapter) would load into ``model`` wrapped with ``config``.

    The shadow of ``model`` is wrapped by PEFT exactly as the real load will wrap ``model``; ``tensors`` must then
    hold exactly the keys of the shadow's adapter state dict, with the same shapes, floating-point tensors where
    it has floating-point ones, and pass ``set_peft_model_state_dict`` (which runs the layers' own load checks).
    """
    trial = copy.deepcopy(config)
    name = adapter_name if adapter_name and adapter_name not in _adapter_names(model) else _unused_name(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shadow = PeftModel(shadow_copy(model), trial, adapter_name=name)
            expected = get_peft_model_state_dict(shadow, adapter_name=name)
    except ValueError as exc:  # the saved config does not fit the model (the real injection would raise the same)
        raise ValueError(
            f"the adapter in {where} does not fit this {type(model).__name__}; nothing was changed: {exc}"
        ) from exc
    except Exception as exc:  # an exotic model that cannot be shadowed: fall back to the layers' load checks
        logger.warning("peft-lorsu could not rehearse loading %s (%s: %s); loading unchecked", where, type(exc), exc)
        return
    problems = compare_state(expected, tensors, model)
    if problems:
        raise ValueError(
            f"the adapter in {where} does not fit this {type(model).__name__}; nothing was changed:\n  - "
            + "\n  - ".join(_short(problems, 8, sep=None))
            + "\nIt was saved for a different base model (other width, head count, number of layers or text width), "
            "with another configuration, or its files were edited."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            set_peft_model_state_dict(shadow, tensors, adapter_name=name, low_cpu_mem_usage=True)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"the adapter in {where} was refused before loading; nothing was changed: {exc}") from exc


def compare_state(expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    """Human-readable differences between the adapter state a model expects and a saved one (empty: they agree).

    Keys only one side has are grouped by module (``vision_model.encoder.layers.5.mlp.fc1: ...``); tensors both
    sides have are compared by shape and by kind (floating point or integer).
    """
    problems = []
    prefix = _path_prefix(set(saved) - set(expected), set(expected) - set(saved))
    if prefix:
        problems.append(prefix)
    for module, names in _by_module(set(saved) - set(expected)).items():
        if module and not _has_module(model, module):
            problems.append(f"{module}: the adapter holds {names}, but this model has no such module")
        else:
            problems.append(f"{module}: the adapter holds {names}, which this model and config do not use")
    for module, names in _by_module(set(expected) - set(saved), expected).items():
        problems.append(f"{module}: this model needs {names}, which the adapter does not hold")
    for key in sorted(set(expected) & set(saved)):
        want, got = expected[key], saved[key]
        if tuple(want.shape) != tuple(got.shape):
            problems.append(f"{_strip(key)}: shape {_shape(got)} in the adapter, {_shape(want)} in this model")
        elif want.is_floating_point() != got.is_floating_point():
            kind = "a floating-point" if want.is_floating_point() else "an integer"
            problems.append(f"{_strip(key)}: {got.dtype} in the adapter, this model needs {kind} tensor")
    return problems


def _path_prefix(only_saved: set[str], only_expected: set[str]) -> str | None:
    """A hint when the two sides name the same tensors under paths that differ by a leading prefix."""
    sides = ((only_saved, only_expected, "the adapter's"), (only_expected, only_saved, "this model's"))
    for longer, shorter, side in sides:
        if not shorter or len(longer) < len(shorter):
            continue
        prefixes = set()
        for key in shorter:
            tail = "." + _strip(key)
            matches = [_strip(k)[: -len(tail)] for k in longer if _strip(k).endswith(tail)]
            prefixes.add(matches[0] if len(matches) == 1 else None)
        if len(prefixes) == 1 and None not in prefixes:
            return (
                f"{side} module paths carry an extra prefix {prefixes.pop() + '.'!r}: the adapter was saved from a "
                "model of another class (e.g. a CLIPModel adapter on a bare CLIPVisionModel)"
            )
    return None


def _by_module(keys: set[str], shapes: dict[str, torch.Tensor] | None = None) -> dict[str, str]:
    """``{module path: "name1, name2 (shape)"}`` for state-dict keys, modules in sorted order."""
    grouped: dict[str, list[str]] = {}
    for key in sorted(keys):
        module, _, name = _strip(key).rpartition(".")
        grouped.setdefault(module, []).append(f"{name} {_shape(shapes[key])}" if shapes else name)
    return {module: ", ".join(names) for module, names in grouped.items()}


def _adapter_names(model: nn.Module) -> set[str]:
    return set(getattr(model, "peft_config", None) or {})


def _unused_name(model: nn.Module) -> str:
    taken = _adapter_names(model)
    name, n = "peft_lorsu_check", 0
    while name in taken:
        n += 1
        name = f"peft_lorsu_check{n}"
    return name


def _strip(key: str) -> str:
    return key[len(_KEY_PREFIX) :] if key.startswith(_KEY_PREFIX) else key


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _short(items: list[str], limit: int = 3, sep: str | None = ", ") -> Any:
    """The first ``limit`` items and a count of the rest, joined by ``sep`` (a list if ``sep`` is None)."""
    shown = list(items[:limit]) + ([f"... and {len(items) - limit} more"] if len(items) > limit else [])
    return shown if sep is None else sep.join(shown)


# ------------------------------------------------------------------------------------------- safe_load_adapter


def safe_load_adapter(
    model: nn.Module,
    model_id: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    subfolder: str | None = None,
    revision: str | None = None,
    **kwargs: Any,
) -> PeftModel:
    """Load a LoRSU, RLP or joint adapter without ever unpickling, and leave ``model`` untouched if anything fails.

    Compared with ``PeftModel.from_pretrained`` (which, after ``import peft_lorsu``, already rehearses the load of a
    local folder before wrapping the model), this also:

    - refuses a folder holding any pickle file (``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl``, ...), not only
      ``adapter_model.bin``;
    - for a Hub id, downloads exactly ``adapter_config.json`` and ``adapter_model.safetensors`` (never a pickle
      fallback) and runs the same checks on them;
    - refuses adapter types other than LoRSU, RLP and the joint LoRSU+RLP;
    - undoes the wrapping (restores the original modules and ``requires_grad`` flags) if loading fails after it.

    Args:
        model: a plain base model (``PeftModel.from_pretrained`` is used) or a ``PeftModel`` to add the adapter to
            (``load_adapter``; ``adapter_name`` must be new).
        model_id: a local adapter folder or a Hub repository id.
        adapter_name: the name of the loaded adapter.
        is_trainable: load it trainable (otherwise in inference mode).
        subfolder: a folder inside ``model_id``.
        revision: Hub revision.
        kwargs: passed on to ``PeftModel.from_pretrained`` / ``load_adapter`` (e.g. ``low_cpu_mem_usage``) and, for
            ``cache_dir`` / ``token``, to the Hub download.

    Returns:
        The ``PeftModel``.

    Raises:
        ValueError: pickle files, no or an invalid safetensors file, weights that do not belong to the config, an
            adapter that does not fit ``model``, another adapter type, or an adapter name already in use.
    """
    folder = _local_folder(model_id, subfolder, revision, kwargs)
    refuse_pickles(folder, strict=True)
    check_weights_file(folder, None)  # hash and shapes are checked again, with the config, before injection
    peft_type = _peft_type(folder)
    if peft_type not in PLUGIN_TYPES:
        raise ValueError(
            f"safe_load_adapter loads LoRSU, RLP and joint LoRSU+RLP adapters; {folder} holds a {peft_type} adapter "
            "(use PeftModel.from_pretrained for other methods)"
        )
    if isinstance(model, PeftModel):
        if adapter_name in model.peft_config:
            raise ValueError(
                f"adapter_name={adapter_name!r} is already loaded; delete_adapter it first or pick another name"
            )
        try:
            model.load_adapter(folder, adapter_name, is_trainable=is_trainable, **kwargs)
        except BaseException:
            if adapter_name in model.peft_config:
                model.delete_adapter(adapter_name)
            raise
        return model
    with _undo_injection_on_error(model):
        return PeftModel.from_pretrained(model, folder, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)


def _local_folder(model_id: str | os.PathLike, subfolder: str | None, revision: str | None, kwargs: dict) -> str:
    """``model_id`` (with ``subfolder``) as a local folder; a Hub id gets exactly its config and safetensors file."""
    path = os.fspath(model_id)
    local = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(local):
        return os.path.abspath(local)
    if os.path.exists(local):
        raise ValueError(f"{local} is a file; give the adapter folder (or a Hub repository id)")
    from huggingface_hub import hf_hub_download

    hub = {k: kwargs[k] for k in ("cache_dir", "token") if k in kwargs}
    try:
        files = [
            hf_hub_download(path, name, subfolder=subfolder, revision=revision, **hub)
            for name in (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME)
        ]
    except Exception as exc:  # huggingface_hub raises many kinds: invalid id, offline, missing file, ...
        raise ValueError(
            f"{local} is not a local folder, and {CONFIG_NAME} + {SAFETENSORS_WEIGHTS_NAME} could not be fetched from "
            f"the Hub repository {path!r}: {type(exc).__name__}: {exc}"
        ) from exc
    return os.path.dirname(files[0])


def _peft_type(folder: str) -> str:
    path = os.path.join(folder, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            return str(json.load(f).get("peft_type"))
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{path} is missing or not a JSON object: {exc}") from exc


@contextmanager
def _undo_injection_on_error(model: nn.Module) -> Iterator[None]:
    """If the body raises, put back every replaced module of ``model``, its ``requires_grad`` flags and the absence
    of a ``peft_config`` attribute, then re-raise."""
    modules = dict(model.named_modules())
    flags = [(p, p.requires_grad) for p in model.parameters()]
    had_config = "peft_config" in vars(model)
    try:
        yield
    except BaseException:
        restore_modules(model, modules)
        for param, flag in flags:
            param.requires_grad_(flag)
        if not had_config:
            vars(model).pop("peft_config", None)
        raise


def restore_modules(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Put ``modules`` (``{path: module}`` as recorded by ``named_modules``) back where they were, parents first."""
    for path in sorted((p for p in modules if p), key=lambda p: p.count(".")):
        parent_path, _, child = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path)
            current = getattr(parent, child, None)
        except AttributeError:
            continue
        if current is not modules[path]:
            setattr(parent, child, modules[path])
    remaining = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and n not in modules]
    if remaining:
        logger.warning("peft-lorsu: could not unwrap %s after a failed load", remaining)
