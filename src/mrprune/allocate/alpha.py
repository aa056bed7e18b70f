"""AlphaPruning (Lu et al. 2024, arXiv 2410.10912): sparsity from the heavy-tail exponent of each weight's spectrum.

Heavy-Tailed Self-Regularisation theory reads a heavier-tailed eigenvalue spectrum of W^T W (smaller power-law
exponent alpha) as a better-trained matrix, so blocks with larger alpha are pruned more. The ratios are alpha
min-max scaled to [1 - eps, 1 + eps] and rescaled so the parameter-weighted mean is the target; no calibration
data is needed (one eigendecomposition per matrix, on the run's device).

Exponent estimator (PL_Alpha_Hill, as WeightWatcher's ``fix_fingers='xmin_peak'``):

* the spectrum is the eigenvalues of W^T W for the (out x in) weight (its squared singular values, from the
  float64 Gram of the shorter side), numerical zeros (below ``ZERO_TOL`` x the largest eigenvalue) dropped;
* for a candidate x_min, alpha = 1 + n / sum ln(lambda_i / x_min) over the n eigenvalues >= x_min (the
  continuous power-law maximum-likelihood, i.e. Hill, estimator);
* x_min is the candidate whose fitted power law (CDF 1 - (x / x_min)^(1 - alpha)) has the smallest two-sided
  Kolmogorov-Smirnov distance to the empirical distribution of the eigenvalues >= x_min (Clauset et al. 2009);
* candidates are the eigenvalues in [0.95 p, 1.5 p], where p is the left edge of the tallest bin of a
  100-bin histogram of log10(eigenvalues). An unrestricted KS search tends to pick x_min far out in the tail,
  where a handful of eigenvalues ("fingers") fit any exponent and alpha becomes erratic; the bulk's peak is
  where the power-law tail of a trained matrix starts, so the search stays next to it.
  Note: WeightWatcher passes log10(0.95 p) as the lower end of that range (a log value next to the linear
  1.5 p), which in practice removes the lower bound; we use the window both ends were meant to give.
  If the window holds no usable candidate, the first eigenvalue >= 0.95 p is used.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from ..errors import ConfigError
from .base import Allocation, AllocationContext, Allocator
from .fit import fit_to_target

log = logging.getLogger(__name__)

#: eigenvalues below this fraction of the largest are numerical zeros (rank deficiency, rounding)
ZERO_TOL = 1e-10
#: columns of the longer side per slice of the Gram sum (bounds esd's float64 working memory)
_GRAM_SLICE = 4096
#: candidates x KS-points evaluated at once (bounds the memory of the vectorised KS search)
_CHUNK_ELEMENTS = 1 << 22


def esd(weight: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Eigenvalues of W^T W (the squared singular values of W), ascending, float64, on ``device`` (default: the
    weight's).

    Computed as the eigenvalues of the float64 Gram matrix of W's shorter side, not by an SVD: the same
    min(out, in) values, more accurate than a float32 SVD, and several times faster (an SVD of a 4096 x 11008
    matrix takes about a second on an H200, so a 7B model's 224 matrices took minutes; BENCHMARKS.md section 5).
    The Gram is summed over slices of the longer side, so no float64 copy of the whole weight is made.
    """
    with torch.no_grad():
        w = weight.detach()
        if device is not None:
            w = w.to(device)
        if w.shape[0] > w.shape[1]:
            w = w.T  # rows = the shorter side: the Gram is (short x short)
        gram = torch.zeros(w.shape[0], w.shape[0], dtype=torch.float64, device=w.device)
        for start in range(0, w.shape[1], _GRAM_SLICE):
            part = w[:, start:start + _GRAM_SLICE].to(torch.float64)
            gram.addmm_(part, part.T)
        return torch.linalg.eigvalsh(gram)  # ascending


