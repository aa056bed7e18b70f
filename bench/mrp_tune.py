"""Tune MRP on held-out C4 text: run allocations / MRP settings on one model in one process and tabulate
held-out perplexity, redundancy spread, iterations and wall time. Never evaluates on WikiText-2 test.

    python bench/mrp_tune.py --model DIR --sparsity 0.7 --nsamples 16 --seqlen 512 --max-windows 8 \
        --run uniform --run owl --run "mrp step=0.05 gamma=0.95 min_step=0.01 s0_gap=0.1"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import c4_split  # noqa: E402

from mrprune import PruneConfig, prune  # noqa: E402
from mrprune.config import merge  # noqa: E402
from mrprune.data import load_eval_text  # noqa: E402
from mrprune.evaluate.perplexity import perplexity  # noqa: E402
from mrprune.models import get_adapter, load_model  # noqa: E402


def parse_run(spec: str) -> tuple[str, dict]:
    method, *pairs = spec.split()
    options = {}
    for pair in pairs:
        key, value = pair.split("=")
        path = key if "." in key else f"allocation.{'mrp' if method.startswith('mrp') else method}.{key}"
        if key == "granularity":
            path = "allocation.granularity"
        options[path] = None if value == "None" else float(value) if "." in value or "e" in value else int(value)
    return method, options


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--metric", default="wanda")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--run", action="append", required=True, help="'method key=value ...'")
    parser.add_argument("--json", default=None)
    parser.add_argument("--work", default="/tmp/mrprune-bench")
    args = parser.parse_args()
    calib, heldout = c4_split(Path(args.work))
    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    adapter = get_adapter(model)
    dense = {ref.name: ref.weight.clone() for ref in adapter.all_linear_layers()}
    corpus = load_eval_text(str(heldout))
    base = merge(PruneConfig(), {"metric": args.metric, "sparsity": args.sparsity,
                                 "calibration.source": str(calib), "calibration.nsamples": args.nsamples,
                                 "calibration.seqlen": args.seqlen})
    rows = []
    for spec in args.run:
        method, options = parse_run(spec)
        for ref in adapter.all_linear_layers():
            ref.set_weight(dense[ref.name])
        config = merge(base, {"allocation.method": method, **options})
        start = time.perf_counter()
        outcome = prune(model, config, tokenizer=tok, progress=False)
        seconds = time.perf_counter() - start
        ppl = perplexity(model, tok, corpus, args.eval_seqlen, args.max_windows, progress=False)
        alloc = outcome.report.allocation
        row = {"run": spec, "ppl": ppl.perplexity, "seconds": seconds, "iterations": alloc.get("iterations"),
               "cv": alloc.get("redundancy_spread", {}).get("cv"), "blocks": alloc["block_targets"],
               "timings": outcome.report.timings_s}
        rows.append(row)
        print(f"{spec:<60} ppl {ppl.perplexity:9.3f}  {seconds:7.1f}s  it {row['iterations']}  cv {row['cv']}  "
              f"blocks {[round(b, 2) for b in alloc['block_targets']]}", flush=True)
    print(f"protocol: {ppl.protocol}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
