"""Loading the plugin's adapters: refuse what does not fit *before* the base model is touched.

``PeftModel.from_pretrained`` wraps the base model's modules first and reads the weights afterwards, so an adapter
for another base model, or one whose files were edited or half-written, would fail halfway and leave a half-wrapped
model. One mechanism closes that gap: the tuners' ``_prepare_model`` calls :func:`check_before_injection` before any
module is replaced. For a config just read from a local folder (:class:`peft_lorsu.config.PluginConfig` remembers
the folder) it checks the folder (no ``adapter_model.bin``, a readable safetensors file whose SHA-256 the config
records, finite values) and rehearses the load on a shadow copy of the model whose weights take no memory: peft
wraps the shadow with the same config, and the saved tensors must have exactly the keys, shapes and kinds the shadow
expects and pass the layers' own load checks (:func:`rehearse_load`).

:func:`safe_load_adapter` is the strict entry point: it also refuses any pickle file in the folder, reads the config
with a clear error for every way it can be broken, and fetches exactly the two safetensors-era files from the Hub.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from peft import PeftConfig, PeftModel
from peft.utils import set_peft_model_state_dict
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import SafetensorError, safe_open
from torch import nn

from .compat import adapter_state_dict
from .config import file_sha256

logger = logging.getLogger(__name__)

PLUGIN_TYPES = ("LORSU", "RLP", "LORSU_RLP")
# File endings of Python pickles (and of the formats built on them: torch.save, joblib, Lightning checkpoints).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
_KEY_PREFIX = "base_model.model."


def refuse_pickles(folder: str, strict: bool) -> None:
    """Raise if ``folder`` holds ``adapter_model.bin`` (any pickle file at all when ``strict``).

    peft reads ``adapter_model.bin`` with ``torch.load`` when no safetensors file is present; the plugin never does.
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


