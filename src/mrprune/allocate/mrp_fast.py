"""Fast MRP: the fixed point of Maximum Redundancy Pruning in a few passes instead of one pass per iteration.

Exact MRP raises the least-outlier unit step by step until the target, so at the end every unit it raised has
(about) the same outlier ratio D, units it never raised sit at the start s0 with a higher D, and units at s_max
a lower one. Because each row loses its lowest scores first, a unit's D as a function of its own sparsity is
predictable from its per-row outlier counts (``RedundancyCurve``). What is not predictable from one unit alone
is how pruning the blocks before it moves its counts (its "drift"), and the loop's end state depends on the
curves measured with the FINAL upstream blocks. So:

1. dense pass (the one exact MRP also needs for its thresholds): thresholds tau and one curve per unit;
   ``equalize`` solves for the sparsities that give every free unit the same D with the target's weighted mean
   (a water-filling over [s0, s_max]);
2. pilot pass (``pilot="start"``, the default): the model pruned uniformly to s0, block by block, as the exact
   loop's first step prunes it (every block restored afterwards), each unit's curve measured there and the plan
   re-solved on these curves; the start's statistics are kept for step 3. ``pilot="plan"`` measures the curves
   on the model pruned to the first plan instead (closer to the loop's end state and to its allocation, but
   worse in perplexity everywhere it was measured: docs/mrp.md); ``pilot="dense"`` skips the pass;
3. one sequential pruning pass: at each block the curves of its units are recomputed from the TRUE inputs
   (pruned upstream), the curves of later units are scaled by a forecast of their drift, the plan is re-solved
   with the earlier units fixed, and the block is pruned to its planned sparsity. The drift is not uniform over
   depth (on SmolLM2 the middle blocks gain outliers as upstream is pruned, the last ones lose them) and grows
   with the pruning upstream, so with ``drift="upstream"`` (the default) a unit's forecast comes from its own
   drift between the dense pass and the pilot and from how much its plan prunes upstream of it beyond s0, fitted
   on the units reached so far (``DriftForecast``); ``drift="per-unit"`` drops the upstream term,
   ``drift="global"`` scales every later unit by the mean drift measured so far. With ``masks="nested"`` (the
   default) the block is pruned first to s0 with the start's statistics (the dense ones without a start pilot),
   so that its mask holds the loop's own start mask (the loop's result depends on its masks, not only on its
   allocation: docs/mrp.md).

Cost: about 2.5-2.9x a uniform run with a pilot (CPU, SmolLM2), 1.5x without, whatever the step schedule.
"""

from __future__ import annotations

import logging
import math

import torch
from tqdm.auto import tqdm

from ..metrics.base import LayerStats, sq_norms
from ..redundancy import (
    RedundancyCurve,
    equalize,
    fit_log_drift,
    fit_upstream_drift,
    log_ratio,
    row_outlier_counts,
    spread,
    thresholds,
)
from ..runner import LayerRecord, SequentialPruner
from .base import Allocation, AllocationContext
from .mrp import MrpAllocator, Unit, build_units, layer_counts_for, per_unit_on_device, resolve_start, unit_counts

log = logging.getLogger(__name__)

#: checkpoint file holding the pilot pass's per-row outlier counts (and, with the 'start' pilot and nested masks,
#: the start's input statistics under START_KEY + layer name, their token counts under TOKENS_KEY + layer name)
PILOT_FILE = "mrp-fast-pilot"
START_KEY = "start:"
TOKENS_KEY = "start-tokens:"


def unit_curve(unit: Unit, sq_norms: dict[str, torch.Tensor], tau: float) -> RedundancyCurve:
    return RedundancyCurve([(row_outlier_counts(ref.weight, sq_norms[ref.name], tau).cpu(), ref.in_features)
                            for ref in unit.layers])


def start_leg_stats(tokens: int, sq_norm: torch.Tensor | None) -> LayerStats:
    """What the first leg of nested masks needs of the start's statistics (Wanda's norms), without the rest."""
    return LayerStats(tokens=tokens, sq_norm=sq_norm, unseen=tokens == 0)


