"""Dense vs magnitude / Wanda / SparseGPT at 50% and 2:4 on one model, each run in its own process.

Prints a Markdown table of prune time, whole-process wall time, peak RSS and perplexity. Example:
    python bench/cpu_metrics.py --calib ../shared/data/c4_validation_2k.parquet \
        --text ../shared/data/wikitext2_test.txt --nsamples 32 --seqlen 512 --max-windows 16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = [("magnitude", "unstructured"), ("wanda", "unstructured"), ("sparsegpt", "unstructured"),
        ("magnitude", "2:4"), ("wanda", "2:4"), ("sparsegpt", "2:4")]
MRPRUNE = [sys.executable, "-m", "mrprune"]
PRUNE_PHASES = ("data", "capture", "statistics", "masks", "recompute")


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    stdout = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - start, stdout


def perplexity(model: list[str], args) -> tuple[float, dict]:
    wall, stdout = timed([*MRPRUNE, "eval", *model, "-q", "--text", args.text, "--max-windows",
                          str(args.max_windows), "--json"])
    return wall, json.loads(stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=16)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    model = [args.model] if args.model else []

    wall, dense = perplexity(model, args)
    rows = [{"method": "dense", "pattern": "-", "sparsity": 0.0, "prune_s": 0.0, "wall_s": wall,
             "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
             "ppl": dense["perplexity"]}]
    with tempfile.TemporaryDirectory() as tmp:
        for metric, pattern in RUNS:
            out = Path(tmp) / f"{metric}-{pattern.replace(':', 'of')}"
            cmd = [*MRPRUNE, "prune", "-q", *(["--model", args.model] if args.model else []), "--metric", metric,
                   "--pattern", pattern, "--calib", args.calib, "--nsamples", str(args.nsamples),
                   "--seqlen", str(args.seqlen), "--output", str(out)]
            if pattern == "unstructured":
                cmd += ["--sparsity", "0.5"]
            wall, _ = timed(cmd)
            report = json.loads((out / "mrprune_report.json").read_text())
            _, result = perplexity([str(out)], args)
            rows.append({"method": metric, "pattern": pattern, "sparsity": report["sparsity"]["achieved"],
                         "prune_s": sum(report["timings_s"].get(k, 0.0) for k in PRUNE_PHASES), "wall_s": wall,
                         "peak_rss_mib": report["memory_mib"]["peak_host"], "ppl": result["perplexity"]})
            print(f"done {metric} {pattern}: ppl {result['perplexity']:.3f}", file=sys.stderr, flush=True)
    print("| method | pattern | sparsity | prune time (s) | process wall (s) | peak RSS (MiB) | perplexity |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['pattern']} | {r['sparsity']:.4f} | {r['prune_s']:.1f} | {r['wall_s']:.1f} | "
              f"{r['peak_rss_mib']:.0f} | {r['ppl']:.3f} |")
    print(f"\nperplexity protocol: {dense['protocol']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
