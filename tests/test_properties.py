"""Property tests (hypothesis): masks prune exact counts whatever the shape, sparsity, pattern or forced weights;
allocators meet their weighted target within bounds whatever the inputs; the config loader either builds a
config or raises ConfigError, never anything else."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mrprune.allocate.alpha import alpha_sparsities
from mrprune.allocate.fit import LOWER, UPPER, fit_to_target, weighted_mean
from mrprune.allocate.owl import owl_sparsities
from mrprune.config import PruneConfig, from_dict
from mrprune.errors import ConfigError
from mrprune.metrics.masks import lowest_in_matrix, lowest_n_of_m, lowest_per_row, select_mask, target_count
from mrprune.metrics.pattern import SparsityPattern

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def scores_and_forced(rows, cols, seed, ties, forced_fraction):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (rows, cols), generator=g).float() if ties else torch.rand(rows, cols, generator=g)
    forced = torch.rand(rows, cols, generator=g) < forced_fraction if forced_fraction > 0 else None
    return scores, forced


def assert_lowest_pruned(scores, mask, forced, per_row):
    """No kept weight scores below a pruned (not forced) one, within a row or the whole matrix."""
    free_pruned = mask if forced is None else mask & ~forced
    kept = ~mask
    if per_row:
        for r in range(scores.shape[0]):
            if free_pruned[r].any() and kept[r].any():
                assert scores[r][free_pruned[r]].max() <= scores[r][kept[r]].min()
    elif free_pruned.any() and kept.any():
        assert scores[free_pruned].max() <= scores[kept].min()


shape = st.tuples(st.integers(1, 12), st.integers(1, 24))


@FAST
@given(shape=shape, sparsity=st.floats(0, 1), seed=st.integers(0, 2**16), ties=st.booleans(),
       forced_fraction=st.sampled_from([0.0, 0.1, 0.5, 0.9]))
def test_per_row_masks_are_exact_even_and_keep_forced(shape, sparsity, seed, ties, forced_fraction):
    rows, cols = shape
    scores, forced = scores_and_forced(rows, cols, seed, ties, forced_fraction)
    count = target_count(rows * cols, sparsity)
    mask = lowest_per_row(scores, count, forced)
    forced_total = 0 if forced is None else int(forced.sum())
    assert int(mask.sum()) == min(max(count, forced_total), rows * cols)
    per_row = mask.sum(1)
    if forced is None:
        assert int(per_row.max() - per_row.min()) <= 1
    else:
        assert bool((mask | ~forced).all())  # forced weights stay pruned
        floor = forced.sum(1)
        free_rows = per_row > floor  # rows above their forced count share the rest evenly
        if free_rows.any():
            assert int(per_row[free_rows].max() - per_row[free_rows].min()) <= 1
            assert bool((per_row[~free_rows] >= per_row[free_rows].min() - 1).all())
    assert_lowest_pruned(scores, mask, forced, per_row=True)


@FAST
@given(shape=shape, sparsity=st.floats(0, 1), seed=st.integers(0, 2**16), ties=st.booleans(),
       forced_fraction=st.sampled_from([0.0, 0.2, 0.7]))
def test_matrix_masks_are_exact_and_keep_forced(shape, sparsity, seed, ties, forced_fraction):
    rows, cols = shape
    scores, forced = scores_and_forced(rows, cols, seed, ties, forced_fraction)
    count = target_count(rows * cols, sparsity)
    mask = lowest_in_matrix(scores, count, forced)
    forced_total = 0 if forced is None else int(forced.sum())
    assert int(mask.sum()) == max(count, forced_total)
    if forced is not None:
        assert bool((mask | ~forced).all())
    assert_lowest_pruned(scores, mask, forced, per_row=False)


@FAST
@given(rows=st.integers(1, 10), groups=st.integers(1, 6), m=st.integers(2, 8), data=st.data(),
       seed=st.integers(0, 2**16), ties=st.booleans(), with_forced=st.booleans())
def test_n_of_m_masks_prune_exactly_n_in_every_group(rows, groups, m, data, seed, ties, with_forced):
    n = data.draw(st.integers(1, m - 1))
    pattern = SparsityPattern(n, m)
    cols = groups * m
    scores, _ = scores_and_forced(rows, cols, seed, ties, 0.0)
    forced = None
    if with_forced:  # any number forced per group (a dequantised checkpoint can have more than n zeros)
        g = torch.Generator().manual_seed(seed + 1)
        keys = torch.rand(rows, groups, m, generator=g)
        k = data.draw(st.integers(0, m))
        forced = (keys.argsort(-1).argsort(-1) < k).reshape(rows, cols)
    mask = lowest_n_of_m(scores, pattern, forced)
    per_group = mask.reshape(rows, groups, m).sum(-1)
    if forced is None:
        assert bool((per_group == n).all())
    else:  # exactly n, or every forced weight where a group has more
        assert bool((mask | ~forced).all())
        assert bool((per_group == forced.reshape(rows, groups, m).sum(-1).clamp(min=n)).all())
    assert select_mask(scores, 0.0, pattern, "row", forced).equal(mask)


# ------------------------------------------------------------------------------------------------ allocators

ratios_and_sizes = st.integers(1, 12).flatmap(lambda k: st.tuples(
    st.lists(st.floats(-1.0, 2.0), min_size=k, max_size=k),
    st.lists(st.integers(1, 10**7), min_size=k, max_size=k)))


def assert_fitted(fitted, sizes, target):
    assert all(LOWER <= r <= UPPER for r in fitted)
    assert weighted_mean(fitted, sizes) == pytest.approx(target, abs=1e-9)


@FAST
@given(rs=ratios_and_sizes, target=st.floats(0.0, 0.99))
def test_fit_to_target_meets_the_weighted_target_within_bounds(rs, target):
    ratios, sizes = rs
    assert_fitted(fit_to_target(ratios, sizes, target), sizes, target)


@FAST
@given(rs=ratios_and_sizes, target=st.floats(0.0, 0.95), lam=st.floats(0.0, 0.3))
def test_owl_mapping_meets_the_target(rs, target, lam):
    raw_ratios, sizes = rs
    outlier = [abs(r) / 2 for r in raw_ratios]  # outlier ratios live in [0, 1]
    raw = owl_sparsities(outlier, sizes, target, lam)
    assert weighted_mean(raw, sizes) == pytest.approx(target, abs=1e-9)
    assert_fitted(fit_to_target(raw, sizes, target), sizes, target)


@FAST
@given(rs=ratios_and_sizes, target=st.floats(0.0, 0.95), eps=st.floats(0.0, 0.9))
def test_alphapruning_mapping_meets_the_target(rs, target, eps):
    raw_alphas, sizes = rs
    alphas = [1.5 + 3 * abs(a) for a in raw_alphas]  # heavy-tail exponents
    raw = alpha_sparsities(alphas, sizes, target, eps)
    assert weighted_mean(raw, sizes) == pytest.approx(target, abs=1e-9)
    assert_fitted(fit_to_target(raw, sizes, target), sizes, target)


# ---------------------------------------------------------------------------------------------- config fuzz


KNOWN_KEYS = sorted({"model", "metric", "sparsity", "pattern", "allocation", "calibration", "sparsegpt", "runtime",
                     "evaluate", "evaluation", "output", "overwrite", "method", "ratios", "granularity", "owl",
                     "alpha", "mrp", "m", "lam", "eps", "s0", "s0_gap", "smax", "step", "min_step", "gamma",
                     "checkpoint_stride", "source", "column", "nsamples", "seqlen", "seed", "blocksize", "percdamp",
                     "device", "dtype", "offload", "offload_activations", "batch_size", "trust_remote_code",
                     "allow_pickle", "checkpoint_dir", "resume", "remove_checkpoint", "preflight", "text",
                     "max_windows", "bos", "tasks", "limit", "num_fewshot", "task_data"})
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8), st.integers(-3, 3))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-10**400, 10**400), st.floats(),
                    st.text(max_size=12), st.sampled_from(["wanda", "sparsegpt", "2:4", "3:x", "file", "mrp", "auto",
                                                           "cpu", "embedded", "0.5", "unstructured", "layer"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.dictionaries(keys, values, max_size=6))
def test_config_loader_builds_or_raises_config_error(data):
    try:
        config = from_dict(PruneConfig, data)
        config.validate()
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(config, PruneConfig)


@settings(max_examples=100, deadline=None)
@given(section=st.sampled_from(["allocation", "calibration", "runtime", "evaluation", "sparsegpt"]),
       inner=st.dictionaries(st.sampled_from(KNOWN_KEYS), scalars, max_size=5))
def test_config_sections_build_or_raise_config_error(section, inner):
    try:
        from_dict(PruneConfig, {section: inner}).validate()
    except ConfigError:
        pass


def test_huge_numbers_are_config_errors_not_crashes():
    with pytest.raises(ConfigError, match="sparsity"):
        from_dict(PruneConfig, {"sparsity": 10**400})
    assert math.isnan(from_dict(PruneConfig, {"sparsity": float("nan")}).sparsity)
    with pytest.raises(ConfigError, match="sparsity must be in"):
        from_dict(PruneConfig, {"sparsity": float("nan")}).validate()
