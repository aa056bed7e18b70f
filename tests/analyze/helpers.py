"""Shared settings of the analysis tests: tiny models, embedded text, a handful of short windows."""

from mrprune import PruneConfig
from mrprune.config import merge

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

FAST = {"calibration.source": "embedded", "calibration.nsamples": 4, "calibration.seqlen": 32,
        "evaluation.text": "embedded", "evaluation.seqlen": 64, "evaluation.max_windows": 2}

FAST_ARGS = ("-q", "--calib", "embedded", "--nsamples", 4, "--seqlen", 32)
EVAL_ARGS = ("--eval-text", "embedded", "--eval-seqlen", 64, "--max-windows", 2)


def fast_config(**overrides) -> PruneConfig:
    return merge(PruneConfig(), {**FAST, **overrides})


def state(model) -> dict:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def same_state(model, saved: dict) -> bool:
    current = model.state_dict()
    return current.keys() == saved.keys() and all(torch_equal(current[k], saved[k]) for k in saved)


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())  # a job may have moved the model to a GPU
