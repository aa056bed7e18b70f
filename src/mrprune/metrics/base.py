"""The pruning-metric interface: how the weights inside one linear layer are ranked and removed."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .pattern import SparsityPattern


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's input, accumulated in float32.

    ``sq_norm[j]`` is the sum over calibration tokens of x_j^2 (Wanda's ||X_j||^2); ``hessian`` is sum x x^T
    (SparseGPT's H up to the factor 2/n, which its relative dampening makes irrelevant).
    """

    tokens: int = 0
    sq_norm: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)
    #: no calibration token reached the layer (an expert its router never chose): the statistics are zeros
    unseen: bool = False
    #: what a metric derives from these statistics once for every layer sharing them (SparseGPT's H^-1)
    derived: dict = field(default_factory=dict, repr=False)


def sq_norms(stats: dict[str, LayerStats]) -> dict[str, torch.Tensor]:
    """Every layer's ``sq_norm``, of statistics collected with it."""
    norms: dict[str, torch.Tensor] = {}
    for name, layer in stats.items():
        if layer.sq_norm is None:
            raise ValueError(f"no input statistics (sq_norm) for layer {name}")
        norms[name] = layer.sq_norm
    return norms


@dataclass
class PruneResult:
    """New float32 weight (pruned weights are exact zeros) and the mask that produced it."""

    weight: torch.Tensor
    mask: torch.Tensor


class PruningMetric(ABC):
    """Ranks and prunes one weight matrix (out x in). Implementations are stateless apart from options."""

    name: ClassVar[str]
    needs_sq_norm: ClassVar[bool] = False
    needs_hessian: ClassVar[bool] = False
    updates_weights: ClassVar[bool] = False

    @property
    def needs_calibration(self) -> bool:
        return self.needs_sq_norm or self.needs_hessian

    @abstractmethod
    def prune(
        self,
        weight: torch.Tensor,
        stats: LayerStats,
        sparsity: float,
        pattern: SparsityPattern,
        forced: torch.Tensor | None = None,
    ) -> PruneResult:
        """Prune ``weight`` (float32, out x in) to ``sparsity``; ``forced`` marks weights that must stay pruned."""


#: the note a layer's record carries when no calibration token reached it
UNSEEN_NOTE = ("no calibration token reached this layer (an expert its router never chose, or a layer whose weight the "
               "model's code reads without calling it): pruned by |W| per row")


def prune_unseen(weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: SparsityPattern,
                 forced: torch.Tensor | None = None) -> PruneResult:
    """A layer without calibration statistics: Wanda's scores would all be zero and SparseGPT's Hessian empty,
    so either would prune arbitrary weights; the magnitude within each row (Wanda with equal input norms) is
    the ranking that still uses what is known."""
    from .masks import select_mask

    stats.notes.append(UNSEEN_NOTE)
    mask = select_mask(weight.abs(), sparsity, pattern, group="row", forced=forced)
    return PruneResult(weight.masked_fill(mask, 0.0), mask)
