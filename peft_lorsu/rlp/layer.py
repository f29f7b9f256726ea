"""The RLP tuner layer: learned context vectors written into CLIP's text token embeddings.

Symbols, per adapter: n = n_ctx (context length), d = width of the text token embedding, r = rank.

- ``rlp_P_fr``  ``(n, d)``  frozen initial context (persistent buffer, saved with the adapter)
- ``rlp_A``     ``(n, r)``  trainable factor P_A (low-rank mode)
- ``rlp_B``     ``(r, d)``  trainable factor P_B (low-rank mode)
- ``rlp_P``     ``(n, d)``  trainable context (full-rank mode, CoOp)
- ``rlp_ctx_ids`` ``(n,)``  token ids that mark a prompt carrying the context; -1 matches any token

The context is ``P = P_fr + Dropout(P_A @ P_B)`` (low rank) or ``P = rlp_P`` (full rank).
"""

from __future__ import annotations

import warnings

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.models.clip.modeling_clip import CLIPTextEmbeddings
from transformers.models.siglip.modeling_siglip import SiglipTextEmbeddings

from ..compat import BufferDict, move_adapter_to_base_device
from ..utils import check_index_tensor
from .config import RLPConfig

# Text embedding modules RLP can wrap: they hold `token_embedding` and `position_embedding` and compute
# `inputs_embeds + position_embedding(position_ids)`, where inputs_embeds defaults to token_embedding(input_ids).
# The context starts after the tokens that open every prompt: CLIP's start token (position 0), none for SigLIP, whose
# tokenizer writes `text </s> <pad> ...`.
CONTEXT_START: dict[type[nn.Module], int] = {CLIPTextEmbeddings: 1, SiglipTextEmbeddings: 0}
SUPPORTED_TEXT_EMBEDDINGS: tuple[type[nn.Module], ...] = tuple(CONTEXT_START)
# Embeddings of the same shape that RLP refuses, and why.
UNSUPPORTED_TEXT_EMBEDDINGS = {
    "Siglip2TextEmbeddings": "SigLIP2's Gemma tokenizer pads on the left, so the context tokens sit at a different "
    "position in every padded prompt, while RLP writes its context at fixed positions",
}

WILDCARD_ID = -1


