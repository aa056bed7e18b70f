"""Plumbing shared by the analyses: option parsing, loading, calibration, weight snapshots, perplexity, output.

Every analysis works on ONE loaded model and prunes it in memory many times, so it snapshots the decoder
linear weights (the only tensors pruning changes) and restores them between runs instead of reloading.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import PruneConfig, merge
from ..data import Corpus, load_eval_text, read_corpus, sample_calibration
from ..errors import ConfigError, OutputError
from ..evaluate.perplexity import PerplexityResult, model_windows, windows_perplexity
from ..export import (
    check_clear_of_inputs,
    check_output,
    check_parent,
    publish_mode,
    write_dir_atomically,
    write_json,
)
from ..metrics import build_metric
from ..metrics.base import sq_norms
from ..metrics.pattern import SparsityPattern
from ..models.adapter import ModelAdapter, declared_num_layers, get_adapter
from ..models.loading import open_source, resolve_device
from ..runner import SequentialPruner
from ..runtime import place_model

log = logging.getLogger(__name__)

#: what analyses never take from a job config: they export no model and measure perplexity themselves
_NO_JOB_OUTPUT = {"output": None, "overwrite": False, "evaluate": False}
_NO_ZEROSHOT = {"evaluation.tasks": None, "evaluation.limit": None, "evaluation.task_data": None,
                "evaluation.num_fewshot": 0}


def analysis_config(config: PruneConfig | None, zeroshot: bool = False) -> PruneConfig:
    """A validated copy of ``config`` without export and built-in evaluation (and zero-shot unless asked)."""
    overrides: dict[str, Any] = dict(_NO_JOB_OUTPUT)
    if not zeroshot:
        overrides.update(_NO_ZEROSHOT)
    return merge(config or PruneConfig(), overrides).validate()


# ------------------------------------------------------------------------------------------------ options


def split_names(values: str | Iterable[str], choices: Iterable[str], what: str) -> list[str]:
    """Comma-separated (or listed) names, each checked against ``choices``; duplicates dropped, order kept."""
    names = [v.strip() for v in (values.split(",") if isinstance(values, str) else values)]
    if not names or not all(names):
        raise ConfigError(f"{what}s must be a comma-separated list of names, got {values!r}")
    allowed = sorted(choices)
    for name in names:
        if name not in allowed:
            raise ConfigError(f"unknown {what} '{name}'; choose from: {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def split_numbers(values: str | Iterable[float], what: str, convert: Callable = float) -> list:
    """Comma-separated (or listed) numbers; a value that does not parse is a ConfigError naming it."""
    items = values.split(",") if isinstance(values, str) else list(values)
    out = []
    for item in items:
        try:
            out.append(convert(item.strip() if isinstance(item, str) else item))
        except (TypeError, ValueError):
            raise ConfigError(f"{what} must be comma-separated numbers, got {values!r}") from None
    if not out:
        raise ConfigError(f"{what} needs at least one value")
    return list(dict.fromkeys(out))


def check_sparsity(value: float, what: str = "sparsity") -> float:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{what} must be in [0, 1), got {value:g}")
    return float(value)


def target_sparsity(config: PruneConfig) -> float:
    """The sparsity an analysis prunes to: --sparsity, else implied by an N:M pattern, else 0.5."""
    pattern = SparsityPattern.parse(config.pattern)
    if config.sparsity is not None:
        return config.sparsity
    return pattern.sparsity if pattern.is_nm else 0.5


# ------------------------------------------------------------------------------------------------ the model


@dataclass
class Job:
    """A loaded model placed for running, with what every analysis needs next to it."""

    model: torch.nn.Module
    tokenizer: object
    adapter: ModelAdapter
    source: str
    device: torch.device
    config: PruneConfig
    _windows: dict[str, tuple[torch.Tensor, bool]] = field(default_factory=dict, repr=False)

    def pruner(self, metric: str = "wanda", pattern: SparsityPattern | None = None,
               progress: bool = False) -> SequentialPruner:
        r = self.config.runtime
        return SequentialPruner(self.adapter, build_metric(metric, self.config), pattern or SparsityPattern(),
                                self.device, r.batch_size, r.offload, r.offload_activations, progress=progress)

    def windows(self, corpus: Corpus) -> tuple[torch.Tensor, bool]:
        """The evaluation windows of ``corpus`` (and whether each starts with BOS), cut once per job: an
        analysis measures perplexity once per block, metric or cell."""
        if corpus.name not in self._windows:
            e = self.config.evaluation
            self._windows[corpus.name] = model_windows(self.model, self.tokenizer, corpus, e.seqlen, e.max_windows,
                                                       e.bos)
        return self._windows[corpus.name]

    def perplexity(self, corpus: Corpus, progress: bool = False) -> PerplexityResult:
        windows, bos = self.windows(corpus)
        return windows_perplexity(self.model, windows, bos, corpus.name, self.device, progress,
                                  self.config.runtime.offload)

    def observe(self, input_ids: torch.Tensor, progress: bool = False,
                dense_weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Input sq_norm of every decoder linear layer of the model as it is now (one calibration pass); with
        ``dense_weights`` and MRP's default dense-block convention, each block's internal activations come
        from its dense weights, as MRP measures redundancy."""
        if self.config.allocation.mrp.activations != "dense-block":
            dense_weights = None
        stats = self.pruner(progress=progress).observe(input_ids, dense_weights)
        return sq_norms(stats)


