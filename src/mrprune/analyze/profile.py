"""Observation 3: the per-block non-outlier ratio (redundancy) of a model, dense or pruned.

The ratio follows MRP (:mod:`mrprune.redundancy`): Wanda scores A = |W| * ||X_j||_2 of the block's linear layers
on the calibration data, with the activations of the model itself (so a pruned model's upstream pruning
counts); D_l = #{A > tau_l} / #surviving weights; R_l = 1 - D_l. Where tau_l comes from:

* ``dense`` given (MRP's definition): tau_l = M x mean Wanda score over ALL weights of block l of the DENSE
  model (its weights, its activations). The two models must have the same architecture. As in MRP's default
  (``allocation.mrp.activations = dense-block``), the activations INSIDE each block then come from its dense
  weights, fed by the analysed model's (pruned) upstream blocks.
* otherwise: tau_l = M x mean Wanda score over the SURVIVING (non-zero) weights of block l of the analysed
  model itself. For a dense model this is MRP's definition; for a pruned model it is the only reference at
  hand, and the mean over survivors (not over all weights, which the zeros would drag down) keeps "outlier"
  meaning "M times the typical surviving score". Ratios measured this way are lower than with dense
  thresholds, since pruning removes low scores and raises the survivors' mean; compare like with like.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import spill
from ..config import PruneConfig
from ..errors import ConfigError
from ..export import input_paths
from ..models.adapter import ModelAdapter, embedding_table
from ..redundancy import UnitCounts, layer_counts, spread, thresholds
from ..runtime import keeps_placement
from . import common, plots

log = logging.getLogger(__name__)

DENSE_RULE = "tau_l = M x mean dense Wanda score over all weights of block l (dense model, dense activations)"
SELF_RULE = ("tau_l = M x mean Wanda score over the surviving weights of block l of the analysed model "
             "(no dense reference given)")


# ------------------------------------------------------------------------------------------- pure functions


def block_counts(adapter: ModelAdapter, sq_norms: dict[str, torch.Tensor],
                 taus: list[float] | None = None) -> list[UnitCounts]:
    """Score sum, size, survivors and (with ``taus``) outliers of every block, from per-layer input sq_norms."""
    counts = []
    for index in range(adapter.num_blocks):
        total = UnitCounts()
        for ref in adapter.linear_layers(index):
            total = total.add(layer_counts(ref.weight, sq_norms[ref.name], None if taus is None else taus[index]))
        counts.append(total)
    return counts


def surviving_thresholds(counts: list[UnitCounts], m: float) -> list[float]:
    """tau = M x mean score over each unit's SURVIVING weights (pruned weights score 0 and add nothing)."""
    return [m * c.score_sum / c.surviving if c.surviving else 0.0 for c in counts]


def dense_thresholds(adapter: ModelAdapter, dense_sq_norms: dict[str, torch.Tensor], m: float) -> list[float]:
    """MRP's frozen thresholds: call while ``adapter``'s model is dense, with its dense activations."""
    return thresholds(block_counts(adapter, dense_sq_norms), m)


def non_outlier_ratios(adapter: ModelAdapter, sq_norms: dict[str, torch.Tensor], taus: list[float]) -> list[float]:
    return [c.non_outlier_ratio for c in block_counts(adapter, sq_norms, taus)]


# ------------------------------------------------------------------------------------------------- result


@dataclass
class RedundancyResult:
    model: str
    dense_model: str | None
    m: float
    thresholds: list[float]
    blocks: list[dict[str, Any]]  # index, non_outlier_ratio, outliers, surviving, weights, sparsity
    settings: dict[str, Any]
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def ratios(self) -> list[float]:
        return [b["non_outlier_ratio"] for b in self.blocks]

    @property
    def spread(self) -> dict[str, float]:
        return spread(self.ratios)

    @property
    def rule(self) -> str:
        return DENSE_RULE if self.dense_model is not None else SELF_RULE

    @property
    def activations(self) -> str:
        if self.dense_model is None:
            return "the analysed model's own activations on the calibration data"
        return ("the analysed model's activations on the calibration data entering each block, and inside each "
                "block those of the dense model's weights (MRP's dense-block statistics)")

    @property
    def sparsity(self) -> float:
        weights = sum(b["weights"] for b in self.blocks)
        return sum(b["weights"] - b["surviving"] for b in self.blocks) / weights

    def to_dict(self) -> dict[str, Any]:
        return {
            "analysis": "redundancy",
            "model": self.model,
            "global_sparsity": self.sparsity,
            "thresholds": {"source": "dense" if self.dense_model is not None else "self",
                           "dense_model": self.dense_model, "m": self.m, "rule": self.rule,
                           "values": self.thresholds},
            "definition": "R_l = 1 - #{Wanda score > tau_l} / #surviving weights of block l; scores with "
                          + self.activations,
            "blocks": self.blocks,
            "spread": self.spread,
            "settings": self.settings,
            "timings_s": self.timings_s,
        }

    def to_markdown(self) -> str:
        s = self.spread
        ratios = self.ratios
        hi = max(range(len(ratios)), key=ratios.__getitem__)
        lo = min(range(len(ratios)), key=ratios.__getitem__)
        rows = [[str(b["index"]), f"{b['non_outlier_ratio']:.5f}", f"{1 - b['non_outlier_ratio']:.5f}",
                 str(b["outliers"]), str(b["surviving"]), f"{b['sparsity']:.4f}", f"{t:.4g}"]
                for b, t in zip(self.blocks, self.thresholds)]
        return "\n".join([
            f"# Per-block redundancy (non-outlier ratio): {self.model}",
            "",
            (f"Global sparsity {self.sparsity:.4f}; M = {self.m:g}; thresholds: {self.rule}"
             + (f" from {self.dense_model}." if self.dense_model else ".")),
            f"Calibration: {_calib_text(self.settings['calibration'])}.",
            "",
            (f"Redundancy spread: coefficient of variation {s['cv']:.4g}, max - min {s['range']:.4g} "
             f"(mean {s['mean']:.5f}). Most redundant block {hi} ({ratios[hi]:.5f}), least redundant block {lo} "
             f"({ratios[lo]:.5f}). MRP's principle is a uniform level: a smaller spread is the goal."),
            "",
            common.md_table(["block", "non-outlier ratio", "outlier ratio", "outliers", "surviving", "sparsity",
                             "tau"], rows),
        ])

    def plot(self, path: Path) -> None:
        source = (f"dense thresholds ({_short(self.dense_model)})" if self.dense_model
                  else "self thresholds (survivors)")
        plots.redundancy_plot(path, self.ratios, title=f"Non-outlier ratio per block: {_short(self.model)}",
                              subtitle=f"sparsity {self.sparsity:.3f}, M={self.m:g}, {source}; "
                                       f"cv {self.spread['cv']:.3g}")

    def save(self, output: str | Path, overwrite: bool = False, plot: bool = True,
             protect: Sequence[Path] = ()) -> Path:
        writers = {"redundancy.json": common.json_writer(self.to_dict()),
                   "redundancy.md": common.text_writer(self.to_markdown())}
        if plot:
            writers["redundancy.png"] = self.plot
        return common.write_dir(Path(output), writers, overwrite, protect)


