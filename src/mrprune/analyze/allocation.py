"""Allocators side by side: the per-block sparsity each gives for one model, target and metric, and the
redundancy spread each leaves after pruning (observation 3).

Each allocator prunes a fresh copy of the dense weights (the decoder linear weights are snapshotted on the
CPU once and restored before each run) through :func:`mrprune.api.prune`, the same code path as
``mrprune prune``. The non-outlier ratios after pruning use MRP's frozen DENSE thresholds (tau_l = M x mean
dense Wanda score of block l, M = ``allocation.mrp.m``), measured on the pruned model with one calibration
pass, so the allocators are compared against the same reference.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import spill
from ..allocate import CANDIDATE_ALLOCATIONS, COMPARED_BY_DEFAULT, build_allocator
from ..api import PruneOutcome, check_allocation_shape, prune
from ..config import PruneConfig, merge
from ..errors import ConfigError
from ..export import input_paths
from ..metrics import SparsityPattern
from ..models.adapter import ModelAdapter
from ..redundancy import spread
from ..runtime import keeps_placement
from . import common, plots
from .profile import dense_thresholds, non_outlier_ratios

log = logging.getLogger(__name__)

DEFAULT_ALLOCATIONS = COMPARED_BY_DEFAULT
#: allocation details too long for a side-by-side summary (MRP's per-iteration trace)
_DROPPED_DETAILS = ("trace",)


class DenseReference:
    """The dense weights of a job, kept on the CPU, plus what redundancy needs of the dense model.

    ``prune(config)`` restores the dense weights and prunes them as ``config`` says; ``ratios()`` measures the
    current model's per-block non-outlier ratios against the dense thresholds (one calibration pass)."""

    def __init__(self, job: common.Job, input_ids: torch.Tensor | None, m: float, progress: bool = False):
        self.job = job
        self.layers = job.adapter.all_linear_layers()
        self.weights = spill.snapshot(self.layers, "cpu")
        self.input_ids = input_ids
        self.progress = progress
        self.taus: list[float] | None = None
        self.dense_ratios: list[float] | None = None
        if input_ids is not None:
            sq_norms = job.observe(input_ids, progress)
            self.taus = dense_thresholds(job.adapter, sq_norms, m)
            self.dense_ratios = non_outlier_ratios(job.adapter, sq_norms, self.taus)

    def restore(self) -> None:
        spill.restore(self.layers, self.weights)

    def prune(self, config: PruneConfig) -> PruneOutcome:
        self.restore()
        return prune(self.job.model, config, tokenizer=self.job.tokenizer, progress=self.progress)

    def ratios(self) -> list[float]:
        if self.taus is None or self.input_ids is None:
            raise RuntimeError("redundancy needs calibration data: build DenseReference with input_ids")
        sq_norms = self.job.observe(self.input_ids, self.progress, dense_weights=self.weights)
        return non_outlier_ratios(self.job.adapter, sq_norms, self.taus)


@dataclass
class AllocatorOutcome:
    name: str
    block_targets: list[float]
    block_sparsity: list[float]
    sparsity: dict[str, Any]  # global check of the prune report
    non_outlier_ratios: list[float]
    spread: dict[str, float]
    details: dict[str, Any]
    perplexity: dict[str, Any] | None = None
    seconds: float = 0.0


