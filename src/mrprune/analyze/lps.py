"""Observations 1 and 2: layerwise pruning sensitivity (LPS) and its dependence on the metric.

Protocol: prune ONE block at sparsity s with a metric, every other block dense; record the perplexity
increase over the dense model; repeat for every block (or the chosen ones) and every metric.

Efficiency: with only block l pruned, the inputs of block l are the DENSE outputs of blocks < l, so one dense
sequential pass over the calibration windows serves every block. At block l that pass collects, in the same
forward that advances the cached activations to block l+1, the statistics all requested metrics need
(Wanda's per-feature sq_norm, SparseGPT's per-layer Hessian); then, for each metric, block l's linear weights
are snapshotted, pruned, the model's perplexity measured, and the weights restored bit for bit. Only block
l's statistics are alive at any time: Hessians of all blocks at once would take L x (a block's Hessians),
e.g. ~22 GB in float32 for a 7B Llama, while one block's take ~0.7 GB. The perplexity measurements start at
block l too (:class:`TailPerplexity`): blocks before it are dense, so their output on the evaluation windows
is kept and never recomputed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import spill
from ..api import check_pattern
from ..calibrate import StatsCollector, capture_block_inputs, record_block_calls, run_block
from ..config import PruneConfig
from ..errors import ConfigError
from ..evaluate import blockwise
from ..evaluate.perplexity import head_nll
from ..export import input_paths
from ..metrics import METRICS, build_metric
from ..metrics.base import LayerStats
from ..metrics.pattern import SparsityPattern
from ..numerics import require_finite_activations
from ..runner import Activations, SequentialPruner
from ..runtime import BlockMover, keeps_placement
from . import common, plots

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- pure functions


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's r of the ranks, ties averaged); None when a series is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs series of equal length, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def parse_blocks(blocks: str | Iterable[int] | None, num_blocks: int) -> list[int]:
    """Block indices to analyse (all by default), sorted and checked against the model's block count."""
    if blocks is None:
        return list(range(num_blocks))
    chosen = sorted(common.split_numbers(blocks, "blocks", int))
    bad = [b for b in chosen if not 0 <= b < num_blocks]
    if bad:
        raise ConfigError(f"blocks {bad} out of range: the model has blocks 0..{num_blocks - 1}")
    return chosen


# ------------------------------------------------------------------------------------------------- result


