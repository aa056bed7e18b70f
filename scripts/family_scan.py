"""Which causal-LM model types of the installed transformers mrprune accepts, and what it leaves dense.

For every model type with a causal-LM class, a tiny configuration is built on PyTorch's meta device (no
weights, seconds in all) and handed to the adapter. Each accepted type gets one line: its number of prunable
layers in block 0, how many of them are experts, its routers, and the share of the block's weight matrices
that no prunable layer covers (convolution kernels and the like, which stay dense). Refused types print the
one-line reason a user would see. With --forward every accepted type is also built for real (random weights,
float32, CPU) and run: its perplexity on one window block by block (the order offloaded evaluation uses, with
the model's own head) against one whole forward, and a Wanda 50% pruning through mrprune.prune. Run it after
upgrading transformers:

    python scripts/family_scan.py              # every type
    python scripts/family_scan.py --moe        # only the types with experts
    python scripts/family_scan.py --forward    # and run each accepted type (minutes)
"""

from __future__ import annotations

import argparse
import warnings

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from mrprune.models import get_adapter
from mrprune.models.adapter import ExpertRef

#: small values for whichever of these a configuration has (the rest keep their defaults)
TINY = {"hidden_size": 64, "intermediate_size": 64, "moe_intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts": 4,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "head_dim": 16, "vocab_size": 256}


#: --forward builds models up to this size (a configuration whose sizes TINY does not reach can be huge)
MAX_RUN_PARAMS = 20_000_000


def tiny_model(model_type: str, device: str = "meta"):
    config = AutoConfig.for_model(model_type)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for part in {id(config): config, id(text): text}.values():
        for key, value in TINY.items():
            if hasattr(part, key):
                setattr(part, key, value)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def describe(model) -> tuple[str, int]:
    adapter = get_adapter(model)
    refs, routers = adapter.linear_layers(0), adapter.routers(0)
    block = adapter.blocks[0]
    matrices = sum(p.numel() for p in block.parameters() if p.ndim >= 2)
    covered = sum(r.numel for r in refs) + sum(model.get_submodule(n).weight.numel() for n in routers)
    experts = sum(isinstance(r, ExpertRef) for r in refs)
    return (f"{len(refs)} layers ({experts} expert matrices), routers {len(routers)}, "
            f"dense {1 - covered / max(matrices, 1):.1%}"), experts


def run(model_type: str) -> str:
    """Block-by-block perplexity against a whole forward, then a Wanda 50% pruning, of a tiny real model."""
    from mrprune import CalibrationConfig, PruneConfig, prune
    from mrprune.evaluate.perplexity import block_major_nlls, window_nll

    torch.manual_seed(0)
    model = tiny_model(model_type, "cpu").eval()
    ids = torch.randint(3, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    try:
        with torch.inference_mode():
            whole = window_nll(model, ids[0], cpu)
    except Exception as exc:  # noqa: BLE001 (transformers' own forward, not mrprune: the tiny sizes do not suit it)
        return f"(its own forward fails at the tiny sizes: {type(exc).__name__})"
    by_block = block_major_nlls(model, ids[:1], cpu, progress=False)[0]
    if abs(by_block - whole) > 1e-4 * max(1.0, abs(whole)):
        return f"MISMATCH block by block {by_block:.6f}, whole forward {whole:.6f}"
    config = PruneConfig(model=None, metric="wanda", sparsity=0.5,
                         calibration=CalibrationConfig(nsamples=2, seqlen=16))
    outcome = prune(model, config, progress=False, calibration_ids=ids)
    return f"ran: nll {whole:.4f} both ways, pruned to {outcome.report.sparsity['achieved']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moe", action="store_true", help="only model types whose blocks have experts")
    parser.add_argument("--forward", action="store_true", help="also run each accepted type on real weights")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            model = tiny_model(model_type)
        except Exception as exc:  # noqa: BLE001 (any failure of a configuration is a row: say so, go on)
            line, experts = f"(no tiny configuration: {type(exc).__name__})", 0
        else:
            try:
                line, experts = describe(model)
            except Exception as exc:  # noqa: BLE001 (mrprune's refusal, as a user would read it)
                line, experts = f"refused: {exc}", 0
            else:
                params = sum(p.numel() for p in model.parameters())
                if args.forward and (experts or not args.moe) and params > MAX_RUN_PARAMS:
                    line += f"; not run: {params / 1e6:.0f}M parameters at the tiny sizes"
                elif args.forward and (experts or not args.moe):
                    try:
                        line += f"; {run(model_type)}"
                    except Exception as exc:  # noqa: BLE001 (a failure to run is the row's finding)
                        line += f"; FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        if not args.moe or experts:
            print(f"{model_type:<28} {line}", flush=True)


if __name__ == "__main__":
    main()
