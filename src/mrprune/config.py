"""Typed configuration for every mrprune job.

A config is a tree of dataclasses. It serialises to plain dicts (YAML/JSON), so a run's effective settings can
be saved in its report and replayed with ``mrprune prune --config``. Loading is strict: an unknown key is an
error naming the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import operator
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


@dataclass
class CalibrationConfig:
    """Where calibration windows come from. ``source`` None means the hub's C4 when online, else embedded text."""

    source: str | None = None
    column: str = "text"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0


@dataclass
class EvalConfig:
    """Perplexity protocol: non-overlapping windows of ``seqlen`` tokens, optional BOS per window.

    Zero-shot (lm-evaluation-harness): ``tasks`` comma-separated, at most ``limit`` items each, ``num_fewshot``
    examples per prompt, ``batch_size`` sequences per forward, local data from the folder ``task_data``.
    """

    text: str | None = None
    seqlen: int = 2048
    max_windows: int | None = None
    bos: str = "auto"
    tasks: str | None = None
    limit: int | None = None
    num_fewshot: int = 0
    task_data: str | None = None
    batch_size: int = 1


@dataclass
class SparseGPTConfig:
    blocksize: int = 128
    percdamp: float = 0.01


@dataclass
class OwlConfig:
    """OWL: outliers are Wanda scores above ``m`` x the block mean; ratios spread over +-``lam``."""

    m: float = 5.0
    lam: float = 0.08


@dataclass
class AlphaConfig:
    """AlphaPruning: ratios spread over [1 - eps, 1 + eps] x target by the heavy-tail exponent."""

    eps: float = 0.3


@dataclass
class MrpConfig:
    """Maximum Redundancy Pruning; ``s0`` None means ``target - s0_gap``. Defaults: see docs/mrp.md."""

    m: float = 10.0
    s0: float | None = None
    s0_gap: float = 0.1
    smax: float = 0.95
    step: float = 0.05
    min_step: float = 0.005
    gamma: float = 0.95
    checkpoint_stride: int = 0
    activations: str = "dense-block"
    #: fast MRP's planning curves: "start" (an extra pass over the model pruned uniformly to s0, the exact loop's
    #: own first step), "plan" (an extra pass over the model pruned to the dense pass's plan, close to the end
    #: state) or "dense" (the dense pass's curves, no extra pass)
    pilot: str = "start"
    #: fast MRP's masks: "nested" (each block first pruned to s0, with the statistics of the loop's uniform start
    #: where the start pilot measured them, else the dense model's, then to its plan with its current ones, so
    #: its mask holds the start's as the exact loop's masks do; Wanda) or "one-shot" (straight to the plan)
    masks: str = "nested"
    #: fast MRP's forecast of how pruning upstream moves a later unit's outlier ratio: "upstream" (from the unit's
    #: own move between the dense pass and the pilot and the pruning upstream of it beyond s0, fitted on the units
    #: reached so far; needs a pilot), "per-unit" (from its own move alone) or "global" (one scale for all: the
    #: mean move measured so far)
    drift: str = "upstream"


@dataclass
class AutoConfig:
    """``--allocation auto``: prune once with each of ``candidates`` (comma-separated allocations) and keep the
    one with the lowest perplexity on ``windows`` windows of the calibration source that calibration did not
    use. No allocation wins everywhere (BENCHMARKS.md section 3), and the evaluation text must not choose."""

    candidates: str = "uniform,owl,alphapruning,mrp-fast"
    windows: int = 16


@dataclass
class AllocationConfig:
    method: str = "uniform"
    ratios: str | None = None
    granularity: str = "block"
    owl: OwlConfig = field(default_factory=OwlConfig)
    alpha: AlphaConfig = field(default_factory=AlphaConfig)
    mrp: MrpConfig = field(default_factory=MrpConfig)
    auto: AutoConfig = field(default_factory=AutoConfig)

    def candidate_names(self) -> list[str]:
        """The allocations ``auto`` chooses from, as given (validated by PruneConfig.validate)."""
        return [name.strip() for name in self.auto.candidates.split(",")]

    def methods_used(self) -> list[str]:
        """Every allocation this job runs: the method, or auto's candidates."""
        return self.candidate_names() if self.method == "auto" else [self.method]


@dataclass
class RuntimeConfig:
    """Where and how a job runs. ``checkpoint_dir`` saves progress after every finished block; ``resume``
    continues from it (same options, same result bit for bit on the CPU); ``remove_checkpoint`` deletes its
    content after a successful run (kept by default: a finished checkpoint re-exports without re-pruning).
    ``preflight`` refuses, before the weights load, a run whose estimated memory does not fit. ``offload_dir``
    keeps pruned blocks (and exact MRP's dense copy) in scratch files there instead of RAM; on an accelerator
    it implies ``offload``."""

    device: str = "auto"
    dtype: str = "auto"
    offload: bool = False
    offload_activations: bool = False
    offload_dir: str | None = None
    batch_size: int = 8
    trust_remote_code: bool = False
    allow_pickle: bool = False
    checkpoint_dir: str | None = None
    resume: bool = False
    remove_checkpoint: bool = False
    preflight: bool = True

    @property
    def offloads(self) -> bool:
        """Blocks wait on the host between their turns (``offload``, or implied by ``offload_dir``)."""
        return self.offload or self.offload_dir is not None


