"""How closely cheap variants of MRP follow the exact loop's allocation (mean / max absolute per-block difference).

Two studies on one model and calibration (C4, seed 0), Wanda, CPU:

* ``rounds``: fast MRP's planning iterated: plan from the dense curves, then N times "prune to the plan (and
  restore), measure every block's curve, plan again";
* ``epochs``: exact MRP's greedy, with its step schedule, run on curves that are re-measured only E times
  (E recomputes instead of one per iteration).

    python bench/mrp_fidelity.py --model DIR --sparsity 0.7 --reference exact_blocks.json --study rounds --n 3
    python bench/mrp_fidelity.py --model DIR --sparsity 0.7 --reference exact_blocks.json --study epochs --n 2

The reference is the exact run's per-block sparsities (the ``blocks`` of a ``bench/mrp_grid.py --run mrp`` row).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import C4

from mrprune import PruneConfig, prune
from mrprune.allocate import mrp, mrp_fast
from mrprune.allocate.mrp_fast import unit_curve
from mrprune.config import merge
from mrprune.data import read_corpus, sample_calibration
from mrprune.models import load_model
from mrprune.redundancy import equalize


def distance(blocks: list[float], reference: list[float]) -> str:
    diffs = [abs(a - b) for a, b in zip(blocks, reference)]
    return f"mean {sum(diffs) / len(diffs):.4f} max {max(diffs):.3f}"


class PlanRounds(mrp_fast.FastMrpRun):
    """Only the planning of fast MRP, iterated; the model is pruned to the last plan at the end."""

    rounds = 1
    plans: list[list[float]] = []

    def run(self):
        pruner, opt = self.pruner, self.opt
        curves = self.dense_curves()
        pruner.restore()
        plan = equalize(curves, self.target, self.s0, opt.smax)
        self.plans.append(plan)
        for _ in range(self.rounds):
            plan = equalize(self.curves_pruned_to(plan), self.target, self.s0, opt.smax)
            self.plans.append(plan)
        return self.result([0.0] * len(self.units))


class EpochMrp(mrp.MrpRun):
    """Exact MRP's greedy between ``epochs`` recomputes, the outlier ratios in between from the curves."""

    epochs = 1

    def iterate(self) -> None:
        goal = round(self.target * sum(u.numel for u in self.units))
        zeros = {u.index: u.zeros() for u in self.units}
        first = done = sum(zeros.values())
        caps = mrp.smax_caps(self.units, self.opt.smax)
        t = 0
        for epoch in range(1, self.epochs + 1):
            self.refresh()
            curves = {u.index: unit_curve(u, self.sq_norm, self.tau[u.index]) for u in self.units}
            epoch_goal = goal if epoch == self.epochs else first + round(epoch * (goal - first) / self.epochs)
            changed = set()
            while done < epoch_goal:
                ratios = [1 - curves[u.index].outlier_ratio(zeros[u.index] / u.numel) for u in self.units]
                unit = mrp.most_redundant(self.units, ratios, zeros, caps)
                _, add = mrp.next_step(self.opt, t, unit.numel, caps[unit.index] - zeros[unit.index], epoch_goal - done)
                zeros[unit.index] += add
                done += add
                t += 1
                changed.add(unit.index)
            for index in sorted(changed):
                self.prune_unit(self.units[index], zeros[index])
        self.trace = [{"iterations": t}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--reference", required=True, help="JSON list of the exact run's per-block sparsities")
    parser.add_argument("--study", choices=("rounds", "epochs"), required=True)
    parser.add_argument("--n", type=int, default=1, help="planning rounds, or recomputes (epochs)")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reference = json.loads(Path(args.reference).read_text())

    loaded = load_model(args.model, dtype="float32", device="cpu")
    ids = sample_calibration(read_corpus(str(C4), "calibration"), loaded.tokenizer, args.nsamples, args.seqlen, 0)
    method = "mrp-fast" if args.study == "rounds" else "mrp"
    config = merge(PruneConfig(), {"metric": "wanda", "sparsity": args.sparsity, "allocation.method": method,
                                   "runtime.device": "cpu", "calibration.nsamples": args.nsamples,
                                   "calibration.seqlen": args.seqlen})
    PlanRounds.rounds, EpochMrp.epochs = args.n, args.n
    if args.study == "rounds":
        mrp_fast.FastMrpRun = PlanRounds  # the allocator builds its run from this module attribute
    else:
        mrp.MrpRun = EpochMrp
    start = time.perf_counter()
    outcome = prune(loaded.model, config, tokenizer=loaded.tokenizer, progress=False, calibration_ids=ids)
    seconds = time.perf_counter() - start
    if args.study == "rounds":
        for k, plan in enumerate(PlanRounds.plans):
            print(f"plan {k} ({'dense curves' if k == 0 else f'curves at plan {k - 1}'}): "
                  f"{distance(plan, reference)}  " + " ".join(f"{x:.3f}" for x in plan))
    else:
        blocks = outcome.report.allocation["block_targets"]
        print(f"epochs {args.n}: {distance(blocks, reference)} in {seconds:.0f} s  " + " ".join(f"{x:.3f}" for x in blocks))


if __name__ == "__main__":
    main()
