"""A mixture of experts with real weights: SmolLM2-135M upcycled into a Mixtral, then pruned like the dense model.

No real MoE checkpoint can be downloaded on these machines, so this builds one from the embedded SmolLM2: every
block's MLP is copied into each of --experts experts and a random router picks --top-k of them per token. The
router's weights over the chosen experts sum to one and the experts are identical, so the dense MoE computes
exactly the dense model (its perplexity is the same, which checks the conversion). Pruning then treats each
expert as its own layers, calibrated on the tokens the router sends it, and the experts drift apart: the
perplexity after pruning, against the dense model pruned with the same metric and calibration, says what
calibrating each expert on a share of the tokens costs.

    python bench/moe_upcycle.py --out /tmp/smollm2-moe --json moe_upcycle.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers

from mrprune import PruneConfig, prune
from mrprune.config import merge
from mrprune.models.loading import convert_gguf, embedded_default_gguf


def upcycle(dense_dir: Path, out: Path, experts: int, top_k: int, seed: int) -> Path:
    """Write a Mixtral with ``experts`` copies of each dense MLP and a random router; returns ``out``."""
    dense = transformers.AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    c = dense.config
    config = transformers.MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=c.rope_parameters, tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, num_local_experts=experts,
        num_experts_per_tok=top_k, sliding_window=None, router_jitter_noise=0.0)
    torch.manual_seed(seed)
    moe = transformers.MixtralForCausalLM(config).eval()
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, _ = moe.load_state_dict(state, strict=False)
    with torch.no_grad():
        for block, source in zip(moe.model.layers, dense.model.layers):
            mlp = source.mlp
            block.mlp.experts.gate_up_proj.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])[None])
            block.mlp.experts.down_proj.copy_(mlp.down_proj.weight[None])
            block.mlp.gate.weight.normal_(0.0, 0.02)
    left = [k for k in missing if not (".mlp.experts." in k or ".mlp.gate." in k or k == "lm_head.weight")]
    if left:
        raise RuntimeError(f"weights not copied: {left[:5]}")
    moe.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(dense_dir).save_pretrained(out)
    return out


def run(model: Path, metric: str, sparsity: float, args) -> dict:
    config = merge(PruneConfig(), {
        "model": str(model), "metric": metric, "sparsity": sparsity, "calibration.source": args.calib,
        "calibration.nsamples": args.nsamples, "calibration.seqlen": args.seqlen, "runtime.device": "cpu",
        "evaluate": True, "evaluation.text": args.eval_text, "evaluation.max_windows": args.max_windows})
    start = time.perf_counter()
    outcome = prune(config=config, progress=False)
    report = outcome.report
    return {"model": model.name, "metric": metric, "sparsity": sparsity, "seconds": time.perf_counter() - start,
            "before": report.perplexity["before"]["perplexity"], "after": report.perplexity["after"]["perplexity"],
            "protocol": report.perplexity["after"]["protocol"], "experts": report.extra.get("experts"),
            "achieved": report.sparsity["achieved"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/smollm2-moe", help="where the upcycled model is written")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="of the random router")
    parser.add_argument("--metrics", default="wanda,sparsegpt")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--calib", default="embedded")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-text", default="embedded")
    parser.add_argument("--max-windows", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    dense_dir = convert_gguf(embedded_default_gguf())
    moe_dir = upcycle(dense_dir, Path(args.out), args.experts, args.top_k, args.seed)
    rows = []
    for metric in args.metrics.split(","):
        for model in (dense_dir, moe_dir):
            rows.append(run(model, metric, args.sparsity, args))
            r = rows[-1]
            print(f"{r['model']:<48} {metric:<9} {r['before']:.3f} -> {r['after']:.3f}  ({r['seconds']:.0f} s) "
                  f"{r['experts'] or ''}", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"experts": args.experts, "top_k": args.top_k,
                                                       "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
