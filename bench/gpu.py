"""GPU speed and memory on a LLaMA-2-7B-shaped model with random weights, against llm-compressor.

One command measures, on the same model and the same n x seqlen calibration tokens: the floor (one dense
forward of the calibration set through all blocks), then each mrprune method with and without --offload
(wall time split by phase, peak GPU memory, achieved sparsity), then llm-compressor's WandaPruningModifier and
SparseGPTModifier through its sequential pipeline. Random weights say nothing about quality: only time and
memory are meaningful. Prints a Markdown table and writes JSON.

    python bench/gpu.py --json gpu.json                      # full LLaMA-2-7B shape, 128 x 2048
    python bench/gpu.py --layers 2 --hidden 256 --mlp 688 --nsamples 8 --seqlen 128   # a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from mrprune import PruneConfig, prune
from mrprune.config import merge
from mrprune.metrics import SparsityPattern, build_metric
from mrprune.models import get_adapter
from mrprune.runner import SequentialPruner
from mrprune.runtime import place_model, streamed_blocks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import C4, WIKITEXT, add_llama_shape, llama_shape_config, number_or_text

GIB = 2**30


def build_model(args) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    config = llama_shape_config(args)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    return model.eval()


class Weights:
    """Dense decoder weights kept in pinned host memory, restored before every run."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.saved = {r.name: r.weight.detach().to("cpu").pin_memory() for r in adapter.all_linear_layers()}

    def restore(self, offload: bool) -> None:
        model = self.adapter.model
        if offload:
            model.to("cpu")
        else:
            model.to("cuda")
        for ref in self.adapter.all_linear_layers():
            ref.weight.copy_(self.saved[ref.name], non_blocking=True)
        torch.cuda.synchronize()


def measure(fn) -> dict:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        extra = fn() or {}
        error = None
    except Exception as exc:  # a benchmark keeps going and records what failed
        traceback.print_exc()
        extra, error = {}, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start, "peak_gib": torch.cuda.max_memory_allocated() / GIB,
            "error": error, **extra}


def floor(adapter, ids, args, offload: bool) -> dict:
    """One dense forward of the calibration set through every block, the way the runner does it."""
    runner = SequentialPruner(adapter, build_metric("magnitude"), SparsityPattern(), torch.device("cuda"),
                              args.batch_size, offload, args.offload_activations and offload, progress=False)
    acts = runner.capture(ids)
    for index in range(adapter.num_blocks):
        runner._block_on_device(index)
        runner.advance(acts)
        runner._release(index, changed=False)
    return {"phases": runner.timer.as_dict()}


def eval_run(model, adapter, ids, args, offload: bool, order: str) -> dict:
    """Perplexity evaluation of ``--eval-windows`` windows of the calibration ids, in the order mrprune uses
    (``order='auto'``: block by block when offloaded) or window by window (``'window'``: with --offload every
    block moves in for each window's forward), which was the only order before."""
    from mrprune.evaluate.perplexity import block_major_nlls, window_nll

    device = torch.device("cuda")
    place_model(model, adapter.blocks_name, device, offload)
    windows = ids[: args.eval_windows]
    if order == "auto" and offload:
        nlls = block_major_nlls(model, windows, device, progress=False)
    else:
        with streamed_blocks(adapter.blocks, device, offload):
            nlls = [window_nll(model, window, device) for window in windows]
    return {"mean_nll": sum(nlls) / len(nlls), "windows": len(nlls)}


@functools.cache
def bench_tokenizer(vocab: int):
    from mrprune.testing import train_tokenizer

    return train_tokenizer(vocab)  # real text, ids below the model's vocabulary


def zeroshot_run(model, adapter, args, offload: bool, order: str) -> dict:
    """RTE (``--zs-limit`` items, local data from ``--task-data``) through lm-eval, in the order mrprune uses
    (``'auto'``: block by block when offloaded) or one forward per lm-eval batch (``'forward'``: with --offload
    every block moves in for each batch)."""
    from mrprune.evaluate import zeroshot as zs

    device = torch.device("cuda")
    place_model(model, adapter.blocks_name, device, offload)
    tasks = zs.prepare_tasks("rte", args.task_data)
    tokenizer = bench_tokenizer(args.vocab)
    context = streamed_blocks(adapter.blocks, device, offload) if order == "forward" else contextlib.nullcontext()
    with context:
        result = zs.evaluate_zeroshot(model, tokenizer, tasks, limit=args.zs_limit, batch_size=args.zs_batch_size,
                                      offload=offload and order == "auto")
    rte = result.to_dict()["tasks"]["rte"]
    return {"acc": rte["acc"], "items": rte["items"]}


