import math

import pytest
import torch

from mrprune import PruneConfig, prune
from mrprune.allocate import AllocationContext
from mrprune.allocate.mrp import MrpRun, Unit, layer_counts_for, most_redundant
from mrprune.config import MrpConfig, merge
from mrprune.errors import ConfigError
from mrprune.metrics import SparsityPattern, build_metric
from mrprune.models import get_adapter
from mrprune.redundancy import RedundancyCurve
from mrprune.runner import SequentialPruner
from tests.conftest import VOCAB, tiny_model

IDS = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))


def mrp_run(metric="wanda", target=0.6, granularity="block", model=None, device="cpu", **options):
    model = model or tiny_model("llama")
    adapter = get_adapter(model)
    pruner = SequentialPruner(adapter, build_metric(metric), SparsityPattern(), torch.device(device), progress=False)
    dense = pruner.observe(IDS)
    ctx = AllocationContext(adapter, target, granularity, None, dense_stats=lambda: dense)
    opts = {"step": 0.05, "min_step": 0.01, **options}
    return MrpRun(MrpConfig(**opts), ctx, pruner, IDS)


def weights_zero_mask(adapter):
    return {ref.name: (ref.weight == 0).clone() for ref in adapter.all_linear_layers()}


def test_most_redundant_picks_highest_non_outlier_ratio_below_cap():
    units = [Unit(i, i, []) for i in range(4)]
    ratios = [0.90, 0.97, 0.97, 0.99]
    zeros = {0: 10, 1: 10, 2: 10, 3: 50}
    caps = {0: 50, 1: 50, 2: 50, 3: 50}  # unit 3 is at its cap
    assert most_redundant(units, ratios, zeros, caps).index == 1  # tie between 1 and 2: lowest index
    assert most_redundant(units, ratios, {i: 50 for i in range(4)}, caps) is None


def test_first_pick_is_the_block_without_outliers():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(3)
    for ref in adapter.all_linear_layers():
        shape = ref.weight.shape
        if ref.block == 1:  # constant magnitude: no score is 5x the mean, the block is maximally redundant
            ref.set_weight(torch.where(torch.rand(shape, generator=g) < 0.5, -0.02, 0.02))
        else:  # heavy-tailed magnitudes: many outliers
            ref.set_weight(0.02 * torch.randn(shape, generator=g) * torch.exp(1.5 * torch.randn(shape, generator=g)))
    run = mrp_run(model=model)
    allocation, _ = run.run()
    trace = allocation.details["trace"]
    assert trace[0]["unit"] == "1"
    assert trace[0]["non_outlier_ratios"][1] == max(trace[0]["non_outlier_ratios"])
    assert allocation.block_targets[1] == max(allocation.block_targets)


@pytest.mark.parametrize("metric", ["magnitude", "wanda", "sparsegpt"])
def test_stops_exactly_at_target_respects_smax_and_masks_nest(metric, device):
    run = mrp_run(metric, target=0.6, s0=0.5, smax=0.64, device=device)
    adapter = run.adapter
    run.prepare()
    run.uniform_start()
    start = weights_zero_mask(adapter)
    run.iterate()
    final = weights_zero_mask(adapter)
    for name, mask in start.items():
        assert final[name][mask].all(), f"{name}: a weight pruned at the start came back"
    refs = adapter.all_linear_layers()
    total = sum(ref.numel for ref in refs)
    assert sum(int(m.sum()) for m in final.values()) == round(0.6 * total)
    for unit in run.units:
        assert unit.zeros() <= int(0.64 * unit.numel)
    assert len(run.trace) >= 2 and run.trace[-1]["global_sparsity"] == pytest.approx(0.6, abs=1e-5)


