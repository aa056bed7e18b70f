"""Maximum Redundancy Pruning (Gao et al. 2025, arXiv 2503.18377), the iterative algorithm of methods.md.

1. Outlier thresholds tau_u = M x mean dense Wanda score of each unit (block or linear layer), frozen.
2. Every unit is pruned to a uniform start s0 with the job's metric (the sequential pass).
3. While the global sparsity is below the target: recompute each unit's outlier ratio D_u over its SURVIVING
   weights with Wanda scores of the current model (activations from the pruned upstream blocks); among units
   below s_max pick the one with the highest non-outlier ratio 1 - D_u; raise its sparsity by
   max(step0 * gamma^t, step_min) (clipped so the target is hit exactly) and re-prune it, keeping its earlier
   mask (nested). SparseGPT re-runs on the unit with a Hessian from its current inputs.

Recomputing D after a change to block b only needs blocks >= b: the inputs of earlier blocks are unchanged. So
block inputs are cached ("checkpoints", every ``stride`` blocks, as memory allows) and each iteration re-runs
the model from the changed block onward. This is exact: the same D as a full calibration pass.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..metrics.base import LayerStats, sq_norms
from ..models.adapter import LinearRef
from ..redundancy import UnitCounts, layer_counts, spread, thresholds
from ..runner import Activations, LayerRecord, SequentialPruner
from ..spill import host_copies
from .base import Allocation, AllocationContext, IterativeAllocator

log = logging.getLogger(__name__)

#: fraction of free memory the block-input checkpoints may take when the stride is chosen automatically
CHECKPOINT_MEMORY_FRACTION = 0.25


@dataclass
class Unit:
    """What MRP allocates to: one block (all its linear layers) or one linear layer."""

    index: int
    block: int
    layers: list[LinearRef]

    @property
    def numel(self) -> int:
        return sum(ref.numel for ref in self.layers)

    def zeros(self) -> int:
        return sum(int((ref.weight == 0).sum()) for ref in self.layers)

    def label(self) -> str:
        return str(self.block) if len(self.layers) > 1 else self.layers[0].name


def build_units(ctx: AllocationContext) -> list[Unit]:
    adapter = ctx.adapter
    if ctx.granularity == "layer":
        return [Unit(i, ref.block, [ref]) for i, ref in enumerate(adapter.all_linear_layers())]
    return [Unit(i, i, adapter.linear_layers(i)) for i in range(adapter.num_blocks)]


def layer_counts_for(unit: Unit, total: int) -> dict[str, int]:
    """Split ``total`` pruned weights over the unit's layers at one common sparsity level, no layer below the
    zeros it already has (masks nest): water-filling on the level, then largest-remainder rounding."""
    zeros = {ref.name: int((ref.weight == 0).sum()) for ref in unit.layers}
    total = min(max(total, sum(zeros.values())), unit.numel)

    def filled(level: float) -> float:
        return sum(max(zeros[r.name], level * r.numel) for r in unit.layers)

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if filled(mid) < total else (lo, mid)
    desired = {r.name: max(zeros[r.name], hi * r.numel) for r in unit.layers}
    counts = {name: math.floor(d) for name, d in desired.items()}
    for ref in sorted(unit.layers, key=lambda r: counts[r.name] - desired[r.name]):
        if sum(counts.values()) >= total:
            break
        if counts[ref.name] < ref.numel:
            counts[ref.name] += 1
    return counts


def unit_counts(unit: Unit, sq_norms: dict[str, torch.Tensor], tau: float | None) -> UnitCounts:
    """Score sum, size, survivors and (given ``tau``) outliers of a unit's current weights."""
    total = UnitCounts()
    for ref in unit.layers:
        total = total.add(layer_counts(ref.weight, sq_norms[ref.name], tau))
    return total


def with_block(pruner: SequentialPruner, index: int, work, changed: bool = True):
    """Run ``work()`` with block ``index`` on the device (it returns to the CPU afterwards if offloaded, without
    a copy when ``work`` only read it)."""
    pruner._block_on_device(index)
    try:
        return work()
    finally:
        pruner._release(index, changed)