class RLPLayer(BaseTunerLayer):
    """Mixin holding the per-adapter RLP tensors of one text embedding module."""

    adapter_layer_names = ("rlp_A", "rlp_B", "rlp_P")
    other_param_names = ("rlp_P_fr", "rlp_ctx_ids", "rlp_dropout", "n_ctx", "rank", "mode")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.rlp_A = nn.ParameterDict({})
        self.rlp_B = nn.ParameterDict({})
        self.rlp_P = nn.ParameterDict({})
        self.rlp_P_fr = BufferDict({}, persistent=True)
        self.rlp_ctx_ids = BufferDict({}, persistent=True)
        self.rlp_dropout = nn.ModuleDict({})
        self.n_ctx: dict[str, int] = {}
        self.rank: dict[str, int] = {}
        self.mode: dict[str, str] = {}
        # Fixed contexts of merged adapters, (n, d) each. Not saved: merging is a runtime state, as in LoRA.
        self._merged_context: dict[str, torch.Tensor] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs

        base = self.get_base_layer()
        if not isinstance(base, SUPPORTED_TEXT_EMBEDDINGS):
            names = ", ".join(cls.__name__ for cls in SUPPORTED_TEXT_EMBEDDINGS)
            raise TypeError(f"RLP wraps CLIP text embeddings ({names}), got {type(base).__name__}")
        self.context_start = next(start for cls, start in CONTEXT_START.items() if isinstance(base, cls))
        self.width = base.token_embedding.embedding_dim
        self.vocab_size = base.token_embedding.num_embeddings
        self.max_positions = base.position_embedding.num_embeddings

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # The embeddings module has no `.weight`; its token embedding decides where the adapter lives.
        weight = self.get_base_layer().token_embedding.weight
        move_adapter_to_base_device(self, adapter_name, weight.device, weight.dtype, device)

    def update_layer(self, adapter_name: str, config: RLPConfig, inference_mode: bool = False, **kwargs) -> None:
        """Add (or re-initialise) the adapter ``adapter_name`` from ``config``."""
        n_ctx, rank = config.n_ctx, config.rank
        if config.mode == "low_rank" and rank > min(n_ctx, self.width):
            raise ValueError(
                f"rank={rank} exceeds min(n_ctx, width) = min({n_ctx}, {self.width}); "
                f"use 1 <= rank <= {min(n_ctx, self.width)}"
            )
        room = self.max_positions - self.context_start - 1  # the prompt's opening tokens and the end token
        if n_ctx > room:
            raise ValueError(
                f"n_ctx={n_ctx} leaves no room for the start and end tokens in a text tower with "
                f"max_position_embeddings={self.max_positions}; use n_ctx <= {room}"
            )
        ids = config.init_token_ids
        if ids is not None and max(ids) >= self.vocab_size:
            raise ValueError(
                f"init_token_ids={ids} holds ids outside the text tower's vocabulary of {self.vocab_size} tokens; "
                "was the init text tokenised with this model's tokenizer?"
            )

        token_weight = self.get_base_layer().token_embedding.weight
        device, dtype = token_weight.device, token_weight.dtype
        if ids is None:
            ctx_ids = torch.full((n_ctx,), WILDCARD_ID, dtype=torch.long, device=device)
        else:
            ctx_ids = torch.tensor(ids, dtype=torch.long, device=device)
        if config.prompt_init == "text":
            initial = token_weight.detach()[ctx_ids].clone()
        else:
            initial = torch.randn(n_ctx, self.width, device=device, dtype=dtype) * config.init_std

        self.n_ctx[adapter_name] = n_ctx
        self.rank[adapter_name] = rank
        self.mode[adapter_name] = config.mode
        self.rlp_ctx_ids[adapter_name] = ctx_ids
        if config.mode == "full_rank":
            self.rlp_P[adapter_name] = nn.Parameter(initial)
        else:
            self.rlp_P_fr[adapter_name] = initial
            if config.init_weights == "zero_b":
                p_a = torch.randn(n_ctx, rank, device=device, dtype=dtype) * rank**-0.5
                p_b = torch.zeros(rank, self.width, device=device, dtype=dtype)
            else:
                p_a = torch.randn(n_ctx, rank, device=device, dtype=dtype) * config.init_std
                p_b = torch.randn(rank, self.width, device=device, dtype=dtype) * config.init_std
            self.rlp_A[adapter_name] = nn.Parameter(p_a)
            self.rlp_B[adapter_name] = nn.Parameter(p_b)
        self.rlp_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # peft leaves new modules in train mode: follow the wrapped module, so a model in eval mode stays deterministic
        self.rlp_dropout[adapter_name].train(self.get_base_layer().training)

        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _check_loaded_ctx_ids(self, state_dict, prefix, *args) -> None:
        # The context ids come from the config's init_token_ids (-1 without an init text); saved weights must agree.
        for adapter in list(self.rlp_ctx_ids.keys()):
            loaded = state_dict.get(f"{prefix}rlp_ctx_ids.{adapter}")
            if loaded is None:
                continue
            current = self.rlp_ctx_ids[adapter]
            loaded = check_index_tensor(f"rlp_ctx_ids[{adapter!r}] (n_ctx ids)", loaded, tuple(current.shape), 0)
            if not torch.equal(loaded.long().cpu(), current.cpu()):
                raise ValueError(
                    f"rlp_ctx_ids[{adapter!r}]={loaded.tolist()} disagree with the init_token_ids "
                    f"{current.tolist()} of the adapter config: weights and config do not belong together"
                )

    def get_delta_context(self, adapter_name: str) -> torch.Tensor:
        """The low-rank branch ``P_A @ P_B`` of shape ``(n_ctx, d)``, without dropout (low-rank adapters only)."""
        if self.mode[adapter_name] != "low_rank":
            raise ValueError(f"adapter {adapter_name!r} is full-rank: it has no P_A @ P_B branch")
        return self.rlp_A[adapter_name] @ self.rlp_B[adapter_name]

    def get_context(self, adapter_name: str) -> torch.Tensor:
        """The context ``P`` of shape ``(n_ctx, d)`` as used in eval mode (no dropout)."""
        if self.mode[adapter_name] == "full_rank":
            return self.rlp_P[adapter_name]
        return self.rlp_P_fr[adapter_name] + self.get_delta_context(adapter_name)

    def _forward_context(self, adapter_name: str) -> torch.Tensor:
        """The context ``P`` of shape ``(n_ctx, d)`` for this forward pass (dropout in train mode)."""
        if adapter_name in self._merged_context:
            return self._merged_context[adapter_name]
        if self.mode[adapter_name] == "full_rank":
            return self.rlp_P[adapter_name]
        delta = self.rlp_A[adapter_name] @ self.rlp_B[adapter_name]
        return self.rlp_P_fr[adapter_name] + self.rlp_dropout[adapter_name](delta)

    def match(self, input_ids: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """Which sequences carry the adapter's context.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): token ids.

        Returns:
            `torch.BoolTensor` of shape `(batch_size,)`: True where the ``n_ctx`` positions from
            ``self.context_start`` (1 for CLIP, 0 for SigLIP) hold the context tokens.
        """
        ids = self.rlp_ctx_ids[adapter_name].to(input_ids.device)
        n_ctx, start = ids.shape[0], self.context_start
        wildcard = ids == WILDCARD_ID
        if input_ids.shape[1] < start + n_ctx + 1:
            if bool(wildcard.all()):
                raise ValueError(
                    f"adapter {adapter_name!r} has no init text, so it writes its n_ctx={n_ctx} context vectors into "
                    f"positions {start}..{start + n_ctx - 1} of every prompt, but the sequences have only "
                    f"{input_ids.shape[1]} tokens; "
                    "write each prompt with n_ctx placeholder words after the start token"
                )
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        window = input_ids[:, start : start + n_ctx]
        return ((window == ids) | wildcard).all(dim=1)


class RLPTextEmbedding(nn.Module, RLPLayer):
    """CLIP text embeddings whose context positions are replaced by learned vectors.

    For each sequence whose tokens at positions ``1 .. n_ctx`` are the adapter's context tokens, the token embeddings
    at those positions become the rows of ``P``; position embeddings are then added as in the base module. All other
    sequences, and all other positions, are embedded exactly as by the base module.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: RLPConfig, **kwargs) -> None:
        super().__init__()
        RLPLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self._register_load_state_dict_pre_hook(self._check_loaded_ctx_ids)
        self.update_layer(adapter_name, config)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fix each adapter's context ``P = P_fr + P_A @ P_B`` so the forward pass skips the low-rank product.

        The base embeddings are not changed (the context is not a function of the base weights alone), so merging is
        exactly reversible; see ``RLPModel.merge_and_unload`` for folding into a plain CLIP model.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names:
            if name not in self.n_ctx:
                continue
            with torch.no_grad():
                context = self.get_context(name).detach().clone()
            if safe_merge and not torch.isfinite(context).all():
                raise ValueError(f"NaNs detected in the merged context. The adapter {name} seems to be broken")
            self._merged_context[name] = context
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            self._merged_context.pop(self.merged_adapters.pop(), None)

    def fold_into_position_embedding(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Write one adapter's context into the base position embeddings, in place.

        Row ``1 + i`` of the position embedding gains ``P[i] - token_embedding(ctx_id[i])``, so a prompt that starts
        with the context tokens embeds to ``P[i] + position[1 + i]`` (up to float rounding) without the adapter. Every
        other prompt changes too, which is why this is only correct when every prompt starts with the init text.
        """
        names = [n for n in (adapter_names or self.active_adapters) if n in self.n_ctx]
        if len(names) != 1:
            raise ValueError(
                f"the position embeddings can hold the context of exactly one adapter, got {names or 'none'}; "
                "pass adapter_names=[one name]"
            )
        name = names[0]
        ids = self.rlp_ctx_ids[name]
        if bool((ids == WILDCARD_ID).any()):
            raise ValueError(
                f"adapter {name!r} has no init text, so the tokens at its context positions are unknown and cannot be "
                "subtracted from the position embeddings; folding needs an adapter with init_text / init_token_ids"
            )
        base = self.get_base_layer()
        weight = base.position_embedding.weight
        with torch.no_grad():
            context = self.get_context(name).to(weight.dtype)
            delta = context - base.token_embedding.weight[ids].to(weight.dtype)
            folded = weight.detach().clone()
            folded[self.context_start : self.context_start + ids.shape[0]] += delta
            if safe_merge and not torch.isfinite(folded).all():
                raise ValueError(f"NaNs detected in the folded position embeddings. The adapter {name} seems broken")
            weight.copy_(folded)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): token ids.
            position_ids (`torch.LongTensor` of shape `(1 or batch_size, sequence_length)`, *optional*): positions.
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, d)`, *optional*): token
                embeddings to use instead of ``token_embedding(input_ids)``; the context still overwrites them.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, sequence_length, d)`: token plus position embeddings.
        """
        base = self.base_layer
        adapters = [name for name in self.active_adapters if name in self.n_ctx]
        if self.disable_adapters or input_ids is None or not adapters:
            return base(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds)

        embeds = inputs_embeds if inputs_embeds is not None else base.token_embedding(input_ids)
        claimed = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for name in adapters:
            match = self.match(input_ids, name)
            if bool((match & claimed).any()):
                raise ValueError(
                    f"a prompt starts with the context tokens of adapter {name!r} and of another active adapter; "
                    "activate one of them, or give the adapters different init texts"
                )
            claimed |= match
            if not bool(match.any()):
                continue
            context = self._forward_context(name).to(embeds.device, embeds.dtype)
            start, end = self.context_start, self.context_start + context.shape[0]
            with_context = torch.cat(
                [embeds[:, :start], context.unsqueeze(0).expand(embeds.shape[0], -1, -1), embeds[:, end:]], dim=1
            )
            embeds = torch.where(match[:, None, None], with_context, embeds)
        return base(input_ids=None, position_ids=position_ids, inputs_embeds=embeds)

    def __repr__(self) -> str:
        return "rlp." + super().__repr__()
