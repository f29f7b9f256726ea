"""LoRSU's trainable-parameter count in closed form, and choosing ``r``, ``top_k_heads`` and ``sparsity`` for a budget.

For a model and a config (towers, layers, which parts are on) the count is

    total(r, k, s) = bias + r * (factor + k * rows) + sum_j max(1, floor(s * numel_j))

- ``bias``: the dense bias deltas (``train_biases``): ``d`` per q / k / v (``3d`` per fused qkv) when it trains
  ``"attention"``, ``m`` per fc1 when it trains ``"mlp"``;
- ``r * factor``: the input-side factors ``V`` (``r x d`` per attention block when q / k / v share it, per projection
  otherwise) plus the output projection's update ``r * (d + o)``;
- ``r * k * rows``: the output-side factors ``U``, ``d_h`` rows per selected head in each of q, k and v;
- the last sum: the ``S`` fc1 values of each adapted fc1 of ``numel_j = m * d`` entries.

With every part on and ``L`` equal layers this is docs/lorsu.md's
``L * (floor(s * m * d) + m + 3d + r * (3 * k * d_h + d)) + r * (d + o)``.

The budget rule of :func:`config_for_budget`:

1. The part left after the biases is split between the low-rank updates and the sparse fc1 update in the proportion
   of the paper's reference run (:data:`PAPER_ATTENTION_SHARE`: about one quarter low-rank), unless
   ``attention_share`` says otherwise.
2. ``r`` is the power of two (up to the narrowest adapted width) whose low-rank count at the paper's fraction of
   heads (2 of 12, so ``k = round(H / 6)``, at least 1) comes closest to the low-rank share; then ``k`` in ``1..H`` is
   the head count that brings it closest at that ``r``.
3. ``sparsity`` takes the rest in closed form: ``s = rest / sum_j numel_j``.

If that choice misses 1% (its fc1 part cannot absorb the rest), the other ``(r, k)`` pairs are tried in order of
closeness to the share. Parts that are off or fixed by the caller drop out of the search; without an fc1 update every
``r`` in ``1..width`` is tried, since nothing else can absorb the remainder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from ..utils import unwrap_model
from .targets import TargetSpec, as_attention, as_linear, find_sites, trains_bias


class BudgetSpec(TargetSpec, Protocol):
    """The fields of a :class:`~peft_lorsu.lorsu.config.LoRSUConfig` the closed-form count reads."""

    adapt_attention: bool
    adapt_mlp: bool
    train_biases: bool | list[str]
    share_qkv_factor: bool
    r: int
    top_k_heads: int
    sparsity: float

# The paper's reference run on CLIP ViT-B/16 (r = 64, top_k_heads = 2, sparsity = 0.1): low-rank part
# 12 * 64 * (3 * 2 * 64 + 768) + 64 * (768 + 512) = 966,656, fc1 part 12 * floor(0.1 * 3072 * 768) = 2,831,148.
PAPER_LOW_RANK, PAPER_SPARSE = 966_656, 2_831_148
PAPER_ATTENTION_SHARE = PAPER_LOW_RANK / (PAPER_LOW_RANK + PAPER_SPARSE)
PAPER_HEAD_FRACTION = 2 / 12  # top_k_heads = 2 of ViT-B/16's 12 heads
TOLERANCE = 0.01  # the chosen count lands within 1% of the budget, or config_for_budget raises


@dataclass(frozen=True)
class CountStructure:
    """The terms of ``total(r, k, s)`` for one model and config (see the module docstring).

    Attributes:
        bias: trainable bias-delta entries (independent of ``r``, ``k``, ``s``).
        factor: ``total`` grows by ``factor`` per unit of ``r`` (input-side factors and projection).
        rows: and by ``rows`` per unit of ``r * k`` (output-side factor rows per selected head).
        fc1_sizes: ``numel`` of every adapted fc1 weight.
        max_heads: the smallest head count of an adapted block (``top_k_heads`` may not exceed it), 0 without one.
        max_rank: the smallest width of a low-rank update (rank search bound), 0 without one.
    """

    bias: int
    factor: int
    rows: int
    fc1_sizes: tuple[int, ...]
    max_heads: int
    max_rank: int

    @property
    def has_low_rank(self) -> bool:
        return self.factor + self.rows > 0

    def low_rank(self, r: int, k: int) -> int:
        return r * (self.factor + k * self.rows)

    def sparse(self, sparsity: float) -> int:
        # the same rule as selection.num_sparse_values: at least one entry per fc1
        return sum(max(1, math.floor(sparsity * n)) for n in self.fc1_sizes)

    def total(self, r: int, k: int, sparsity: float) -> int:
        return self.bias + self.low_rank(r, k) + self.sparse(sparsity)


def count_structure(model: nn.Module, config: BudgetSpec) -> CountStructure:
    """The count's terms for ``config`` on ``model``, from the modules LoRSU would wrap (nothing is built)."""
    base = unwrap_model(model)
    sites = find_sites(base, config)
    bias = factor = rows = 0
    fc1_sizes, heads, widths, owners = [], [], [], set()
    attention = config.adapt_attention
    for site in sites.values():
        module = base.get_submodule(site.name)
        if site.role in ("q", "k", "v"):
            linear = as_linear(module)
            bias += linear.out_features if trains_bias(config, "attention") else 0
            if attention:
                rows += site.head_dim
                if not config.share_qkv_factor or site.block not in owners:
                    factor += linear.in_features
                    owners.add(site.block)
                heads.append(site.num_heads)
                widths.append(linear.in_features)
        elif site.role == "qkv":
            width = as_attention(module).embed_dim
            bias += 3 * width if trains_bias(config, "attention") else 0
            if attention:
                rows += 3 * site.head_dim
                factor += width * (1 if config.share_qkv_factor else 3)
                heads.append(site.num_heads)
                widths.append(width)
        elif site.role == "fc1":
            linear = as_linear(module)
            bias += linear.out_features if trains_bias(config, "mlp") else 0
            if config.adapt_mlp:
                fc1_sizes.append(linear.in_features * linear.out_features)
        else:  # projection: an unmasked rank-r update, no bias delta
            linear = as_linear(module)
            factor += linear.in_features + linear.out_features
            widths.append(min(linear.in_features, linear.out_features))
    return CountStructure(bias, factor, rows, tuple(fc1_sizes), min(heads, default=0), min(widths, default=0))


