"""Scoring and selection: how the probe turns gradients into LoRSU's heads and fc1 entries.

Heads: the paper's gradient score, per-sample Fisher, random, or a user's function.

Every strategy turns the statistics of one attention block (:class:`HeadStatistics`) into one score per head, and
the probe keeps the ``top_k_heads`` best heads of each block (ties to the lower index). fc1 entries are always chosen
by the mean gradient, whatever the head strategy: the ``S`` entries of largest ``|G|``. Both choices are
deterministic: ties go to the lower index, and fc1 indices are stored in ascending order.

Symbols for one block: ``H`` heads of size ``d_h``, input width ``d``, ``N`` probe samples, ``l_i`` the loss of
sample ``i`` and ``g_i = grad l_i``; ``G = (1 / N) sum_i g_i`` is the mean gradient the probe accumulates.

- ``"gradient"`` (default, the paper): ``s_h = ||G_q^h||^2 + ||G_k^h||^2 + ||G_v^h||^2``, the rows of head ``h``
  in each projection. Averaged first, squared later: gradients of different samples can cancel.
- ``"fisher"``: ``s_h = (1 / N) sum_i (||g_{i,q}^h||^2 + ||g_{i,k}^h||^2 + ||g_{i,v}^h||^2)``, the trace of the
  empirical Fisher over the head's rows (squared first, averaged later: nothing cancels; ranking as by the sum).
  It needs per-sample losses: ``loss_fn`` must return a `(batch_size,)` tensor, and the default does so for CLIP
  (:func:`per_sample_clip_loss`). Cost: one extra pass over the probed batches with one backward pass per *sample*
  (``B`` backward passes through the retained graph of a batch of ``B``) instead of one per batch, i.e. roughly
  ``B`` times the gradient probe's backward compute; memory: the batch's graph stays alive for those ``B`` passes,
  plus one q/k/v-sized gradient at a time. Keep probe batches small.
- ``"random"``: uniform scores drawn from ``config.seed`` and the block's name (an ablation that keeps the
  data-chosen fc1 entries; ``selection="random"`` randomises both).
- a callable ``head_scorer(stats) -> (H,)`` given to ``probe_lorsu``: any rule of your own; ``config.head_scoring``
  is then recorded as ``"custom"``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..compat import full_shape
from ..distributed import all_reduce_sum_
from ..utils import batch_size, only_these_require_grad, output_field, strip_data_parallel, to_device, unwrap_model
from .functional import index_dtype
from .targets import HEAD_ROLES, Site, as_linear, attention_blocks, qkv_gradients, qkv_weights

if TYPE_CHECKING:
    from .config import LoRSUConfig

LossFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]


def num_sparse_values(weight: torch.Tensor, sparsity: float) -> int:
    """``S = floor(sparsity * numel(weight))``, at least 1 so a tiny layer still gets an update."""
    return max(1, math.floor(sparsity * full_shape(weight).numel()))


def head_scores(grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Score of every head: ``s_h = ||G_q^h||_F^2 + ||G_k^h||_F^2 + ||G_v^h||_F^2``.

    Args:
        grad_q, grad_k, grad_v: mean gradients of the q/k/v weights, `(d, d_in)`; head ``h`` owns rows
            ``[h * d_h, (h + 1) * d_h)``.
        num_heads: ``H``.

    Returns:
        `(H,)` float32 scores.
    """
    return sum(g.float().reshape(num_heads, -1).pow(2).sum(1) for g in (grad_q, grad_k, grad_v))