def test_step_decays_to_its_floor_and_is_clipped_at_the_cap_and_the_target():
    from mrprune.allocate.mrp import next_step, smax_caps

    opt = MrpConfig(step=0.05, gamma=0.5, min_step=0.01)
    assert next_step(opt, 0, 1000, 10**6, 10**6) == (0.05, 50)
    assert next_step(opt, 1, 1000, 10**6, 10**6) == (0.025, 25)
    assert next_step(opt, 9, 1000, 10**6, 10**6) == (0.01, 10)  # 0.05 * 0.5^9 is below the floor
    assert next_step(opt, 0, 1000, 7, 10**6)[1] == 7  # s_max headroom
    assert next_step(opt, 0, 1000, 10**6, 3)[1] == 3  # what the target still needs
    assert next_step(opt, 0, 10, 10**6, 10**6)[1] == 1  # a step rounding to nothing still prunes one weight
    run = mrp_run(target=0.6)
    caps = smax_caps(run.units, 0.95)
    assert all(caps[u.index] <= 0.95 * u.numel < caps[u.index] + 1 for u in run.units)


def test_every_iteration_is_logged_at_debug_level(caplog):
    """A loop of hours on a large model: with -v every iteration's unit, step and global sparsity are in the log."""
    run = mrp_run(target=0.6, s0=0.5, smax=0.7)
    run.prepare()
    run.uniform_start()
    with caplog.at_level("DEBUG", logger="mrprune.allocate.mrp"):
        run.iterate()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MRP iteration")]
    assert len(lines) == len(run.trace) >= 2
    last = run.trace[-1]
    assert lines[-1] == (f"MRP iteration {last['iteration']}: unit {last['unit']} raised by {last['step']:.4f} to "
                         f"{last['sparsity']:.4f}, global sparsity {last['global_sparsity']:.4f}")


def full_pass_statistics(run, dense_weights=None):
    """Every layer's input sq_norm from one pass over the current model; with ``dense_weights`` each block's
    internal activations come from its dense weights (inputs from the pruned blocks before it)."""
    from mrprune.calibrate import StatsCollector, run_block

    pruner, adapter = run.pruner, run.adapter
    acts = pruner.capture(IDS)
    stats = {}
    for index, block in enumerate(adapter.blocks):
        layers = adapter.linear_layers(index)
        current = {ref.name: ref.weight.clone() for ref in layers}
        if dense_weights is not None:
            for ref in layers:
                ref.set_weight(dense_weights[ref.name])
        with StatsCollector(layers, True, False) as collector:
            run_block(block, acts.calls[index], acts.hidden, pruner.batch_size, pruner.device, write_back=False)
        stats.update({name: s.sq_norm for name, s in collector.result().items()})
        for ref in layers:
            ref.set_weight(current[ref.name])
        pruner.advance(acts)
    return stats


@pytest.mark.parametrize("activations", ["dense-block", "pruned-block"])
def test_incremental_statistics_equal_a_full_recomputation(activations):
    dense_model = tiny_model("llama")
    dense = {ref.name: ref.weight.clone() for ref in get_adapter(dense_model).all_linear_layers()}
    run = mrp_run(target=0.6, s0=0.45, activations=activations)
    run.prepare()
    run.uniform_start()
    run.iterate()
    run.refresh()
    full = full_pass_statistics(run, dense if activations == "dense-block" else None)
    for name, sq_norm in run.sq_norm.items():
        torch.testing.assert_close(sq_norm, full[name], rtol=1e-5, atol=1e-6)


def test_dense_block_outlier_ratio_rises_with_a_blocks_own_sparsity():
    """The spec's rationale: pruning a block's low scores leaves relatively more outliers among its survivors."""
    run = mrp_run(target=0.6, s0=0.3, m=5.0)  # a tiny random model has few scores above 10x the mean
    run.prepare()
    run.uniform_start()
    before = run.ratios()
    unit = run.units[1]
    run.prune_unit(unit, int(0.6 * unit.numel))
    run.refresh()
    after = run.ratios()
    assert after[1] < before[1]  # non-outlier ratio fell: the block became less redundant
    assert after[0] == before[0]  # blocks before it are untouched


