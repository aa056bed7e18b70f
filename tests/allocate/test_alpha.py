import json
import math

import pytest
import torch

from mrprune import PruneConfig, prune
from mrprune.allocate import AllocationContext, AlphaAllocator, build_allocator, weighted_mean
from mrprune.allocate import alpha as alpha_mod
from mrprune.allocate.alpha import alpha_sparsities, esd, hill_alpha, ks_distance, peak_window, pl_alpha_hill
from mrprune.config import merge
from mrprune.errors import ConfigError
from mrprune.models import get_adapter
from tests.conftest import DEVICES, tiny_model


def pareto(alpha: float, n: int, seed: int) -> torch.Tensor:
    """n draws of density proportional to x^-alpha on [1, inf), by inverse CDF: x = (1 - u)^(-1/(alpha - 1))."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (1 - u) ** (-1 / (alpha - 1))


# ------------------------------------------------------------------------------------------------ the mapping


def test_alpha_mapping_matches_hand_computation():
    # r = minmax(alpha) * 2 * 0.3 + 0.7 = [0.7, 1.0, 1.3]; sum N r = 0.7 + 1.0 + 2 * 1.3 = 4.3
    # sparsity = r * 0.5 * 4 / 4.3
    raw = alpha_sparsities([2.0, 3.0, 4.0], [1, 1, 2], 0.5, 0.3)
    assert raw == pytest.approx([1.4 / 4.3, 2.0 / 4.3, 2.6 / 4.3], abs=1e-15)
    assert (1 * raw[0] + 1 * raw[1] + 2 * raw[2]) / 4 == pytest.approx(0.5, abs=1e-15)
    # larger alpha (lighter tail) -> more pruning
    assert raw[0] < raw[1] < raw[2]
    assert alpha_sparsities([3.0, 3.0], [5, 7], 0.4, 0.3) == [0.4, 0.4]


def fake_alphas(monkeypatch, values):
    """Make the estimator return ``values`` in layer order (7 matrices per tiny-llama block)."""
    it = iter(values)
    monkeypatch.setattr(alpha_mod, "pl_alpha_hill", lambda eigenvalues: (next(it), 1.0))


def test_alpha_allocator_matches_hand_computation_from_per_matrix_alphas(monkeypatch):
    adapter = get_adapter(tiny_model("llama"))
    # block metrics are plain means of the block's 7 matrices: 3, 4 and 6
    fake_alphas(monkeypatch, [3.0] * 7 + [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0] + [5.0] * 6 + [12.0])
    allocation = AlphaAllocator().allocate(AllocationContext(adapter, 0.5))
    assert allocation.method == "alphapruning"
    assert allocation.details["alpha"] == pytest.approx([3.0, 4.0, 6.0])
    # r = [0.7, 0.7 + 0.6 / 3, 1.3] = [0.7, 0.9, 1.3]; equal block sizes: sparsity = r * 0.5 * 3 / 2.9
    assert allocation.block_targets == pytest.approx([1.05 / 2.9, 1.35 / 2.9, 1.95 / 2.9], abs=1e-12)
    assert allocation.details["eps"] == 0.3
    assert len(allocation.details["layer_alpha"]) == 21
    json.dumps(allocation.details)


def test_alpha_allocator_layer_granularity(monkeypatch):
    adapter = get_adapter(tiny_model("llama"))
    refs = adapter.all_linear_layers()
    values = [2.0 + 0.1 * i for i in range(len(refs))]
    fake_alphas(monkeypatch, values)
    allocation = AlphaAllocator(eps=0.2).allocate(AllocationContext(adapter, 0.6, "layer"))
    assert sorted(allocation.layer_targets) == sorted(r.name for r in refs)
    lo, hi = min(values), max(values)
    r = [(a - lo) / (hi - lo) * 0.4 + 0.8 for a in values]
    scale = 0.6 * sum(ref.numel for ref in refs) / sum(ref.numel * ri for ref, ri in zip(refs, r))
    for ref, ri in zip(refs, r):
        assert allocation.layer_targets[ref.name] == pytest.approx(ri * scale, abs=1e-12)
    assert allocation.details["alpha"][refs[4].name] == pytest.approx(values[4])
    ordered = [allocation.layer_targets[ref.name] for ref in refs]
    assert ordered == sorted(ordered)  # alphas increase in layer order, so do the ratios


def test_alpha_equal_exponents_give_uniform(monkeypatch):
    adapter = get_adapter(tiny_model("llama"))
    fake_alphas(monkeypatch, [4.0] * 21)
    assert AlphaAllocator().allocate(AllocationContext(adapter, 0.7)).block_targets == [0.7, 0.7, 0.7]


# ---------------------------------------------------------------------------------------------- the estimator


def test_hill_alpha_and_ks_by_hand():
    e = torch.tensor([1.0, math.e, math.e ** 2], dtype=torch.float64)
    assert hill_alpha(e, 1.0) == pytest.approx(1 + 3 / (0 + 1 + 2))  # 2.0
    assert hill_alpha(e, math.e) == pytest.approx(1 + 2 / (0 + 1))  # 3.0
    # two points, alpha 2: fitted CDF 0 at 1 and 1 - 1/e at e; empirical steps 0 -> 1/2 -> 1
    gap = max(0.5, 1 - (1 - 1 / math.e), (1 - 1 / math.e) - 0.5)
    assert ks_distance(torch.tensor([1.0, math.e], dtype=torch.float64), 1.0, 2.0) == pytest.approx(gap)


def test_peak_window_by_hand():
    # log10 spans [0, 4] in 100 bins of 0.04; 50 values at 10^2.01 fill bin 50, whose left edge is 10^2
    e = torch.tensor([1.0] + [10 ** 2.01] * 50 + [10 ** 3.0] * 5 + [1e4], dtype=torch.float64)
    peak, lower, upper = peak_window(e)
    assert peak == pytest.approx(100.0) and lower == pytest.approx(95.0) and upper == pytest.approx(150.0)
    _, xmin = pl_alpha_hill(e)
    assert 95.0 <= xmin <= 150.0


@pytest.mark.parametrize("true_alpha", [2.0, 3.0, 4.5])
def test_estimator_recovers_pareto_exponent(true_alpha):
    eigenvalues = pareto(true_alpha, 3000, seed=7)
    alpha, _ = pl_alpha_hill(eigenvalues)
    assert abs(alpha - true_alpha) / true_alpha < 0.10
    # the exponent of a spectrum does not depend on the weight's scale
    scaled, _ = pl_alpha_hill(eigenvalues * 3e-4)
    assert scaled == pytest.approx(alpha, rel=1e-9)


@pytest.fixture(scope="module")
def orthogonal():
    """Random U (1500 x 1200) and V (1200 x 1200) with orthonormal columns, shared by the matrix tests."""
    g = torch.Generator().manual_seed(11)
    u, _ = torch.linalg.qr(torch.randn(1500, 1200, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(1200, 1200, generator=g, dtype=torch.float64))
    return u, v


@pytest.mark.parametrize("true_alpha", [2.0, 3.0, 4.5])
def test_estimator_recovers_exponent_from_a_matrix_spectrum(orthogonal, true_alpha):
    u, v = orthogonal
    k = v.shape[0]
    lam = pareto(true_alpha, k, seed=3)
    weight = ((u * lam.sqrt()) @ v.T).float()  # (out x in) with singular values sqrt(lambda)
    eigenvalues = esd(weight)
    assert eigenvalues.shape == (k,)
    assert torch.allclose(eigenvalues.double(), torch.sort(lam).values, rtol=1e-3)
    alpha, _ = pl_alpha_hill(eigenvalues)
    assert abs(alpha - true_alpha) / true_alpha < 0.10


@pytest.mark.parametrize("shape", [(300, 7000), (7000, 300), (257, 257)])  # wide, tall (sliced Gram sums), square
def test_esd_is_the_squared_singular_values_of_either_orientation(shape):
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(*shape, generator=g) * torch.rand(shape[1], generator=g)  # uneven column scales
    eigenvalues = esd(weight)
    reference = torch.sort(torch.linalg.svdvals(weight.double()).square()).values
    assert eigenvalues.dtype == torch.float64 and eigenvalues.shape == (min(shape),)
    assert torch.allclose(eigenvalues, reference, rtol=1e-9, atol=1e-9 * float(reference[-1]))
    assert torch.equal(esd(weight.bfloat16()), esd(weight.bfloat16().float()))  # the weight's own values


@pytest.mark.parametrize("device", DEVICES)
def test_alpha_allocator_computes_spectra_on_the_runs_device(monkeypatch, device):
    adapter = get_adapter(tiny_model("llama"))  # weights on the host, as with --offload
    seen = []
    real = alpha_mod.esd

    def spy(weight, on=None):
        result = real(weight, on)
        seen.append((weight.device.type, result.device.type))
        return result

    monkeypatch.setattr(alpha_mod, "esd", spy)
    expected = AlphaAllocator().allocate(AllocationContext(adapter, 0.6)).block_targets
    seen.clear()
    got = AlphaAllocator().allocate(AllocationContext(adapter, 0.6, device=torch.device(device))).block_targets
    assert seen and all(w == "cpu" and e == device for w, e in seen)
    assert got == pytest.approx(expected, abs=1e-9)


def test_pl_alpha_hill_picks_the_ks_minimising_candidate_in_the_window():
    eigenvalues = pareto(2.5, 800, seed=5) * torch.exp(0.3 * torch.randn(800, dtype=torch.float64))
    e = torch.sort(eigenvalues).values
    _, lower, upper = peak_window(e)
    # brute force, one candidate at a time, with the scalar functions
    best = None
    for xmin in e[:-1].tolist():
        if lower <= xmin <= upper:
            a = hill_alpha(e, xmin)
            d = ks_distance(e, xmin, a)
            if best is None or d < best[0]:
                best = (d, a, xmin)
    assert best is not None
    alpha, xmin = pl_alpha_hill(eigenvalues)
    assert xmin == pytest.approx(best[2]) and alpha == pytest.approx(best[1], rel=1e-9)
    # without the window the search may only do as well or better on KS
    a_all, x_all = pl_alpha_hill(eigenvalues, window=None)
    assert ks_distance(e, x_all, a_all) <= best[0] + 1e-12


def test_degenerate_spectra_have_no_exponent():
    assert all(math.isnan(v) for v in pl_alpha_hill(torch.zeros(10)))
    assert all(math.isnan(v) for v in pl_alpha_hill(torch.full((10,), 2.0)))


def test_zero_matrix_gets_the_mean_exponent_and_the_target_is_still_met():
    adapter = get_adapter(tiny_model("llama"))
    zeroed = adapter.linear_layers(1)[0]
    with torch.no_grad():
        zeroed.weight.zero_()
    allocation = AlphaAllocator().allocate(AllocationContext(adapter, 0.5))
    alphas = allocation.details["layer_alpha"]
    others = [a for n, a in alphas.items() if n != zeroed.name]
    assert alphas[zeroed.name] == pytest.approx(sum(others) / len(others))
    assert weighted_mean(allocation.block_targets, adapter.block_sizes()) == pytest.approx(0.5, abs=1e-9)


# ------------------------------------------------------------------------------------------ target and bounds


@pytest.mark.parametrize("granularity", ["block", "layer"])
@pytest.mark.parametrize("eps", [0.3, 0.95])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.7, 0.9])
def test_alpha_hits_target_within_bounds(granularity, eps, target):
    adapter = get_adapter(tiny_model("llama", seed=2))
    allocation = AlphaAllocator(eps).allocate(AllocationContext(adapter, target, granularity))
    refs = adapter.all_linear_layers()
    ratios = [allocation.layer_targets[r.name] for r in refs]
    assert weighted_mean(ratios, [r.numel for r in refs]) == pytest.approx(target, abs=1e-9)
    assert weighted_mean(allocation.block_targets, adapter.block_sizes()) == pytest.approx(target, abs=1e-9)
    assert all(0.0 <= r <= 0.99 for r in ratios)
    assert len(set(ratios)) > 1  # real spectra of random matrices differ
    if eps == 0.95 and target == 0.9:
        assert 0.99 in ratios  # 1.95 x 0.9 would exceed the bound: clamped, remainder redistributed


def test_alpha_options_and_registration():
    allocator = build_allocator("alphapruning", merge(PruneConfig(), {"allocation.alpha.eps": 0.5}))
    assert isinstance(allocator, AlphaAllocator) and allocator.eps == 0.5
    assert build_allocator("alphapruning").eps == 0.3 and not AlphaAllocator.needs_calibration
    with pytest.raises(ConfigError, match="alpha.eps"):
        AlphaAllocator(eps=-1)


def test_alpha_end_to_end(tiny_dir):
    config = merge(PruneConfig(), {
        "model": str(tiny_dir("llama")), "allocation.method": "alphapruning", "sparsity": 0.7,
        "calibration.source": "embedded", "calibration.nsamples": 4, "calibration.seqlen": 32,
    })
    report = prune(config=config, progress=False).report
    assert report.allocation["method"] == "alphapruning"
    assert report.sparsity["target_met"] and report.sparsity["target"] == 0.7
    assert len(report.allocation["alpha"]) == 3 and len(set(report.allocation["block_targets"])) == 3
    json.dumps(report.to_dict())
