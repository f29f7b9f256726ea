"""Small helpers shared by the tuners, the probe and the Trainer glue: unwrapping models, batches, index checks."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain transformers model under DDP / DataParallel / ``PeftModel`` wrappers (adapter layers stay)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        else:
            return model


def strip_data_parallel(model: nn.Module) -> nn.Module:
    """``model`` without its outer DDP / DataParallel wrappers.

    The probe runs its passes on the inner module: DDP would average every batch's gradients inside backward (a
    collective each rank must join, while shards may end at different steps) and expects a gradient for every
    parameter it registered, while the probe tracks only a few weights.
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def batch_size(batch: Mapping[str, Any], who: str = "probe_lorsu") -> int:
    """The leading size of a dict batch of model keyword arguments (``pixel_values``, ``input_ids``, ``labels``)."""
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"{who}: batches must be dicts of model keyword arguments (pixel_values, input_ids, ...), got a "
            f"{type(batch).__name__}"
        )
    preferred = [batch.get(key) for key in ("pixel_values", "input_ids", "labels")]
    for value in (*preferred, *batch.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError(f"{who}: cannot tell the batch size; batches must be dicts holding at least one tensor")


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """``batch`` with every tensor moved to ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@contextmanager
def only_these_require_grad(model: nn.Module, tracked: Iterable[nn.Parameter]) -> Iterator[None]:
    """Let only ``tracked`` require grad, in eval mode; restore flags, ``.grad`` tensors and modes afterwards."""
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p in params:
            p.grad = None
            p.requires_grad_(False)
        for p in tracked:
            p.requires_grad_(True)
        model.eval()
        yield
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad
        for module, mode in modes:
            module.training = mode


def check_index_tensor(what: str, loaded: torch.Tensor, shape: tuple[int, ...], upper: int) -> torch.Tensor:
    """Validate an integer index tensor a saved adapter brings: integer dtype, ``shape``, values in ``[0, upper)``.

    ``-1`` entries are allowed where ``upper`` is 0 (RLP's wildcard context ids are checked by equality instead).

    Returns:
        ``loaded`` as int64.
    """
    if loaded.dtype not in (torch.int32, torch.int64) or tuple(loaded.shape) != tuple(shape):
        raise ValueError(
            f"{what}: expected an int64 tensor of shape {tuple(shape)}, the adapter holds {loaded.dtype} "
            f"{tuple(loaded.shape)}"
        )
    if upper and loaded.numel():
        low, high = torch.aminmax(loaded)
        if int(low) < 0 or int(high) >= upper:
            raise ValueError(f"{what}: values must lie in [0, {upper}), the adapter holds [{int(low)}, {int(high)}]")
    return loaded.long()


def is_number(value: object) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: object) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


class PluginTuner(BaseTuner):
    """What the plugin's three tuners (LoRSU, RLP, joint) share beyond peft's ``BaseTuner``.

    - Targets are found by module structure in ``_prepare_model``, not from a per-architecture name table, so
      ``_prepare_adapter_config`` has nothing to look up.
    - Unloading puts the original module back as it is: modules without a ``.weight`` (a fused attention, CLIP's
      text embeddings) would break peft's default replacement, which copies the weight's device over. A layer that
      placed hooks on other modules of the model (``remove_hooks``) takes them off first.
    """

    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config, model_config: dict):
        return peft_config

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Refused: LoRSU adapters each choose their own heads and fc1 entries (RLP prompts their own context), so
        two adapters' tensors do not line up entry by entry the way LoRA's do."""
        raise NotImplementedError(
            f"add_weighted_adapter is not supported for {type(self).__name__}: each adapter selects its own heads and "
            "fc1 entries (or prompt context), so their weights cannot be averaged entry by entry. To combine "
            "adapters, activate several at once (model.base_model.set_adapter(['a', 'b']): their updates add up) or "
            "merge them one after the other (merge_adapter / merge_and_unload)"
        )

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if isinstance(new_module, BaseTunerLayer):
            super()._replace_module(parent, child_name, new_module, child)
        else:
            if callable(getattr(child, "remove_hooks", None)):
                child.remove_hooks()
            setattr(parent, child_name, new_module)


def output_field(output: Any, name: str, model: nn.Module, fix: str) -> Any:
    """``name`` of a model output (a ``ModelOutput``, a dict or an object); raise naming the model and ``fix`` if it
    has none."""
    value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
    if value is None:
        raise ValueError(f"{type(unwrap_model(model)).__name__} returned no {name} for this batch; {fix}")
    return value


def check_modules_to_save(config: Any, targets: Iterable[str]) -> None:
    """Refuse ``config.modules_to_save`` entries that name a module the tuner itself wraps (peft would fail halfway
    through the injection); peft matches an entry against the end of a module's path."""
    entries = getattr(config, "modules_to_save", None) or []
    clash = sorted({t for t in targets for e in entries if t == e or t.endswith("." + e)})
    if clash:
        raise ValueError(
            f"{type(config).__name__}.modules_to_save={list(entries)} names module(s) the adapter already wraps: "
            f"{clash[:3]}; a module is either adapted or trained in full, not both. Remove them from modules_to_save"
            " (or turn the adapter's part off, e.g. adapt_projection=False)"
        )
