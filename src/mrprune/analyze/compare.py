"""A comparison grid on one model: allocation x metric x sparsity, each cell pruned from the same dense weights
with the same calibration windows (source, size, seed) and measured on the same evaluation text.

Each cell restores the dense decoder linear weights (kept on the CPU), prunes in memory through
:func:`mrprune.api.prune` and measures perplexity; optionally the redundancy spread (non-outlier ratios
against MRP's dense thresholds, one calibration pass) and zero-shot accuracy (lm-evaluation-harness).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..allocate import CANDIDATE_ALLOCATIONS
from ..config import PruneConfig
from ..evaluate import zeroshot as zs
from ..export import input_paths
from ..metrics import METRICS
from ..redundancy import spread
from ..runtime import keeps_placement
from . import common, plots
from .allocation import DEFAULT_ALLOCATIONS, DenseReference, cell_configs, check_cells

log = logging.getLogger(__name__)


@dataclass
class Cell:
    allocation: str
    metric: str
    sparsity: float
    perplexity: float
    achieved: float
    target_met: bool
    block_sparsity: list[float]
    redundancy: dict[str, float] | None = None
    zeroshot: dict[str, Any] | None = None  # task -> lm-eval metrics
    seconds: float = 0.0


@dataclass
class CompareResult:
    model: str
    allocations: list[str]
    metrics: list[str]
    sparsities: list[float]
    dense: dict[str, Any]  # perplexity of the dense model, with its protocol
    cells: list[Cell]
    settings: dict[str, Any]
    dense_zeroshot: dict[str, Any] | None = None
    zeroshot_protocol: str | None = None
    timings_s: dict[str, float] = field(default_factory=dict)

    def cell(self, allocation: str, metric: str, sparsity: float) -> Cell:
        for c in self.cells:
            if (c.allocation, c.metric, c.sparsity) == (allocation, metric, sparsity):
                return c
        raise KeyError((allocation, metric, sparsity))

    @property
    def columns(self) -> list[tuple[str, float]]:
        return [(m, s) for m in self.metrics for s in self.sparsities]

    def _table(self, value) -> str:
        header = ["allocation"] + [f"{m} {s:g}" for m, s in self.columns]
        rows = [[a] + [value(self.cell(a, m, s)) for m, s in self.columns] for a in self.allocations]
        return common.md_table(header, rows)

    @property
    def tasks(self) -> list[str]:
        return list(self.cells[0].zeroshot) if self.cells and self.cells[0].zeroshot else []

    def to_markdown(self) -> str:
        c = self.settings["calibration"]
        lines = [
            f"# Allocation x metric x sparsity: {self.model}",
            "",
            (f"Perplexity ({self.dense['protocol']}); dense {common.fmt_ppl(self.dense['perplexity'])}. "
             f"Calibration {c['nsamples']} x {c['seqlen']} tokens of {c['source']} (seed {c['seed']}), the same "
             "windows for every cell."),
            "",
            self._table(lambda cell: common.fmt_ppl(cell.perplexity)),
        ]
        if any(cell.redundancy for cell in self.cells):
            m = self.settings["allocation"]["mrp"]["m"]
            lines += ["", (f"Redundancy spread: coefficient of variation of the per-block non-outlier ratio after "
                           f"pruning (MRP's dense thresholds, M = {m:g}; smaller is more uniform)."), "",
                      self._table(lambda cell: f"{cell.redundancy['cv']:.4g}")]
        for task in self.tasks:
            dense = (self.dense_zeroshot or {}).get(task, {}).get("acc")
            lines += ["", f"Zero-shot {task}, acc" + (f" (dense {dense:.4f})" if dense is not None else "") + ":", "",
                      self._table(lambda cell, t=task: _acc(cell.zeroshot.get(t, {})))]
        if self.zeroshot_protocol:
            lines += ["", f"Zero-shot: {self.zeroshot_protocol}."]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "analysis": "compare",
            "model": self.model,
            "allocations": self.allocations,
            "metrics": self.metrics,
            "sparsities": self.sparsities,
            "dense": {"perplexity": self.dense, "zeroshot": self.dense_zeroshot},
            "zeroshot_protocol": self.zeroshot_protocol,
            "rows": [asdict(c) for c in self.cells],
            "settings": self.settings,
            "timings_s": self.timings_s,
        }

    def plot(self, path: Path) -> None:
        series = {m: {a: [self.cell(a, m, s).perplexity for s in self.sparsities] for a in self.allocations}
                  for m in self.metrics}
        c = self.settings["calibration"]
        plots.compare_plot(path, self.sparsities, series, self.dense["perplexity"],
                           title=f"Perplexity by allocation: {_short(self.model)}",
                           subtitle=f"calib {c['nsamples']}x{c['seqlen']}; PPL {self.dense['windows']}x"
                                    f"{self.dense['seqlen']} tokens of {_short(self.dense['text'])}")

    def save(self, output: str | Path, overwrite: bool = False, plot: bool = True,
             protect: Sequence[Path] = ()) -> Path:
        """Write the table to ``output`` (Markdown), the rows to the .json and the plot to the .png next to it."""
        md, js, png = output_paths(output)
        common.prepare_files([md, js] + ([png] if plot else []), overwrite, protect)
        writers = {js: common.json_writer(self.to_dict()), md: common.text_writer(self.to_markdown())}
        if plot:
            writers[png] = self.plot
        common.write_files(writers)
        log.info("wrote %s", md)
        return md


def _acc(metrics: dict[str, Any]) -> str:
    value = metrics.get("acc")
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _short(source: str) -> str:
    return Path(source).name if "/" in source else source


def output_paths(output: str | Path) -> tuple[Path, Path, Path]:
    md = Path(output).expanduser().resolve()
    return md, md.with_suffix(".json"), md.with_suffix(".png")


def _scores(result: zs.ZeroShotResult) -> dict[str, Any]:
    return {name: {k: v for k, v in row.items() if k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}
            for name, row in result.to_dict()["tasks"].items()}


@keeps_placement
def compare(
    model=None,
    config: PruneConfig | None = None,
    *,
    allocations: str | Sequence[str] = DEFAULT_ALLOCATIONS,
    metrics: str | Sequence[str] = ("wanda",),
    sparsities: str | Sequence[float] = (0.5,),
    redundancy: bool = False,
    tokenizer=None,
    progress: bool = True,
    output: str | Path | None = None,
    overwrite: bool = False,
    plot: bool = True,
) -> CompareResult:
    """Prune ``model`` once per (allocation, metric, sparsity) from the same dense weights and measure each.

    Calibration, evaluation text and allocator options come from ``config``; ``config.evaluation.tasks`` adds
    zero-shot accuracy. With ``output`` (a Markdown file) the table is written there, the rows to the .json and
    the plot to the .png beside it. The model is left dense, as it was given."""
    config = common.analysis_config(config, zeroshot=True)
    alloc_names = common.split_names(allocations, CANDIDATE_ALLOCATIONS, "allocation")
    metric_names = common.split_names(metrics, METRICS, "metric")
    levels = [common.check_sparsity(s, "sparsities") for s in common.split_numbers(sparsities, "sparsities")]
    configs = {(m, s): cell_configs(config, alloc_names, m, s) for m in metric_names for s in levels}
    protect = input_paths(model if model is not None else config.model)
    if output is not None:
        if plot:
            plots.require()
        md, js, png = output_paths(output)
        common.prepare_files([md, js] + ([png] if plot else []), overwrite, protect)
    tasks = None
    if config.evaluation.tasks:
        tasks = zs.prepare_tasks(config.evaluation.tasks, config.evaluation.task_data)  # fails before heavy work
    start = time.perf_counter()
    corpus = common.eval_corpus(config)  # texts are checked before the weights load
    calibration = common.calibration_corpus(config) if redundancy else None
    job = common.load_job(model, tokenizer, config)
    for grid_row in configs.values():
        check_cells(grid_row, job.adapter)
    ids = common.calibration_ids(config, job.tokenizer, calibration) if calibration is not None else None
    reference = DenseReference(job, ids, config.allocation.mrp.m, progress)
    e = config.evaluation

    def zeroshot(tasks: zs.ZeroShotTasks) -> zs.ZeroShotResult:
        return zs.evaluate_zeroshot(job.model, job.tokenizer, tasks, e.limit, e.num_fewshot, e.batch_size,
                                    offload=config.runtime.offload)

    dense = job.perplexity(corpus, progress)
    log.info("dense %s", dense)
    dense_zs = zeroshot(tasks) if tasks is not None else None
    cells: list[Cell] = []
    total = len(alloc_names) * len(configs)
    try:
        for (metric, sparsity), by_alloc in configs.items():
            for allocation, cell_config in by_alloc.items():
                t = time.perf_counter()
                log.info("cell %d/%d: %s, %s, sparsity %g", len(cells) + 1, total, allocation, metric, sparsity)
                report = reference.prune(cell_config).report
                ppl = job.perplexity(corpus).perplexity
                ratios = reference.ratios() if redundancy else None
                scores = _scores(zeroshot(tasks)) if tasks is not None else None
                cells.append(Cell(allocation, metric, sparsity, ppl, report.sparsity["achieved"],
                                  report.sparsity["target_met"], [b["sparsity"] for b in report.blocks],
                                  spread(ratios) if ratios is not None else None, scores,
                                  round(time.perf_counter() - t, 3)))
                log.info("cell %d/%d: perplexity %.3f", len(cells), total, ppl)
    finally:
        reference.restore()
    settings = {
        "calibration": common.calibration_summary(config),
        "evaluation": asdict(config.evaluation),
        "allocation": asdict(config.allocation),
        "runtime": asdict(config.runtime),
        "sparsegpt": asdict(config.sparsegpt),
        "redundancy": redundancy,
    }
    result = CompareResult(job.source, alloc_names, metric_names, levels, dense.to_dict(), cells, settings,
                           _scores(dense_zs) if dense_zs is not None else None,
                           dense_zs.protocol if dense_zs is not None else None,
                           {"total": round(time.perf_counter() - start, 3)})
    if output is not None:
        result.save(output, overwrite, plot, protect)
    return result