@dataclass
class AllocationResult:
    model: str
    metric: str
    target: float
    m: float
    thresholds: list[float]
    dense_ratios: list[float]
    outcomes: list[AllocatorOutcome]
    settings: dict[str, Any]
    dense_perplexity: dict[str, Any] | None = None
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "analysis": "allocation",
            "model": self.model,
            "metric": self.metric,
            "target": self.target,
            "redundancy": {"m": self.m, "thresholds": self.thresholds,
                           "rule": "non-outlier ratio after pruning against MRP's dense thresholds: tau_l = M x mean "
                                   "dense Wanda score of block l",
                           "dense_ratios": self.dense_ratios, "dense_spread": spread(self.dense_ratios)},
            "dense_perplexity": self.dense_perplexity,
            "allocators": {o.name: asdict(o) for o in self.outcomes},
            "settings": self.settings,
            "timings_s": self.timings_s,
        }

    def to_markdown(self) -> str:
        names = [o.name for o in self.outcomes]
        n = len(self.outcomes[0].block_sparsity)
        rows = [[str(i)] + [f"{o.block_sparsity[i]:.4f}" for o in self.outcomes] for i in range(n)]
        summary = [[o.name, f"{o.sparsity['achieved']:.6f}", "yes" if o.sparsity["target_met"] else "NO",
                    f"{min(o.block_sparsity):.4f} - {max(o.block_sparsity):.4f}", f"{o.spread['cv']:.4g}",
                    f"{o.spread['range']:.4g}"]
                   + ([common.fmt_ppl(o.perplexity["perplexity"])] if o.perplexity else [])
                   for o in self.outcomes]
        header = ["allocation", "global sparsity", "target met", "block range", "redundancy cv", "redundancy max-min"]
        if self.dense_perplexity:
            header.append("perplexity")
        best = min(self.outcomes, key=lambda o: o.spread["cv"])
        c = self.settings["calibration"]
        lines = [
            f"# Allocations side by side: {self.model}",
            "",
            (f"Metric {self.metric}, target sparsity {self.target:g}. Calibration {c['nsamples']} x {c['seqlen']} "
             f"tokens of {c['source']} (seed {c['seed']}), shared by every allocator. Redundancy: per-block "
             f"non-outlier ratio after pruning with MRP's dense thresholds (M = {self.m:g}); its spread is the "
             f"coefficient of variation (cv) and max - min over blocks."),
            "",
            (f"The dense model's redundancy spread is cv {spread(self.dense_ratios)['cv']:.4g}; the most uniform "
             f"after pruning is {best.name} (cv {best.spread['cv']:.4g})."),
        ]
        if self.dense_perplexity:
            lines += ["", (f"Dense perplexity {common.fmt_ppl(self.dense_perplexity['perplexity'])} "
                           f"({self.dense_perplexity['protocol']}).")]
        lines += ["", common.md_table(header, summary, ["l"] + ["r"] * (len(header) - 1)), "",
                  "Per-block sparsity (achieved):", "", common.md_table(["block"] + names, rows)]
        return "\n".join(lines)

    def plot(self, path: Path) -> None:
        c = self.settings["calibration"]
        plots.allocation_plot(
            path, {o.name: o.block_sparsity for o in self.outcomes},
            {o.name: o.non_outlier_ratios for o in self.outcomes}, self.target,
            title=f"Per-block sparsity by allocator: {_short(self.model)}, {self.metric}, target {self.target:g}",
            subtitle=f"calib {c['nsamples']}x{c['seqlen']} tokens of {_short(c['source'])}; non-outlier ratios "
                     f"with dense thresholds, M={self.m:g}",
            spreads={o.name: o.spread["cv"] for o in self.outcomes},
        )

    def save(self, output: str | Path, overwrite: bool = False, plot: bool = True,
             protect: Sequence[Path] = ()) -> Path:
        writers = {"allocation.json": common.json_writer(self.to_dict()),
                   "allocation.md": common.text_writer(self.to_markdown())}
        if plot:
            writers["allocation.png"] = self.plot
        return common.write_dir(Path(output), writers, overwrite, protect)


def _short(source: str) -> str:
    return Path(source).name if "/" in source else source


def cell_configs(config: PruneConfig, allocations: Sequence[str], metric: str,
                 sparsity: float) -> dict[str, PruneConfig]:
    """One validated prune config per allocator, its allocator's options checked too (so a bad combination
    fails before any work; what needs the model's shape waits for ``check_cells``)."""
    out = {}
    for name in allocations:
        cell = merge(config, {"allocation.method": name, "metric": metric, "sparsity": sparsity,
                              "pattern": "unstructured"})
        with _naming_the_cell(name, metric, sparsity):
            out[name] = cell.validate()
            build_allocator(name, out[name]).check_options(sparsity)
    return out