def auto_text() -> str:
    """A running text long enough for 128 x 2048 calibration windows plus auto's held-out windows, sharing no
    token with them, under the bench tokenizer: the C4 sample's documents joined, then WikiText-2 test."""
    import pandas

    path = Path("/tmp/mrprune-bench-auto.txt")
    if not path.exists():
        path.write_text("\n\n".join(pandas.read_parquet(C4)["text"]) + "\n\n" + WIKITEXT.read_text())
    return str(path)


def mrprune_run(model, ids, args, method: str, offload: bool) -> dict:
    """One prune() call. 'auto' (--allocation auto over its default candidates) needs real text for its
    held-out windows: it calibrates on auto_text() through the bench tokenizer instead of on ``ids``."""
    metric, allocation = (method, "uniform") if method in ("magnitude", "wanda", "sparsegpt") else ("wanda", method)
    sparsity = args.sparsity if allocation == "uniform" else args.mrp_sparsity
    mrp = {f"allocation.mrp.{k}": number_or_text(v) for k, v in (p.split("=") for p in args.mrp_options.split())}
    config = merge(PruneConfig(), {
        **(mrp if allocation.startswith("mrp") else {}),
        "metric": metric, "sparsity": sparsity, "allocation.method": allocation, "runtime.device": "cuda",
        "runtime.offload": offload, "runtime.offload_activations": args.offload_activations and offload,
        "runtime.batch_size": args.batch_size,
        "calibration.nsamples": ids.shape[0], "calibration.seqlen": ids.shape[1],
        **({"calibration.source": auto_text()} if allocation == "auto" else {}),
    })
    if allocation == "auto":
        outcome = prune(model, config, tokenizer=bench_tokenizer(args.vocab), progress=args.progress)
    else:
        outcome = prune(model, config, progress=args.progress, calibration_ids=ids)
    report = outcome.report
    result = {"phases": report.timings_s, "sparsity": report.sparsity["achieved"]}
    if "iterations" in report.allocation:
        result["iterations"] = report.allocation["iterations"]
    selection = report.extra.get("allocation_selection")
    if selection:
        result["selection"] = selection
    return result


def llmc_run(model, ids, args, method: str) -> dict:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from torch.utils.data import DataLoader

    modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method](
        sparsity=args.sparsity, targets=["Linear"], ignore=["lm_head"])
    if not model.config._name_or_path:  # llm-compressor re-reads the config from this path
        import tempfile

        model.config._name_or_path = tempfile.mkdtemp(prefix="random-llama-")
        model.config.save_pretrained(model.config._name_or_path)
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    loader = DataLoader(rows, batch_size=1)
    oneshot(model=model, dataset=loader, recipe=modifier, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], pipeline="sequential", processor=placeholder_tokenizer())
    adapter = get_adapter(model)
    refs = adapter.all_linear_layers()
    zeros = sum(int((r.weight == 0).sum()) for r in refs)
    return {"sparsity": zeros / sum(r.numel for r in refs),
            "layer_sparsity_range": [min(float((r.weight == 0).float().mean()) for r in refs),
                                     max(float((r.weight == 0).float().mean()) for r in refs)]}


