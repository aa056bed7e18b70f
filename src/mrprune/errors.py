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


class ResourceError(MrpruneError):
    """The run would not fit: too little memory on the device or the host, or too little disk for the output."""


class NumericsError(MrpruneError):
    """Weights, activations or statistics hold NaN or Inf: continuing would write a broken model."""


class CheckpointError(MrpruneError):
    """A checkpoint directory cannot be used as asked (missing, not ours, or made by a different run)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: unwinds like Ctrl-C (``finally`` blocks and atomic writes clean up).

    A KeyboardInterrupt subclass so that ``except Exception`` never swallows it; ``exit_code`` is 128 + signal.
    """

    def __init__(self, signum: int, name: str):
        super().__init__(name)
        self.signum = signum
        self.name = name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def reason(exc: BaseException) -> str:
    """Why an OS call (or torch's file mapping) failed, as a lower-case clause of a one-line message."""
    text = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    return text.lower()