def check_cells(cells: dict[str, PruneConfig], adapter: ModelAdapter) -> None:
    """What each cell's allocation can check on the model's shape (MRP's start against the target, a ratios
    file against the blocks), for every cell before the first one runs."""
    for name, cell in cells.items():
        assert cell.sparsity is not None
        with _naming_the_cell(name, cell.metric, cell.sparsity):
            check_allocation_shape(build_allocator(name, cell), adapter, cell, SparsityPattern.parse(cell.pattern))


@contextmanager
def _naming_the_cell(name: str, metric: str, sparsity: float) -> Iterator[None]:
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(f"{name}, {metric}, sparsity {sparsity:g}: {exc}") from None


def summarize(name: str, outcome: PruneOutcome, ratios: list[float], seconds: float,
              perplexity: dict | None = None) -> AllocatorOutcome:
    report = outcome.report
    details = {k: v for k, v in report.allocation.items()
               if k not in _DROPPED_DETAILS + ("method", "target", "block_targets")}
    return AllocatorOutcome(name, list(report.allocation["block_targets"]), [b["sparsity"] for b in report.blocks],
                            report.sparsity, ratios, spread(ratios), details, perplexity, round(seconds, 3))


@keeps_placement
def allocation_analysis(
    model=None,
    config: PruneConfig | None = None,
    *,
    allocations: str | Sequence[str] = DEFAULT_ALLOCATIONS,
    tokenizer=None,
    progress: bool = True,
    output: str | Path | None = None,
    overwrite: bool = False,
    plot: bool = True,
) -> AllocationResult:
    """Prune ``model`` with each allocator in ``allocations`` (metric, target and options from ``config``;
    target 0.5 if unset) from the same dense weights; report per-block sparsities and the redundancy spread
    each leaves. ``config.evaluate`` adds each allocation's perplexity. With ``output`` writes
    ``allocation.{json,md,png}`` there. The model is left dense, as it was given."""
    evaluate = bool(config is not None and config.evaluate)
    config = common.analysis_config(config)
    names = common.split_names(allocations, CANDIDATE_ALLOCATIONS, "allocation")
    target = common.check_sparsity(config.sparsity if config.sparsity is not None else 0.5)
    configs = cell_configs(config, names, config.metric, target)
    if plot and output is not None:
        plots.require()
    protect = input_paths(model if model is not None else config.model)
    out = common.prepare_dir(output, overwrite, "allocation.json", protect)
    start = time.perf_counter()
    calibration = common.calibration_corpus(config)  # texts are checked before the weights load
    corpus = common.eval_corpus(config) if evaluate else None
    job = common.load_job(model, tokenizer, config)
    check_cells(configs, job.adapter)
    ids = common.calibration_ids(config, job.tokenizer, calibration)
    m = config.allocation.mrp.m
    reference = DenseReference(job, ids, m, progress)
    dense_ppl = job.perplexity(corpus, progress).to_dict() if corpus is not None else None
    outcomes = []
    try:
        for name in names:
            t = time.perf_counter()
            log.info("allocation %s: pruning to %g with %s", name, target, config.metric)
            outcome = reference.prune(configs[name])
            ratios = reference.ratios()
            ppl = job.perplexity(corpus).to_dict() if corpus is not None else None
            outcomes.append(summarize(name, outcome, ratios, time.perf_counter() - t, ppl))
            log.info("allocation %s: redundancy cv %.4g%s", name, outcomes[-1].spread["cv"],
                     f", perplexity {ppl['perplexity']:.3f}" if ppl else "")
    finally:
        reference.restore()
    settings = {"calibration": common.calibration_summary(config), "allocation": asdict(config.allocation),
                "runtime": asdict(config.runtime), "sparsegpt": asdict(config.sparsegpt), "allocations": names}
    if evaluate:
        settings["evaluation"] = {k: v for k, v in asdict(config.evaluation).items()
                                  if k in ("text", "seqlen", "max_windows", "bos")}
    assert reference.taus is not None and reference.dense_ratios is not None
    result = AllocationResult(job.source, config.metric, target, m, reference.taus, reference.dense_ratios, outcomes,
                              settings, dense_ppl, {"total": round(time.perf_counter() - start, 3)})
    if out is not None:
        result.save(out, overwrite, plot, protect)
    return result