def count_trainable(model: nn.Module, config: BudgetSpec) -> int:
    """Trainable parameters ``get_peft_model(model, config)`` will create, in closed form (no model is built)."""
    return count_structure(model, config).total(config.r, config.top_k_heads, config.sparsity)


def config_for_budget(
    config_cls: type[BudgetSpec],
    model: nn.Module,
    trainable_params: int,
    attention_share: float | None = None,
    **fixed,
) -> dict[str, Any]:
    """Fields of a ``config_cls`` whose trainable count is within 1% of ``trainable_params`` (rule: module docstring).

    Args:
        model: the model to adapt (``CLIPModel``, a vision tower, ... or a wrapper around one).
        trainable_params: the budget ``N``.
        attention_share: share of ``N - bias`` for the low-rank updates, in ``[0, 1]``; default
            :data:`PAPER_ATTENTION_SHARE` (about 0.25).
        **fixed: any other :class:`LoRSUConfig` fields. Giving ``r``, ``top_k_heads`` or ``sparsity`` holds them
            fixed; ``lora_alpha`` defaults to the chosen ``r`` (scale 1, as in the reference run).

    Raises:
        ValueError: ``trainable_params`` outside the range these settings can reach (the message gives the range),
            or no combination within 1% (possible when parts are fixed).
    """
    if isinstance(trainable_params, bool) or not isinstance(trainable_params, int) or trainable_params < 1:
        raise ValueError(
            f"LoRSUConfig.from_budget: trainable_params must be an integer >= 1, got {trainable_params!r}"
        )
    share = PAPER_ATTENTION_SHARE if attention_share is None else attention_share
    if not 0 <= share <= 1:
        raise ValueError(f"LoRSUConfig.from_budget: attention_share must be in [0, 1], got {attention_share!r}")
    probe_config = config_cls(**fixed)
    shape = count_structure(model, probe_config)
    if "top_k_heads" in fixed and probe_config.adapt_attention and fixed["top_k_heads"] > shape.max_heads:
        raise ValueError(
            f"LoRSUConfig.top_k_heads={fixed['top_k_heads']} exceeds the {shape.max_heads} heads of the smallest "
            f"adapted block (allowed: 1..{shape.max_heads})"
        )
    free_sparsity = bool(shape.fc1_sizes) and "sparsity" not in fixed
    # a part that is off contributes nothing whatever its knob, so the knob keeps its (given or default) value
    ranks = _choices(fixed.get("r"), shape.max_rank, shape.has_low_rank, free_sparsity) or [probe_config.r]
    heads = _choices(fixed.get("top_k_heads"), shape.max_heads, shape.rows > 0, False) or [probe_config.top_k_heads]
    sparsities = (1e-12, 1.0) if free_sparsity else (probe_config.sparsity,)
    low = shape.total(ranks[0], heads[0], sparsities[0])
    high = shape.total(ranks[-1], heads[-1], sparsities[-1])
    if not low <= trainable_params <= high:
        raise ValueError(
            f"LoRSUConfig.from_budget: trainable_params={trainable_params:,} is outside what these settings reach on "
            f"{type(unwrap_model(model)).__name__}: {low:,} (r={ranks[0]}, top_k_heads={heads[0]}, "
            f"{'one fc1 entry per layer' if free_sparsity else f'sparsity={sparsities[0]}'}) to {high:,} "
            f"(r={ranks[-1]}, top_k_heads={heads[-1]}, sparsity={sparsities[-1]}), biases {shape.bias:,} included"
        )
    pairs = [(r, k) for r in ranks for k in heads]
    if free_sparsity:
        target = (share if shape.has_low_rank else 0.0) * (trainable_params - shape.bias)
        pairs.sort(key=lambda rk: (abs(shape.low_rank(*rk) - target), rk[1], rk[0]))
        pairs.insert(0, _rule_pair(shape, ranks, heads, target))  # the stated rule first, the closest pairs after
    else:
        pairs.sort(key=lambda rk: (abs(shape.total(*rk, sparsities[0]) - trainable_params), rk[1], rk[0]))
    best = None
    for r, k in pairs:
        sparsity = _solve_sparsity(shape, trainable_params - shape.bias - shape.low_rank(r, k)) if free_sparsity else (
            sparsities[0]
        )
        if sparsity is None:
            continue
        miss = abs(shape.total(r, k, sparsity) - trainable_params)
        if best is None or miss < best[0]:
            best = (miss, r, k, sparsity)
        if miss <= TOLERANCE * trainable_params:
            break
    if best is None or best[0] > TOLERANCE * trainable_params:
        closest = "" if best is None else f"; closest: {shape.total(*best[1:]):,} (r={best[1]}, top_k_heads={best[2]})"
        raise ValueError(
            f"LoRSUConfig.from_budget: no r / top_k_heads / sparsity within 1% of trainable_params="
            f"{trainable_params:,} with the fixed fields {sorted(fixed)}{closest}"
        )
    _, r, k, sparsity = best
    return {"lora_alpha": r, **fixed, "r": r, "top_k_heads": k, "sparsity": sparsity}


