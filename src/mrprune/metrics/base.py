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
    #: what a metric derives from these statistics once for every layer sharing them (SparseGPT's H^-1)
    derived: dict = field(default_factory=dict, repr=False)


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