def read_adapter_tensors(folder: str, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    """Every tensor of ``folder``'s safetensors file, on the CPU, after checking the file against its config.

    Raises:
        ValueError: no such file, not a safetensors file, a SHA-256 other than ``expected_sha256`` (the config and the
            weights come from different saves), or a floating-point tensor holding NaN / inf.
    """
    path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no {SAFETENSORS_WEIGHTS_NAME}; peft-lorsu loads adapter weights only from it")
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path} is not a valid safetensors file (truncated or edited?): {exc}") from exc
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise ValueError(
            f"{path} is not the file that was saved with {CONFIG_NAME} (its SHA-256 differs from the one the config "
            "records): the weights come from another save (an interrupted or concurrent save_pretrained?) or were "
            "edited. Save the adapter again; if you replaced the weights on purpose, set weights_sha256 to null in "
            f"{CONFIG_NAME}"
        )
    broken = sorted(k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if broken:
        raise ValueError(f"{path}: tensor(s) {_short(broken)} hold NaN or inf; the saved adapter is broken")
    return tensors


def check_before_injection(tuner: nn.Module, config: PeftConfig, model: nn.Module) -> None:
    """What the plugin's tuners run in ``_prepare_model``, before any module of ``model`` is replaced.

    Re-validates ``config`` (its fields may have been edited since construction) and, when ``config`` was just read
    from a local folder by ``from_pretrained`` and not edited since, checks that folder's weights against ``model``.
    """
    config.validate()
    source = vars(config).pop("loaded_from", None)  # used once: the rehearsal's own injection must not recurse
    if source is None:
        return
    folder, as_read = source
    if config.fields_as_read() != as_read:
        logger.debug("config read from %s was edited before injection; its folder is not checked", folder)
        return
    refuse_pickles(folder, strict=False)
    tensors = read_adapter_tensors(folder, config.weights_sha256)
    check_range(tensors, model, folder)
    names = [name for name, c in getattr(tuner, "peft_config", {}).items() if c is config]
    rehearse_load(model, config, tensors, where=folder, adapter_name=names[0] if names else None)


def check_range(tensors: dict[str, torch.Tensor], model: nn.Module, where: str) -> None:
    """Refuse saved values that overflow the floating dtype of ``model`` (e.g. an fp32 adapter onto an fp16 model)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    limit = torch.finfo(dtype).max
    huge = sorted(k for k, t in tensors.items() if t.is_floating_point() and t.numel() and t.abs().max() > limit)
    if huge:
        raise ValueError(
            f"the adapter in {where} holds values beyond the {dtype} range of this model (|x| > {limit:.3g}) in "
            f"{_short(huge)}; they would become inf. Load it onto a model in a wider dtype (float32); nothing was "
            "changed"
        )


def shadow_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are zero-stride views of one zero (no weight memory).

    Shapes, dtypes, devices, module types and attributes are those of ``model``; values are all zero. Adapter layers
    built on the copy get real (adapter-sized) tensors, so a saved adapter can be loaded into them as a rehearsal.
    """
    memo: dict[int, Any] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in memo:
            empty = torch.zeros((), dtype=tensor.dtype, device=tensor.device).expand(tensor.shape)
            if isinstance(tensor, nn.Parameter):
                empty = nn.Parameter(empty, requires_grad=tensor.requires_grad)
            memo[id(tensor)] = empty
    return copy.deepcopy(model, memo)


def rehearse_load(
    model: nn.Module, config: PeftConfig, tensors: dict[str, torch.Tensor], where: str, adapter_name: str | None = None
) -> None:
    """Raise ``ValueError`` unless ``tensors`` (a saved adapter) would load into ``model`` wrapped with ``config``."""
    taken = set(getattr(model, "peft_config", None) or {})
    name = adapter_name if adapter_name and adapter_name not in taken else _unused_name(taken)
    refusal = f"the adapter in {where} does not fit this {type(model).__name__}; nothing was changed"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shadow = PeftModel(shadow_copy(model), copy.deepcopy(config), adapter_name=name)
            expected, tensors = adapter_state_dict(shadow, name, tensors)
    except ValueError as exc:  # the saved config does not fit the model (the real injection would raise the same)
        raise ValueError(f"{refusal}: {exc}") from exc
    problems = compare_state(expected, tensors, model)
    if problems:
        raise ValueError(
            f"{refusal}:\n  - "
            + "\n  - ".join(_short(problems, 8, sep=None))
            + "\nIt was saved for a different base model (other width, head count, number of layers or text width), "
            "with another configuration, or its files were edited."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            set_peft_model_state_dict(shadow, tensors, adapter_name=name)
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


def _unused_name(taken: set[str]) -> str:
    name, n = "peft_lorsu_check", 0
    while name in taken:
        n += 1
        name = f"peft_lorsu_check{n}"
    return name


def safe_load_adapter(
    model: nn.Module,
    model_id: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    subfolder: str | None = None,
    revision: str | None = None,
    **kwargs: Any,
) -> PeftModel:
    """Load a LoRSU, RLP or joint adapter without ever unpickling; ``model`` is untouched if it is refused.

    Compared with ``PeftModel.from_pretrained`` (which, after ``import peft_lorsu``, already rehearses the load of a
    local folder before wrapping the model), this also refuses a folder holding any pickle file, reads
    ``adapter_config.json`` with a clear error for each way it can be broken (not JSON, not an object, no or an
    unknown ``peft_type``), refuses other adapter types, and for a Hub id downloads exactly ``adapter_config.json``
    and ``adapter_model.safetensors``.

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

    Raises:
        ValueError: naming the file and what is wrong with it.
    """
    folder = _local_folder(model_id, subfolder, revision, kwargs)
    refuse_pickles(folder, strict=True)
    peft_type = read_peft_type(folder)
    if peft_type not in PLUGIN_TYPES:
        raise ValueError(
            f"safe_load_adapter loads LoRSU, RLP and joint LoRSU+RLP adapters; {folder} holds a {peft_type} adapter "
            "(use PeftModel.from_pretrained for other methods)"
        )
    if not isinstance(model, PeftModel):
        return PeftModel.from_pretrained(model, folder, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)
    if adapter_name in model.peft_config:
        raise ValueError(
            f"adapter_name={adapter_name!r} is already loaded; delete_adapter it first or pick another name"
        )
    model.load_adapter(folder, adapter_name, is_trainable=is_trainable, **kwargs)
    return model


def read_peft_type(folder: str) -> str:
    """The ``peft_type`` of ``folder/adapter_config.json``, with an error naming the file for every broken form."""
    path = os.path.join(folder, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            fields = json.load(f)
    except FileNotFoundError as exc:
        raise ValueError(f"{folder} holds no {CONFIG_NAME}: it is not a saved adapter folder") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON (truncated or edited?): {exc}. Save the adapter again") from exc
    if not isinstance(fields, dict):
        raise ValueError(f"{path} must hold a JSON object of config fields, got a {type(fields).__name__}")
    if "peft_type" not in fields:
        raise ValueError(f"{path} has no peft_type field; a peft-lorsu adapter has one of {PLUGIN_TYPES}")
    return str(fields["peft_type"])


def _local_folder(model_id: str | os.PathLike, subfolder: str | None, revision: str | None, kwargs: dict) -> str:
    """``model_id`` (with ``subfolder``) as a local folder; a Hub id gets exactly its config and safetensors file."""
    path = os.fspath(model_id)
    local = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(local):
        return os.path.abspath(local)
    if os.path.exists(local):
        raise ValueError(f"{local} is a file; give the adapter folder (or a Hub repository id)")
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
