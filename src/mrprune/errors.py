"""User-facing errors.

Every mistake a user can make (a bad path, an impossible sparsity, too little text) raises a subclass of
:class:`MrpruneError`. The CLI turns these into one line on stderr and a non-zero exit; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class MrpruneError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class ConfigError(MrpruneError):
    """An option or config-file value is invalid."""


class ModelLoadError(MrpruneError):
    """The model cannot be found, downloaded or loaded."""


class UnsupportedModelError(MrpruneError):
    """The model is not a decoder-only language model that mrprune can reach."""


class DataError(MrpruneError):
    """Calibration or evaluation text is missing, unreadable or too short."""


class PatternError(MrpruneError):
    """A sparsity pattern cannot be applied to a layer (e.g. N:M with in_features not divisible by M)."""


class OutputError(MrpruneError):
    """The output directory cannot be written as asked."""


class EvalError(MrpruneError):
    """Zero-shot evaluation cannot run as asked (lm-eval missing, unknown task, task data out of reach)."""