def test_checkpoint_stride_does_not_change_the_result():
    results = []
    for stride in (1, 2, 3):
        run = mrp_run(target=0.6, s0=0.45, checkpoint_stride=stride)
        allocation, _ = run.run()
        results.append((allocation.details["trace"], weights_zero_mask(run.adapter)))
    for trace, masks in results[1:]:
        assert trace == results[0][0]
        assert all(torch.equal(masks[k], results[0][1][k]) for k in masks)


def test_layer_granularity_allocates_per_linear_layer():
    run = mrp_run(target=0.55, granularity="layer", s0=0.5)
    allocation, records = run.run()
    assert len(run.units) == 21 and "." in allocation.details["trace"][0]["unit"]
    assert sum(r.zeros for r in records) == round(0.55 * sum(r.numel for r in records))
    assert len(set(round(v, 4) for v in allocation.layer_targets.values())) > 1


def test_layer_counts_keep_existing_zeros():
    model = tiny_model("llama")
    unit = Unit(0, 0, get_adapter(model).linear_layers(0))
    unit.layers[0].weight[:, :40] = 0.0  # 40 of 64 columns already pruned in q_proj
    counts = layer_counts_for(unit, unit.numel // 2)
    assert sum(counts.values()) == unit.numel // 2
    assert counts[unit.layers[0].name] >= 40 * 64


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="s_max"):
        mrp_run(target=0.6, smax=0.5)
    with pytest.raises(ConfigError, match="s0"):
        mrp_run(target=0.6, s0=0.7)
    with pytest.raises(ConfigError, match="min_step"):
        mrp_run(target=0.6, step=0.01, min_step=0.02)


def test_mrp_through_the_api_reports_its_trace(tiny_dir, tmp_path):
    config = merge(PruneConfig(), {
        "model": str(tiny_dir("qwen2")), "metric": "wanda", "sparsity": 0.6, "allocation.method": "mrp",
        "allocation.mrp.step": 0.05, "calibration.source": "embedded", "calibration.nsamples": 4,
        "calibration.seqlen": 32, "output": str(tmp_path / "out"),
    })
    report = prune(config=config, progress=False).report
    assert report.sparsity["target_met"] and abs(report.sparsity["deviation_weights"]) <= 0.5
    assert report.allocation["method"] == "mrp" and report.allocation["iterations"] == len(report.allocation["trace"])
    assert report.allocation["redundancy_spread"]["cv"] >= 0
    with pytest.raises(ConfigError, match="cannot be combined"):
        merge(config, {"pattern": "2:4", "sparsity": None}).validate()


@pytest.mark.parametrize("pilot", ["plan", "dense", "start"])
@pytest.mark.parametrize("metric", ["wanda", "sparsegpt"])
def test_fast_mrp_hits_target_within_bounds(metric, pilot, device):
    from mrprune.allocate.mrp_fast import FastMrpRun

    run = mrp_run(metric, target=0.6, s0=0.5, smax=0.7, device=device, pilot=pilot)
    run = FastMrpRun(run.opt, run.ctx, run.pruner, IDS)
    allocation, records = run.run()
    assert sum(r.zeros for r in records) == round(0.6 * sum(r.numel for r in records))
    assert all(0.5 - 1e-3 <= s <= 0.7 + 1e-3 for s in allocation.block_targets)
    assert len(allocation.details["trace"]) == 3
    if pilot != "dense":  # the pilot pass pruned every block only to move on: the model ends as planned
        assert run.pruner.timer.seconds["pilot"] > 0


