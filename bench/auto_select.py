"""Does `--allocation auto` choose what WikiText-2 would? Each candidate allocation prunes the same dense weights
with the same calibration windows (C4 sample); each pruned model is measured on auto's held-out windows (C4
documents calibration did not use, the choice's only input) and on WikiText-2 test (which auto never sees).
Reports, per model and sparsity, the held-out and WikiText-2 perplexity of every candidate, auto's choice, the
WikiText-2 winner and the choice's regret (its WikiText-2 perplexity over the winner's). With --auto-run, the
real `mrprune.prune(--allocation auto)` runs too, to confirm its choice and time it against uniform.

    python bench/auto_select.py --model smollm2=<dir or gguf> --sparsities 0.6,0.7 --json auto_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import C4, WIKITEXT

from mrprune import PruneConfig, prune
from mrprune.allocate import COMPARED_BY_DEFAULT
from mrprune.config import merge
from mrprune.data import load_eval_text, read_corpus, sample_with_heldout
from mrprune.evaluate.perplexity import perplexity, windows_perplexity, with_bos
from mrprune.models import get_adapter, load_model, resolve_device
from mrprune.spill import restore, snapshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=PATH (repeatable)")
    parser.add_argument("--sparsities", default="0.6,0.7")
    parser.add_argument("--candidates", default=",".join(COMPARED_BY_DEFAULT))
    parser.add_argument("--metric", default="wanda")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--heldout", type=int, default=16, help="auto's held-out windows (its default: 16)")
    parser.add_argument("--max-windows", type=int, default=16, help="WikiText-2 windows of --eval-seqlen")
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--auto-run", action="store_true", help="also run --allocation auto and uniform for real")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    device = resolve_device(args.device)
    names = args.candidates.split(",")
    rows, cells = [], []
    for spec_model in args.model:
        name, path = spec_model.split("=", 1)
        loaded = load_model(path or None, dtype=args.dtype, device=args.device)  # NAME= : the embedded default
        model, tok = loaded.model, loaded.tokenizer
        adapter = get_adapter(model)
        dense = snapshot(adapter.all_linear_layers(), "cpu")
        corpus = read_corpus(str(C4), "calibration")
        ids, held = sample_with_heldout(corpus, tok, args.nsamples, args.seqlen, args.seed, args.heldout)
        held, bos = with_bos(held, tok, "auto", model.config.model_type)
        wikitext = load_eval_text(str(WIKITEXT))
        base = {"metric": args.metric, "runtime.device": args.device, "runtime.dtype": args.dtype,
                "calibration.source": str(C4), "calibration.nsamples": args.nsamples,
                "calibration.seqlen": args.seqlen, "calibration.seed": args.seed}
        for sparsity in [float(s) for s in args.sparsities.split(",")]:
            scores = {}
            for method in names:
                restore(adapter.all_linear_layers(), dense)
                config = merge(PruneConfig(), {**base, "sparsity": sparsity, "allocation.method": method})
                start = time.perf_counter()
                prune(model, config, tokenizer=tok, progress=False, calibration_ids=ids)
                seconds = time.perf_counter() - start
                h = windows_perplexity(model, held, bos, corpus.name, device, False).perplexity
                w = perplexity(model, tok, wikitext, args.eval_seqlen, args.max_windows, device=device,
                               progress=False)
                scores[method] = (h, w.perplexity)
                rows.append({"model": name, "sparsity": sparsity, "allocation": method, "heldout_ppl": h,
                             "wikitext_ppl": w.perplexity, "prune_seconds": round(seconds, 2),
                             "protocol": w.protocol})
                print(f"{name:<8} {sparsity:.2f} {method:<14} held-out {h:10.3f}  wikitext {w.perplexity:10.3f} "
                      f"{seconds:7.1f}s", flush=True)
            chosen = min(names, key=lambda m: scores[m][0])
            best = min(names, key=lambda m: scores[m][1])
            cell = {"model": name, "sparsity": sparsity, "chosen": chosen, "wikitext_best": best,
                    "regret": scores[chosen][1] / scores[best][1] - 1}
            if args.auto_run:
                timed = {}
                for method in ("uniform", "auto"):
                    restore(adapter.all_linear_layers(), dense)
                    config = merge(PruneConfig(), {**base, "sparsity": sparsity, "allocation.method": method,
                                                   "allocation.auto.candidates": args.candidates,
                                                   "allocation.auto.windows": args.heldout})
                    start = time.perf_counter()
                    outcome = prune(model, config, tokenizer=tok, progress=False)
                    timed[method] = time.perf_counter() - start
                selection = outcome.report.extra["allocation_selection"]
                cell.update(auto_chosen=selection["chosen"], auto_seconds=round(timed["auto"], 1),
                            uniform_seconds=round(timed["uniform"], 1),
                            auto_over_uniform=round(timed["auto"] / timed["uniform"], 2))
            cells.append(cell)
            print(json.dumps(cell), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"rows": rows, "cells": cells, "heldout_bos": bos,
                                                       "settings": vars(args)}, indent=2))
        del model, adapter, dense
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
