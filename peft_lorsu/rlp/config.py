"""Configuration of RLP, the re-parameterised low-rank prompt for CLIP's text encoder (arXiv 2312.10813)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal

from transformers import AutoTokenizer

from ..compat import add_peft_type
from ..config import PluginConfig
from ..utils import is_int as _is_int
from ..utils import is_number as _is_number

PEFT_TYPE = add_peft_type("RLP")

MODES = ("low_rank", "full_rank")
PROMPT_INITS = ("text", "random")
INIT_WEIGHTS = ("zero_b", "gaussian")
# Dropout on P_A @ P_B when the config leaves it unset. The paper makes the dropout part of the method but gives no
# rate; 0.5 had the best mean of the best harmonic means over three datasets in the validation-only base-to-new
# investigation of docs/benchmarks/accuracy.md (see docs/rlp.md, "Dropout").
DEFAULT_DROPOUT = 0.5


@dataclass
class RLPConfig(PluginConfig):
    """
    Configuration of an [`RLPModel`]: n_ctx learned context vectors that replace the prompt's context tokens in the
    input of CLIP's text encoder.

    A prompt for class c is ``[SOS] p_1 ... p_n_ctx <class-name tokens> . [EOS]``. RLP learns the context
    ``P = P_fr + Dropout(P_A @ P_B)`` of shape ``(n_ctx, d)``, where ``P_fr`` is a frozen copy of the initial context,
    ``P_A`` has shape ``(n_ctx, rank)`` and ``P_B`` shape ``(rank, d)``; ``d`` is the width of the text token
    embedding (512 for ViT-B). Trainable parameters: ``n_ctx * rank + rank * d``. With ``mode="full_rank"`` the
    context ``P`` itself is learned (CoOp): ``n_ctx * d`` parameters.

    The context is only written into sequences whose tokens at positions ``1 .. n_ctx`` (right after the start token)
    are the init text's tokens, so prompts are written as plain text, e.g. ``"a photo of a cat."``; every other
    sequence is left as the base model would encode it. No vocabulary tokens are added.

    Args:
        n_ctx (`int`, *optional*):
            Number of context vectors. Resolved from the init text (its token count, without start and end tokens)
            when one is given; if it is also set explicitly the two must agree. Required when there is no init text.
        rank (`int`, defaults to `1`):
            Rank r of the low-rank branch ``P_A @ P_B``; between 1 and ``min(n_ctx, d)``. Ignored for
            ``mode="full_rank"``.
        dropout (`float`, *optional*):
            Dropout probability on the low-rank branch ``P_A @ P_B``, in ``[0, 1)``; active in train mode only. Unset,
            it resolves to ``DEFAULT_DROPOUT`` (0.5) for ``mode="low_rank"`` and to 0 for ``mode="full_rank"``, which
            has no such branch and refuses any other value. The resolved number is what the config saves.
        mode (`str`, defaults to `"low_rank"`):
            ``"low_rank"`` (RLP: train ``P_A`` and ``P_B``, keep ``P_fr`` frozen) or ``"full_rank"`` (CoOp: train the
            ``(n_ctx, d)`` context directly, starting from the initial context).
        prompt_init (`str`, defaults to `"text"`):
            Where the initial context comes from: ``"text"`` (the token embeddings of the init text) or ``"random"``
            (Gaussian with standard deviation ``init_std``). With ``"random"`` an init text is optional and only marks
            which sequences carry the context; without one, positions ``1 .. n_ctx`` of *every* sequence are replaced.
        init_text (`str`, *optional*):
            Text of the context, e.g. ``"a photo of a"``. Tokenised with ``tokenizer_name_or_path`` (without special
            tokens) into ``init_token_ids`` when those are not given.
        tokenizer_name_or_path (`str`, *optional*):
            Tokenizer (local folder or Hub id) used to tokenise ``init_text``; loaded with
            ``transformers.AutoTokenizer``, only when ``init_token_ids`` is not already known.
        tokenizer_kwargs (`dict`, *optional*):
            Extra keyword arguments for ``AutoTokenizer.from_pretrained``.
        init_token_ids (`list[int]`, *optional*):
            Token ids of the init text without start and end tokens. Filled in from ``init_text`` and saved with the
            adapter, so a saved adapter loads without its tokenizer. May be given directly instead of a text.
        init_weights (`str`, defaults to `"zero_b"`):
            Initialisation of the low-rank factors. ``"zero_b"``: ``P_A ~ N(0, 1 / rank)``, ``P_B = 0``, so P starts
            exactly at ``P_fr`` and an SGD step on ``P_B`` moves P about as far as the same step on a full-rank
            context would. ``"gaussian"``: both factors ``~ N(0, init_std^2)`` (the paper's init, inferred), so P
            starts close to, but not at, ``P_fr``.
        init_std (`float`, defaults to `0.02`):
            Standard deviation of the ``"gaussian"`` factors and of a ``"random"`` initial context; positive.
        target_modules (`list[str]` or `str`, *optional*):
            Names of the CLIP text embedding modules to adapt. Leave unset: the CLIP text tower's embeddings
            (``text_model.embeddings`` in a ``CLIPModel``, ``embeddings`` in a ``CLIPTextModel``) are found by type
            and their names written here.
        modules_to_save (`list[str]`, *optional*):
            Modules besides the RLP context to train and save, e.g. ``["text_projection"]``.
    """

    n_ctx: int | None = field(
        default=None,
        metadata={"help": "Number of context vectors; resolved from the init text when one is given."},
    )
    rank: int = field(default=1, metadata={"help": "Rank of P_A @ P_B, between 1 and min(n_ctx, width)."})
    dropout: float | None = field(
        default=None,
        metadata={"help": "Dropout on P_A @ P_B, in [0, 1); train mode only. Unset: 0.5 (low_rank), 0 (full_rank)."},
    )
    mode: Literal["low_rank", "full_rank"] = field(
        default="low_rank",
        metadata={"help": "'low_rank' (RLP: P = P_fr + P_A @ P_B) or 'full_rank' (CoOp: P learned directly)."},
    )
    prompt_init: Literal["text", "random"] = field(
        default="text",
        metadata={"help": "Initial context: 'text' (init text token embeddings) or 'random' (N(0, init_std^2))."},
    )
    init_text: str | None = field(default=None, metadata={"help": "Context text, e.g. 'a photo of a'."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer used to tokenise init_text (AutoTokenizer)."}
    )
    tokenizer_kwargs: dict | None = field(
        default=None, metadata={"help": "Keyword arguments for AutoTokenizer.from_pretrained."}
    )
    init_token_ids: list[int] | None = field(
        default=None,
        metadata={"help": "Token ids of the init text without start/end tokens; filled in from init_text."},
    )
    init_weights: Literal["zero_b", "gaussian"] = field(
        default="zero_b",
        metadata={"help": "'zero_b' (P_B = 0, P starts at P_fr) or 'gaussian' (both factors N(0, init_std^2))."},
    )
    init_std: float = field(
        default=0.02, metadata={"help": "Std of 'gaussian' factors and of a 'random' initial context."}
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "CLIP text embedding modules to adapt; found by type when unset."},
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules besides the context to train and save."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        self._check_fields()
        if self.init_token_ids is None and self.init_text is not None:
            self.init_token_ids = self._tokenize_init_text()
            self._check_init_token_ids()
        if self.init_token_ids is not None and self.n_ctx is None:
            self.n_ctx = len(self.init_token_ids)
        self._check_combination()
        if self.mode == "full_rank" and self.rank != 1:
            warnings.warn(
                f"rank={self.rank} is ignored with mode='full_rank' (the whole (n_ctx, d) context is learned)",
                stacklevel=3,  # __post_init__ <- the dataclass __init__ <- the caller
            )

    def validate(self) -> None:
        """Check every field again (``get_peft_model`` calls this, so fields edited after construction are caught).

        Raises:
            ValueError: naming the field, the allowed values and the value found.
        """
        self._check_fields()
        self._check_combination()

    def _check_fields(self) -> None:
        """Each field on its own: type and range."""
        _check_choice("mode", self.mode, MODES)
        _check_choice("prompt_init", self.prompt_init, PROMPT_INITS)
        _check_choice("init_weights", self.init_weights, INIT_WEIGHTS)
        if self.dropout is None:  # unset: the mode's default, written into the field so that it is saved
            self.dropout = DEFAULT_DROPOUT if self.mode == "low_rank" else 0.0
        if not _is_int(self.rank) or self.rank < 1:
            raise ValueError(f"RLPConfig.rank must be an integer >= 1, got {self.rank!r}")
        if not (_is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"RLPConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.mode == "full_rank" and self.dropout > 0.0:
            raise ValueError(
                f"RLPConfig.dropout={self.dropout} acts on the low-rank branch P_A @ P_B, which mode='full_rank' does "
                "not have; leave dropout unset (None) or set it to 0.0, or use mode='low_rank'"
            )
        if not (_is_number(self.init_std) and 0.0 < self.init_std < math.inf):
            raise ValueError(f"RLPConfig.init_std must be > 0 and finite, got {self.init_std!r}")
        if self.n_ctx is not None and (not _is_int(self.n_ctx) or self.n_ctx < 1):
            raise ValueError(f"RLPConfig.n_ctx must be an integer >= 1, got {self.n_ctx!r}")
        for name in ("init_text", "tokenizer_name_or_path"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"RLPConfig.{name} must be a string or None, got {getattr(self, name)!r}")
        kwargs = self.tokenizer_kwargs
        if kwargs is not None and not (isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs)):
            raise ValueError(f"RLPConfig.tokenizer_kwargs must be a dict of keyword arguments or None, got {kwargs!r}")
        if kwargs and kwargs.get("trust_remote_code"):
            raise ValueError(
                "RLPConfig.tokenizer_kwargs must not enable trust_remote_code: peft-lorsu never runs code downloaded "
                "with a tokenizer (an adapter config could otherwise make loading execute it)"
            )
        if self.init_token_ids is not None:
            self._check_init_token_ids()
        for name in ("target_modules", "modules_to_save"):
            value = getattr(self, name)
            allowed_str = name == "target_modules" and isinstance(value, str)
            if not (value is None or allowed_str or _is_str_collection(value)):
                raise ValueError(f"RLPConfig.{name} must be None or a list of module names, got {value!r}")
        self.check_plugin_fields()

    def _check_combination(self) -> None:
        """Fields that constrain each other: the init text, n_ctx, the mode and the rank."""
        if self.init_token_ids is not None:
            if self.n_ctx != len(self.init_token_ids):
                raise ValueError(
                    f"RLPConfig.n_ctx={self.n_ctx} disagrees with the init text {self.init_text!r}, which has "
                    f"{len(self.init_token_ids)} tokens {self.init_token_ids}; leave n_ctx unset or make them match"
                )
        elif self.prompt_init == "text":
            raise ValueError(
                "RLPConfig.prompt_init='text' needs an init text: set init_text (with tokenizer_name_or_path) or "
                "init_token_ids, or use prompt_init='random' with n_ctx"
            )
        elif self.n_ctx is None:
            raise ValueError(
                "RLPConfig.n_ctx must be set when there is no init text (prompt_init='random' without init_text)"
            )
        if self.mode == "low_rank" and self.rank > self.n_ctx:
            raise ValueError(
                f"RLPConfig.rank={self.rank} exceeds n_ctx={self.n_ctx}: P_A @ P_B of shape (n_ctx, d) has rank at "
                f"most min(n_ctx, d); use 1 <= rank <= {self.n_ctx}"
            )

    def _tokenize_init_text(self) -> list[int]:
        """Token ids of ``init_text`` without special tokens, from ``tokenizer_name_or_path``."""
        if not self.init_text or not self.init_text.strip():
            raise ValueError(f"RLPConfig.init_text={self.init_text!r} is empty; give a context such as 'a photo of a'")
        if self.tokenizer_name_or_path is None:
            raise ValueError(
                f"RLPConfig.init_text={self.init_text!r} needs tokenizer_name_or_path to be tokenised "
                "(or pass its token ids as init_token_ids)"
            )
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path, **(self.tokenizer_kwargs or {}))
        ids = tokenizer(self.init_text, add_special_tokens=False)["input_ids"]
        if len(ids) == 0:
            raise ValueError(
                f"RLPConfig.init_text={self.init_text!r} tokenises to no tokens with tokenizer "
                f"{self.tokenizer_name_or_path!r}"
            )
        return [int(i) for i in ids]

    def _check_init_token_ids(self) -> None:
        ids = self.init_token_ids
        if not isinstance(ids, (list, tuple)) or len(ids) == 0:
            raise ValueError(f"RLPConfig.init_token_ids must be a non-empty list of token ids, got {ids!r}")
        if any(not _is_int(i) or i < 0 for i in ids):
            raise ValueError(f"RLPConfig.init_token_ids must hold integer token ids >= 0, got {ids!r}")
        self.init_token_ids = [int(i) for i in ids]


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"RLPConfig.{name} must be one of {allowed}, got {value!r}")


def _is_str_collection(value: object) -> bool:
    return isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value)