def load_job(model, tokenizer, config: PruneConfig, need_tokenizer: bool = True) -> Job:
    """Load (or adopt) the model of an analysis and place it as the config's runtime options say."""
    from ..api import _load

    if config.runtime.checkpoint_dir or config.runtime.resume:
        raise ConfigError("runtime.checkpoint_dir and runtime.resume apply to 'mrprune prune' only; "
                          "analyses are not resumable")
    if config.runtime.offload_dir is not None:
        raise ConfigError("runtime.offload_dir applies to 'mrprune prune' only; analyses keep their blocks in "
                          "memory (use --offload to keep them on the CPU)")
    model, tokenizer, source, _ = _load(model, tokenizer, config)
    if need_tokenizer and tokenizer is None:
        raise ConfigError("a tokenizer is needed for calibration and evaluation; pass tokenizer=...")
    adapter = get_adapter(model)
    device = resolve_device(config.runtime.device)
    place_model(model, adapter.blocks_name, device, config.runtime.offload)
    return Job(model, tokenizer, adapter, source, device, config)


def calibration_corpus(config: PruneConfig) -> Corpus:
    """The calibration text of ``config``, read (and so checked) before any model is loaded."""
    c = config.calibration
    return read_corpus(c.source, "calibration", c.column)


def calibration_ids(config: PruneConfig, tokenizer, corpus: Corpus | None = None) -> torch.Tensor:
    """The calibration windows a prune job with ``config`` would draw (same source, size and seed) from
    ``corpus`` (default: read it now)."""
    c = config.calibration
    corpus = corpus if corpus is not None else calibration_corpus(config)
    ids = sample_calibration(corpus, tokenizer, c.nsamples, c.seqlen, c.seed)
    log.info("calibration: %d x %d tokens from %s (seed %d)", c.nsamples, c.seqlen, corpus.name, c.seed)
    return ids


def calibration_summary(config: PruneConfig) -> dict:
    c = config.calibration
    return {"source": c.source or "default (c4 when online, else embedded)", "nsamples": c.nsamples,
            "seqlen": c.seqlen, "seed": c.seed}


def eval_corpus(config: PruneConfig) -> Corpus:
    return load_eval_text(config.evaluation.text)


def declared_blocks(model, config: PruneConfig) -> int | None:
    """The number of blocks the model's config declares, read without loading its weights (None if unsaid)."""
    if model is not None and not isinstance(model, (str, Path)):
        return declared_num_layers(getattr(model, "config", None))
    r = config.runtime
    return declared_num_layers(open_source(str(model) if model is not None else config.model, r.trust_remote_code,
                                   r.allow_pickle).config)


def layout(adapter: ModelAdapter) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Per block, the linear layers' short names and shapes: what 'the same architecture' means here."""
    return [[(ref.short_name, tuple(ref.weight.shape)) for ref in adapter.linear_layers(i)]
            for i in range(adapter.num_blocks)]


# ---------------------------------------------------------------------------------------------- output


def prepare_dir(output: str | Path | None, overwrite: bool, marker: str,
                protect: Sequence[Path] = ()) -> Path | None:
    """Check an output directory before any heavy work: not in or around an input model (``protect``),
    existing and non-empty only with ``overwrite`` and only if an earlier analysis wrote it (holds ``marker``)."""
    return None if output is None else check_output(output, overwrite, protect, marker=marker)


def write_dir(out: Path, writers: dict[str, Callable[[Path], None]], overwrite: bool,
              protect: Sequence[Path] = ()) -> Path:
    """Write files into ``out`` atomically. ``writers`` maps a file name to a function writing that file to the
    path it is given; the first name marks the directory as this analysis's output."""
    out = check_output(out, overwrite, protect, marker=next(iter(writers)))

    def fill(tmp: Path) -> None:
        for name, write in writers.items():
            write(tmp / name)

    return write_dir_atomically(out, fill, overwrite=overwrite)


def prepare_files(paths: Sequence[Path], overwrite: bool, protect: Sequence[Path] = ()) -> None:
    """Refuse, before any heavy work, to replace existing files without ``overwrite`` or to write inside an
    input model's directory (``protect``)."""
    for path in paths:
        path = Path(path).expanduser().resolve()
        check_clear_of_inputs(path, protect)
        if path.exists() and not path.is_file():
            raise OutputError(f"output {path} exists and is not a file")
        if path.exists() and not overwrite:
            raise OutputError(f"output file {path} already exists; pass --overwrite to replace it")
        check_parent(path)


def write_files(writers: dict[Path, Callable[[Path], None]]) -> None:
    """Write a set of sibling files as one: every file to a temporary sibling first, renamed over its path only
    once all are written, so a failed writer leaves none of them (a crash between the renames, a few system
    calls, is the only window for a partial set)."""
    temporaries: dict[Path, Path] = {}
    try:
        for path, write in writers.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
            os.close(fd)
            temporaries[path] = Path(name)
            publish_mode(Path(name), directory=False)
            write(Path(name))
        for path, tmp in temporaries.items():
            os.replace(tmp, path)
    finally:
        for tmp in temporaries.values():
            tmp.unlink(missing_ok=True)


def json_writer(data) -> Callable[[Path], None]:
    return lambda path: write_json(path, data)


def text_writer(text: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")

    return write


# ------------------------------------------------------------------------------------------------- format


def fmt_ppl(value: float) -> str:
    """Perplexities: two decimals while small, fewer digits once they run into the hundreds and beyond."""
    if math.isnan(value):
        return "nan"
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.1f}" if abs(value) < 1e5 else f"{value:.3g}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str] | None = None) -> str:
    """A Markdown table; ``align`` per column is 'l' or 'r' (default: first left, the rest right)."""
    align = align or ["l"] + ["r"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
