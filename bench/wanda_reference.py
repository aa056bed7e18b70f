"""Independent reference implementation of Wanda (Sun et al. 2023, arXiv 2306.11695) in the style of the
original research code, to cross-check mrprune's Wanda. It deliberately imports nothing from mrprune.

Protocol: C4-style calibration (random document longer than seqlen, random window in it, Python ``random``
seeded with --seed); block-by-block pruning where block l's statistics come from the outputs of the already
pruned blocks < l; score |W_ij| * ||X_j||_2 and the int(in * s) lowest scores of every row removed; then
WikiText-2 perplexity over non-overlapping windows, PPL = exp(mean over windows of the mean token NLL).

    python bench/wanda_reference.py --model DIR --calib c4.parquet --nsamples 32 --seqlen 512 --sparsity 0.5 \
        --max-windows 8 [--save pruned.safetensors]
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def get_c4_calibration(path: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> list[torch.Tensor]:
    """nsamples windows (1 x seqlen ids): a random document longer than seqlen, then a random start in it."""
    docs = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    random.seed(seed)
    samples = []
    for _ in range(nsamples):
        while True:
            enc = tokenizer(docs[random.randint(0, len(docs) - 1)], return_tensors="pt").input_ids
            if enc.shape[1] > seqlen:
                break
        start = random.randint(0, enc.shape[1] - seqlen - 1)
        samples.append(enc[:, start : start + seqlen])
    return samples


class StopForward(Exception):
    pass


def clean(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    for key in CACHE_KWARGS:
        if key in kwargs:
            kwargs[key] = None
    return kwargs


@torch.no_grad()
def capture(model, layers, samples, device):
    """(hidden states entering block 0 for every sample, kwargs of every block from one full forward)."""
    block_kwargs = [None] * len(layers)

    def recorder(i):
        def hook(module, args, kwargs):
            assert len(args) <= 1, "extra positional block arguments are not handled"
            block_kwargs[i] = clean({k: v for k, v in kwargs.items() if k != "hidden_states"})

        return hook

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    model(samples[0].to(device), use_cache=False)
    for h in handles:
        h.remove()

    inps = []

    def catcher(module, args, kwargs):
        inps.append(args[0] if args else kwargs["hidden_states"])
        raise StopForward

    handle = layers[0].register_forward_pre_hook(catcher, with_kwargs=True)
    for sample in samples:
        try:
            model(sample.to(device), use_cache=False)
        except StopForward:
            pass
    handle.remove()
    return inps, block_kwargs


def run_block(layer, inps, kwargs):
    outs = []
    for x in inps:  # one sample at a time, as the original code does
        out = layer(x, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


@torch.no_grad()
def prune_wanda(model, samples, sparsity: float, device) -> None:
    layers = model.model.layers
    inps, block_kwargs = capture(model, layers, samples, device)
    for i, layer in enumerate(layers):
        linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        sum_sq = {name: torch.zeros(m.in_features, dtype=torch.float32, device=device) for name, m in linears.items()}

        def accumulate(acc: torch.Tensor):
            def hook(module, inp, out):
                x = inp[0].reshape(-1, inp[0].shape[-1]).float()
                acc.add_((x * x).sum(dim=0))

            return hook

        handles = [m.register_forward_hook(accumulate(sum_sq[name])) for name, m in linears.items()]
        run_block(layer, inps, block_kwargs[i])
        for h in handles:
            h.remove()

        for name, m in linears.items():
            W = m.weight.data
            score = W.abs() * torch.sqrt(sum_sq[name])[None, :]
            order = torch.sort(score, dim=-1, stable=True)[1]
            mask = torch.zeros_like(W, dtype=torch.bool)
            mask.scatter_(1, order[:, : int(W.shape[1] * sparsity)], True)
            W[mask] = 0
        inps = run_block(layer, inps, block_kwargs[i])  # outputs of the pruned block feed the next one


@torch.no_grad()
def wikitext_ppl(model, tokenizer, path: str, seqlen: int, max_windows: int | None, device) -> tuple[float, int]:
    ids = tokenizer(Path(path).read_text(encoding="utf-8"), return_tensors="pt").input_ids
    n = ids.shape[1] // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    nlls = []
    for w in range(n):
        batch = ids[:, w * seqlen : (w + 1) * seqlen].to(device)
        logits = model(batch, use_cache=False).logits[0, :-1].float()
        nlls.append(F.cross_entropy(logits, batch[0, 1:]).item())
    return math.exp(sum(nlls) / n), n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--calib", required=True, help="parquet file with a 'text' column (C4 documents)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--text", default="/work/shared/data/wikitext2_test.txt", help="WikiText-2 test text")
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--save", help="write the pruned model's state dict to this safetensors file")
    args = p.parse_args()
    device = torch.device(args.device)

    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).eval()
    model.config.use_cache = False
    if args.sparsity > 0:
        samples = get_c4_calibration(args.calib, tokenizer, args.nsamples, args.seqlen, args.seed)
        t1 = time.time()
        prune_wanda(model, samples, args.sparsity, device)
        print(f"calibration {t1 - t0:.1f}s, pruning {time.time() - t1:.1f}s")
    linears = [m.weight for layer in model.model.layers for m in layer.modules() if isinstance(m, nn.Linear)]
    zeros, total = sum(int((w == 0).sum()) for w in linears), sum(w.numel() for w in linears)
    print(f"decoder linear sparsity {zeros / total:.6f} ({zeros}/{total})")
    if args.save:
        from safetensors.torch import save_model

        save_model(model, args.save)
    t2 = time.time()
    ppl, n = wikitext_ppl(model, tokenizer, args.text, args.eval_seqlen, args.max_windows, device)
    print(f"wikitext2 perplexity {ppl:.4f} ({n} windows of {args.eval_seqlen} tokens, {time.time() - t2:.1f}s)")
    print(f"total wall time {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
