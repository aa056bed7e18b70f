"""Magnitude pruning: score |W|, compared over the whole matrix."""

from __future__ import annotations

import torch

from .base import LayerStats, PruneResult, PruningMetric
from .masks import select_mask
from .pattern import SparsityPattern


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs()


class Magnitude(PruningMetric):
    name = "magnitude"

    def prune(self, weight, stats: LayerStats, sparsity: float, pattern: SparsityPattern, forced=None) -> PruneResult:
        mask = select_mask(magnitude_scores(weight), sparsity, pattern, group="matrix", forced=forced)
        return PruneResult(weight.masked_fill(mask, 0.0), mask)
