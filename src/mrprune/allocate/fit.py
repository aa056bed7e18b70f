"""Fitting ratios to a parameter-weighted target: clamp to bounds, redistribute the remainder additively."""

from __future__ import annotations

from ..errors import ConfigError

LOWER, UPPER = 0.0, 0.99


def weighted_mean(ratios: list[float], sizes: list[int]) -> float:
    return sum(r * n for r, n in zip(ratios, sizes)) / sum(sizes)


def fit_to_target(
    ratios: list[float], sizes: list[int], target: float, lower: float = LOWER, upper: float = UPPER
) -> list[float]:
    """Return clip(r + c, lower, upper) with the shift c chosen so sum(n * r') / sum(n) == target.

    The weighted mean of the clipped, shifted ratios is continuous and non-decreasing in c, so bisection finds
    c; entries pinned at a bound keep it and the rest absorb the remainder (water-filling).
    """
    if len(ratios) != len(sizes) or not ratios:
        raise ValueError("need one size per ratio")
    if not lower <= target <= upper:
        raise ConfigError(f"target sparsity {target} is outside [{lower}, {upper}]")

    inside = [min(max(r, lower), upper) for r in ratios]
    if inside == list(ratios) and abs(weighted_mean(inside, sizes) - target) <= 1e-12:
        return inside  # already exact: keep it bit for bit (a uniform allocation stays uniform)

    def mean_at(c: float) -> float:
        return weighted_mean([min(max(r + c, lower), upper) for r in ratios], sizes)

    lo, hi = lower - max(ratios), upper - min(ratios)
    for _ in range(200):
        mid = (lo + hi) / 2
        if mean_at(mid) < target:
            lo = mid
        else:
            hi = mid
    fitted = [min(max(r + hi, lower), upper) for r in ratios]
    # remove the last float error on the free entries so the mean is exact to rounding
    free = [i for i, r in enumerate(fitted) if lower < r < upper]
    if free:
        residual = (target - weighted_mean(fitted, sizes)) * sum(sizes) / sum(sizes[i] for i in free)
        for i in free:
            fitted[i] = min(max(fitted[i] + residual, lower), upper)
    return fitted