def placeholder_tokenizer():
    """llm-compressor insists on a processor when given data; the random model's token ids need none."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<unk>")


def table(rows: list[dict]) -> str:
    phases = ["capture", "statistics", "masks", "recompute", "dense statistics", "mrp statistics"]
    lines = ["| run | offload | wall (s) | x floor | " + " | ".join(phases) + " | peak GPU (GiB) | sparsity |",
             "|---|---|---|---|" + "---|" * len(phases) + "---|---|"]
    base = next((r["seconds"] for r in rows if r["run"] == "floor" and not r["offload"]), None)
    for r in rows:
        p = r.get("phases", {})
        ratio = f"{r['seconds'] / base:.2f}" if base else "-"
        cells = " | ".join(f"{p[k]:.1f}" if k in p else "" for k in phases)
        sparsity = f"{r['sparsity']:.4f}" if "sparsity" in r else ""
        note = f" ({r['error']})" if r.get("error") else ""
        lines.append(f"| {r['run']}{note} | {'yes' if r['offload'] else 'no'} | {r['seconds']:.1f} | {ratio} | "
                     f"{cells} | {r['peak_gib']:.2f} | {sparsity} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_llama_shape(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--mrp-sparsity", type=float, default=0.7)
    parser.add_argument("--runs", default="floor,magnitude,wanda,sparsegpt,mrp-fast,mrp",
                        help="also 'eval': perplexity of --eval-windows windows as mrprune computes it (block "
                             "by block when offloaded), 'eval-per-window': window by window; 'zeroshot': RTE "
                             "through lm-eval as mrprune runs it, 'zeroshot-per-forward': a forward per batch; "
                             "'auto': --allocation auto (C4 + WikiText-2 text through a trained tokenizer)")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--zs-limit", type=int, default=100, help="'zeroshot' runs: RTE items")
    parser.add_argument("--zs-batch-size", type=int, default=8)
    parser.add_argument("--task-data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--offload", default="no,yes", help="which of no,yes to run")
    parser.add_argument("--offload-runs", default=None, help="runs repeated with --offload (default: --runs)")
    parser.add_argument("--offload-activations", action="store_true", help="with --offload, activations on CPU")
    parser.add_argument("--llmc", default="wanda,sparsegpt", help="llm-compressor methods ('' to skip)")
    parser.add_argument("--mrp-options", default="", help="e.g. 'step=0.1 gamma=0.9 min_step=0.02 pilot=dense'")
    parser.add_argument("--progress", action="store_true", help="progress bars on stderr")
    parser.add_argument("--verbose", action="store_true", help="mrprune's debug log (every MRP iteration) on stderr")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.verbose:
        logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger("mrprune").setLevel(logging.DEBUG)

    model = build_model(args)
    adapter = get_adapter(model)
    weights = Weights(adapter)
    ids = torch.randint(0, args.vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    rows = []
    def save() -> None:
        if args.json:  # after every row, so a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps({"env": environment(args), "rows": rows}, indent=2))

    for offload in [o == "yes" for o in args.offload.split(",") if o]:
        runs = args.offload_runs if offload and args.offload_runs is not None else args.runs
        for run in [r for r in runs.split(",") if r]:
            weights.restore(offload)
            if run == "floor":
                result = measure(lambda: floor(adapter, ids, args, offload))
            elif run in ("zeroshot", "zeroshot-per-forward"):
                if run == "zeroshot":
                    bench_tokenizer(args.vocab)  # trained once, outside the measurement
                order = "auto" if run == "zeroshot" else "forward"
                result = measure(lambda o=offload, order=order: zeroshot_run(model, adapter, args, o, order))
            elif run == "auto":
                bench_tokenizer(args.vocab), auto_text()  # built once, outside the measurement
                result = measure(lambda o=offload, r=run: mrprune_run(model, ids, args, r, o))
            elif run in ("eval", "eval-per-window"):
                order = "auto" if run == "eval" else "window"
                result = measure(lambda o=offload, order=order: eval_run(model, adapter, ids, args, o, order))
            else:
                result = measure(lambda: mrprune_run(model, ids, args, run, offload))
            rows.append({"run": run, "offload": offload, **result})
            nll = f"mean NLL {result['mean_nll']:.6f} " if "mean_nll" in result else ""
            nll += f"acc {result['acc']:.4f} " if "acc" in result else ""
            if "selection" in result:
                nll += "; ".join(f"{c['allocation']} {c['seconds']:.1f}s" for c in result["selection"]["candidates"])
                nll += f" -> {result['selection']['chosen']} "
            print(f"{run} offload={offload}: {result['seconds']:.1f}s peak {result['peak_gib']:.2f} GiB {nll}"
                  f"{result.get('error') or ''}", flush=True)
            save()
    for method in [m for m in args.llmc.split(",") if m]:
        weights.restore(False)
        result = measure(lambda: llmc_run(model, ids, args, method))
        rows.append({"run": f"llm-compressor {method}", "offload": False, **result})
        print(f"llm-compressor {method}: {result['seconds']:.1f}s peak {result['peak_gib']:.2f} GiB "
              f"{result.get('error') or ''}", flush=True)
        save()

    print(json.dumps(environment(args)))
    print(table(rows))
    save()


def environment(args) -> dict:
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
           "shape": f"{args.layers} blocks, hidden {args.hidden}, mlp {args.mlp}, heads {args.heads} "
                    f"(kv {args.kv_heads or args.heads}), vocab {args.vocab}, bf16"
                    + (f", {args.experts} experts, top {args.top_k}" if args.experts else ""),
           "calibration": f"{args.nsamples} x {args.seqlen}", "batch_size": args.batch_size}
    try:
        import transformers

        env["transformers"] = transformers.__version__
        import llmcompressor

        env["llmcompressor"] = llmcompressor.__version__
    except ImportError:
        pass
    return env


if __name__ == "__main__":
    main()