@dataclass
class PruneConfig:
    """Everything one pruning job needs. ``sparsity`` None: implied by the pattern or ratios file, else 0.5."""

    model: str | None = None
    metric: str = "wanda"
    sparsity: float | None = None
    pattern: str = "unstructured"
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    sparsegpt: SparseGPTConfig = field(default_factory=SparseGPTConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    evaluate: bool = False
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    output: str | None = None
    overwrite: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> PruneConfig:
        """Check value ranges that need no model; raises ConfigError naming the option."""
        from .allocate import ALLOCATORS
        from .metrics import METRICS
        from .metrics.pattern import SparsityPattern

        _check_types(self)
        check_choice("metric", self.metric, METRICS)
        check_choice("allocation.method", self.allocation.method, ALLOCATORS)
        for path, choices in CHOICES.items():
            check_choice(path, operator.attrgetter(path)(self), choices)
        pattern = SparsityPattern.parse(self.pattern)
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if pattern.is_nm and self.sparsity is not None and abs(self.sparsity - pattern.sparsity) > 1e-9:
            raise ConfigError(
                f"pattern {pattern} implies sparsity {pattern.sparsity:g}, but sparsity {self.sparsity:g} was given"
            )
        if pattern.is_nm and self.allocation.method != "uniform":
            raise ConfigError(
                f"allocation '{self.allocation.method}' cannot be combined with pattern {pattern}: "
                "an N:M pattern fixes every layer's sparsity; use --allocation uniform"
            )
        if self.allocation.method == "auto":
            _check_auto(self)
        if "file" in self.allocation.methods_used() and not self.allocation.ratios:
            raise ConfigError("allocation 'file' needs --ratios FILE (JSON or YAML)")
        for path in ("output", "runtime.checkpoint_dir", "runtime.offload_dir", "allocation.ratios",
                     "calibration.source", "evaluation.text", "model"):
            value = operator.attrgetter(path)(self)
            if isinstance(value, str) and not value.strip():
                raise ConfigError(f"{path} is empty: give a path (or leave the option out)")
        check_positive("calibration.nsamples", self.calibration.nsamples)
        check_positive("calibration.seqlen", self.calibration.seqlen)
        check_positive("evaluation.seqlen", self.evaluation.seqlen)
        check_positive("runtime.batch_size", self.runtime.batch_size)
        check_positive("sparsegpt.blocksize", self.sparsegpt.blocksize)
        if self.evaluation.max_windows is not None:
            check_positive("evaluation.max_windows", self.evaluation.max_windows)
        _check_zeroshot(self.evaluation)
        if not 0.0 <= self.sparsegpt.percdamp < 1.0:
            raise ConfigError(f"sparsegpt.percdamp must be in [0, 1), got {self.sparsegpt.percdamp}")
        if (self.runtime.resume or self.runtime.remove_checkpoint) and not self.runtime.checkpoint_dir:
            flag = "--resume" if self.runtime.resume else "--remove-checkpoint"
            raise ConfigError(f"{flag} needs --checkpoint-dir DIR (the directory of the interrupted run)")
        return self


def _check_types(config: Any, prefix: str = "") -> None:
    """A config built in Python (not read from a file) gets the file's type checks too: a string where a bool
    belongs (``overwrite="False"``) would otherwise count as true."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint, path = getattr(config, f.name), hints[f.name], f"{prefix}{f.name}"
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                raise ConfigError(f"config key '{path}' expects {hint.__name__}, got {type(value).__name__} "
                                  f"(build it with {hint.__name__}(...), or set keys with mrprune.config.merge)")
            _check_types(value, f"{path}.")
        elif not _is_a(hint, value):
            raise ConfigError(f"config key '{path}' expects {_type_name(hint)}, got {value!r}")


def _is_a(hint: Any, value: Any) -> bool:
    """The one type rule of a config value, for files (``from_dict``) and for configs built in code."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_a(arg, value) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, (str, os.PathLike))  # paths are text options too
    return hint is Any


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _check_auto(config: PruneConfig) -> None:
    from .allocate import CANDIDATE_ALLOCATIONS

    names = config.allocation.candidate_names()
    for name in names:
        if not name:
            raise ConfigError(f"allocation.auto.candidates needs comma-separated allocations, got "
                              f"{config.allocation.auto.candidates!r}")
        check_choice("allocation.auto.candidates entry", name, CANDIDATE_ALLOCATIONS)
    if len(set(names)) != len(names) or len(names) < 2:
        raise ConfigError(f"allocation.auto.candidates needs at least two different allocations, got "
                          f"{config.allocation.auto.candidates!r}")
    check_positive("allocation.auto.windows", config.allocation.auto.windows)


def check_zeroshot_counts(limit: int | None, num_fewshot: int, batch_size: int, prefix: str = "") -> None:
    """Items per task (None: all), examples per prompt, sequences per forward."""
    if limit is not None:
        check_positive(f"{prefix}limit", limit)
    check_positive(f"{prefix}batch_size", batch_size)
    if not isinstance(num_fewshot, int) or isinstance(num_fewshot, bool) or num_fewshot < 0:
        raise ConfigError(f"{prefix}num_fewshot must be a non-negative integer, got {num_fewshot!r}")


def _check_zeroshot(e: EvalConfig) -> None:
    if e.tasks is not None and not all(name.strip() for name in e.tasks.split(",")):
        raise ConfigError(f"evaluation.tasks needs comma-separated task names, got {e.tasks!r}")
    check_zeroshot_counts(e.limit, e.num_fewshot, e.batch_size, "evaluation.")
    if e.tasks is None and (e.limit is not None or e.task_data is not None or e.num_fewshot):
        raise ConfigError("evaluation.limit, num_fewshot and task_data apply to zero-shot tasks: set --tasks too")


#: the text options with a fixed set of values, by dotted path (the CLI offers the same choices)
CHOICES = {
    "allocation.granularity": ("block", "layer"),
    "allocation.mrp.activations": ("dense-block", "pruned-block"),
    "allocation.mrp.pilot": ("plan", "start", "dense"),
    "allocation.mrp.masks": ("nested", "one-shot"),
    "allocation.mrp.drift": ("upstream", "per-unit", "global"),
    "evaluation.bos": ("auto", "always", "never"),
}


def check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} '{value}'; choose one of: {', '.join(sorted(choices))}")


