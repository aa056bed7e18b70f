"""OWL, Outlier-Weighted Layerwise sparsity (Yin et al. 2023, arXiv 2310.05175).

Blocks whose Wanda scores hold more outliers (scores above ``m`` x the block mean) are pruned less: the
outlier ratios are min-max scaled to [0, 2 lambda] and subtracted from the target around their
parameter-weighted mean, so the global target is met exactly whatever the block sizes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ..errors import ConfigError
from ..metrics.base import LayerStats
from ..metrics.wanda import wanda_scores
from ..models.adapter import LinearRef
from .base import Allocation, AllocationContext, Allocator
from .fit import fit_to_target, weighted_mean

log = logging.getLogger(__name__)


def outlier_ratio(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], m: float) -> float:
    """Fraction of the Wanda scores of a group of layers (``(weight, sq_norm)`` pairs) above ``m`` x their mean.

    The group's scores are never concatenated (a block of a large model would need gigabytes): the mean comes
    from per-layer sums and counts, then each layer's scores are recomputed and counted against the threshold.
    """
    total, count = 0.0, 0
    for weight, sq_norm in layers:
        scores = wanda_scores(weight.float(), sq_norm)
        total += float(scores.sum(dtype=torch.float64))
        count += scores.numel()
    if count == 0:
        raise ValueError("outlier ratio of an empty group of layers")
    threshold = m * total / count
    above = sum(int((wanda_scores(weight.float(), sq_norm) > threshold).sum()) for weight, sq_norm in layers)
    return above / count


def owl_sparsities(ratios: Sequence[float], sizes: Sequence[int], target: float, lam: float) -> list[float]:
    """Raw (unclamped) OWL sparsities: x = minmax(D) * 2 lambda, sparsity = target - x + weighted mean(x).

    This is methods.md's density_l = x_l - mean(x) + (1 - S), sparsity_l = 1 - density_l, with the mean
    weighted by the group sizes so that the weighted mean of the sparsities is exactly ``target``.
    Equal ratios carry no information, so they give the uniform allocation.
    """
    if len(ratios) != len(sizes) or not ratios:
        raise ValueError("need one size per outlier ratio")
    lo, hi = min(ratios), max(ratios)
    if hi <= lo:
        return [float(target)] * len(ratios)
    x = [(d - lo) / (hi - lo) * 2.0 * lam for d in ratios]
    x_mean = weighted_mean(x, list(sizes))
    return [target - xi + x_mean for xi in x]


class OwlAllocator(Allocator):
    """Per-block (or per-layer) sparsity from the outlier ratio of the dense model's Wanda scores."""

    name = "owl"
    needs_calibration = True

    def __init__(self, m: float = 5.0, lam: float = 0.08):
        if not m > 0:
            raise ConfigError(f"allocation.owl.m must be positive, got {m}")
        if not lam >= 0:
            raise ConfigError(f"allocation.owl.lam must be non-negative, got {lam}")
        self.m = float(m)
        self.lam = float(lam)

    def allocate(self, ctx: AllocationContext) -> Allocation:
        if ctx.dense_stats is None:
            raise ValueError("OWL needs the dense model's calibration statistics (ctx.dense_stats)")
        if ctx.granularity not in ("block", "layer"):
            raise ConfigError(f"unknown allocation.granularity '{ctx.granularity}'; choose block or layer")
        adapter = ctx.adapter
        target = 0.5 if ctx.target is None else ctx.target
        stats = ctx.dense_stats()

        if ctx.granularity == "layer":
            groups = [[ref] for ref in adapter.all_linear_layers()]
        else:
            groups = [adapter.linear_layers(i) for i in range(adapter.num_blocks)]
        ratios = [outlier_ratio([(ref.weight, _sq_norm(stats, ref)) for ref in group], self.m) for group in groups]
        sizes = [sum(ref.numel for ref in group) for group in groups]
        fitted = fit_to_target(owl_sparsities(ratios, sizes, target, self.lam), sizes, target)
        log.info("OWL outlier ratios (M=%g): min %.5f, max %.5f; sparsities %.4f..%.4f",
                 self.m, min(ratios), max(ratios), min(fitted), max(fitted))

        details = {"m": self.m, "lambda": self.lam, "granularity": ctx.granularity}
        if ctx.granularity == "layer":
            names = [group[0].name for group in groups]
            return Allocation.from_layers(
                self.name, adapter, dict(zip(names, fitted)), target,
                outlier_ratio={n: float(d) for n, d in zip(names, ratios)}, **details,
            )
        return Allocation.from_blocks(self.name, adapter, fitted, target,
                                      outlier_ratio=[float(d) for d in ratios], **details)


def _sq_norm(stats: dict[str, LayerStats], ref: LinearRef) -> torch.Tensor:
    layer = stats.get(ref.name)
    if layer is None or layer.sq_norm is None:
        raise ValueError(f"no dense input statistics (sq_norm) for layer {ref.name}")
    return layer.sq_norm
