"""Evaluation of (pruned) models: perplexity, and zero-shot accuracy through lm-evaluation-harness."""

from .perplexity import PerplexityResult, perplexity
from .zeroshot import ZeroShotResult, ZeroShotTasks, evaluate_zeroshot, prepare_tasks

__all__ = ["PerplexityResult", "ZeroShotResult", "ZeroShotTasks", "evaluate_zeroshot", "perplexity", "prepare_tasks"]