def _rule_pair(shape: CountStructure, ranks: list[int], heads: list[int], target: float) -> tuple[int, int]:
    """The rule's ``(r, k)``: ``r`` closest to the low-rank target at the paper's fraction of heads (2 of 12), then
    ``k`` closest to it at that ``r`` (ties: lower rank, fewer heads)."""
    paper_k = min(heads, key=lambda k: (abs(k - max(1, round(shape.max_heads * PAPER_HEAD_FRACTION))), k))
    r = min(ranks, key=lambda r: (abs(shape.low_rank(r, paper_k) - target), r))
    return r, min(heads, key=lambda k: (abs(shape.low_rank(r, k) - target), k))


def _choices(fixed: int | None, bound: int, used: bool, powers_of_two: bool) -> list[int]:
    """Candidate values of ``r`` or ``k``, ascending: the fixed one, powers of two up to ``bound`` (plus ``bound``),
    or every value in ``1..bound``; ``[]`` when the part is off and nothing is fixed."""
    if fixed is not None or not used:
        return [] if fixed is None else [fixed]
    if not powers_of_two:
        return list(range(1, bound + 1))
    values = [2**i for i in range(bound.bit_length()) if 2**i <= bound]
    return values if values[-1] == bound else [*values, bound]


def _solve_sparsity(shape: CountStructure, rest: int) -> float | None:
    """``s = rest / sum_j numel_j`` (``None`` when ``rest`` is below one entry per fc1 or above all of them)."""
    total = sum(shape.fc1_sizes)
    if rest < len(shape.fc1_sizes) or rest > total:
        return None
    return min(1.0, rest / total)
