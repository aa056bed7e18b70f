"""Layerwise redundancy (Gao et al. 2025): how many of a unit's surviving weights are NOT outliers.

A unit is a decoder block (all its linear layers together) or one linear layer. Its Wanda scores are
A = |W| * ||X_j||_2; the outlier threshold is tau = M * mean(A) over all the unit's weights of the DENSE model,
frozen; on a (partly) pruned model D = #{A > tau} / #surviving weights and the redundancy is R = 1 - D.
Pruned weights score 0 and are never outliers. Pure functions over tensors; orchestration lives elsewhere.
"""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass

import torch

from .metrics.wanda import wanda_scores


@dataclass
class UnitCounts:
    """Sufficient statistics of one unit's scores: enough to get its mean score or outlier ratio."""

    score_sum: float = 0.0
    weights: int = 0
    outliers: int = 0
    surviving: int = 0

    def add(self, other: UnitCounts) -> UnitCounts:
        return UnitCounts(self.score_sum + other.score_sum, self.weights + other.weights,
                          self.outliers + other.outliers, self.surviving + other.surviving)

    @property
    def mean_score(self) -> float:
        return self.score_sum / self.weights if self.weights else 0.0

    @property
    def outlier_ratio(self) -> float:
        return self.outliers / self.surviving if self.surviving else 1.0

    @property
    def non_outlier_ratio(self) -> float:
        return 1.0 - self.outlier_ratio


def layer_counts(weight: torch.Tensor, sq_norm: torch.Tensor, tau: float | None = None) -> UnitCounts:
    """Score sum, size, surviving weights and (given ``tau``) outliers of one (out x in) layer."""
    weight = weight.to(torch.float32)
    scores = wanda_scores(weight, sq_norm)
    outliers = int((scores > tau).sum()) if tau is not None else 0
    return UnitCounts(float(scores.sum(dtype=torch.float64)), weight.numel(), outliers, int((weight != 0).sum()))


def thresholds(counts: list[UnitCounts], m: float) -> list[float]:
    """tau = M x mean score of each unit (measured on the dense model)."""
    return [m * c.mean_score for c in counts]


def spread(ratios: list[float]) -> dict[str, float]:
    """How uneven the units' redundancy is: coefficient of variation and max - min (principle 3)."""
    mean = statistics.fmean(ratios)
    stdev = statistics.pstdev(ratios)
    return {"mean": mean, "cv": stdev / mean if mean else 0.0, "range": max(ratios) - min(ratios),
            "min": min(ratios), "max": max(ratios)}


def row_outlier_counts(weight: torch.Tensor, sq_norm: torch.Tensor, tau: float) -> torch.Tensor:
    """Outliers (Wanda score > tau) in each output row of one layer."""
    return (wanda_scores(weight.to(torch.float32), sq_norm) > tau).sum(1)


GRID = torch.linspace(0.0, 1.0, 2001, dtype=torch.float64)


def capped_sums(counts: torch.Tensor, width: int, caps: torch.Tensor) -> torch.Tensor:
    """sum_r min(counts_r, k) for every k in ``caps`` (integers in [0, width]), from the histogram of the counts:
    rows below k add their count, the others k. O(width + len(caps)) instead of O(rows x len(caps))."""
    hist = torch.bincount(counts.to("cpu", torch.long), minlength=width + 1).to(torch.float64)
    values = torch.arange(width + 1, dtype=torch.float64)
    rows_below = torch.cumsum(hist, 0) - hist  # rows with a count < k
    sum_below = torch.cumsum(hist * values, 0) - hist * values
    k = caps.to(torch.long)
    return sum_below[k] + caps.to(torch.float64) * (counts.numel() - rows_below[k])