def per_unit_on_device(pruner: SequentialPruner, units: list[Unit], work) -> list:
    """``work(unit)`` (which only reads the unit) for every unit, visiting blocks in order so each block moves
    to the device once."""
    results: dict[int, object] = {}
    for block in sorted({u.block for u in units}):
        mine = [u for u in units if u.block == block]
        with_block(pruner, block, lambda: results.update({u.index: work(u) for u in mine}), changed=False)
    return [results[u.index] for u in units]


def resolve_start(options, target: float | None) -> tuple[float, float]:
    """(target, s0) after checking the start and ceiling, which both MRP variants read, against the target."""
    target = 0.5 if target is None else target
    s0 = options.s0 if options.s0 is not None else max(0.0, target - options.s0_gap)
    if not 0.0 <= s0 <= target:
        raise ConfigError(f"MRP start s0={s0:g} must lie in [0, target {target:g}] (--mrp-s0, --mrp-s0-gap)")
    if not target <= options.smax < 1.0:
        raise ConfigError(f"MRP s_max={options.smax:g} must lie in [target {target:g}, 1) (--mrp-smax)")
    return target, s0


def check_schedule(options) -> None:
    """The exact loop's step schedule (fast MRP has none)."""
    if not 0 < options.min_step <= options.step or not 0 < options.gamma <= 1:
        raise ConfigError(f"MRP needs 0 < min_step <= step and 0 < gamma <= 1, got min_step {options.min_step:g}, "
                          f"step {options.step:g}, gamma {options.gamma:g} (--mrp-min-step, --mrp-step, --mrp-gamma)")


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 * 2**30


