"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, compared within each output row; no weight update."""

from __future__ import annotations

import torch

from .base import LayerStats, PruneResult, PruningMetric, prune_unseen
from .masks import select_mask
from .pattern import SparsityPattern


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """|W| scaled per input feature by the L2 norm of that feature over all calibration tokens."""
    return weight.abs() * sq_norm.to(weight.device, torch.float32).sqrt()[None, :]


class Wanda(PruningMetric):
    name = "wanda"
    needs_sq_norm = True

    def prune(self, weight, stats: LayerStats, sparsity: float, pattern: SparsityPattern, forced=None) -> PruneResult:
        if stats.unseen:
            return prune_unseen(weight, stats, sparsity, pattern, forced)
        assert stats.sq_norm is not None
        mask = select_mask(wanda_scores(weight, stats.sq_norm), sparsity, pattern, group="row", forced=forced)
        return PruneResult(weight.masked_fill(mask, 0.0), mask)
