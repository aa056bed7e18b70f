"""Pruning metrics by name. Add one by subclassing PruningMetric and registering a factory here."""

from __future__ import annotations

from typing import Callable

from .base import LayerStats, PruneResult, PruningMetric
from .magnitude import Magnitude, magnitude_scores
from .pattern import SparsityPattern
from .sparsegpt import SparseGPT, sparsegpt_prune
from .wanda import Wanda, wanda_scores

#: name -> factory taking the job's PruneConfig (so metrics can read their own options)
METRICS: dict[str, Callable[..., PruningMetric]] = {
    "magnitude": lambda config=None: Magnitude(),
    "wanda": lambda config=None: Wanda(),
    "sparsegpt": lambda config=None: (
        SparseGPT() if config is None else SparseGPT(config.sparsegpt.blocksize, config.sparsegpt.percdamp)
    ),
}


def build_metric(name: str, config=None) -> PruningMetric:
    return METRICS[name](config)


__all__ = [
    "METRICS",
    "LayerStats",
    "Magnitude",
    "PruneResult",
    "PruningMetric",
    "SparseGPT",
    "SparsityPattern",
    "Wanda",
    "build_metric",
    "magnitude_scores",
    "sparsegpt_prune",
    "wanda_scores",
]
