"""Scores drift forecasts on the records of ``bench/drift_trace.py``: at every block b of a fast MRP pass, each
forecast predicts the log drift (outlier ratio at s0 when reached / in the pilot) of every later unit from what
the units up to b showed; reported per record are the root-mean-square error over all (b, later unit) pairs, the
mean signed error (negative: drift under-forecast) and the error over the next three units only.

    python bench/drift_scores.py bench/results/fast_vs_exact/h100_c32_perunit/drift

A record NAME.json is paired with run-NAME.json (its mrp_grid row: the allocation, for the upstream-sparsity fit).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from mrprune.redundancy import fit_log_drift, fit_upstream_drift


def drifts(record: dict) -> tuple[list, list, dict]:
    """(pilot drifts x, log drifts y as measured when reached, unit -> measured outlier ratio at s0)."""
    measured = {index: ratio for index, ratio, *_ in record["obs"]}
    y = [math.log(measured[u] / p) if measured.get(u, 0) > 0 and p > 0 else None
         for u, p in enumerate(record["pilot"])]
    return record["x"], y, measured


def forecasts(x: list, y: list, b: int, excess: list[float], global_drift: float, past: dict) -> dict:
    """Every forecast as it stands after unit b: name -> (unit -> predicted log drift)."""
    seen = [(u, x[u], y[u]) for u in range(b + 1) if x[u] is not None and y[u] is not None]

    def fallback(_u: int) -> float:
        return global_drift

    out = {"global": fallback}
    fit = fit_log_drift([(xu, yu) for _, xu, yu in seen])  # the product's own fit (DriftForecast)
    if fit is not None:
        out["per-unit"] = lambda u, c=fit[0], k=fit[1]: c + k * x[u] if x[u] is not None else global_drift
    else:
        out["per-unit"] = fallback
    errors = [y[v] - past[v - 1]["per-unit"](v) for v in range(3, b + 1) if y[v] is not None and v - 1 in past]
    for window in (3, 6):
        shift = float(np.mean(errors[-window:])) if errors else 0.0
        out[f"per-unit + last {window} errors"] = lambda u, shift=shift: out["per-unit"](u) + shift
    upstream = fit_upstream_drift([(xu, yu, excess[u]) for u, xu, yu in seen])  # the product's (DriftForecast)
    if upstream is not None:
        out["upstream"] = lambda u, a=upstream[0], k=upstream[1]: (a * excess[u] + k * x[u] if x[u] is not None
                                                                   else global_drift)
    else:
        out["upstream"] = out["per-unit"]
    if len(seen) >= 5:  # the same with an intercept, which the product leaves out
        rows = np.array([[1.0, xu, excess[u]] for u, xu, _ in seen])
        c, k, a = np.linalg.lstsq(rows, np.array([yu for *_, yu in seen]), rcond=None)[0]
        out["upstream + intercept"] = lambda u, c=c, k=k, a=a: (c + k * x[u] + a * excess[u] if x[u] is not None
                                                               else global_drift)
    else:
        out["upstream + intercept"] = out["upstream"]
    return out


def score(path: Path) -> dict[str, tuple[float, float, float]]:
    record = json.loads(path.read_text())
    run = json.loads(path.with_name(f"run-{path.name}").read_text())[0]
    x, y, measured = drifts(record)
    n = len(x)
    s0, blocks = run["allocation"]["s0"], run["blocks"]
    excess = [sum(blocks[v] - s0 for v in range(u)) / n for u in range(n)]  # the final allocation: optimistic
    past: dict = {}
    sums: dict = {}
    for b in range(n - 1):
        global_drift = math.log(sum(measured[u] for u in range(b + 1)) / sum(record["pilot"][: b + 1]))
        past[b] = forecasts(x, y, b, excess, global_drift, past)
        if b < 2:
            continue
        for name, predict in past[b].items():
            errors = [predict(u) - y[u] for u in range(b + 1, n) if y[u] is not None]
            total = sums.setdefault(name, ([], [], []))
            total[0].extend(e * e for e in errors)
            total[1].append(float(np.mean(errors)))
            total[2].extend(e * e for e in errors[:3])
    return {name: (math.sqrt(np.mean(sq)), float(np.mean(bias)), math.sqrt(np.mean(near)))
            for name, (sq, bias, near) in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    overall: dict = {}
    for path in sorted(p for p in args.folder.glob("*.json") if not p.name.startswith("run-")):
        scores = score(path)
        print(path.stem.ljust(16), " | ".join(f"{k}: rmse {r:.3f} bias {b:+.3f} next3 {m:.3f}"
                                              for k, (r, b, m) in scores.items()))
        for name, values in scores.items():
            overall.setdefault(name, []).append(values)
    print("all (mean over records)".ljust(16), " | ".join(
        f"{k}: rmse {np.mean([v[0] for v in vs]):.3f} under-forecast in {sum(v[1] < 0 for v in vs)}/{len(vs)}"
        for k, vs in overall.items()))


if __name__ == "__main__":
    main()
