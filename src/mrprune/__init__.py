"""mrprune: post-training pruning of Hugging Face causal LMs with principled layerwise sparsity allocation.

The public names load on first use (PEP 562), so ``import mrprune`` and the command line's start stay light and
an interrupt while torch loads is the command line's to report.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS = {
    "PruneOutcome": "api", "evaluate_perplexity": "api", "evaluate_zeroshot": "api", "prune": "api",
    "AllocationConfig": "config", "CalibrationConfig": "config", "EvalConfig": "config", "PruneConfig": "config",
    "RuntimeConfig": "config", "MrpruneError": "errors",
}

if TYPE_CHECKING:
    from .api import PruneOutcome, evaluate_perplexity, evaluate_zeroshot, prune
    from .config import AllocationConfig, CalibrationConfig, EvalConfig, PruneConfig, RuntimeConfig
    from .errors import MrpruneError


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: mrprune.config.merge(...)
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'mrprune' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "AllocationConfig",
    "CalibrationConfig",
    "EvalConfig",
    "MrpruneError",
    "PruneConfig",
    "PruneOutcome",
    "RuntimeConfig",
    "evaluate_perplexity",
    "evaluate_zeroshot",
    "prune",
    "__version__",
]