class DriftForecast:
    """Forecasts each later unit's drift (its outlier ratio at s0 once upstream is pruned as planned, over the
    pilot's) from its own drift between the dense pass and the pilot, x = log(pilot / dense), fitted on the units
    reached so far. ``model`` "upstream": log drift = a e + k x, e being the pruning upstream of the unit beyond
    the pilot's s0 (a share of all weights): a unit drifts more the more is pruned before it, so the units still to
    come, with more pruned before them, drift more than those reached. "per-unit": log drift = c + k x, blind to
    that. Until a fit has enough points, the per-unit fit and then the global scale stand in; for units without
    outliers the global scale does."""

    def __init__(self, dense: list[RedundancyCurve], pilot: list[RedundancyCurve], s0: float,
                 points: list | None = None, model: str = "upstream"):
        self.s0 = s0
        self.pilot = pilot
        self.model = model
        self.x = [log_ratio(p.outlier_ratio(s0), d.outlier_ratio(s0)) for d, p in zip(dense, pilot)]
        self.points = [tuple(p) for p in points or []]  # (x, y, e); a resumed run's come back from JSON as lists
        self.refit()

    def refit(self) -> None:
        self.fit = fit_log_drift([(p[0], p[1]) for p in self.points])
        self.upstream_fit = (fit_upstream_drift([p for p in self.points if len(p) == 3])
                             if self.model == "upstream" else None)

    def observe(self, index: int, measured: RedundancyCurve, excess: float = 0.0) -> None:
        """Add a reached unit's measured drift (and the excess pruning upstream of it) to the fits."""
        x = self.x[index]
        y = log_ratio(measured.outlier_ratio(self.s0), self.pilot[index].outlier_ratio(self.s0))
        if x is not None and y is not None:
            self.points.append((x, y, excess))
            self.refit()

    def scale(self, index: int, fallback: float, excess: float = 0.0) -> float:
        x = self.x[index]
        if x is None or self.fit is None:
            return fallback
        if self.upstream_fit is None:
            return math.exp(self.fit[0] + self.fit[1] * x)
        return math.exp(self.upstream_fit[0] * excess + self.upstream_fit[1] * x)


