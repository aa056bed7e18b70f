"""Analyses behind the paper's observations, each a typed function writing JSON, a PNG plot and Markdown.

- :func:`layerwise_sensitivity` (``mrprune analyze lps``): perplexity increase when only one block is pruned,
  per block and per metric (observations 1 and 2).
- :func:`redundancy_profile` (``mrprune analyze redundancy``): per-block non-outlier ratio of a model
  (observation 3).
- :func:`allocation_analysis` (``mrprune analyze allocation``): the per-block sparsity of each allocator and
  the redundancy spread each leaves.
- :func:`compare` (``mrprune compare``): an allocation x metric x sparsity grid of perplexities.
"""

from __future__ import annotations

from .allocation import AllocationResult, allocation_analysis
from .compare import CompareResult, compare
from .lps import LpsResult, layerwise_sensitivity, spearman
from .profile import RedundancyResult, redundancy_profile

__all__ = [
    "AllocationResult",
    "CompareResult",
    "LpsResult",
    "RedundancyResult",
    "allocation_analysis",
    "compare",
    "layerwise_sensitivity",
    "redundancy_profile",
    "spearman",
]
