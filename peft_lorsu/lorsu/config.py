"""Configuration of LoRSU (Low-Rank Structured Updates)."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..compat import add_peft_type
from ..config import PluginConfig
from ..utils import is_int as _is_int
from ..utils import is_number as _is_number
from .budget import config_for_budget
from .targets import BIAS_PARTS

PEFT_TYPE = add_peft_type("LORSU")
MAX_LORA_ALPHA = 1e6

TOWERS = ("vision", "text", "both")
SELECTIONS = ("gradient", "random")
HEAD_SCORINGS = ("gradient", "fisher", "random", "custom")
INIT_CHOICES = (True, False, "lorsu", "lora")
FLAGS = ("adapt_attention", "adapt_mlp", "adapt_projection", "share_qkv_factor")


@dataclass
class LoRSUConfig(PluginConfig):
    """Configuration of a LoRSU adapter.

    LoRSU adapts the transformer encoder of a CLIP-style model with three structured updates per encoder layer: a
    low-rank update confined to the q/k/v rows of the ``top_k_heads`` most important attention heads, a sparse update
    of the ``sparsity`` fraction of the first MLP layer's (fc1) entries with the largest mean gradient, and (optional,
    on by default as in the reference run) dense bias deltas and an unmasked low-rank update of the output projection.
    Which heads and which fc1 entries are chosen by :func:`peft_lorsu.probe_lorsu`, run before ``get_peft_model``.

    Symbols: ``L`` targeted layers, width ``d``, ``H`` heads of size ``d_h = d / H``, fc1 width ``m``, projection
    output ``o``. With all parts on, the number of trainable parameters is
    ``L * (floor(sparsity * m * d) + m + 3 * d + r * (3 * top_k_heads * d_h + d)) + r * (d + o)``.

    Args:
        r (`int`, defaults to 64):
            Rank of the low-rank updates, ``>= 1``.
        lora_alpha (`float`, defaults to 64):
            The low-rank updates are scaled by ``lora_alpha / r``.
        lora_dropout (`float`, defaults to 0.0):
            Dropout on the input of the low-rank updates, in ``[0, 1)``. The reference uses none.
        top_k_heads (`int`, defaults to 2):
            Attention heads adapted per layer, ``1 <= top_k_heads <= num_heads``.
        sparsity (`float`, defaults to 0.1):
            Fraction of fc1 entries updated per layer, in ``(0, 1]``; ``S = floor(sparsity * m * d)`` entries.
        tower (`str`, defaults to `"vision"`):
            Which encoder to adapt: ``"vision"``, ``"text"`` or ``"both"``.
        layers_to_transform (`list[int]`, *optional*):
            Encoder layer indices to adapt; all layers of the chosen tower(s) when ``None``.
        target_modules (`str` or `list[str]`, *optional*):
            Further restricts the modules LoRSU detects (q/k/v, fc1, projection) to those matching this regex (a
            string, full match) or whose name ends with one of these names (a list). ``None`` keeps all of them.
        adapt_attention (`bool`, defaults to `True`):
            Apply the head-masked low-rank update to q/k/v.
        adapt_mlp (`bool`, defaults to `True`):
            Apply the sparse update to fc1.
        adapt_projection (`bool`, defaults to `True`):
            Apply an unmasked rank-``r`` update to the tower's output projection (``visual_projection`` /
            ``text_projection``) when the model has one. On in the reference run.
        train_biases (`bool` or `list[str]`, defaults to `True`):
            Train dense bias deltas: ``True`` for q, k, v (all heads) and fc1 (the reference run), ``False`` for none,
            or a list of the parts whose biases train, from ``"attention"`` (q, k, v) and ``"mlp"`` (fc1); e.g.
            ``["mlp"]`` is the authors' VLM run (:func:`~peft_lorsu.lorsu.lorsu_ppl_config`). A list is stored (and
            saved) in the order ``["attention", "mlp"]`` without repeats.
        share_qkv_factor (`bool`, defaults to `True`):
            One input-side factor ``V`` (r x d) shared by q, k and v, as in the paper. ``False`` gives each projection
            its own factor (the VLM variant of the paper).
        init_weights (`bool` or `str`, defaults to `True`):
            ``True``: the reference's init at every site. q/k/v: ``"lorsu"`` with a shared factor, ``"lora"`` with
            separate ones (the VLM variant); the output projection: ``"lora"`` (the authors' LoRA on ``x @ P`` puts
            its random factor on the input side of HF's transposed weight). ``"lorsu"``: output-side factor ``U``
            Kaiming-uniform and input-side ``V`` zero at every site (before issue 18 the projection's default).
            ``"lora"``: ``V`` Kaiming-uniform and ``U`` zero at every site (PEFT's usual layout). ``False`` makes every
            update non-zero at init (tests).
        selection (`str`, defaults to `"gradient"`):
            ``"gradient"``: heads and fc1 entries come from :func:`probe_lorsu`. ``"random"``: chosen at random
            from ``seed`` without data (ablation).
        head_scoring (`str`, defaults to `"gradient"`):
            How the probe ranks heads (see :mod:`peft_lorsu.lorsu.scoring`): ``"gradient"`` (the paper: squared norm
            of each head's mean q/k/v gradient), ``"fisher"`` (mean squared norm of each head's per-sample
            gradients), ``"random"`` (seeded; fc1 still by gradient) or ``"custom"`` (recorded when a scoring function
            is passed to ``probe_lorsu(head_scorer=...)``). fc1 entries always follow the mean gradient.
        seed (`int`, defaults to 0):
            Seed of the random selection (and of ``head_scoring="random"``).
        probe_samples (`int`, defaults to 1000):
            The probe stops once it has seen at least this many samples and no accumulated gradient entry is zero
            (or when the dataloader ends, or after ``num_batches``).
        selected_heads (`dict[str, list[int]]`, *optional*):
            Written by the probe: attention module name -> the chosen head indices, ascending.
        head_scores (`dict[str, list[float]]`, *optional*):
            Written by the probe: attention module name -> importance of every head.
        fc1_indices (`dict[str, torch.LongTensor]`, *optional*):
            Written by the probe: fc1 module name -> the `(S,)` ascending flat indices of its chosen entries. Too
            large for JSON, so never written to ``adapter_config.json``: they travel in memory from the probe to
            ``get_peft_model`` and are saved as the ``lorsu_indices`` buffers of ``adapter_model.safetensors``.
        modules_to_save (`list[str]`, *optional*):
            Extra modules trained in full and saved with the adapter (PEFT's usual field).
    """

    r: int = field(default=64, metadata={"help": "Rank of the low-rank updates (>= 1)."})
    lora_alpha: float = field(default=64, metadata={"help": "Scale of the low-rank updates is lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the low-rank input, in [0, 1)."})
    top_k_heads: int = field(default=2, metadata={"help": "Attention heads adapted per layer."})
    sparsity: float = field(default=0.1, metadata={"help": "Fraction of fc1 entries updated per layer, in (0, 1]."})
    tower: Literal["vision", "text", "both"] = field(
        default="vision", metadata={"help": "Encoder(s) to adapt: 'vision', 'text' or 'both'."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Encoder layer indices to adapt (default: all)."}
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Optional regex / name list restricting the detected modules."}
    )
    adapt_attention: bool = field(default=True, metadata={"help": "Head-masked low-rank update of q/k/v."})
    adapt_mlp: bool = field(default=True, metadata={"help": "Sparse update of fc1."})
    adapt_projection: bool = field(default=True, metadata={"help": "Low-rank update of the output projection."})
    train_biases: bool | list[str] = field(
        default=True, metadata={"help": "Dense bias deltas: True, False, or parts from ['attention', 'mlp']."}
    )
    share_qkv_factor: bool = field(default=True, metadata={"help": "One input-side factor shared by q, k, v."})
    init_weights: bool | Literal["lorsu", "lora"] = field(
        default=True, metadata={"help": "'lorsu', 'lora', True (method default) or False (random, for tests)."}
    )
    selection: Literal["gradient", "random"] = field(
        default="gradient", metadata={"help": "'gradient' (probe_lorsu) or 'random' (seeded ablation)."}
    )
    head_scoring: Literal["gradient", "fisher", "random", "custom"] = field(
        default="gradient",
        metadata={"help": "Head ranking of the probe: 'gradient' (paper), 'fisher', 'random' or 'custom'."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random selection."})
    probe_samples: int = field(default=1000, metadata={"help": "Minimum samples the probe accumulates."})
    selected_heads: dict[str, list[int]] | None = field(
        default=None, metadata={"help": "Probe result: attention module name -> chosen heads."}
    )
    head_scores: dict[str, list[float]] | None = field(
        default=None, metadata={"help": "Probe result: attention module name -> score of every head."}
    )
    fc1_indices: dict[str, torch.Tensor] | None = field(
        default=None, repr=False, metadata={"help": "Probe result (in memory only): fc1 name -> (S,) flat indices."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        self._validate()
        if self.lora_dropout > 0 and self.share_qkv_factor:
            warnings.warn(
                "LoRSUConfig.lora_dropout > 0 with a shared q/k/v factor: each projection draws its own dropout mask",
                stacklevel=3,  # __post_init__ <- the dataclass __init__ <- the caller
            )

    def validate(self) -> None:
        """Check every field again (``get_peft_model`` calls this, so fields edited after construction are caught).

        Raises:
            ValueError: naming the field, the allowed values and the value found.
        """
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"LoRSUConfig.{name} must be {allowed}, got {getattr(self, name)!r}")

        check(_is_int(self.r) and self.r >= 1, "r", "an integer >= 1")
        check(
            _is_number(self.lora_alpha) and 0 < self.lora_alpha <= MAX_LORA_ALPHA,
            "lora_alpha",
            f"a number in (0, {MAX_LORA_ALPHA:g}] (larger scales overflow the low-rank update)",
        )
        check(_is_number(self.lora_dropout) and 0 <= self.lora_dropout < 1, "lora_dropout", "in [0, 1)")
        check(
            _is_int(self.top_k_heads) and self.top_k_heads >= 1,
            "top_k_heads",
            "an integer >= 1 (and <= the model's heads per layer)",
        )
        check(_is_number(self.sparsity) and 0 < self.sparsity <= 1, "sparsity", "in (0, 1]")
        check(self.tower in TOWERS, "tower", f"one of {TOWERS}")
        check(self.selection in SELECTIONS, "selection", f"one of {SELECTIONS}")
        check(self.head_scoring in HEAD_SCORINGS, "head_scoring", f"one of {HEAD_SCORINGS}")
        # `1 in INIT_CHOICES` holds (1 == True): also require a bool or a str
        check(
            isinstance(self.init_weights, (bool, str)) and self.init_weights in INIT_CHOICES,
            "init_weights",
            f"one of {INIT_CHOICES}",
        )
        for flag in FLAGS:
            check(isinstance(getattr(self, flag), bool), flag, "True or False")
        parts = self.train_biases
        check(
            isinstance(parts, bool)
            or (isinstance(parts, (list, tuple, set)) and all(isinstance(p, str) and p in BIAS_PARTS for p in parts)),
            "train_biases",
            f"True, False or a list of parts from {list(BIAS_PARTS)}",
        )
        if not isinstance(parts, bool):
            self.train_biases = [p for p in BIAS_PARTS if p in parts]
        check(_is_int(self.probe_samples) and self.probe_samples >= 1, "probe_samples", "an integer >= 1")
        check(_is_int(self.seed) and 0 <= self.seed < 2**64, "seed", "an integer in [0, 2**64)")
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        check(
            self.layers_to_transform is None
            or (
                isinstance(self.layers_to_transform, (list, tuple))
                and all(_is_int(i) and i >= 0 for i in self.layers_to_transform)
            ),
            "layers_to_transform",
            "None, an int or a list of non-negative ints",
        )
        check(
            self.target_modules is None
            or isinstance(self.target_modules, str)
            or (
                isinstance(self.target_modules, (list, tuple, set))
                and all(isinstance(t, str) for t in self.target_modules)
            ),
            "target_modules",
            "None, a regex string or a list of module names",
        )
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise ValueError(
                    f"LoRSUConfig.target_modules must be a valid regular expression, got {self.target_modules!r} "
                    f"({exc})"
                ) from exc
        check(
            self.modules_to_save is None
            or (
                isinstance(self.modules_to_save, (list, tuple, set))
                and all(isinstance(m, str) for m in self.modules_to_save)
            ),
            "modules_to_save",
            "None or a list of module names",
        )
        self.check_plugin_fields()
        check(
            self.fc1_indices is None
            or (
                isinstance(self.fc1_indices, dict)
                and all(isinstance(v, torch.Tensor) for v in self.fc1_indices.values())
            ),
            "fc1_indices",
            "None or a dict of module name -> index tensor (written by probe_lorsu)",
        )
        if not (self.adapt_attention or self.adapt_mlp or self.adapt_projection or self.train_biases):
            raise ValueError(
                "LoRSUConfig has nothing to train: adapt_attention, adapt_mlp, adapt_projection and train_biases are "
                "all False"
            )
        if self.selected_heads is not None:
            check(
                isinstance(self.selected_heads, dict)
                and all(
                    isinstance(k, str)
                    and isinstance(h, (list, tuple))
                    and len(h) == self.top_k_heads
                    and len(set(h)) == len(h)
                    and all(_is_int(i) and i >= 0 for i in h)
                    for k, h in self.selected_heads.items()
                ),
                "selected_heads",
                f"a dict of module name -> {self.top_k_heads} distinct head indices >= 0 (top_k_heads)",
            )
            self.selected_heads = {k: sorted(int(i) for i in v) for k, v in self.selected_heads.items()}
        check(
            self.head_scores is None
            or (
                isinstance(self.head_scores, dict)
                and all(
                    isinstance(k, str)
                    and isinstance(v, (list, tuple))
                    and all(_is_number(x) and math.isfinite(x) for x in v)
                    for k, v in self.head_scores.items()
                )
            ),
            "head_scores",
            "None or a dict of module name -> list of finite numbers",
        )

    @classmethod
    def from_budget(cls, model, trainable_params: int, attention_share: float | None = None, **fixed) -> LoRSUConfig:
        """A config for ``model`` whose trainable count lies within 1% of ``trainable_params``.

        ``r`` (a power of two), ``top_k_heads`` and ``sparsity`` are chosen so that the low-rank updates get the
        paper's share of the budget left after the biases (``attention_share``, default about 0.25) and fc1 the rest;
        see :mod:`peft_lorsu.lorsu.budget` for the rule and the closed-form count. ``fixed`` holds any other field
        (``adapt_projection=False``, ``tower="both"``, ``layers_to_transform=[...]``, or ``r`` / ``top_k_heads`` /
        ``sparsity`` to keep fixed); ``lora_alpha`` defaults to the chosen ``r``.

        Raises:
            ValueError: a budget below the smallest or above the largest count these settings reach (both given in
                the message), or no combination within 1%.
        """
        return cls(**config_for_budget(cls, model, trainable_params, attention_share=attention_share, **fixed))

    def to_dict(self) -> dict:
        """The JSON-able fields: everything but the in-memory ``fc1_indices`` (saved as tensors instead)."""
        indices, self.fc1_indices = self.fc1_indices, None
        try:
            out = super().to_dict()
        finally:
            self.fc1_indices = indices
        out.pop("fc1_indices", None)
        return out

    @property
    def resolved_init(self) -> bool | str:
        """The q/k/v init scheme after resolving ``True`` to the variant's default."""
        if self.init_weights is True:
            return "lorsu" if self.share_qkv_factor else "lora"
        return self.init_weights

    @property
    def resolved_projection_init(self) -> bool | str:
        """The output projection's init scheme: ``True`` resolves to ``"lora"`` (``V`` random, ``U`` zero)."""
        return "lora" if self.init_weights is True else self.init_weights

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    @property
    def has_selection(self) -> bool:
        """Whether the probe (or a random selection) has filled in what ``get_peft_model`` needs."""
        heads_ok = self.selected_heads is not None or not self.adapt_attention
        fc1_ok = self.fc1_indices is not None or not self.adapt_mlp
        return heads_ok and fc1_ok