def auto_stride(num_blocks: int, checkpoint_bytes: int, device: torch.device) -> int:
    """Smallest stride whose checkpoints fit in a fraction of the free memory of ``device``."""
    affordable = int(free_memory_bytes(device) * CHECKPOINT_MEMORY_FRACTION // max(checkpoint_bytes, 1))
    return max(1, math.ceil(num_blocks / max(affordable, 1)))


class MrpRun:
    """One MRP job: owns the checkpoints, the current redundancy statistics and the iteration trace."""

    def __init__(self, options, ctx: AllocationContext, pruner: SequentialPruner, input_ids: torch.Tensor):
        if ctx.dense_stats is None:
            raise ValueError("MRP needs the dense model's calibration statistics (ctx.dense_stats)")
        self.opt = options
        self.stride = options.checkpoint_stride
        self.ctx = ctx
        self.dense_stats = ctx.dense_stats
        self.pruner = pruner
        self.adapter = ctx.adapter
        self.input_ids = input_ids
        self.target, self.s0 = resolve_start(options, ctx.target)
        check_schedule(options)
        self.units = build_units(ctx)
        self.unit_of_block: dict[int, list[Unit]] = {}
        for unit in self.units:
            self.unit_of_block.setdefault(unit.block, []).append(unit)
        self.block_of = {ref.name: ref.block for ref in ctx.adapter.all_linear_layers()}
        self.sq_norm: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}  # 0: no calibration token reached the layer (an expert never chosen)
        self.stale_from = 0
        # "dense-block": a block's internal activations come from its dense weights (inputs from the pruned
        # upstream blocks), as Wanda collects statistics; "pruned-block": from its current pruned weights
        self.dense_block = options.activations == "dense-block"
        self.dense_weights: dict[str, torch.Tensor] = {}
        self.counts: dict[int, UnitCounts] = {}
        self.trace: list[dict] = []

    # ---------------------------------------------------------------------------------------- redundancy
    def dense_thresholds(self) -> list[float]:
        norms = sq_norms(self.dense_stats())
        counts = per_unit_on_device(self.pruner, self.units, lambda u: unit_counts(u, norms, None))
        return thresholds(counts, self.opt.m)

    def _count(self, unit: Unit) -> UnitCounts:
        """The unit's counts with the current statistics and weights (cached until either changes)."""
        if unit.index not in self.counts:
            self.counts[unit.index] = unit_counts(unit, self.sq_norm, self.tau[unit.index])
        return self.counts[unit.index]

    def _forget_counts(self, block: int) -> None:
        for unit in self.unit_of_block[block]:
            self.counts.pop(unit.index, None)

    def ratios(self) -> list[float]:
        """Current non-outlier ratio of every unit (statistics must be fresh)."""
        missing = [u for u in self.units if u.index not in self.counts]
        per_unit_on_device(self.pruner, missing, self._count)
        return [self._count(u).non_outlier_ratio for u in self.units]

    def _remember(self, stats: dict[str, LayerStats]) -> None:
        self.sq_norm.update(sq_norms(stats))
        self.tokens.update({name: s.tokens for name, s in stats.items()})
        for block in {self.block_of[name] for name in stats}:
            self._forget_counts(block)

    # --------------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, block: int, hidden: torch.Tensor) -> None:
        if block % self.stride == 0 and block < self.adapter.num_blocks:
            if block in self.checkpoints:
                self.checkpoints[block].copy_(hidden)
            else:
                self.checkpoints[block] = hidden.clone()

    def _activations_at(self, block: int) -> Activations:
        """Activations entering ``block``, replayed from the nearest checkpoint at or before it."""
        start = block - block % self.stride
        acts = Activations(self.checkpoints[start].clone(), self.calls, start)
        while acts.index < block:
            self._with_block(acts.index, lambda: self.pruner.advance(acts), changed=False)
        return acts

    def _with_block(self, index: int, work, changed: bool = True):
        return with_block(self.pruner, index, work, changed)

    def _keep_dense_weights(self) -> None:
        # --offload-dir: the copy goes to its files
        self.dense_weights.update(host_copies(self.adapter.all_linear_layers(), self.pruner.mover.spill,
                                              pin=self.pruner.device.type == "cuda"))

    def _observe(self, acts: Activations, index: int, hessian: bool = False) -> dict[str, LayerStats]:
        """Input statistics of block ``index``'s layers without advancing: with its dense weights in
        dense-block mode, its current weights otherwise."""
        dense = self.dense_weights if self.dense_block else None
        return self.pruner.block_statistics(acts, index, hessian, dense, phase="mrp statistics")

    def refresh(self) -> None:
        """Recompute the statistics of every block whose inputs (or, in pruned-block mode, weights) changed,
        and the cached inputs of the blocks after the first changed one."""
        if self.stale_from >= self.adapter.num_blocks:
            return
        changed = self.stale_from  # its weights changed; in dense-block mode its statistics did not
        acts = self._activations_at(changed)

        def visit(index: int) -> None:
            """One turn of the block on the device: its statistics, its outputs and its units' counts."""
            if self.dense_block:
                if index > changed or not all(ref.name in self.sq_norm for ref in self.adapter.linear_layers(index)):
                    self._remember(self._observe(acts, index))
                self.pruner.advance(acts)
            else:
                self._remember(self.pruner.advance(acts, observe=True, phase="mrp statistics"))
            for unit in self.unit_of_block[index]:
                self._count(unit)

        while acts.index < self.adapter.num_blocks:
            index = acts.index
            self._with_block(index, lambda: visit(index), changed=False)
            self._save_checkpoint(acts.index, acts.hidden)
        self.stale_from = self.adapter.num_blocks

    # -------------------------------------------------------------------------------------------- prune
    def _metric_stats(self, unit: Unit) -> dict[str, LayerStats]:
        metric = self.pruner.metric
        if metric.needs_hessian:
            acts = self._activations_at(unit.block)
            stats = self._with_block(unit.block, lambda: self._observe(acts, unit.block, hessian=True), changed=False)
            return {ref.name: stats[ref.name] for ref in unit.layers}
        if metric.needs_sq_norm:
            return {ref.name: LayerStats(tokens=self.tokens[ref.name], sq_norm=self.sq_norm[ref.name],
                                         unseen=self.tokens[ref.name] == 0) for ref in unit.layers}
        return {}

    def prune_unit(self, unit: Unit, total_zeros: int) -> None:
        counts = layer_counts_for(unit, total_zeros)
        stats = self._metric_stats(unit)
        targets = {ref.name: counts[ref.name] / ref.numel for ref in unit.layers}
        self._with_block(unit.block, lambda: self.pruner.prune_layers(unit.layers, targets, stats))
        self._forget_counts(unit.block)
        self.stale_from = min(self.stale_from, unit.block)

    def _start_cache(self) -> Activations:
        """Capture the inputs of block 0 and every block's call context; choose the stride; cache block 0."""
        acts = self.pruner.capture(self.input_ids)
        self.calls = acts.calls
        checkpoint_bytes = acts.hidden.numel() * acts.hidden.element_size()
        if not self.stride:
            self.stride = auto_stride(self.adapter.num_blocks, checkpoint_bytes, acts.hidden.device)
        log.info("MRP: caching the inputs of every %d block(s) (%.0f MiB each)", self.stride, checkpoint_bytes / 2**20)
        self.checkpoints: dict[int, torch.Tensor] = {}
        self._save_checkpoint(0, acts.hidden)
        return acts

    def _save_progress(self, blocks: list[int]) -> None:
        """Saved state of an iteration: the weights of the blocks it changed and the trace (the rest follows
        from the weights: zeros, global sparsity, and the statistics a refresh from block 0 recomputes)."""
        ckpt = self.pruner.checkpoint
        if ckpt is None:
            return
        with self.pruner.timer.phase("checkpoint"):
            ckpt.save_blocks(self.adapter, blocks)
            ckpt.commit("mrp-iterate", range(self.adapter.num_blocks), state={"trace": self.trace,
                                                                              "notes": self.pruner.layer_notes})

    def resume(self) -> None:
        """Continue a checkpointed run: restore its weights (and trace); statistics are recomputed from block 0
        by the next refresh, exactly as an uninterrupted run computed them."""
        ckpt = self.pruner.checkpoint
        assert ckpt is not None and ckpt.progress is not None
        if ckpt.stage() == "mrp-start":
            self.uniform_start(resume=True)
            return
        self.pruner.close()  # no block copy in flight while the host weights are rewritten
        with self.pruner.timer.phase("resume"):
            ckpt.restore_weights(self.adapter, before_write=self.pruner.mover.prepare_host_write)
        self.trace = list(ckpt.progress["state"].get("trace", []))
        self.pruner.layer_notes.update(ckpt.progress["state"].get("notes", {}))
        self._start_cache()
        self.stale_from = 0

    def uniform_start(self, resume: bool = False) -> None:
        """Capture, then prune every block to s0 (whole-weight rounding), collecting redundancy statistics of
        the pruned blocks in the same forward that feeds the next block. With ``resume``, continue from the
        checkpoint's next block (the statistics of the restored blocks are then recomputed by a refresh)."""
        pruner = self.pruner
        acts = self._start_cache()
        first = 0
        if resume:
            first, _ = pruner.restore()
            if 0 < first < self.adapter.num_blocks:
                assert pruner.checkpoint is not None
                hidden = pruner.checkpoint.load_activations().to(acts.hidden.device, acts.hidden.dtype)
                acts = Activations(hidden, self.calls, first)
        start = Allocation.from_blocks("uniform", self.adapter, [self.s0] * self.adapter.num_blocks, self.s0)
        targets = start.whole_weight_targets(self.adapter)
        for index in tqdm(range(first, self.adapter.num_blocks),
                          desc=f"MRP start ({pruner.metric.name}, s0={self.s0:.3f})",
                          unit="block", disable=not pruner.progress):
            layers = self.adapter.linear_layers(index)

            def step():
                # the block is still dense here: these statistics serve the metric and, in dense-block mode,
                # redundancy
                wanted = pruner.metric.needs_calibration or self.dense_block
                stats = pruner.collect_stats(acts, layers, sq_norm=self.dense_block) if wanted else {}
                if self.dense_block:
                    self._remember(stats)
                pruner.prune_layers(layers, targets, stats)
                if self.dense_block:
                    pruner.advance(acts)
                else:
                    self._remember(pruner.advance(acts, observe=True, phase="mrp statistics"))

            self._with_block(index, step)
            self._save_checkpoint(acts.index, acts.hidden)
            pruner.save_progress(acts, index, [], stage="mrp-start")
        self.stale_from = 0 if first else self.adapter.num_blocks

    def prepare(self) -> None:
        """What MRP needs of the dense model, taken before any weight changes (or a checkpoint's restore):
        the outlier thresholds and, in dense-block mode, the dense weights."""
        self.tau = self.dense_thresholds()
        if self.dense_block:
            self._keep_dense_weights()

    def run(self) -> tuple[Allocation, list[LayerRecord]]:
        self.prepare()
        if self.pruner.checkpoint is not None and self.pruner.checkpoint.resuming:
            self.resume()
        else:
            self.uniform_start()
        self.iterate()
        self.refresh()
        return self.result(self.ratios())

    def iterate(self) -> None:
        """Raise the most redundant unit below s_max, step by step, until the global target is met exactly."""
        weights = sum(u.numel for u in self.units)
        goal = round(self.target * weights)
        zeros = {u.index: u.zeros() for u in self.units}
        done = sum(zeros.values())
        bar = tqdm(total=max(goal - done, 0), desc="MRP iterations", unit="w", unit_scale=True,
                   disable=not self.pruner.progress)
        t = len(self.trace)
        while done < goal:
            self.refresh()
            ratios = self.ratios()
            caps = smax_caps(self.units, self.opt.smax)
            unit = most_redundant(self.units, ratios, zeros, caps)
            if unit is None:
                raise ConfigError(f"every unit reached s_max={self.opt.smax} before the target {self.target}")
            step, add = next_step(self.opt, t, unit.numel, caps[unit.index] - zeros[unit.index], goal - done)
            self.prune_unit(unit, zeros[unit.index] + add)
            new_zeros = unit.zeros()
            done += new_zeros - zeros[unit.index]
            bar.update(new_zeros - zeros[unit.index])
            zeros[unit.index] = new_zeros
            self.trace.append({
                "iteration": t, "unit": unit.label(), "step": round(step, 6),
                "sparsity": round(new_zeros / unit.numel, 6), "global_sparsity": round(done / weights, 6),
                "non_outlier_ratios": [round(r, 5) for r in ratios],
            })
            log.debug("MRP iteration %d: unit %s raised by %.4f to %.4f, global sparsity %.4f", t, unit.label(), step,
                      new_zeros / unit.numel, done / weights)
            t += 1
            self._save_progress([unit.block])
        bar.close()

    def result(self, final_ratios: list[float]) -> tuple[Allocation, list[LayerRecord]]:
        records = self.pruner.final_records()
        o = self.opt
        allocation = Allocation.from_layers(
            "mrp", self.adapter, {r.name: r.sparsity for r in records}, self.target,
            granularity=self.ctx.granularity, s0=self.s0, m=o.m, smax=o.smax, step=o.step, min_step=o.min_step,
            gamma=o.gamma, activations=o.activations, iterations=len(self.trace), checkpoint_stride=self.stride,
            thresholds=[float(t) for t in self.tau],
            final_non_outlier_ratios=[round(r, 6) for r in final_ratios],
            redundancy_spread=spread(final_ratios),
            trace=self.trace,
        )
        return allocation, records


