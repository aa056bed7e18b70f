import json

import pytest
import torch

from mrprune import PruneConfig, prune
from mrprune.allocate import AllocationContext, OwlAllocator, build_allocator, weighted_mean
from mrprune.allocate.owl import outlier_ratio, owl_sparsities
from mrprune.config import merge
from mrprune.errors import ConfigError
from mrprune.metrics import LayerStats
from mrprune.models import get_adapter
from tests.conftest import tiny_model

N_BLOCK = 36864  # tiny llama block: q 64x64, k 32x64, v 32x64, o 64x64, gate/up 128x64, down 64x128


def unit_model():
    """Tiny llama whose linear weights are all +-1 (random signs, so |W| = 1), with unit input statistics."""
    model = tiny_model("llama")
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for ref in adapter.all_linear_layers():
            signs = torch.randint(0, 2, ref.weight.shape, generator=g).float() * 2 - 1
            ref.weight.copy_(signs)
    stats = {ref.name: LayerStats(tokens=1, sq_norm=torch.ones(ref.in_features)) for ref in adapter.all_linear_layers()}
    return adapter, stats


def planted_model():
    """Outliers planted by hand; expected counts are worked out in the tests below.

    block 0: q_proj input feature 3 has sq_norm 400 (64 scores of 20); down_proj row 0 has 5 weights -50;
    block 1: up_proj column 0 is 3 (128 scores of 3: above the mean, below 5x the mean);
    block 2: gate_proj rows 0..9 are 8 (640 scores of 8).
    """
    adapter, stats = unit_model()
    layers = {ref.name: ref for ref in adapter.all_linear_layers()}
    with torch.no_grad():
        stats["model.layers.0.self_attn.q_proj"].sq_norm[3] = 400.0
        layers["model.layers.0.mlp.down_proj"].weight[0, :5] = -50.0
        layers["model.layers.1.mlp.up_proj"].weight[:, 0] = 3.0
        layers["model.layers.2.mlp.gate_proj"].weight[:10, :] = 8.0
    return adapter, stats


def run(adapter, stats, target=0.5, granularity="block", **options):
    ctx = AllocationContext(adapter, target, granularity, None, dense_stats=lambda: stats)
    return OwlAllocator(**options).allocate(ctx)


def test_owl_matches_hand_computed_block_allocation():
    adapter, stats = planted_model()
    # block means and thresholds (M = 5), by hand
    mean0 = (N_BLOCK + 64 * (20 - 1) + 5 * (50 - 1)) / N_BLOCK  # 1.0396
    mean1 = (N_BLOCK + 128 * (3 - 1)) / N_BLOCK  # 1.0069
    mean2 = (N_BLOCK + 640 * (8 - 1)) / N_BLOCK  # 1.1215
    assert 1 < 5 * mean0 < 20 and 3 < 5 * mean1 and 1 < 5 * mean2 < 8  # the plants land where intended
    d = [69 / N_BLOCK, 0.0, 640 / N_BLOCK]
    # min-max to [0, 2 * 0.08]; equal block sizes, so the weighted mean of x is the plain mean
    x = [69 / 640 * 0.16, 0.0, 0.16]
    x_mean = (x[0] + x[1] + x[2]) / 3
    expected = [0.5 - x[0] + x_mean, 0.5 - x[1] + x_mean, 0.5 - x[2] + x_mean]  # 0.54183, 0.55908, 0.39908

    allocation = run(adapter, stats)
    assert allocation.method == "owl" and allocation.target == 0.5
    assert allocation.details["outlier_ratio"] == pytest.approx(d, abs=1e-15)
    assert allocation.block_targets == pytest.approx(expected, abs=1e-12)
    assert allocation.details["m"] == 5.0 and allocation.details["lambda"] == 0.08
    json.dumps(allocation.details)  # plain floats, fit for the JSON report
    # every layer of a block carries its block's ratio
    for ref in adapter.all_linear_layers():
        assert allocation.layer_targets[ref.name] == allocation.block_targets[ref.block]


