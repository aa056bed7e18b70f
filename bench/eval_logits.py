"""Peak memory and time of a perplexity evaluation with the head on slices of positions (the default beyond
``LOGIT_BYTES``) against all of a window's logits at once, on a real model (``common.PeakMemory`` above what
the loaded model holds: the resident set sampled every 20 ms on the CPU, torch's peak allocation on CUDA).

    python bench/eval_logits.py --model <Gemma-3 GGUF or dir> --windows 4
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WIKITEXT, PeakMemory

from mrprune.data import load_eval_text
from mrprune.evaluate.perplexity import LOGIT_BYTES, model_windows, window_nll
from mrprune.models.loading import load_model


def measure(model, windows, device, logit_bytes: int) -> dict:
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        nlls = [window_nll(model, w, device, logit_bytes=logit_bytes) for w in windows]
        seconds = time.perf_counter() - start
    return {"ppl": math.exp(sum(nlls) / len(nlls)), "seconds": round(seconds, 2),
            "peak_above_model_gib": round((memory.peak_bytes - memory.start_bytes) / 2**30, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    loaded = load_model(args.model, device=args.device)
    windows, _ = model_windows(loaded.model, loaded.tokenizer, load_eval_text(str(WIKITEXT)), args.seqlen,
                               args.windows, "auto")
    rows = []
    for name, budget in (("all positions at once", 1 << 62), (f"slices ({LOGIT_BYTES >> 20} MiB)", LOGIT_BYTES)):
        row = {"head": name, **measure(loaded.model, windows, device, budget)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"{args.windows} windows of {args.seqlen} tokens of {WIKITEXT.name}, {device}, "
          f"vocabulary {loaded.model.get_output_embeddings().weight.shape[0]}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