def smax_caps(units: list[Unit], smax: float) -> dict[int, int]:
    """The most weights each unit may lose (s_max of its size, rounded down)."""
    return {u.index: math.floor(smax * u.numel) for u in units}


def next_step(options, t: int, numel: int, headroom: int, remaining: int) -> tuple[float, int]:
    """Iteration ``t``'s step (step0 * gamma^t, floored at min_step) and the weights it prunes from a unit of
    ``numel`` weights: clipped at the unit's s_max headroom and at what the target still needs, so the target
    is hit to the weight; at least one, so the loop always advances."""
    step = max(options.step * options.gamma**t, options.min_step)
    return step, max(1, min(round(step * numel), headroom, remaining))


def most_redundant(units: list[Unit], ratios: list[float], zeros: dict[int, int], caps: dict[int, int]) -> Unit | None:
    """The unit with the highest non-outlier ratio among those still below their s_max cap (ties: lowest index)."""
    eligible = [u for u in units if zeros[u.index] < caps[u.index]]
    return max(eligible, key=lambda u: (ratios[u.index], -u.index)) if eligible else None


class MrpAllocator(IterativeAllocator):
    """The literal loop; FastMrpAllocator shares the options and checks and swaps the run (``job``)."""

    name = "mrp"
    job: type = MrpRun
    stepped = True  # reads the step schedule

    def __init__(self, options):
        self.options = options

    def check_options(self, target: float | None) -> None:
        resolve_start(self.options, target)
        if self.stepped:
            check_schedule(self.options)

    def prune(self, ctx: AllocationContext, pruner: SequentialPruner,
              input_ids: torch.Tensor) -> tuple[Allocation, list[LayerRecord]]:
        return self.job(self.options, ctx, pruner, input_ids).run()