def check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------------------------------- loading


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that keeps ``2:4`` text (YAML 1.1 reads an unquoted N:M as the base-60 integer 124), reads
    ``5e-1`` as a number (YAML 1.1 wants ``5.0e-1``) and refuses a key given twice (the last would win
    silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_YamlLoader.yaml_implicit_resolvers = {key: list(value) for key, value in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _digit in "0123456789":
    _YamlLoader.yaml_implicit_resolvers[_digit].insert(0, ("tag:yaml.org,2002:str", re.compile(r"^[0-9]+:[0-9]+$")))
for _first in "-+0123456789":
    _YamlLoader.yaml_implicit_resolvers.setdefault(_first, []).append(
        ("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$")))


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    twice = next((key for key in keys if keys.count(key) > 1), None)
    if twice is not None:
        raise ValueError(f"key '{twice}' is given twice")
    return dict(pairs)


def read_data(path: str | Path) -> Any:
    """Parse a YAML or JSON file (JSON is valid YAML; .json files get the stricter JSON parser)."""
    path = Path(path)
    is_json = path.suffix.lower() == ".json"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        if is_json:
            return json.loads(text, object_pairs_hook=_no_duplicate_keys)
        return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass
    except (ValueError, yaml.YAMLError) as exc:  # json.JSONDecodeError is a ValueError
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path} is not valid {'JSON' if is_json else 'YAML'}: {first_line}") from None


def read_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML/JSON file that must hold a mapping of options (an empty file is an empty mapping)."""
    data = read_data(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of options, found {type(data).__name__}")
    return data


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are ConfigErrors with the key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            shown = f"{prefix}{key}"
            shown = f"'{shown}'" if shown.isprintable() else repr(shown)  # one line, whatever the key holds
            raise ConfigError(f"unknown config key {shown}{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=f"{path}.")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, path)
    if hint is str and _is_a(float, value):  # a number where text belongs (a YAML scalar): its text
        return str(value)
    if not _is_a(hint, value):
        raise ConfigError(f"config key '{path}' expects {_type_name(hint)}, got {value!r}")
    if hint is float:
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float
            raise ConfigError(f"config key '{path}' expects a float, got an integer too large for one") from None
    return os.fspath(value) if hint is str else value


def load_config(path: str | Path, cls: type = PruneConfig) -> Any:
    return from_dict(cls, read_mapping(path))


def merge(config: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of ``config`` with dotted-path overrides applied (``{"calibration.nsamples": 32}``)."""
    config = dataclasses.replace(config)
    for dotted, value in overrides.items():
        target = config
        *parents, leaf = dotted.split(".")
        for name in parents:
            child = dataclasses.replace(getattr(target, name))
            setattr(target, name, child)
            target = child
        setattr(target, leaf, value)
    return config


def dump_config(config: Any) -> str:
    def plain(value: Any) -> Any:  # a Path given in Python is written as its text
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    return yaml.safe_dump(plain(dataclasses.asdict(config)), sort_keys=False)