@dataclass
class LpsResult:
    model: str
    sparsity: float
    pattern: str
    blocks: list[int]
    dense: dict[str, Any]  # PerplexityResult.to_dict() of the dense model
    perplexity: dict[str, list[float]]  # metric -> perplexity with only block b pruned, b in ``blocks``
    block_sparsity: dict[str, list[float]]  # metric -> achieved sparsity of the pruned block
    settings: dict[str, Any]
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def metrics(self) -> list[str]:
        return list(self.perplexity)

    @property
    def dense_ppl(self) -> float:
        return self.dense["perplexity"]

    def increase(self, metric: str) -> list[float]:
        return [p - self.dense_ppl for p in self.perplexity[metric]]

    @property
    def protocol(self) -> str:
        c = self.settings["calibration"]
        return (f"one block pruned at sparsity {self.sparsity:g} ({self.pattern}), all others dense; metric "
                f"statistics from dense activations of {c['nsamples']} x {c['seqlen']} calibration tokens "
                f"({c['source']}, seed {c['seed']}); perplexity on {self.dense['protocol']}")

    def correlations(self) -> list[dict[str, Any]]:
        names = self.metrics
        return [{"a": a, "b": b, "spearman": spearman(self.increase(a), self.increase(b))}
                for i, a in enumerate(names) for b in names[i + 1:]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "analysis": "lps",
            "model": self.model,
            "sparsity": self.sparsity,
            "pattern": self.pattern,
            "protocol": self.protocol,
            "dense": self.dense,
            "blocks": self.blocks,
            "metrics": {
                name: {"perplexity": self.perplexity[name], "increase": self.increase(name),
                       "block_sparsity": self.block_sparsity[name]}
                for name in self.metrics
            },
            "spearman": self.correlations(),
            "settings": self.settings,
            "timings_s": self.timings_s,
        }

    def summary_sentences(self) -> list[str]:
        lines = []
        k = max(1, min(3, len(self.blocks) // 2))
        for name in self.metrics:
            inc = self.increase(name)
            order = sorted(range(len(inc)), key=lambda i: inc[i], reverse=True)
            most = ", ".join(f"{self.blocks[i]} ({inc[i]:+.3g})" for i in order[:k])
            least = ", ".join(f"{self.blocks[i]} ({inc[i]:+.3g})" for i in order[::-1][:k])
            ratio = ""
            low = min(inc)
            if low > 0 and len(inc) > 1:
                ratio = f" The largest increase is {max(inc) / low:.3g}x the smallest."
            lines.append(f"- **{name}**: most sensitive block(s) {most}; least sensitive {least}.{ratio}")
        for c in self.correlations():
            rho = c["spearman"]
            if rho is None:
                lines.append(f"- Spearman rank correlation {c['a']} vs {c['b']}: undefined (a constant curve).")
                continue
            verdict = ("nearly the same ordering of blocks" if rho >= 0.9 else
                       "a similar but clearly different ordering" if rho >= 0.5 else
                       "different orderings: which blocks are sensitive depends on the metric")
            lines.append(f"- Spearman rank correlation of the LPS curves {c['a']} vs {c['b']}: "
                         f"{rho:.3f} ({verdict}).")
        return lines

    def to_markdown(self) -> str:
        header = ["block"] + [h for name in self.metrics for h in (f"{name} ppl", f"{name} increase")]
        rows = []
        for i, block in enumerate(self.blocks):
            row = [str(block)]
            for name in self.metrics:
                row += [common.fmt_ppl(self.perplexity[name][i]), f"{self.increase(name)[i]:+.4g}"]
            rows.append(row)
        return "\n".join([
            f"# Layerwise pruning sensitivity: {self.model}",
            "",
            f"Protocol: {self.protocol}.",
            "",
            f"Dense perplexity {common.fmt_ppl(self.dense_ppl)}.",
            "",
            *self.summary_sentences(),
            "",
            common.md_table(header, rows),
        ])

    def plot(self, path: Path) -> None:
        c = self.settings["calibration"]
        plots.lps_plot(
            path, self.blocks, {name: self.increase(name) for name in self.metrics},
            title=f"Layerwise pruning sensitivity: {_short(self.model)}",
            subtitle=f"one block pruned at {self.sparsity:g} ({self.pattern}), others dense; calib "
                     f"{c['nsamples']}x{c['seqlen']} tokens of {_short(str(c['source']))}; PPL "
                     f"{self.dense['windows']}x{self.dense['seqlen']} tokens of {_short(self.dense['text'])}, "
                     f"dense {common.fmt_ppl(self.dense_ppl)}",
        )

    def save(self, output: str | Path, overwrite: bool = False, plot: bool = True,
             protect: Sequence[Path] = ()) -> Path:
        writers = {"lps.json": common.json_writer(self.to_dict()), "lps.md": common.text_writer(self.to_markdown())}
        if plot:
            writers["lps.png"] = self.plot
        return common.write_dir(Path(output), writers, overwrite, protect)


def _short(source: str) -> str:
    return Path(source).name if "/" in source else source


# ------------------------------------------------------------------------------------------- orchestration


class TailPerplexity:
    """Perplexity of the model while only blocks >= l may differ from the dense model.

    The dense hidden states entering block l are the same for every metric and for every later measurement up
    to l, so they are kept (advanced one dense block at a time as the sweep moves on) and a measurement runs
    blocks l.. and the head only: each window is still its own forward, so the numbers are those of a full
    forward, for about half of its block compute on average."""

    def __init__(self, job: common.Job, states: torch.Tensor, windows: torch.Tensor):
        self.job, self.windows = job, windows
        self.calls = [call.to(job.device) for call in record_block_calls(job.adapter, windows[:1])]
        self.states = states  # dense hidden states entering block ``self.index``, one row per window
        self.index = 0
        self.mover = BlockMover(job.adapter.blocks, job.device, enabled=job.config.runtime.offload)

    @classmethod
    def create(cls, job: common.Job, corpus) -> TailPerplexity | None:
        """None when two copies of the windows' hidden states would not fit in ``blockwise.CHUNK_BYTES``."""
        windows, _ = job.windows(corpus)
        if 2 * blockwise.hidden_bytes(job.model, windows.numel()) > blockwise.CHUNK_BYTES:
            return None
        dtype = next(job.adapter.blocks.parameters()).dtype
        states, _ = capture_block_inputs(job.adapter, windows, 1, job.device, dtype)
        return cls(job, states, windows)

    def _run(self, index: int, hidden: torch.Tensor) -> None:
        block = self.mover.fetch(index)
        try:
            run_block(block, self.calls[index], hidden, 1, self.job.device, write_back=True)
        finally:
            self.mover.release(index, changed=False)

    def measure(self, index: int) -> float:
        """Perplexity with blocks < ``index`` dense (as they must be now) and the model's current blocks from
        ``index`` on."""
        if index < self.index:
            raise ValueError(f"the dense states have moved past block {index}")
        while self.index < index:  # blocks before ``index`` are dense now: advance the kept states through them
            self._run(self.index, self.states)
            self.index += 1
        hidden = self.states.clone()
        for later in range(index, self.job.adapter.num_blocks):
            self._run(later, hidden)
        nlls = [head_nll(self.job.model, window[None], hidden[row : row + 1])
                for row, window in enumerate(self.windows)]
        return math.exp(sum(nlls) / len(nlls))

    def close(self) -> None:
        self.mover.close()


def _dense_block_pass(pruner: SequentialPruner, acts: Activations, sq_norm: bool,
                      hessian: bool) -> dict[str, LayerStats]:
    """Advance the cached activations through block ``acts.index`` (dense) and, in the same forward, collect
    the statistics its layers' metrics need."""
    index = acts.index
    layers = pruner.adapter.linear_layers(index)
    block = pruner.adapter.blocks[index]
    call = acts.calls[index].to(pruner.device)
    with pruner.timer.phase("dense statistics"):
        if sq_norm or hessian:
            with StatsCollector(layers, sq_norm, hessian) as collector:
                finite = run_block(block, call, acts.hidden, pruner.batch_size, pruner.device, write_back=True)
            stats = collector.result()
        else:
            finite = run_block(block, call, acts.hidden, pruner.batch_size, pruner.device, write_back=True)
            stats = {}
        require_finite_activations(finite, f"after block {index}")
    acts.index += 1
    return stats


def sweep(job: common.Job, metrics: Sequence[str], sparsity: float, pattern: SparsityPattern, blocks: Sequence[int],
          input_ids: torch.Tensor | None, measure, progress: bool = True) -> tuple[dict, dict]:
    """For each block in ``blocks`` and each metric: prune only that block, ``measure(block)`` the model,
    restore.

    Returns ({metric: [measure() per block]}, {metric: [achieved block sparsity]}). The model is bit-identical
    to the input afterwards."""
    pruners = {name: job.pruner(name, pattern) for name in metrics}
    first = next(iter(pruners.values()))
    want_sq = any(p.metric.needs_sq_norm for p in pruners.values())
    want_h = any(p.metric.needs_hessian for p in pruners.values())
    acts = None
    if want_sq or want_h:
        assert input_ids is not None
        acts = first.capture(input_ids)
    wanted = set(blocks)
    values: dict[str, list] = {name: [] for name in metrics}
    achieved: dict[str, list[float]] = {name: [] for name in metrics}
    bar = tqdm(total=len(blocks) * len(metrics), desc="LPS", unit="run", disable=not progress)
    for index in range(max(blocks) + 1):
        if index not in wanted and acts is None:
            continue
        first._block_on_device(index)  # every pruner works on it there; a measurement leaves it there
        try:
            stats = {}
            if acts is not None:
                stats = _dense_block_pass(first, acts, want_sq and index in wanted, want_h and index in wanted)
            if index not in wanted:
                continue
            first.mover.drop_prefetch()  # the measurements stream every block through the device meanwhile
            layers = job.adapter.linear_layers(index)
            targets = {ref.name: sparsity for ref in layers}
            for name, pruner in pruners.items():
                bar.set_postfix_str(f"block {index}, {name}")
                saved = spill.snapshot(layers)
                records = pruner.prune_layers(layers, targets, stats)
                achieved[name].append(sum(r.zeros for r in records) / sum(r.numel for r in records))
                try:
                    values[name].append(measure(index))
                finally:
                    spill.restore(layers, saved)
                del saved
                bar.update()
            del stats
        finally:
            first._release(index, changed=index in wanted)
    bar.close()
    return values, achieved


@keeps_placement
def layerwise_sensitivity(
    model=None,
    config: PruneConfig | None = None,
    *,
    metrics: str | Sequence[str] | None = None,
    blocks: str | Iterable[int] | None = None,
    tokenizer=None,
    progress: bool = True,
    output: str | Path | None = None,
    overwrite: bool = False,
    plot: bool = True,
) -> LpsResult:
    """LPS of ``model``: perplexity with one block pruned at ``config.sparsity`` (default 0.5, or implied by
    ``config.pattern``), for every block (or ``blocks``) and every metric in ``metrics`` (default
    ``config.metric``). Calibration and perplexity protocol come from ``config``; with ``output`` writes
    ``lps.{json,md,png}`` there. The model is left exactly as it was."""
    config = common.analysis_config(config)
    names = common.split_names(metrics if metrics is not None else config.metric, METRICS, "metric")
    pattern = SparsityPattern.parse(config.pattern)
    sparsity = common.check_sparsity(common.target_sparsity(config))
    if plot and output is not None:
        plots.require()
    protect = input_paths(model if model is not None else config.model)
    out = common.prepare_dir(output, overwrite, "lps.json", protect)
    # what can be checked without the weights is, before they load (a 70B model takes minutes)
    corpus = common.eval_corpus(config)
    metric_objects = [build_metric(name, config) for name in names]
    calibration = (common.calibration_corpus(config) if any(m.needs_calibration for m in metric_objects)
                   else None)
    if blocks is not None and (declared := common.declared_blocks(model, config)) is not None:
        parse_blocks(blocks, declared)
    start = time.perf_counter()
    job = common.load_job(model, tokenizer, config)
    check_pattern(job.adapter, pattern)
    chosen = parse_blocks(blocks, job.adapter.num_blocks)
    ids = common.calibration_ids(config, job.tokenizer, calibration) if calibration is not None else None
    timings: dict[str, float] = {}

    t = time.perf_counter()
    dense = job.perplexity(corpus, progress)
    timings["dense perplexity"] = round(time.perf_counter() - t, 3)
    log.info("dense %s", dense)

    t = time.perf_counter()
    tail = TailPerplexity.create(job, corpus)

    def measure(index: int) -> float:
        return tail.measure(index) if tail is not None else job.perplexity(corpus).perplexity

    try:
        ppl, achieved = sweep(job, names, sparsity, pattern, chosen, ids, measure, progress)
    finally:
        if tail is not None:
            tail.close()
    timings["sweep"] = round(time.perf_counter() - t, 3)
    timings["total"] = round(time.perf_counter() - start, 3)
    settings = {
        "calibration": common.calibration_summary(config),
        "evaluation": {k: v for k, v in asdict(config.evaluation).items() if k in ("text", "seqlen", "max_windows",
                                                                                   "bos")},
        "runtime": asdict(config.runtime),
        "sparsegpt": asdict(config.sparsegpt),
        "metrics": names,
        "statistics": "one dense calibration pass; block l's statistics collected from dense inputs and freed "
                      "after block l",
    }
    result = LpsResult(job.source, sparsity, str(pattern), chosen, dense.to_dict(), ppl, achieved, settings, timings)
    if out is not None:
        result.save(out, overwrite, plot, protect)
    return result