def test_owl_more_outliers_means_less_pruning():
    adapter, stats = planted_model()
    allocation = run(adapter, stats)
    d, s = allocation.details["outlier_ratio"], allocation.block_targets
    assert d[2] > d[0] > d[1]
    assert s[2] < s[0] < s[1]


def test_owl_m_option_reaches_the_allocator():
    adapter, stats = planted_model()
    config = merge(PruneConfig(), {"allocation.owl.m": 2.0, "allocation.owl.lam": 0.1})
    allocator = build_allocator("owl", config)
    assert (allocator.m, allocator.lam) == (2.0, 0.1)
    allocation = allocator.allocate(AllocationContext(adapter, 0.5, dense_stats=lambda: stats))
    # with M = 2 the 3s of block 1 (threshold 2 x 1.0069) count as outliers too
    assert allocation.details["outlier_ratio"] == pytest.approx([69 / N_BLOCK, 128 / N_BLOCK, 640 / N_BLOCK])
    x = [0.0, (128 - 69) / (640 - 69) * 0.2, 0.2]
    x_mean = sum(x) / 3
    assert allocation.block_targets == pytest.approx([0.5 - xi + x_mean for xi in x], abs=1e-12)


def test_owl_equal_outlier_ratios_give_uniform():
    adapter, stats = unit_model()
    assert run(adapter, stats, 0.6).block_targets == [0.6, 0.6, 0.6]  # no outliers anywhere
    layers = {ref.name: ref for ref in adapter.all_linear_layers()}
    with torch.no_grad():
        for block in range(3):  # the same plant in every block
            layers[f"model.layers.{block}.mlp.up_proj"].weight[:4, :] = 30.0
    allocation = run(adapter, stats, 0.6)
    assert allocation.details["outlier_ratio"] == [256 / N_BLOCK] * 3
    assert allocation.block_targets == [0.6, 0.6, 0.6]


def test_owl_layer_granularity_matches_hand_computation_and_covers_every_layer():
    adapter, stats = planted_model()
    allocation = run(adapter, stats, granularity="layer")
    names = [ref.name for ref in adapter.all_linear_layers()]
    assert sorted(allocation.layer_targets) == sorted(names) and len(names) == 21
    ratios = allocation.details["outlier_ratio"]
    assert sorted(ratios) == sorted(names)
    # per-layer means: q0 (4096 + 64*19)/4096 = 1.297 -> 64 outliers; down0 (8192 + 5*49)/8192 -> 5;
    # up1 (8192 + 128*2)/8192 = 1.031 -> 3 < 5.16, none; gate2 (8192 + 640*7)/8192 = 1.547 -> 8 > 7.73, 640
    special = {
        "model.layers.0.self_attn.q_proj": (64 / 4096, 4096),
        "model.layers.0.mlp.down_proj": (5 / 8192, 8192),
        "model.layers.2.mlp.gate_proj": (640 / 8192, 8192),
    }
    for name in names:
        assert ratios[name] == pytest.approx(special.get(name, (0.0,))[0], abs=1e-15)
    d_max = 640 / 8192
    x = {name: d / d_max * 0.16 for name, (d, _) in special.items()}
    x_mean = sum(x[name] * n for name, (_, n) in special.items()) / (3 * N_BLOCK)  # other layers have x = 0
    for name in names:
        assert allocation.layer_targets[name] == pytest.approx(0.5 - x.get(name, 0.0) + x_mean, abs=1e-12)
    sizes = {ref.name: ref.numel for ref in adapter.all_linear_layers()}
    mean = sum(allocation.layer_targets[n] * sizes[n] for n in names) / sum(sizes.values())
    assert mean == pytest.approx(0.5, abs=1e-12)
    # block targets are the size-weighted means of their layers
    for block in range(3):
        refs = adapter.linear_layers(block)
        expected = sum(allocation.layer_targets[r.name] * r.numel for r in refs) / N_BLOCK
        assert allocation.block_targets[block] == pytest.approx(expected, abs=1e-12)


