"""mrprune: post-training pruning of Hugging Face causal LMs with principled layerwise sparsity allocation."""

__version__ = "0.1.0"

from .api import PruneOutcome, evaluate_perplexity, evaluate_zeroshot, prune  # noqa: E402
from .config import AllocationConfig, CalibrationConfig, EvalConfig, PruneConfig, RuntimeConfig  # noqa: E402
from .errors import MrpruneError  # noqa: E402

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
