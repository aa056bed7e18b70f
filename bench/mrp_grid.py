"""Allocation grid on real models: allocator / MRP settings x target sparsity, one process per model, the same
calibration windows for every run. Reports perplexity, wall time, MRP iterations and the redundancy spread.

Tuning evaluates on held-out C4 text (the last 300 documents of the C4 sample, never used for calibration);
final figures evaluate on WikiText-2 test. Example (tuning):

    python bench/mrp_grid.py --model smollm2=DIR --sparsities 0.7 --eval heldout \
        --run uniform --run owl --run mrp-fast --run "mrp step=0.05 gamma=0.95 min_step=0.01"

A run is 'METHOD key=value ...'; keys are MrpConfig / OwlConfig / AlphaConfig fields of that method, or
'granularity' / 'metric'; 'file ratios=PATH' prunes to a saved per-block allocation (e.g. another run's);
'file from=RUN' prunes, in one shot, to the per-layer allocation an earlier run of this model and sparsity in the
same process ended with (e.g. 'file from=mrp': the exact loop's allocation without its step-by-step masks).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import C4, WIKITEXT, PeakMemory, c4_split, number_or_text

from mrprune import PruneConfig, prune
from mrprune.analyze.profile import dense_thresholds, non_outlier_ratios
from mrprune.config import merge
from mrprune.data import load_eval_text, read_corpus, sample_calibration
from mrprune.evaluate.perplexity import perplexity
from mrprune.metrics import SparsityPattern, build_metric
from mrprune.models import get_adapter, load_model, resolve_device
from mrprune.redundancy import spread
from mrprune.runner import SequentialPruner


def sq_norms(adapter, ids, device, dense_weights=None) -> dict:
    """Input sq_norm of every decoder linear layer of the model as it is now (one calibration pass); with
    ``dense_weights``, each block's internal activations come from its dense weights (MRP's default)."""
    pruner = SequentialPruner(adapter, build_metric("wanda"), SparsityPattern(), device, progress=False)
    return {name: s.sq_norm for name, s in pruner.observe(ids, dense_weights).items()}

SECTION = {"mrp": "mrp", "mrp-fast": "mrp", "owl": "owl", "alphapruning": "alpha"}


def parse_run(spec: str) -> tuple[str, dict]:
    """'mrp step=0.05 granularity=layer' -> ('mrp', {'allocation.mrp.step': 0.05, ...})."""
    method, *pairs = spec.split()
    options: dict = {}
    for pair in pairs:
        key, value = pair.split("=")
        integer = key in ("checkpoint_stride", "batch_size")
        parsed = None if value == "None" else int(value) if integer else number_or_text(value)
        if key == "from":  # resolved by main() once that run has happened
            options["from"] = value
        elif key in ("granularity", "ratios"):  # 'file ratios=PATH' evaluates a saved allocation
            options[f"allocation.{key}"] = parsed
        elif key == "metric":
            options["metric"] = parsed
        elif key == "batch_size":  # micro-batch: the same computation in another summation order
            options["runtime.batch_size"] = parsed
        else:
            options[f"allocation.{SECTION[method]}.{key}"] = parsed
    return method, options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=PATH (repeatable)")
    parser.add_argument("--sparsities", default="0.7")
    parser.add_argument("--run", action="append", required=True)
    parser.add_argument("--metric", default="wanda")
    parser.add_argument("--eval", choices=("heldout", "wikitext"), default="heldout")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=16)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--data", default=None, help="folder with the C4 parquet and WikiText file (default: "
                        "../shared/data)")
    parser.add_argument("--dense", action="store_true", help="also evaluate each dense model")
    parser.add_argument("--work", default="/tmp/mrprune-bench")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    parser.add_argument("--keep-allocation", action="store_true", help="store each run's whole allocation "
                        "report in its row (for MRP: thresholds, final ratios and every iteration's trace)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    c4, wikitext = (Path(args.data) / C4.name, Path(args.data) / WIKITEXT.name) if args.data else (C4, WIKITEXT)
    if args.eval == "heldout":
        calib_file, eval_file = c4_split(Path(args.work), c4)
    else:
        calib_file, eval_file = c4, wikitext
    rows = []
    for spec_model in args.model:
        name, path = spec_model.split("=", 1)
        loaded = load_model(path, dtype=args.dtype, device=args.device)
        model, tok = loaded.model, loaded.tokenizer
        adapter = get_adapter(model)
        dense = {ref.name: ref.weight.detach().to("cpu", copy=True) for ref in adapter.all_linear_layers()}
        ids = sample_calibration(read_corpus(str(calib_file), "calibration"), tok, args.nsamples, args.seqlen, args.seed)
        device = resolve_device(args.device)
        dense_norms = sq_norms(adapter, ids, device)
        taus = {}  # outlier thresholds per M: the spread of a run is measured with its own M
        corpus = load_eval_text(str(eval_file))
        if args.dense:
            ppl = perplexity(model, tok, corpus, args.eval_seqlen, args.max_windows, device=device, progress=False)
            rows.append({"model": name, "sparsity": 0.0, "run": "dense", "ppl": ppl.perplexity,
                         "protocol": ppl.protocol})
            print(f"{name:<8} 0.00 {'dense':<55} ppl {ppl.perplexity:10.3f}", flush=True)
        for sparsity in [float(s) for s in args.sparsities.split(",")]:
            layer_ratios = {}  # run spec -> the per-layer sparsities it ended with
            for spec in args.run:
                method, options = parse_run(spec)
                if "from" in options:
                    source = options.pop("from")
                    if source not in layer_ratios:
                        parser.error(f"'{spec}': no earlier run '{source}' at sparsity {sparsity}")
                    saved = Path(args.work) / f"{name}-{sparsity}-{source.replace(' ', '_')}.json"
                    saved.parent.mkdir(parents=True, exist_ok=True)
                    saved.write_text(json.dumps({"layers": layer_ratios[source]}))
                    options["allocation.ratios"] = str(saved)
                for ref in adapter.all_linear_layers():
                    ref.set_weight(dense[ref.name])
                config = merge(PruneConfig(), {"metric": args.metric, "sparsity": sparsity,
                                               "allocation.method": method, "runtime.device": args.device,
                                               "calibration.nsamples": args.nsamples,
                                               "calibration.seqlen": args.seqlen, **options})
                m = config.allocation.mrp.m
                if m not in taus:  # while the weights are dense
                    taus[m] = dense_thresholds(adapter, dense_norms, m=m)
                with PeakMemory(device) as memory:
                    start = time.perf_counter()
                    outcome = prune(model, config, tokenizer=tok, progress=False, calibration_ids=ids)
                    seconds = time.perf_counter() - start
                cv = spread(non_outlier_ratios(adapter, sq_norms(adapter, ids, device, dense), taus[m]))["cv"]
                ppl = perplexity(model, tok, corpus, args.eval_seqlen, args.max_windows, device=device,
                                 progress=False)
                alloc = outcome.report.allocation
                layer_ratios[spec] = {layer["name"]: layer["sparsity"] for layer in outcome.report.layers}
                row = {"model": name, "sparsity": sparsity, "seed": args.seed, "run": spec, "ppl": ppl.perplexity,
                       "seconds": round(seconds, 2), "peak_gib": memory.gib, "iterations": alloc.get("iterations"),
                       "cv": cv, "cv_m": m,
                       "blocks": [round(b, 4) for b in alloc["block_targets"]],
                       "timings": outcome.report.timings_s, "protocol": ppl.protocol}
                if args.keep_allocation:
                    row["allocation"] = alloc
                rows.append(row)
                print(f"{name:<8} {sparsity:.2f} {spec:<55} ppl {ppl.perplexity:10.3f} {seconds:7.1f}s "
                      f"{memory.gib:6.2f} GiB it {row['iterations']} cv {row['cv']:.4f}", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(rows, indent=2))
        del model, adapter, dense
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"protocol: {rows[-1]['protocol']}; calibration {args.nsamples} x {args.seqlen} from {calib_file.name}")


if __name__ == "__main__":
    main()