def _calib_text(c: dict) -> str:
    return f"{c['nsamples']} x {c['seqlen']} tokens of {c['source']} (seed {c['seed']})"


def _short(source: str) -> str:
    return Path(source).name if "/" in source else source


# ------------------------------------------------------------------------------------------- orchestration


@keeps_placement
def redundancy_profile(
    model=None,
    config: PruneConfig | None = None,
    *,
    dense=None,
    tokenizer=None,
    dense_tokenizer=None,
    progress: bool = True,
    output: str | Path | None = None,
    overwrite: bool = False,
    plot: bool = True,
) -> RedundancyResult:
    """Per-block non-outlier ratio of ``model`` (object, path, or None for ``config.model``).

    With ``dense`` (object or path of the same architecture) the thresholds are MRP's, from the dense model;
    without, from the analysed model's surviving weights (see the module docstring). M is
    ``config.allocation.mrp.m``; calibration as in ``config.calibration``. Writes ``redundancy.{json,md,png}``
    to ``output`` when given.
    """
    config = common.analysis_config(config)
    if plot and output is not None:
        plots.require()
    protect = input_paths(model if model is not None else config.model, dense)
    out = common.prepare_dir(output, overwrite, "redundancy.json", protect)
    m = config.allocation.mrp.m
    if m <= 0:
        raise ConfigError(f"the outlier multiple M must be positive, got {m:g}")
    calibration = common.calibration_corpus(config)  # checked before the weights load
    start = time.perf_counter()
    ids = None
    taus = None
    dense_layout = None
    dense_source = None
    dense_weights = None  # with a dense reference, blocks' internal activations come from its weights (MRP)
    if dense is not None:
        job = common.load_job(dense, dense_tokenizer, config)
        dense_source = job.source
        ids = common.calibration_ids(config, job.tokenizer, calibration)
        taus = dense_thresholds(job.adapter, job.observe(ids, progress), m)
        dense_weights = spill.snapshot(job.adapter.all_linear_layers(), "cpu")
        dense_layout = common.layout(job.adapter)
        dense_vocab = embedding_table(job.model).shape[0]
        del job
        gc.collect()
    job = common.load_job(model, tokenizer, config)
    if dense_layout is not None:
        _check_same_architecture(dense_layout, common.layout(job.adapter), dense_vocab,
                                 embedding_table(job.model).shape[0])
    if ids is None:
        ids = common.calibration_ids(config, job.tokenizer, calibration)
    sq_norms = job.observe(ids, progress, dense_weights=dense_weights)
    if taus is None:
        taus = surviving_thresholds(block_counts(job.adapter, sq_norms), m)
    counts = block_counts(job.adapter, sq_norms, taus)
    blocks = [{"index": i, "non_outlier_ratio": c.non_outlier_ratio, "outliers": c.outliers,
               "surviving": c.surviving, "weights": c.weights, "sparsity": 1 - c.surviving / c.weights,
               "mean_score": c.mean_score} for i, c in enumerate(counts)]
    settings = {"calibration": common.calibration_summary(config),
                "runtime": asdict(config.runtime), "m": m}
    result = RedundancyResult(job.source, dense_source, m, [float(t) for t in taus], blocks, settings,
                              {"total": round(time.perf_counter() - start, 3)})
    if out is not None:
        result.save(out, overwrite, plot, protect)
    return result


def _check_same_architecture(dense: list, analysed: list, dense_vocab: int, vocab: int) -> None:
    if len(dense) != len(analysed):
        raise ConfigError(f"--dense model has {len(dense)} blocks, the analysed model {len(analysed)}: "
                          "thresholds need the same architecture")
    for index, (a, b) in enumerate(zip(dense, analysed)):
        if a != b:
            raise ConfigError(f"block {index} differs between the --dense model and the analysed model "
                              f"({len(a)} vs {len(b)} linear layers or different shapes): same architecture needed")
    if dense_vocab != vocab:
        raise ConfigError(f"--dense model's vocabulary ({dense_vocab}) differs from the analysed model's ({vocab}): "
                          "the same calibration tokens cannot feed both")