def _clean(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Sorted float64 eigenvalues without numerical zeros."""
    e = torch.sort(eigenvalues.detach().flatten().to(torch.float64)).values
    if e.numel() == 0 or float(e[-1]) <= 0:
        return e[:0]
    return e[e > float(e[-1]) * ZERO_TOL]


def hill_alpha(eigenvalues: torch.Tensor, xmin: float) -> float:
    """Power-law exponent of the eigenvalues >= ``xmin``: 1 + n / sum ln(lambda_i / xmin) (inf if all equal)."""
    if not xmin > 0:
        raise ValueError(f"xmin must be positive, got {xmin}")
    e = eigenvalues.detach().flatten().to(torch.float64)
    tail = e[e >= xmin]
    if tail.numel() == 0:
        raise ValueError(f"no eigenvalue >= xmin {xmin}")
    log_sum = float(torch.log(tail / xmin).sum())
    return 1.0 + tail.numel() / log_sum if log_sum > 0 else math.inf


def ks_distance(eigenvalues: torch.Tensor, xmin: float, alpha: float) -> float:
    """Two-sided KS distance between the eigenvalues >= ``xmin`` and the power law (xmin, alpha)."""
    e = _clean(eigenvalues)
    tail = e[e >= xmin]
    n = tail.numel()
    if n == 0:
        raise ValueError(f"no eigenvalue >= xmin {xmin}")
    cdf = 1.0 - torch.exp((1.0 - alpha) * torch.log(tail / xmin))
    ranks = torch.arange(n, dtype=torch.float64, device=e.device)
    return float(torch.maximum(cdf - ranks / n, (ranks + 1) / n - cdf).max())


def peak_window(eigenvalues: torch.Tensor, bins: int = 100, window: tuple[float, float] = (0.95, 1.5)
                ) -> tuple[float, float, float]:
    """(p, lower, upper): p is the left edge of the tallest bin of the log10 histogram of the (positive)
    eigenvalues, [lower, upper] the x_min search window around it."""
    logs = torch.log10(eigenvalues.detach().flatten().to(torch.float64))
    lo, hi = float(logs.min()), float(logs.max())
    if hi <= lo:
        peak = 10.0 ** lo
    else:
        index = ((logs - lo) / (hi - lo) * bins).floor().clamp(0, bins - 1).long()
        tallest = int(torch.argmax(torch.bincount(index, minlength=bins)))
        peak = 10.0 ** (lo + tallest * (hi - lo) / bins)
    return peak, window[0] * peak, window[1] * peak


def pl_alpha_hill(
    eigenvalues: torch.Tensor, bins: int = 100, window: tuple[float, float] | None = (0.95, 1.5)
) -> tuple[float, float]:
    """(alpha, x_min) of the spectrum by PL_Alpha_Hill; ``window`` None searches every eigenvalue as x_min.

    Returns (nan, nan) for a spectrum without a tail to fit (fewer than two distinct non-zero eigenvalues).
    """
    e = _clean(eigenvalues)
    count = e.numel()
    if count < 2 or float(e[-1]) <= float(e[0]):
        return math.nan, math.nan
    logs = torch.log(e)
    # candidate indices i (x_min = e[i]): the first of each distinct value, so the tail from i holds exactly the
    # eigenvalues >= x_min; the largest eigenvalue alone cannot be fitted
    usable = torch.arange(count - 1, device=e.device)
    usable = usable[torch.cat([e.new_ones(1, dtype=torch.bool), e[1:-1] > e[:-2]])]
    if window is None:
        candidates = usable
    else:
        _, lower, upper = peak_window(e, bins, window)
        candidates = usable[(e[usable] >= lower) & (e[usable] <= upper)]
        if candidates.numel() == 0:
            above = usable[e[usable] >= lower]
            candidates = above[:1] if above.numel() else usable[-1:]

    # alpha for every candidate at once from suffix sums of log eigenvalues
    suffix = torch.flip(torch.cumsum(torch.flip(logs, [0]), 0), [0])
    n = (count - candidates).to(torch.float64)
    denominator = suffix[candidates] - n * logs[candidates]
    alphas = torch.where(denominator > 0, 1.0 + n / denominator.clamp_min(1e-300),
                         torch.full_like(n, math.inf))

    # KS distance of each candidate's fit, over the eigenvalues >= its x_min, in chunks of candidates
    positions = torch.arange(count, device=e.device)
    distances = []
    step = max(1, _CHUNK_ELEMENTS // count)
    for start in range(0, candidates.numel(), step):
        idx = candidates[start:start + step]
        a = alphas[start:start + step]
        cn = n[start:start + step]
        rank = (positions[None, :] - idx[:, None]).to(torch.float64)  # position in the tail, < 0 outside
        valid = rank >= 0
        rel = (logs[None, :] - logs[idx][:, None]).clamp_min(0.0)
        cdf = 1.0 - torch.exp((1.0 - a[:, None]) * rel)
        gap = torch.maximum(cdf - rank / cn[:, None], (rank + 1) / cn[:, None] - cdf)
        d = torch.where(valid, gap, torch.zeros_like(gap)).amax(dim=1)
        distances.append(torch.where(torch.isfinite(a) & (a > 1), d, torch.full_like(d, math.inf)))
    distance = torch.cat(distances)
    if not bool(torch.isfinite(distance).any()):
        return math.nan, math.nan
    best = int(torch.argmin(distance))
    return float(alphas[best]), float(e[candidates[best]])


def alpha_sparsities(alphas: Sequence[float], sizes: Sequence[int], target: float, eps: float) -> list[float]:
    """Raw (unclamped) AlphaPruning sparsities: r = minmax(alpha) * 2 eps + (1 - eps), scaled to hit ``target``.

    sparsity_l = r_l * target * sum(N) / sum(N_l r_l), so the size-weighted mean is ``target``; larger alpha
    (lighter tail) gets more pruning. Equal alphas give the uniform allocation.
    """
    if len(alphas) != len(sizes) or not alphas:
        raise ValueError("need one size per alpha")
    lo, hi = min(alphas), max(alphas)
    if hi <= lo:
        return [float(target)] * len(alphas)
    r = [(a - lo) / (hi - lo) * 2.0 * eps + (1.0 - eps) for a in alphas]
    weighted = sum(n * ri for n, ri in zip(sizes, r))
    if weighted <= 0:
        raise ConfigError(f"allocation.alpha.eps {eps} leaves no positive ratio to scale to the target")
    scale = target * sum(sizes) / weighted
    return [ri * scale for ri in r]


class AlphaAllocator(Allocator):
    """Per-block (or per-layer) sparsity from the PL_Alpha_Hill exponent of each weight matrix's spectrum."""

    name = "alphapruning"
    needs_calibration = False

    def __init__(self, eps: float = 0.3):
        if not eps >= 0:
            raise ConfigError(f"allocation.alpha.eps must be non-negative, got {eps}")
        self.eps = float(eps)

    def allocate(self, ctx: AllocationContext) -> Allocation:
        if ctx.granularity not in ("block", "layer"):
            raise ConfigError(f"unknown allocation.granularity '{ctx.granularity}'; choose block or layer")
        adapter = ctx.adapter
        target = 0.5 if ctx.target is None else ctx.target
        refs = adapter.all_linear_layers()
        layer_alpha = {}
        for ref in refs:
            alpha, xmin = pl_alpha_hill(esd(ref.weight, ctx.device))
            layer_alpha[ref.name] = alpha
            log.debug("alpha %s = %.4f (x_min %.4g)", ref.name, alpha, xmin)
        bad = [name for name, a in layer_alpha.items() if not math.isfinite(a)]
        if bad:
            log.warning("no power-law fit for %d matrices (e.g. %s); they get the mean exponent", len(bad), bad[0])
        finite = [a for a in layer_alpha.values() if math.isfinite(a)]
        fallback = sum(finite) / len(finite) if finite else 0.0
        filled = {name: (a if math.isfinite(a) else fallback) for name, a in layer_alpha.items()}

        details = {"eps": self.eps, "granularity": ctx.granularity}
        if ctx.granularity == "layer":
            sizes = [ref.numel for ref in refs]
            metric = [filled[ref.name] for ref in refs]
            fitted = fit_to_target(alpha_sparsities(metric, sizes, target, self.eps), sizes, target)
            self._log(metric, fitted)
            return Allocation.from_layers(self.name, adapter, {r.name: s for r, s in zip(refs, fitted)}, target,
                                          alpha={r.name: float(a) for r, a in zip(refs, metric)}, **details)
        metric = []
        for i in range(adapter.num_blocks):
            block = [filled[ref.name] for ref in adapter.linear_layers(i)]
            metric.append(sum(block) / len(block))
        sizes = adapter.block_sizes()
        fitted = fit_to_target(alpha_sparsities(metric, sizes, target, self.eps), sizes, target)
        self._log(metric, fitted)
        return Allocation.from_blocks(self.name, adapter, fitted, target, alpha=[float(a) for a in metric],
                                      layer_alpha={n: float(a) for n, a in filled.items()}, **details)

    @staticmethod
    def _log(metric: list[float], fitted: list[float]) -> None:
        log.info("AlphaPruning exponents %.3f..%.3f; sparsities %.4f..%.4f",
                 min(metric), max(metric), min(fitted), max(fitted))