class FastMrpRun:
    def __init__(self, options, ctx: AllocationContext, pruner: SequentialPruner, input_ids: torch.Tensor):
        if ctx.dense_stats is None:
            raise ValueError("MRP needs the dense model's calibration statistics (ctx.dense_stats)")
        self.opt = options
        self.ctx = ctx
        self.dense_stats = ctx.dense_stats
        self.pruner = pruner
        self.adapter = ctx.adapter
        self.input_ids = input_ids
        self.target, self.s0 = resolve_start(options, ctx.target)
        self.units = build_units(ctx)
        self.by_block: dict[int, list[Unit]] = {}
        for unit in self.units:
            self.by_block.setdefault(unit.block, []).append(unit)
        self.trace: list[dict] = []
        # the exact loop's masks nest: every block is first pruned to s0 (with the statistics of its uniform
        # start) and raised from there; the dense statistics stand in for the start's. Only a metric whose
        # statistics the dense pass keeps (Wanda's norms) can nest; magnitude masks nest by themselves.
        metric = pruner.metric
        self.nested = options.masks == "nested" and metric.needs_sq_norm and not metric.needs_hessian
        #: a drift forecast per unit needs the pilot's curves to set against the dense ones
        self.unit_forecast = options.drift != "global" and options.pilot != "dense"
        #: with the 'start' pilot, each block's statistics in the loop's uniform start (the nested masks' first leg)
        self.start_stats: dict[str, LayerStats] = {}

    def run(self) -> tuple[Allocation, list[LayerRecord]]:
        pruner, opt = self.pruner, self.opt
        planning = dense = self.dense_curves()
        start, _ = pruner.restore()  # after the dense pass: thresholds and dense curves come from dense weights
        if opt.pilot != "dense":
            planning = self.pilot_curves(start, planning)
        with pruner.timer.phase("masks"):
            first_plan = equalize(planning, self.target, self.s0, opt.smax)
        curves = list(planning)  # a fixed unit's curve only lends its size to the plan: any is enough
        goal = round(self.target * sum(u.numel for u in self.units))
        done = 0
        fixed: dict[int, float] = {}
        drift_true = drift_dense = 0.0
        final_ratios = [0.0] * len(self.units)
        if start:
            assert pruner.checkpoint is not None and pruner.checkpoint.progress is not None
            state = pruner.checkpoint.progress["state"]
            done, drift_true, drift_dense = state["done"], state["drift_true"], state["drift_dense"]
            fixed = {int(k): v for k, v in state["fixed"].items()}
            final_ratios, self.trace = list(state["final_ratios"]), list(state["trace"])
            pruner.layer_notes.update(state.get("notes", {}))
        forecast = (DriftForecast(dense, planning, self.s0, state.get("drift_points") if start else None, opt.drift)
                    if self.unit_forecast else None)
        plan = list(state["plan"]) if start and "plan" in state else list(first_plan)
        if start >= self.adapter.num_blocks:
            return self.result(final_ratios)
        acts = pruner.resume(self.input_ids) if start else pruner.capture(self.input_ids)
        # the first leg's statistics: those of the loop's uniform start where the pilot measured it, else dense
        leg_stats = (self.start_stats or self.dense_stats()) if self.nested else {}
        for block in tqdm(range(start, self.adapter.num_blocks), desc=f"fast MRP ({pruner.metric.name})",
                          unit="block", disable=not pruner.progress):
            units = self.by_block[block]
            layers = self.adapter.linear_layers(block)
            pruner._block_on_device(block)
            try:
                stats = pruner.collect_stats(acts, layers, sq_norm=True)
                current = sq_norms(stats)
                with pruner.timer.phase("masks"):
                    excess = self.upstream_excess([fixed.get(i, s) for i, s in enumerate(plan)])
                    for unit in units:
                        curves[unit.index] = unit_curve(unit, current, self.tau[unit.index])
                        drift_true += curves[unit.index].outlier_ratio(self.s0)
                        drift_dense += planning[unit.index].outlier_ratio(self.s0)
                        if forecast is not None:
                            forecast.observe(unit.index, curves[unit.index], excess[unit.index])
                    scale = drift_true / drift_dense if drift_dense else 1.0
                    for later in self.units:
                        if later.block > block:
                            own = (forecast.scale(later.index, scale, excess[later.index]) if forecast is not None
                                   else scale)
                            curves[later.index] = planning[later.index].scaled(own)
                    plan = equalize(curves, self.target, self.s0, opt.smax, fixed)
                    targets = {}
                    for i, unit in enumerate(units):
                        last = block == self.adapter.num_blocks - 1 and i == len(units) - 1
                        count = goal - done if last else round(plan[unit.index] * unit.numel)
                        counts = layer_counts_for(unit, count)
                        targets.update({ref.name: counts[ref.name] / ref.numel for ref in unit.layers})
                        done += sum(counts.values())
                        fixed[unit.index] = sum(counts.values()) / unit.numel
                        step = {"unit": unit.label(), "first_plan": round(first_plan[unit.index], 6),
                                "sparsity": round(fixed[unit.index], 6), "drift": round(scale, 4)}
                        if forecast is not None and forecast.fit is not None:
                            step["drift_fit"] = [round(v, 4) for v in forecast.fit]  # c, k of the forecast used
                        if forecast is not None and forecast.upstream_fit is not None:
                            step["upstream_fit"] = [round(v, 4) for v in forecast.upstream_fit]  # a, k
                        self.trace.append(step)
                if self.nested:
                    first = {name: min(self.s0, share) for name, share in targets.items()}
                    pruner.prune_layers(layers, first, {ref.name: leg_stats[ref.name] for ref in layers})
                pruner.prune_layers(layers, targets, stats)
                del stats
                if opt.activations == "dense-block":  # the statistics above are the dense block's already
                    pruner.advance(acts)
                    pruned_norms = current
                else:
                    after = pruner.advance(acts, observe=True)
                    pruned_norms = sq_norms(after)
                for unit in units:
                    final_ratios[unit.index] = unit_counts(unit, pruned_norms, self.tau[unit.index]).non_outlier_ratio
            finally:
                pruner._release(block)
            pruner.save_progress(acts, block, [], stage="mrp-fast", state={
                "done": done, "fixed": fixed, "drift_true": drift_true, "drift_dense": drift_dense,
                "final_ratios": final_ratios, "trace": self.trace, "notes": pruner.layer_notes,
                "drift_points": forecast.points if forecast is not None else [], "plan": plan})
        return self.result(final_ratios)

    def upstream_excess(self, sparsities: list[float]) -> list[float]:
        """Each unit's pruning upstream of it beyond s0 (the blocks before its own), as a share of all weights."""
        total = sum(u.numel for u in self.units)
        by_block = [0.0] * self.adapter.num_blocks
        for unit in self.units:
            by_block[unit.block] += unit.numel * (sparsities[unit.index] - self.s0)
        before = [0.0] * self.adapter.num_blocks
        for block in range(1, self.adapter.num_blocks):
            before[block] = before[block - 1] + by_block[block - 1]
        return [before[unit.block] / total for unit in self.units]

    def dense_curves(self) -> list[RedundancyCurve]:
        """Every unit's curve on the dense model (the dense pass's statistics), setting the thresholds tau."""
        dense = sq_norms(self.dense_stats())
        with self.pruner.timer.phase("masks"):
            def dense_curve(unit: Unit) -> tuple[float, RedundancyCurve]:
                tau = thresholds([unit_counts(unit, dense, None)], self.opt.m)[0]
                return tau, unit_curve(unit, dense, tau)

            taus, curves = zip(*per_unit_on_device(self.pruner, self.units, dense_curve))
        self.tau = list(taus)
        return list(curves)

    def pilot_curves(self, start: int, dense_curves: list[RedundancyCurve]) -> list[RedundancyCurve]:
        """The planning curves of the pilot pass: computed before the first block is pruned and kept in the
        checkpoint, so a resumed run plans with the very same curves."""
        ckpt = self.pruner.checkpoint
        if start:
            assert ckpt is not None
            saved = ckpt.load_tensors(PILOT_FILE)
            for key, norm in saved.items():
                if key.startswith(START_KEY):
                    name = key[len(START_KEY):]
                    self.start_stats[name] = start_leg_stats(int(saved[TOKENS_KEY + name]), norm)
            return [RedundancyCurve([(saved[f"{unit.index}.{j}"], ref.in_features)
                                     for j, ref in enumerate(unit.layers)]) for unit in self.units]
        if self.opt.pilot == "start":
            sparsities = [self.s0] * len(self.units)
        else:
            with self.pruner.timer.phase("masks"):
                sparsities = equalize(dense_curves, self.target, self.s0, self.opt.smax)
        curves = self.curves_pruned_to(sparsities)
        if ckpt is not None:
            tensors = {f"{unit.index}.{j}": counts for unit, curve in zip(self.units, curves)
                       for j, (counts, _) in enumerate(curve.layers)}
            for name, layer in self.start_stats.items():
                assert layer.sq_norm is not None
                tensors[START_KEY + name] = layer.sq_norm.clone()  # layers sharing an input share the tensor
                tensors[TOKENS_KEY + name] = torch.tensor(layer.tokens)
            ckpt.save_tensors(PILOT_FILE, tensors)
        return curves

    def curves_pruned_to(self, sparsities: list[float]) -> list[RedundancyCurve]:
        """Every unit's curve with the blocks upstream of it pruned to ``sparsities`` (one per unit): one extra
        pass that prunes each block only to advance the activations, then restores it."""
        pruner, metric = self.pruner, self.pruner.metric
        unit_of = {ref.name: unit.index for unit in self.units for ref in unit.layers}
        curves: list[RedundancyCurve | None] = [None] * len(self.units)
        acts = pruner.capture(self.input_ids)
        keep_start = self.nested and self.opt.pilot == "start"
        for block in tqdm(range(self.adapter.num_blocks), desc=f"fast MRP pilot ({self.opt.pilot})", unit="block",
                          disable=not pruner.progress):
            layers = self.adapter.linear_layers(block)
            pruner._block_on_device(block)
            try:
                stats = pruner.collect_stats(acts, layers, sq_norm=True)
                if keep_start:  # the block as the loop's uniform start finds it: dense, upstream pruned to s0
                    self.start_stats.update({ref.name: start_leg_stats(stats[ref.name].tokens, stats[ref.name].sq_norm)
                                             for ref in layers})
                with pruner.timer.phase("masks"):
                    norms = sq_norms(stats)
                    for unit in self.by_block[block]:
                        curves[unit.index] = unit_curve(unit, norms, self.tau[unit.index])
                    pilot_weights = {}
                    for ref in layers:
                        weight = ref.weight.to(torch.float32)
                        pilot_weights[ref.name] = metric.prune(  # in the model's dtype: one block copy
                            weight, stats[ref.name], sparsities[unit_of[ref.name]], pruner.pattern,
                            forced=weight == 0).weight.to(ref.weight.dtype)
                del stats
                with pruner.weights_of(block, pilot_weights):
                    pruner.advance(acts, phase="pilot")
            finally:
                pruner._release(block, changed=False)  # the pilot weights went in and back out
        return curves  # type: ignore[return-value]

    def result(self, final_ratios: list[float]) -> tuple[Allocation, list[LayerRecord]]:
        records = self.pruner.final_records()
        o = self.opt
        allocation = Allocation.from_layers(
            "mrp-fast", self.adapter, {r.name: r.sparsity for r in records}, self.target,
            granularity=self.ctx.granularity, s0=self.s0, m=o.m, smax=o.smax, activations=o.activations,
            pilot=o.pilot, masks="nested" if self.nested else "one-shot",
            drift=o.drift if self.unit_forecast else "global",
            thresholds=[float(t) for t in self.tau],
            final_non_outlier_ratios=[round(r, 6) for r in final_ratios],
            redundancy_spread=spread(final_ratios),
            trace=self.trace,
        )
        return allocation, records


class FastMrpAllocator(MrpAllocator):
    name = "mrp-fast"
    job = FastMrpRun
    stepped = False