def test_fast_mrp_agrees_with_exact_on_the_most_redundant_block():
    from mrprune.allocate.mrp_fast import FastMrpRun

    model = tiny_model("llama")
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(3)
    for ref in adapter.all_linear_layers():
        shape = ref.weight.shape
        scale = 0.5 if ref.block == 1 else 1.5  # block 1 has a lighter tail: fewer outliers
        ref.set_weight(0.02 * torch.randn(shape, generator=g) * torch.exp(scale * torch.randn(shape, generator=g)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    exact, _ = mrp_run(model=model, target=0.6, s0=0.5, step=0.02, min_step=0.005).run()
    model.load_state_dict(state)
    base = mrp_run(model=model, target=0.6, s0=0.5)
    fast, _ = FastMrpRun(base.opt, base.ctx, base.pruner, IDS).run()
    for allocation in (exact, fast):
        assert allocation.block_targets[1] == max(allocation.block_targets)
    assert max(abs(a - b) for a, b in zip(exact.block_targets, fast.block_targets)) < 0.05


def test_pilot_curves_see_the_pruned_upstream_and_leave_the_model_dense():
    from mrprune.allocate.mrp import unit_counts
    from mrprune.allocate.mrp_fast import FastMrpRun, unit_curve
    from mrprune.redundancy import thresholds

    base = mrp_run(target=0.6, s0=0.5)
    run = FastMrpRun(base.opt, base.ctx, base.pruner, IDS)
    before = {ref.name: ref.weight.clone() for ref in run.adapter.all_linear_layers()}
    dense = {name: s.sq_norm for name, s in base.ctx.dense_stats().items()}
    run.tau = thresholds([unit_counts(u, dense, None) for u in run.units], 1.0)  # M 1: many outliers to move
    dense_curves = [unit_curve(u, dense, run.tau[u.index]) for u in run.units]
    unpruned = run.curves_pruned_to([0.0] * len(run.units))
    pruned = run.curves_pruned_to([0.9] * len(run.units))
    for ref in run.adapter.all_linear_layers():
        assert torch.equal(ref.weight, before[ref.name])  # each block pruned only to move on, then restored
    for dense_curve, curve in zip(dense_curves, unpruned):  # nothing pruned upstream: the dense curves
        assert torch.allclose(curve.ratios(), dense_curve.ratios())
    assert torch.allclose(pruned[0].ratios(), dense_curves[0].ratios())  # block 0 has no upstream
    assert any(not torch.allclose(p.ratios(), d.ratios()) for p, d in zip(pruned[1:], dense_curves[1:]))


@pytest.mark.parametrize("masks", ["nested", "one-shot"])
def test_fast_mrp_nested_masks_hold_the_dense_start_mask(masks, device):
    """Nested (the default) without a start pilot: every layer's final mask contains Wanda's mask at s0 from the
    dense statistics, standing in for the exact loop's uniform start; one-shot masks come from the current
    statistics alone."""
    from mrprune.allocate.mrp_fast import FastMrpRun
    from mrprune.metrics.masks import select_mask
    from mrprune.metrics.wanda import wanda_scores

    base = mrp_run(target=0.6, s0=0.5, smax=0.8, masks=masks, device=device, pilot="plan")
    adapter = base.adapter
    dense = base.ctx.dense_stats()
    start = {ref.name: select_mask(wanda_scores(ref.weight.float().cpu(), dense[ref.name].sq_norm.cpu()), 0.5,
                                   SparsityPattern(), group="row") for ref in adapter.all_linear_layers()}
    allocation, records = FastMrpRun(base.opt, base.ctx, base.pruner, IDS).run()
    assert allocation.details["masks"] == masks
    assert sum(r.zeros for r in records) == round(0.6 * sum(r.numel for r in records))
    held = {ref.name: bool((ref.weight.cpu()[start[ref.name]] == 0).all()) for ref in adapter.all_linear_layers()}
    if masks == "nested":
        assert all(held.values())
    else:  # downstream statistics moved with the pruned upstream blocks: some start weights survive
        assert not all(held.values())


def test_fast_mrp_start_pilot_nests_the_exact_loops_own_start_mask(device):
    """With the 'start' pilot (the default), the first leg of the nested masks is the exact loop's uniform start
    itself (Wanda at s0 with the statistics of the model pruned uniformly to s0), not a stand-in from the dense
    statistics (the 'plan' pilot's)."""
    from mrprune.allocate.mrp_fast import FastMrpRun

    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    exact = mrp_run(model=model, target=0.6, s0=0.5, smax=0.8, device=device)
    exact.prepare()
    exact.uniform_start()
    loop_start = weights_zero_mask(exact.adapter)
    model.load_state_dict(state)
    dense_start = mrp_run(model=model, target=0.6, s0=0.5, smax=0.8, device=device, pilot="plan")
    FastMrpRun(dense_start.opt, dense_start.ctx, dense_start.pruner, IDS).run()
    held_dense = [bool(m[loop_start[n]].all()) for n, m in weights_zero_mask(dense_start.adapter).items()]
    model.load_state_dict(state)
    base = mrp_run(model=model, target=0.6, s0=0.5, smax=0.8, device=device)  # the default pilot
    allocation, records = FastMrpRun(base.opt, base.ctx, base.pruner, IDS).run()
    assert allocation.details["masks"] == "nested" and allocation.details["pilot"] == "start"
    assert sum(r.zeros for r in records) == round(0.6 * sum(r.numel for r in records))
    for name, zeros in weights_zero_mask(base.adapter).items():
        assert bool(zeros[loop_start[name]].all()), name
    assert not all(held_dense)  # the dense statistics' start mask is another one after block 0


def test_fast_mrp_nests_only_where_the_dense_pass_kept_the_statistics():
    from mrprune.allocate.mrp_fast import FastMrpRun

    base = mrp_run("sparsegpt", target=0.6, s0=0.5)
    allocation, _ = FastMrpRun(base.opt, base.ctx, base.pruner, IDS).run()
    assert allocation.details["masks"] == "one-shot"  # SparseGPT's Hessians are not kept from the dense pass


def curve_with_ratio(ratio: float, rows: int = 64, width: int = 100) -> RedundancyCurve:
    """A curve whose outlier ratio at sparsity 0.5 is ``ratio`` (all rows alike, counts below the survivors)."""
    return RedundancyCurve([(torch.full((rows,), 10), width)]).scaled(ratio / 0.2)


def test_drift_forecast_extrapolates_each_units_own_pilot_drift():
    """Later units are forecast from their own move between the dense pass and the pilot (log-linear fit on the
    reached units): a unit that lost outliers in the pilot is forecast to lose more, one that gained to gain."""
    from mrprune.allocate.mrp_fast import DriftForecast

    pilot_moves = [0.8, 0.9, 1.0, 1.1, 1.25, 0.7, 1.4]
    dense = [curve_with_ratio(0.01) for _ in pilot_moves]
    pilot = [curve_with_ratio(0.01 * a) for a in pilot_moves]
    c, k = 0.05, 1.5
    true = [curve_with_ratio(0.01 * a * math.exp(c) * a ** k) for a in pilot_moves]
    forecast = DriftForecast(dense, pilot, 0.5, model="per-unit")
    for i in range(3):
        forecast.observe(i, true[i])
        assert forecast.scale(5, fallback=1.23) == 1.23  # too few points: the global scale
    forecast.observe(3, true[3])
    forecast.observe(4, true[4])
    assert forecast.fit == pytest.approx((c, k), rel=1e-3)
    for j in (5, 6):  # never observed: forecast from their own pilot drift
        assert forecast.scale(j, fallback=1.0) == pytest.approx(math.exp(c) * pilot_moves[j] ** k, rel=1e-3)
    assert forecast.scale(5, 1.0) < 1.0 < forecast.scale(6, 1.0)
    assert forecast.scale(5, 1.0, excess=0.5) == forecast.scale(5, 1.0)  # the per-unit line ignores the excess
    resumed = DriftForecast(dense, pilot, 0.5, points=forecast.points, model="per-unit")  # as a resumed run does
    assert resumed.fit == forecast.fit
    no_outliers = DriftForecast([curve_with_ratio(0.0)] + dense[1:], pilot, 0.5, points=forecast.points,
                                model="per-unit")
    assert no_outliers.scale(0, fallback=0.9) == 0.9  # its drift is undefined: the global scale


def test_upstream_drift_forecast_grows_with_the_pruning_upstream():
    """The default forecast: a later unit's log drift is a e + k x, so the more is pruned upstream of it beyond s0,
    the more it drifts; until that fit has enough points (or where the excess has no spread) the per-unit line
    stands in, and before that the global scale."""
    from mrprune.allocate.mrp_fast import DriftForecast

    pilot_moves = [0.8, 0.9, 1.0, 1.1, 1.25, 0.7, 1.4]
    excess = [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06]
    dense = [curve_with_ratio(0.01) for _ in pilot_moves]
    pilot = [curve_with_ratio(0.01 * m) for m in pilot_moves]
    a, k = 5.0, 0.5
    true = [curve_with_ratio(0.01 * m * math.exp(a * e) * m ** k) for m, e in zip(pilot_moves, excess)]
    forecast = DriftForecast(dense, pilot, 0.5)
    for i in range(3):
        forecast.observe(i, true[i], excess[i])
    assert forecast.scale(5, fallback=1.23, excess=0.05) == 1.23  # too few points: the global scale
    forecast.observe(3, true[3], excess[3])
    forecast.observe(4, true[4], excess[4])
    assert forecast.upstream_fit == pytest.approx((a, k), rel=1e-3)
    for j in (5, 6):
        assert forecast.scale(j, 1.0, excess[j]) == pytest.approx(math.exp(a * excess[j]) * pilot_moves[j] ** k,
                                                                  rel=1e-3)
        assert forecast.scale(j, 1.0, 0.2) > forecast.scale(j, 1.0, excess[j])  # more pruned upstream: more drift
    resumed = DriftForecast(dense, pilot, 0.5, points=[list(p) for p in forecast.points])  # from checkpoint JSON
    assert resumed.upstream_fit == forecast.upstream_fit
    flat = DriftForecast(dense, pilot, 0.5)  # no excess anywhere yet: only the per-unit line can be fitted
    for i in range(5):
        flat.observe(i, true[i], 0.0)
    assert flat.upstream_fit is None and flat.fit is not None
    assert flat.scale(5, 1.0, 0.3) == pytest.approx(math.exp(flat.fit[0]) * pilot_moves[5] ** flat.fit[1])


def test_fast_mrp_drift_forecasts(device):
    """Per layer (7 units a block; M 3 so that units have outliers), the upstream and per-unit forecasts take over
    from the global scale once units with different pilot drifts are reached and move the plan; all hit the target, and
    without a pilot there is nothing per unit to forecast from."""
    from mrprune.allocate.mrp_fast import FastMrpRun

    allocations = {}
    for drift in ("upstream", "per-unit", "global"):
        base = mrp_run(target=0.6, granularity="layer", s0=0.5, smax=0.8, m=3.0, device=device, drift=drift)
        allocation, records = FastMrpRun(base.opt, base.ctx, base.pruner, IDS).run()
        assert sum(r.zeros for r in records) == round(0.6 * sum(r.numel for r in records))
        assert allocation.details["drift"] == drift
        trace = allocation.details["trace"]
        fitted = [i for i, step in enumerate(trace) if "drift_fit" in step]
        assert bool(fitted) == (drift != "global")
        assert any("upstream_fit" in step for step in trace) == (drift == "upstream")
        assert all(i >= 7 for i in fitted)  # block 0's 7 layers have no upstream: no spread to fit a slope on
        allocations[drift] = allocation.layer_targets
    assert allocations["per-unit"] != allocations["global"]
    assert allocations["upstream"] != allocations["per-unit"]
    base = mrp_run(target=0.6, granularity="layer", s0=0.5, smax=0.8, m=3.0, device=device, pilot="dense")
    allocation, _ = FastMrpRun(base.opt, base.ctx, base.pruner, IDS).run()
    assert allocation.details["drift"] == "global"