@dataclass
class RedundancyCurve:
    """A unit's outlier ratio as a function of its own sparsity, predicted from per-row outlier counts.

    Pruning removes the lowest scores of each row first, so a row keeps its outliers until fewer weights than
    outliers remain: outliers(s) = sum_r min(o_r, kept(s)), D(s) = outliers(s) / survivors(s). D never falls
    as s grows, which makes the equal-redundancy allocation a monotone search. Evaluated once on a grid of
    sparsities (step 0.0005).
    """

    layers: list[tuple[torch.Tensor, int]]  # (per-row outlier counts, in_features) of each layer
    scale: float = 1.0  # correction of the outlier counts (measured / predicted), see fast MRP

    def __post_init__(self) -> None:
        outliers = torch.zeros_like(GRID)
        survivors = torch.zeros_like(GRID)
        for counts, width in self.layers:
            kept = width - torch.floor(width * GRID)
            outliers += capped_sums(counts, width, kept)
            survivors += kept * counts.numel()
        self._outliers = outliers
        self._survivors = survivors
        self._ratios: torch.Tensor | None = None  # D on the grid, computed on first use (equalize asks often)

    @property
    def numel(self) -> int:
        return sum(counts.numel() * width for counts, width in self.layers)

    def scaled(self, scale: float) -> RedundancyCurve:
        """The same curve with its outlier counts multiplied by ``scale`` (the grid is shared, not rebuilt)."""
        twin = copy.copy(self)
        twin.scale = scale
        twin._ratios = None
        return twin

    def ratios(self) -> torch.Tensor:
        """D on the grid (1 where nothing survives)."""
        if self._ratios is None:
            ratio = torch.where(self._survivors > 0, self.scale * self._outliers / self._survivors.clamp(min=1), 1.0)
            self._ratios = torch.cummax(ratio.clamp(max=1.0), 0).values
        return self._ratios

    def outlier_ratio(self, sparsity: float) -> float:
        return float(self.ratios()[int(round(sparsity * (len(GRID) - 1)))])

    def sparsity_for(self, ratio: float, lower: float, upper: float) -> float:
        """Smallest sparsity in [lower, upper] whose outlier ratio reaches ``ratio``."""
        index = int(torch.searchsorted(self.ratios(), torch.tensor([ratio], dtype=torch.float64)))
        return min(max(float(GRID[min(index, len(GRID) - 1)]), lower), upper)


def equalize(curves: list[RedundancyCurve], target: float, lower: float, upper: float,
             fixed: dict[int, float] | None = None) -> list[float]:
    """Per-unit sparsities that give every free unit the same outlier ratio (MRP's fixed point), within
    [lower, upper] and with a parameter-weighted mean of ``target``; units in ``fixed`` keep their sparsity."""
    fixed = fixed or {}
    sizes = [c.numel for c in curves]
    budget = target * sum(sizes) - sum(sizes[i] * s for i, s in fixed.items())
    free = [i for i in range(len(curves)) if i not in fixed]

    def allocate(ratio: float) -> list[float]:
        out = [fixed.get(i, 0.0) for i in range(len(curves))]
        for i in free:
            out[i] = curves[i].sparsity_for(ratio, lower, upper)
        return out

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        used = sum(sizes[i] * s for i, s in enumerate(allocate(mid)) if i in free)
        lo, hi = (mid, hi) if used < budget else (lo, mid)
    sparsities = allocate(hi)
    if free:  # the curves are step functions: shift the free units to hit the budget exactly
        from .allocate.fit import fit_to_target

        free_target = budget / sum(sizes[i] for i in free)
        shifted = fit_to_target([sparsities[i] for i in free], [sizes[i] for i in free],
                                min(max(free_target, lower), upper), lower, upper)
        for i, s in zip(free, shifted):
            sparsities[i] = s
    return sparsities


def fit_log_drift(points: list[tuple[float, float]], min_points: int = 4) -> tuple[float, float] | None:
    """Least-squares line y = c + k x through (x, y) points, or None with fewer than ``min_points`` or no spread
    in x. Fast MRP fits log(drift to come) on log(drift so far) of the units it has reached."""
    n = len(points)
    if n < min_points:
        return None
    mx = math.fsum(x for x, _ in points) / n
    my = math.fsum(y for _, y in points) / n
    sxx = math.fsum((x - mx) ** 2 for x, _ in points)
    if sxx <= 1e-12:
        return None
    k = math.fsum((x - mx) * (y - my) for x, y in points) / sxx
    return my - k * mx, k


def fit_upstream_drift(points: list[tuple[float, float, float]], min_points: int = 4) -> tuple[float, float] | None:
    """Least-squares y = a e + k x through (x, y, e) points, no intercept, or None with fewer than ``min_points``
    or e and x without independent spread. Fast MRP fits a unit's log drift to come on the pruning upstream of it
    beyond the pilot's (e) and on its drift so far (x); an intercept made the forecast worse on the recorded
    passes (docs/mrp.md, "The upstream term")."""
    if len(points) < min_points:
        return None
    see = math.fsum(e * e for _, _, e in points)
    sxx = math.fsum(x * x for x, _, _ in points)
    sex = math.fsum(e * x for x, _, e in points)
    det = see * sxx - sex * sex
    if det <= 1e-9 * max(see * sxx, 1e-30):
        return None
    sey = math.fsum(e * y for _, y, e in points)
    sxy = math.fsum(x * y for x, y, _ in points)
    return (sey * sxx - sxy * sex) / det, (sxy * see - sey * sex) / det


def log_ratio(a: float, b: float) -> float | None:
    """log(a / b), or None where either is not positive (a unit without outliers has no drift to measure)."""
    return math.log(a / b) if a > 0 and b > 0 else None