def top_k_indices(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest entries of a 1-d tensor, ascending; ties go to the lower index."""
    order = torch.sort(-scores.float(), stable=True).indices
    return sorted(order[:k].tolist())


def top_s_entries(grad: torch.Tensor, num_values: int) -> torch.Tensor:
    """Flat indices (ascending, :func:`~.functional.index_dtype`) of the ``num_values`` entries of ``grad`` with the
    largest magnitude.

    Keeping the S largest ``|G|`` entries is the mask that maximises the first-order loss decrease of an S-sparse
    update (Lemma 3.2 of the LoRSU paper).
    """
    magnitude = grad.float().abs().reshape(-1)
    order = torch.sort(-magnitude, stable=True).indices
    return order[:num_values].sort().values.to(index_dtype(magnitude.numel()))


def check_top_k_heads(config: LoRSUConfig, blocks: dict[str, tuple[int, int]]) -> None:
    """Raise if ``config.top_k_heads`` exceeds the heads of any attention block `{path: (num_heads, head_dim)}`."""
    if not config.adapt_attention:
        return
    for block, (num_heads, _) in blocks.items():
        if config.top_k_heads > num_heads:
            raise ValueError(
                f"LoRSUConfig.top_k_heads={config.top_k_heads} exceeds the {num_heads} heads of {block} "
                f"(allowed: 1..{num_heads})"
            )


def random_selection(model: nn.Module, config: LoRSUConfig, sites: dict[str, Site]) -> None:
    """Fill what ``config`` lacks with heads and fc1 entries drawn at random from ``config.seed`` (ablation; needs
    no data). A part that is already there is kept: when a saved random adapter is loaded, its heads come from
    ``adapter_config.json`` and its fc1 entries from the weights file, never from a new draw."""
    generator = torch.Generator().manual_seed(config.seed)
    heads = {
        block: sorted(torch.randperm(num_heads, generator=generator)[: config.top_k_heads].tolist())
        for block, (num_heads, _) in attention_blocks(sites).items()
    }
    if config.adapt_attention and config.selected_heads is None:
        config.selected_heads = heads
    if config.adapt_mlp and config.fc1_indices is None:
        config.fc1_indices = {}
        for site in sites.values():
            if site.role == "fc1":
                weight = as_linear(model.get_submodule(site.name)).weight
                numel = full_shape(weight).numel()
                chosen = torch.randperm(numel, generator=generator)[: num_sparse_values(weight, config.sparsity)]
                config.fc1_indices[site.name] = chosen.sort().values.to(index_dtype(numel))


@dataclass(frozen=True)
class HeadStatistics:
    """What a head scorer sees for one attention block.

    Attributes:
        block: path of the attention module (the key of ``selected_heads``).
        num_heads: ``H``.
        head_dim: ``d_h``; head ``h`` owns rows ``[h * d_h, (h + 1) * d_h)`` of each gradient below.
        grad_q, grad_k, grad_v: `torch.FloatTensor` of shape `(H * d_h, d)`, the mean gradients ``G`` of the q, k
            and v weights over the probe samples (fp32).
        num_samples: ``N``, the samples the mean gradients average over (all processes together).
        fisher: `torch.FloatTensor` of shape `(H,)`, the per-sample Fisher score of every head; only computed with
            ``head_scoring="fisher"``, else ``None``.
    """

    block: str
    num_heads: int
    head_dim: int
    grad_q: torch.Tensor
    grad_k: torch.Tensor
    grad_v: torch.Tensor
    num_samples: int
    fisher: torch.Tensor | None = None


HeadScorer = Callable[[HeadStatistics], torch.Tensor]


def gradient_score(stats: HeadStatistics) -> torch.Tensor:
    """The paper's score: squared Frobenius norm of each head's rows of the mean q/k/v gradients, `(H,)`."""
    return head_scores(stats.grad_q, stats.grad_k, stats.grad_v, num_heads=stats.num_heads)


def fisher_score(stats: HeadStatistics) -> torch.Tensor:
    """The per-sample Fisher score, `(H,)` (computed by the probe when ``head_scoring="fisher"``)."""
    if stats.fisher is None:
        raise ValueError(f"{stats.block}: no per-sample Fisher statistics; use LoRSUConfig(head_scoring='fisher')")
    return stats.fisher


def random_scorer(seed: int) -> HeadScorer:
    """Uniform `(H,)` scores from ``seed`` and the block's name: the same heads for the same seed, whatever the
    order in which blocks are scored or how many there are."""

    def score(stats: HeadStatistics) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(stats.block.encode()))
        return torch.rand(stats.num_heads, generator=generator)

    return score


def resolve_scorer(config: LoRSUConfig, head_scorer: HeadScorer | None = None) -> HeadScorer:
    """The scorer ``probe_lorsu`` applies: ``head_scorer`` if given, else the one ``config.head_scoring`` names."""
    if head_scorer is not None:
        if not callable(head_scorer):
            raise TypeError(f"head_scorer must be a callable (HeadStatistics) -> (H,) tensor, got {head_scorer!r}")
        return head_scorer
    if config.head_scoring == "custom":
        raise ValueError(
            "LoRSUConfig.head_scoring='custom' needs the scoring function: probe_lorsu(..., head_scorer=fn); "
            "or pick one of 'gradient', 'fisher', 'random'"
        )
    named = {"gradient": gradient_score, "fisher": fisher_score, "random": random_scorer(config.seed)}
    return named[config.head_scoring]


def mean_loss(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` made scalar: a `(batch_size,)` tensor of per-sample losses is averaged, a scalar passes."""

    def loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        value = loss_fn(model, batch)
        return value.mean() if isinstance(value, torch.Tensor) and value.dim() == 1 else value

    return loss


def probe_losses(config: LoRSUConfig, loss_fn: LossFn | None, default: LossFn) -> tuple[LossFn | None, LossFn]:
    """``(per-sample loss or None, scalar loss)`` for the probe's passes.

    With ``head_scoring="fisher"`` and no ``loss_fn`` both passes use :func:`per_sample_clip_loss` (its mean is the
    CLIP loss, or the class-prompt cross-entropy when the batch has labels); otherwise ``default`` serves the gradient
    pass as before.
    """
    if loss_fn is None and config.head_scoring == "fisher":
        loss_fn = per_sample_clip_loss
    return loss_fn, mean_loss(loss_fn or default)


def per_sample_clip_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Per-sample CLIP losses `(B,)` whose mean is the batch loss the probe uses by default.

    With ``labels`` `(B,)` in the batch (class prompts as ``input_ids`` `(C, L)`): the class-prompt cross-entropy of
    each image. Without: sample ``i``'s share of CLIP's symmetric contrastive loss,
    ``(CE(logits_per_image[i], i) + CE(logits_per_text[i], i)) / 2`` (it depends on the whole batch, as the loss does).
    """
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "return_loss")}
    fix = "head_scoring='fisher' needs loss_fn(model, batch) returning the per-sample losses, a (batch_size,) tensor"
    logits = output_field(model(**inputs), "logits_per_image", model, fix)
    if "labels" in batch:
        return F.cross_entropy(logits, batch["labels"].to(logits.device), reduction="none")
    targets = torch.arange(logits.shape[0], device=logits.device)
    per_image = F.cross_entropy(logits, targets, reduction="none")
    per_text = F.cross_entropy(logits.t(), targets, reduction="none")
    return (per_image + per_text) / 2


def per_sample_fisher(
    model: nn.Module,
    sites: dict[str, Site],
    dataloader: Iterable[Mapping[str, Any]],
    loss_fn: LossFn | None = None,
    num_batches: int | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Per-sample Fisher score of every head, ``{block: (H,)}``, and the number of samples it averages over.

    One pass over at most ``num_batches`` batches; each batch's per-sample losses `(B,)` are differentiated one by
    one with respect to the q/k/v weights. The model is left as found (weights, flags, ``.grad``, modes). Under
    ``torch.distributed`` the sums and counts are added over the processes in one collective, which every process
    reaches even when its own pass failed.
    """
    base = unwrap_model(model)
    forward_model = strip_data_parallel(model)
    weights = qkv_weights(base, sites)
    names = list(weights)
    blocks = attention_blocks(sites)
    device = next(iter(weights.values())).device
    sums = {block: torch.zeros(heads, dtype=torch.float32, device=device) for block, (heads, _) in blocks.items()}
    loss_fn = loss_fn or per_sample_clip_loss
    count, error = 0, None
    try:
        with only_these_require_grad(base, weights.values()):
            for step, batch in enumerate(dataloader):
                if num_batches is not None and step >= num_batches:
                    break
                count += _fisher_batch(forward_model, to_device(batch, device), loss_fn, weights, names, sites, sums)
    except Exception as exc:  # reported after the collective, so no process is left waiting
        error = exc
    order = sorted(sums)
    packed = torch.cat([sums[b] for b in order] + [torch.tensor([count, int(error is not None)], device=device)])
    all_reduce_sum_(packed)
    if error is not None:
        raise error
    total, failed = int(packed[-2]), int(packed[-1])
    if failed:
        raise RuntimeError(f"per-sample Fisher: {failed} other process(es) failed; their error is in their own log")
    if total == 0:
        raise ValueError(
            "probe_lorsu: head_scoring='fisher' saw no samples; the dataloader is read twice (gradient pass, then "
            "per-sample pass), so it must be re-iterable: a list or a DataLoader, not a generator"
        )
    out, start = {}, 0
    for block in order:
        size = sums[block].numel()
        out[block] = packed[start : start + size] / total
        start += size
    return out, total


def _fisher_batch(
    model: nn.Module,
    batch: Mapping[str, Any],
    loss_fn: LossFn,
    weights: dict[str, nn.Parameter],
    names: list[str],
    sites: dict[str, Site],
    sums: dict[str, torch.Tensor],
) -> int:
    """Add ``sum_i`` of the per-head squared norms of ``grad l_i`` to ``sums``; return the batch size ``B``."""
    losses = loss_fn(model, batch)
    size = batch_size(batch)
    if losses.shape != (size,):
        raise ValueError(
            f"head_scoring='fisher' needs per-sample losses: loss_fn must return a tensor of shape ({size},) "
            f"(one loss per sample), got shape {tuple(losses.shape)}"
        )
    if not torch.isfinite(losses).all():
        raise ValueError("probe_lorsu: a per-sample loss is NaN or inf (head_scoring='fisher')")
    params = [weights[n] for n in names]
    for i in range(size):
        grads = torch.autograd.grad(losses[i], params, retain_graph=i < size - 1, allow_unused=True)
        per_sample = {n: (torch.zeros_like(p) if g is None else g).float() for n, g, p in zip(names, grads, params)}
        for block, (grad_q, grad_k, grad_v) in qkv_gradients(sites, per_sample).items():
            sums[block] += head_scores(grad_q, grad_k, grad_v, num_heads=sums[block].numel())
    return size


def score_heads(
    config: LoRSUConfig,
    sites: dict[str, Site],
    grads: dict[str, torch.Tensor],
    num_samples: int,
    scorer: HeadScorer,
    fisher: dict[str, torch.Tensor] | None = None,
) -> None:
    """Score every attention block with ``scorer`` and write ``selected_heads`` / ``head_scores`` into ``config``.

    Args:
        grads: mean gradients keyed by weight path, as accumulated by the probe (`(d_out, d_in)` each).
        fisher: ``{block: (H,)}`` from :func:`per_sample_fisher`, when computed.
    """
    qkv = qkv_gradients(sites, grads)
    selected, scores = {}, {}
    for block, (num_heads, head_dim) in attention_blocks(sites).items():
        stats = HeadStatistics(
            block, num_heads, head_dim, *qkv[block], num_samples, None if fisher is None else fisher[block]
        )
        value = torch.as_tensor(scorer(stats)).detach().float().cpu()
        if value.shape != (num_heads,) or not torch.isfinite(value).all():
            raise ValueError(
                f"head scorer for {block}: must return {num_heads} finite scores, shape ({num_heads},); got shape "
                f"{tuple(value.shape)}{'' if torch.isfinite(value).all() else ' with NaN/inf'}"
            )
        scores[block] = [float(v) for v in value]
        selected[block] = top_k_indices(value, config.top_k_heads)
    config.selected_heads, config.head_scores = selected, scores


def select_fc1(config: LoRSUConfig, sites: dict[str, Site], grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The top-S entries of every fc1 by mean-gradient magnitude: ``{fc1 path: (S,) ascending flat indices}``."""
    return {
        site.name: top_s_entries(grads[site.name], num_sparse_values(grads[site.name], config.sparsity))
        for site in sites.values()
        if site.role == "fc1"
    }


def check_gradients(grads: dict[str, torch.Tensor], sites: dict[str, Site], heads_by_gradient: bool = True) -> None:
    """Refuse mean gradients the selection cannot use: NaN / inf anywhere, or all zero (the probe measured nothing).

    Args:
        grads: ``{weight path: (d_out, d_in)}`` as accumulated by the probe.
        heads_by_gradient: whether heads are chosen from these gradients (else the q/k/v sums are not checked).
    """
    broken = sorted(name for name, grad in grads.items() if not torch.isfinite(grad).all())
    if broken:
        # A NaN / inf spreads backwards from where it appears, so the affected weight closest to the loss (the last
        # in the sites' forward order) is where it most likely started.
        order = {name: i for i, name in enumerate(sites)}
        origin = max(broken, key=lambda name: order.get(name, -1))
        raise ValueError(
            f"probe_lorsu: the accumulated gradients of {broken} hold NaN or inf; the layer closest to the loss "
            f"among them, where it most likely started, is {origin}"
        )
    groups = {site.name: [site.name] for site in sites.values() if site.role == "fc1" and site.name in grads}
    if heads_by_gradient:
        for site in sites.values():
            if site.role in HEAD_ROLES and all(path in grads for path in site.qkv):
                groups[site.block] = list(site.qkv)
    zero = [name for name, paths in groups.items() if not any(bool(grads[path].any()) for path in paths)]
    if zero:
        raise ValueError(
            f"probe_lorsu: the gradients of {len(zero)} module(s) are exactly zero, so the probe measured nothing "
            f"there and any choice would be arbitrary: {zero[:4]}{' ...' if len(zero) > 4 else ''}. Usual causes: a "
            "loss that is exactly 0 (CLIP's contrastive loss on batches of one image), a loss multiplied by 0, or "
            "layers the loss does not depend on. Probe with batches of at least 2 samples, or pass a loss_fn "
            "(e.g. the class-prompt loss for labelled images)"
        )
