"""Compare the memory preflight's estimate with the measured peak of real runs (CUDA or CPU).

Builds a random Llama of the given size (bfloat16 on CUDA), saves it with a small trained tokenizer, prunes it
once per setting through ``mrprune.prune`` and prints, per setting, the preflight's estimate of each pool and
the measured peak from the moment of the preflight: on CUDA ``torch.cuda.max_memory_reserved`` (what the
caching allocator took from the device) and ``max_memory_allocated``.

    python scripts/preflight_check.py --hidden 2048 --intermediate 5632 --layers 8 --nsamples 64 --seqlen 2048
    python scripts/preflight_check.py --hidden 2048 --intermediate 5632 --layers 4 --experts 8   # a mixture of experts
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def main() -> None:
    import transformers

    import mrprune.preflight as pf
    from mrprune import PruneConfig, prune
    from mrprune.config import merge
    from mrprune.testing import train_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=0, help="a Mixtral-shaped MoE, --intermediate per expert")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--settings", default="wanda,sparsegpt,wanda+offload,wanda+offload_activations,mrp-fast")
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and args.device != "cpu"
    shape = {"hidden_size": args.hidden, "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
             "num_attention_heads": args.heads, "num_key_value_heads": args.heads // 4 or 1, "vocab_size": 4096,
             "max_position_embeddings": max(4096, args.seqlen), "bos_token_id": 1, "eos_token_id": 2}
    if args.experts:
        config = transformers.MixtralConfig(num_local_experts=args.experts, num_experts_per_tok=args.top_k, **shape)
    else:
        config = transformers.LlamaConfig(**shape)
    folder = Path(tempfile.mkdtemp(prefix="preflight-check-"))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32
                                                  ).save_pretrained(folder)
    train_tokenizer().save_pretrained(folder)

    seen: dict = {}
    check = pf.check

    def spy(est, free, plan):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            seen["base_reserved"] = torch.cuda.memory_reserved()
        seen["estimate"] = {pool: est.total(pool) for pool in est.pools}
        seen["parts"] = est.pools
        return check(est, free, plan)

    pf.check = spy
    for setting in args.settings.split(","):
        name, *flags = setting.split("+")
        overrides = {"model": str(folder), "calibration.source": "embedded", "calibration.nsamples": args.nsamples,
                     "calibration.seqlen": args.seqlen, "runtime.device": args.device}
        if name == "mrp-fast":
            overrides["allocation.method"] = "mrp-fast"
        else:
            overrides["metric"] = name
        for flag in flags:
            overrides[f"runtime.{flag}"] = True
        if cuda:
            torch.cuda.empty_cache()
        prune(config=merge(PruneConfig(), overrides), progress=False)
        row = {"setting": setting, "estimate_gib": {k: round(v / 2**30, 3) for k, v in seen["estimate"].items()}}
        if cuda:
            row["measured_reserved_gib"] = round((torch.cuda.max_memory_reserved() - seen["base_reserved"]) / 2**30, 3)
            row["measured_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            row["ratio_estimate_to_reserved"] = round(seen["estimate"]["device"] / 2**30
                                                      / max(row["measured_reserved_gib"], 1e-9), 2)
        row["parts_gib"] = {pool: {k: round(v / 2**30, 3) for k, v in parts.items()}
                            for pool, parts in seen["parts"].items()}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
