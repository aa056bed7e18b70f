import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mrprune.metrics import LayerStats, SparsityPattern, Wanda
from mrprune.redundancy import (
    RedundancyCurve,
    UnitCounts,
    equalize,
    fit_log_drift,
    fit_upstream_drift,
    layer_counts,
    log_ratio,
    row_outlier_counts,
    spread,
    thresholds,
)


def heavy_tailed(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, cols, generator=g))


def test_counts_and_thresholds_follow_the_definition():
    weight = torch.tensor([[1.0, -2.0, 0.0], [4.0, 0.5, -8.0]])
    sq_norm = torch.tensor([1.0, 4.0, 1.0])  # column norms 1, 2, 1
    counts = layer_counts(weight, sq_norm)
    # scores |W| * norm: [[1, 4, 0], [4, 1, 8]] -> sum 18 over 6 weights, 5 survivors
    assert counts == UnitCounts(18.0, 6, 0, 5)
    (tau,) = thresholds([counts], m=1.5)  # 1.5 x mean 3 = 4.5
    assert tau == 4.5
    assert layer_counts(weight, sq_norm, tau).outliers == 1  # only the 8
    assert layer_counts(weight, sq_norm, tau).non_outlier_ratio == pytest.approx(1 - 1 / 5)
    assert row_outlier_counts(weight, sq_norm, 3.5).tolist() == [1, 2]


def test_curve_predicts_outliers_surviving_wanda_pruning():
    weight = heavy_tailed(32, 64, 0)
    sq_norm = torch.rand(64) + 0.1
    stats = LayerStats(sq_norm=sq_norm)
    tau = thresholds([layer_counts(weight, sq_norm)], m=3.0)[0]
    curve = RedundancyCurve([(row_outlier_counts(weight, sq_norm, tau), 64)])
    previous = 0.0
    for sparsity in (0.0, 0.25, 0.5, 0.75, 0.875, 62 / 64):  # whole weights per row: exact prediction
        pruned = Wanda().prune(weight, stats, sparsity, SparsityPattern()).weight
        measured = layer_counts(pruned, sq_norm, tau).outlier_ratio
        assert curve.outlier_ratio(sparsity) == pytest.approx(measured, abs=1e-9)
        assert curve.outlier_ratio(sparsity) >= previous
        previous = curve.outlier_ratio(sparsity)


def test_equalize_gives_free_units_one_outlier_ratio_and_hits_target():
    curves = [RedundancyCurve([(heavy_tailed(64, 64, s).abs().gt(2.5).sum(1), 64)]) for s in range(6)]
    sizes = [c.numel for c in curves]
    sparsities = equalize(curves, 0.6, 0.5, 0.9)
    assert sum(s * n for s, n in zip(sparsities, sizes)) / sum(sizes) == pytest.approx(0.6, abs=1e-9)
    assert all(0.5 <= s <= 0.9 for s in sparsities)
    free = [i for i, s in enumerate(sparsities) if 0.5 < s < 0.9]
    ratios = [curves[i].outlier_ratio(sparsities[i]) for i in free]
    assert len(free) >= 2 and max(ratios) - min(ratios) < 0.02
    floor = [i for i, s in enumerate(sparsities) if s == 0.5]
    assert all(curves[i].outlier_ratio(0.5) >= min(ratios) - 0.02 for i in floor)


def test_equalize_keeps_fixed_units():
    curves = [RedundancyCurve([(torch.full((16,), k), 16)]) for k in (1, 2, 3)]
    sparsities = equalize(curves, 0.6, 0.4, 0.9, fixed={0: 0.8})
    assert sparsities[0] == 0.8
    assert sum(sparsities) / 3 == pytest.approx(0.6)


def test_spread():
    result = spread([0.9, 0.95, 1.0])
    assert result["range"] == pytest.approx(0.1)
    assert result["cv"] == pytest.approx(math.sqrt(((0.05**2) * 2) / 3) / 0.95)


@given(st.lists(st.integers(0, 40), min_size=1, max_size=30), st.lists(st.integers(0, 40), min_size=1, max_size=10))
def test_capped_sums_match_the_direct_sum(counts, caps):
    from mrprune.redundancy import capped_sums

    counts_t, caps_t = torch.tensor(counts), torch.tensor(caps, dtype=torch.float64)
    expected = [sum(min(c, k) for c in counts) for k in caps]
    assert capped_sums(counts_t, 40, caps_t).tolist() == expected


def test_fit_log_drift_recovers_a_line_and_refuses_too_little_evidence():
    xs = [-0.2, -0.05, 0.0, 0.1, 0.3]
    c, k = fit_log_drift([(x, 0.07 + 1.5 * x) for x in xs])
    assert c == pytest.approx(0.07) and k == pytest.approx(1.5)
    noisy = [(x, 0.07 + 1.5 * x + e) for x, e in zip(xs, [0.01, -0.02, 0.015, -0.01, 0.005])]
    c2, k2 = fit_log_drift(noisy)
    assert abs(k2 - 1.5) < 0.2 and abs(c2 - 0.07) < 0.02
    assert fit_log_drift([(x, x) for x in xs[:3]]) is None  # fewer than 4 points
    assert fit_log_drift([(0.1, y) for y in (0.0, 0.1, 0.2, 0.3)]) is None  # no spread in x: no slope
    assert fit_log_drift([(x, x) for x in xs[:3]], min_points=3) is not None
    assert log_ratio(0.2, 0.1) == pytest.approx(math.log(2)) and log_ratio(0.0, 0.1) is None
    assert log_ratio(0.1, 0.0) is None


def test_fit_upstream_drift_recovers_both_slopes_through_the_origin():
    xs = [-0.2, -0.05, 0.1, 0.3, 0.15]
    es = [0.0, 0.01, 0.02, 0.04, 0.03]
    a, k = fit_upstream_drift([(x, 6.0 * e + 0.8 * x, e) for x, e in zip(xs, es)])
    assert a == pytest.approx(6.0) and k == pytest.approx(0.8)
    assert fit_upstream_drift([(x, x, e) for x, e in zip(xs[:3], es)]) is None  # fewer than 4 points
    assert fit_upstream_drift([(x, x, 0.1 * x) for x in xs]) is None  # e a multiple of x: no separate slopes
    assert fit_upstream_drift([(0.0, 0.1, 0.0)] * 5) is None  # no spread at all
