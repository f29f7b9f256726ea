"""RLPModel: injects RLP context vectors into the text embeddings of a CLIP model."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..loading import check_before_injection
from ..utils import PluginTuner, check_modules_to_save
from .config import RLPConfig
from .layer import SUPPORTED_TEXT_EMBEDDINGS, UNSUPPORTED_TEXT_EMBEDDINGS, RLPLayer, RLPTextEmbedding

SUPPORTED_MODELS = "CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, SiglipModel, SiglipTextModel"


def find_text_embeddings(model: nn.Module) -> list[str]:
    """Names of the CLIP text embedding modules in ``model`` (already wrapped ones included, their insides not)."""
    names: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(found + ".") for found in names):  # inside a wrapped one
            continue
        if isinstance(module, (RLPLayer, *SUPPORTED_TEXT_EMBEDDINGS)):
            names.append(name)
    return names


def prepare_rlp(config: RLPConfig, model: nn.Module) -> None:
    """Check that ``model`` has a text tower RLP can adapt, and name its embeddings in ``config.target_modules``."""
    config.validate()
    names = find_text_embeddings(model)
    refused = {type(m).__name__ for m in model.modules()} & set(UNSUPPORTED_TEXT_EMBEDDINGS)
    if not names and refused:
        name = sorted(refused)[0]
        raise ValueError(f"RLP cannot adapt {type(model).__name__}'s {name}: {UNSUPPORTED_TEXT_EMBEDDINGS[name]}")
    if not names:
        raise ValueError(
            f"RLP adapts the text embeddings (CLIPTextEmbeddings) of a CLIP text tower, and "
            f"{type(model).__name__} has none. Supported models: {SUPPORTED_MODELS}, or any model containing "
            "a CLIPTextEmbeddings module."
        )
    check_modules_to_save(config, names)
    if config.target_modules is None:
        config.target_modules = set(names)


def create_rlp_layer(
    tuner: BaseTuner, config: RLPConfig, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module
) -> None:
    """Wrap ``target`` (CLIP text embeddings) in an :class:`RLPTextEmbedding`, or add ``adapter_name`` to it."""
    if isinstance(target, RLPLayer):
        target.update_layer(adapter_name, config, inference_mode=config.inference_mode)
        return
    if not isinstance(target, SUPPORTED_TEXT_EMBEDDINGS):
        raise TypeError(
            f"target_modules matched {target_name!r} of type {type(target).__name__}, but RLP only wraps CLIP "
            f"text embeddings ({', '.join(c.__name__ for c in SUPPORTED_TEXT_EMBEDDINGS)}); leave target_modules "
            "unset to find them automatically"
        )
    new_module = RLPTextEmbedding(target, adapter_name, config)
    if adapter_name not in tuner.active_adapters:
        # an added, inactive adapter is not trainable until set_adapter
        new_module.requires_grad_(False)
    tuner._replace_module(parent, target_name, new_module, target)


FOLD_REFUSAL = (
    "RLP's context cannot be merged into a plain CLIP model exactly for every prompt (no token embedding "
    "can hold it without new vocabulary tokens). If every prompt you will encode starts with the init "
    "text, call merge_and_unload(fold_into_position_embedding=True) to fold it into the position "
    "embeddings; otherwise keep the PEFT model (merge_adapter() fixes the context) or call unload()."
)


def fold_contexts(model: nn.Module, adapter_names: list[str] | None, safe_merge: bool) -> None:
    """Fold one adapter's context into the position embeddings of every RLP layer of ``model`` (in place)."""
    for module in model.modules():
        if isinstance(module, RLPTextEmbedding):
            module.fold_into_position_embedding(adapter_names=adapter_names, safe_merge=safe_merge)


class RLPModel(PluginTuner):
    """
    Adds RLP (re-parameterised low-rank prompts, arXiv 2312.10813) to the text tower of a CLIP model.

    The CLIP text embeddings (``CLIPTextEmbeddings``) are wrapped by [`RLPTextEmbedding`], which writes the learned
    context ``P`` of shape ``(n_ctx, d)`` into positions ``1 .. n_ctx`` of each prompt that starts with the init text.
    Everything else in the model is frozen. Several named adapters can live side by side (``add_adapter``,
    ``set_adapter``); active adapters must not share a prompt.

    Merging: ``merge_adapter()`` fixes ``P = P_fr + P_A @ P_B`` so inference pays no low-rank product, with identical
    outputs, and ``unmerge_adapter()`` restores the low-rank forward. ``merge_and_unload()`` cannot give a plain CLIP
    model that is exact for every prompt (see its docstring) and therefore requires
    ``fold_into_position_embedding=True``.

    Example:

        ```py
        >>> import peft_lorsu
        >>> from peft import get_peft_model
        >>> from peft_lorsu import RLPConfig
        >>> config = RLPConfig(init_text="a photo of a", tokenizer_name_or_path=path, rank=1)
        >>> peft_model = get_peft_model(clip_model, config)  # trainable: n_ctx * rank + rank * d
        ```
    """

    prefix: str = "rlp_"
    tuner_layer_cls = RLPLayer

    def _prepare_model(self, peft_config: RLPConfig, model: nn.Module) -> None:
        check_before_injection(self, peft_config, model)  # rehearses loading a config just read from disk
        prepare_rlp(peft_config, model)

    def _create_and_replace(
        self,
        peft_config: RLPConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        create_rlp_layer(self, peft_config, adapter_name, target, target_name, parent)

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        fold_into_position_embedding: bool = False,
    ) -> nn.Module:
        """Return the base CLIP model with one adapter's context folded into its position embeddings.

        A learned context cannot be folded into a plain CLIP model exactly for every prompt: the token embedding
        cannot hold it (the same token, e.g. "a", takes different context vectors at different positions, and also
        appears in class names), and no new vocabulary tokens are added. What *can* be folded is the position
        embedding: adding ``P[i] - token_embedding(ctx_id[i])`` to position ``1 + i`` reproduces the adapter exactly
        (up to float rounding) for every prompt that starts with the init text, and changes every other prompt.
        Because that is only correct when every prompt the model will see starts with the init text, the caller
        must say so with ``fold_into_position_embedding=True``; otherwise this raises. Adapters without an init text
        (``prompt_init="random"`` without ``init_text``) cannot be folded. Custom ``position_ids`` bypass the fold.

        To drop the low-rank product but keep the exact per-prompt behaviour, use ``merge_adapter()`` instead; to
        get the untouched base model back, use ``unload()``.

        Args:
            progressbar (`bool`): show a progress bar while unloading.
            safe_merge (`bool`): check the folded weights for NaNs before writing them.
            adapter_names (`list[str]`, *optional*): the one adapter to fold; defaults to the active adapter.
            fold_into_position_embedding (`bool`): confirm that every prompt starts with the init text.
        """
        if not fold_into_position_embedding:
            raise ValueError(FOLD_REFUSAL)
        fold_contexts(self.model, adapter_names, safe_merge)
        return self.unload()

    def get_context(self, adapter_name: str | None = None) -> torch.Tensor:
        """The eval-mode context ``P`` of shape ``(n_ctx, d)`` of ``adapter_name`` (default: the active adapter)."""
        name = adapter_name or self.active_adapters[0]
        for module in self.model.modules():
            if isinstance(module, RLPLayer) and name in module.n_ctx:
                return module.get_context(name)
        raise ValueError(f"no RLP adapter named {name!r}; adapters: {sorted(self.peft_config)}")