def test_outlier_ratio_counts_strictly_above_m_times_mean_without_concatenation():
    w1 = torch.tensor([[1.0, -1.0], [1.0, 1.0]])
    w2 = torch.tensor([[10.0, 1.0, 1.0]])
    s1, s2 = torch.ones(2), torch.tensor([1.0, 4.0, 1.0])  # scores: w1 all 1; w2 [10, 2, 1]
    # mean = (4 + 13) / 7; threshold at M=2: 4.857 -> only the 10 is an outlier
    assert outlier_ratio([(w1, s1), (w2, s2)], 2.0) == pytest.approx(1 / 7)
    # M=0.5: threshold 1.214 -> 10 and 2
    assert outlier_ratio([(w1, s1), (w2, s2)], 0.5) == pytest.approx(2 / 7)


def test_owl_sparsities_are_parameter_weighted():
    # sizes differ: the weighted mean of x (not the plain mean) is subtracted, so the weighted target is exact
    raw = owl_sparsities([0.0, 0.01, 0.02], [1, 1, 2], 0.5, 0.1)
    x = [0.0, 0.1, 0.2]
    x_mean = (0.0 + 0.1 + 2 * 0.2) / 4
    assert raw == pytest.approx([0.5 - xi + x_mean for xi in x], abs=1e-15)
    assert weighted_mean(raw, [1, 1, 2]) == pytest.approx(0.5, abs=1e-15)


def random_setup(seed=0):
    """Random weights and heavy-tailed input norms: blocks differ in outlier ratio."""
    adapter = get_adapter(tiny_model("llama", seed))
    g = torch.Generator().manual_seed(seed)
    stats = {ref.name: LayerStats(tokens=1, sq_norm=torch.exp(3 * torch.randn(ref.in_features, generator=g)))
             for ref in adapter.all_linear_layers()}
    return adapter, stats


@pytest.mark.parametrize("granularity", ["block", "layer"])
@pytest.mark.parametrize("lam", [0.08, 0.6])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.7, 0.9])
def test_owl_hits_target_within_bounds(granularity, lam, target):
    adapter, stats = random_setup()
    allocation = run(adapter, stats, target, granularity, lam=lam)
    refs = adapter.all_linear_layers()
    ratios = [allocation.layer_targets[r.name] for r in refs]
    assert weighted_mean(ratios, [r.numel for r in refs]) == pytest.approx(target, abs=1e-9)
    assert weighted_mean(allocation.block_targets, adapter.block_sizes()) == pytest.approx(target, abs=1e-9)
    assert all(0.0 <= r <= 0.99 for r in ratios)
    assert len(set(ratios)) > 1  # the random setup is not uniform
    if lam == 0.6 and target in (0.3, 0.9):
        assert 0.0 in ratios or 0.99 in ratios  # the clamp was needed and the remainder redistributed


def test_owl_needs_dense_stats_and_valid_options():
    adapter, _ = unit_model()
    with pytest.raises(ValueError, match="dense"):
        OwlAllocator().allocate(AllocationContext(adapter, 0.5))
    with pytest.raises(ConfigError, match="owl.m"):
        OwlAllocator(m=0)
    with pytest.raises(ConfigError, match="owl.lam"):
        OwlAllocator(lam=-0.1)


def test_owl_end_to_end(tiny_dir):
    config = merge(PruneConfig(), {
        "model": str(tiny_dir("llama")), "allocation.method": "owl", "sparsity": 0.6,
        "calibration.source": "embedded", "calibration.nsamples": 4, "calibration.seqlen": 32,
    })
    report = prune(config=config, progress=False).report
    assert report.allocation["method"] == "owl"
    assert report.sparsity["target_met"] and report.sparsity["target"] == 0.6
    assert len(report.allocation["outlier_ratio"]) == 3
    json.dumps(report.to_dict())
