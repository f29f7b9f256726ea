"""RLPModel: injects RLP context vectors into the text embeddings of a CLIP model."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner, _is_key_under_prefixes
from torch import nn

from ..loading import before_injection
from .config import RLPConfig
from .layer import SUPPORTED_TEXT_EMBEDDINGS, UNSUPPORTED_TEXT_EMBEDDINGS, RLPLayer, RLPTextEmbedding

SUPPORTED_MODELS = "CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, SiglipModel, SiglipTextModel"


def find_text_embeddings(model: nn.Module) -> list[str]:
    """Names of the CLIP text embedding modules in ``model`` (already wrapped ones included, their insides not)."""
    names: list[str] = []
    for name, module in model.named_modules():
        if _is_key_under_prefixes(name.rpartition(".")[0], set(names)):
            continue
        if isinstance(module, (RLPLayer, *SUPPORTED_TEXT_EMBEDDINGS)):
            names.append(name)
    return names


class RLPModel(BaseTuner):
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
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: RLPConfig, model_config: dict) -> RLPConfig:
        # Targets are found by module type in _prepare_model, not from a per-architecture name table.
        return peft_config

    def _prepare_model(self, peft_config: RLPConfig, model: nn.Module) -> None:
        before_injection(self, peft_config, model)  # re-validate; rehearse loading a config just read from disk
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
        if peft_config.target_modules is None:
            peft_config.target_modules = set(names)

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
        if isinstance(target, RLPLayer):
            target.update_layer(adapter_name, peft_config, inference_mode=peft_config.inference_mode)
            return
        if not isinstance(target, SUPPORTED_TEXT_EMBEDDINGS):
            raise TypeError(
                f"target_modules matched {current_key!r} of type {type(target).__name__}, but RLP only wraps CLIP "
                f"text embeddings ({', '.join(c.__name__ for c in SUPPORTED_TEXT_EMBEDDINGS)}); leave target_modules "
                "unset to find them automatically"
            )
        new_module = RLPTextEmbedding(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            # an added, inactive adapter is not trainable until set_adapter
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if isinstance(new_module, RLPLayer):
            super()._replace_module(parent, child_name, new_module, child)
        else:
            # unloading: put the original embeddings module back (it has no `.weight` for peft to copy over)
            setattr(parent, child_name, new_module)

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
            raise ValueError(
                "RLP's context cannot be merged into a plain CLIP model exactly for every prompt (no token embedding "
                "can hold it without new vocabulary tokens). If every prompt you will encode starts with the init "
                "text, call merge_and_unload(fold_into_position_embedding=True) to fold it into the position "
                "embeddings; otherwise keep the PEFT model (merge_adapter() fixes the context) or call unload()."
            )
        for module in self.model.modules():
            if isinstance(module, RLPTextEmbedding):
                module.fold_into_position_embedding(adapter_names=adapter_names, safe_merge=safe_merge)
        return self._unload_and_optionally_merge(merge=False, progressbar=progressbar)

    def get_context(self, adapter_name: str | None = None) -> torch.Tensor:
        """The eval-mode context ``P`` of shape ``(n_ctx, d)`` of ``adapter_name`` (default: the active adapter)."""
        name = adapter_name or self.active_adapters[0]
        for module in self.model.modules():
            if isinstance(module, RLPLayer) and name in module.n_ctx:
                return module.get_context(name)
        raise ValueError(f"no RLP adapter named {name!r}; adapters: {sorted(self.peft_config)}")
