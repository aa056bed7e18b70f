"""Host memory of a pruning run with and without --offload-dir, on a LLaMA-shaped model with random weights.

The model is saved once as safetensors in the run's dtype (so it loads mapped from its files, as a real
checkpoint does); each run is a child process whose anonymous and file-backed resident memory is sampled every
50 ms. Without --offload-dir every pruned block is written into the private mapping of the model's file and
becomes anonymous memory: a 70B model needs its size in RAM. With it the blocks go to scratch files and the
host's anonymous memory stays near the parts outside the blocks. Random weights: only memory and time mean
anything; the weights of both runs are compared to be sure the option changes nothing.

    python bench/host_memory.py --device cpu --layers 12 --hidden 2048 --mlp 5504 --json host_cpu.json
    python bench/host_memory.py --device cuda --json host_7b.json      # LLaMA-2-7B shape, bf16, --offload
    python bench/host_memory.py --device cuda --limit-gib 8 --runs plain,plain-no-preflight,offload-dir

Runs: ``plain`` (with --offload on a GPU), ``plain-no-preflight``, ``offload-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_llama_shape, llama_shape_config

GIB = 2**30


def build(args, where: Path) -> None:
    from transformers import LlamaForCausalLM

    config = llama_shape_config(args)
    torch.manual_seed(0)
    with torch.device("cuda" if args.device == "cuda" else "cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    model.save_pretrained(where)
    from mrprune.testing import train_tokenizer  # a job loads one; the calibration ids are given (random)

    train_tokenizer(1024).save_pretrained(where)


def child(args) -> None:
    """One run, in its own process (in the memory cgroup, if given); prints its report as JSON on the last line."""
    if args.cgroup:
        (Path(args.cgroup) / "cgroup.procs").write_text(str(os.getpid()))
    from mrprune import PruneConfig, prune
    from mrprune.config import merge
    from mrprune.models import get_adapter

    ids = torch.randint(0, args.vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    runtime = {"runtime.offload": args.device == "cuda"}
    if args.run == "offload-dir":
        runtime["runtime.offload_dir"] = str(Path(args.workdir) / "scratch")
    if args.run == "plain-no-preflight":  # what the preflight saves a user from: the kernel's OOM killer
        runtime["runtime.preflight"] = False
    config = merge(PruneConfig(), {
        "model": str(Path(args.workdir) / "model"), "metric": args.metric, "sparsity": args.sparsity,
        "allocation.method": args.allocation, "runtime.device": args.device, "runtime.dtype": args.dtype,
        "calibration.nsamples": args.nsamples, "calibration.seqlen": args.seqlen, **runtime,
    })
    start = time.perf_counter()
    outcome = prune(config=config, progress=False, calibration_ids=ids)
    seconds = time.perf_counter() - start
    refs = get_adapter(outcome.model).all_linear_layers()
    checksum = [float(r.weight.double().sum()) for r in refs]
    print(json.dumps({"seconds": round(seconds, 1), "phases": outcome.report.timings_s,
                      "sparsity": outcome.report.sparsity["achieved"], "checksum": checksum}))


def sample(pid: int, peaks: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    key = line.split(":")[0]
                    if key in ("RssAnon", "RssFile", "VmHWM"):
                        peaks[key] = max(peaks.get(key, 0), int(line.split()[1]) * 1024)
        except (OSError, ValueError):
            return
        time.sleep(0.05)


def memory_cgroup(limit_gib: float | None) -> Path | None:
    """A memory cgroup (v2, else v1) limited to ``limit_gib``, for the runs to join; None without a limit."""
    if limit_gib is None:
        return None
    limit = str(int(limit_gib * GIB))
    for root, knob in ((Path("/sys/fs/cgroup"), "memory.max"), (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes")):
        if (root / "cgroup.procs").exists() and (root / ("cgroup.controllers" if knob == "memory.max" else knob)).exists():
            group = root / f"mrprune-bench-{os.getpid()}"
            group.mkdir(exist_ok=True)
            (group / knob).write_text(limit)
            return group
    raise SystemExit("--limit-gib needs a writable memory cgroup (v2 or v1) under /sys/fs/cgroup")


def run(args, name: str, group: Path | None = None) -> dict:
    command = [sys.executable, __file__, "--child", name, *sys.argv[1:]]
    if group is not None:
        command += ["--cgroup", str(group)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks: dict[str, int] = {}
    stop = threading.Event()
    thread = threading.Thread(target=sample, args=(process.pid, peaks, stop), daemon=True)
    thread.start()
    out, err = process.communicate()
    stop.set()
    thread.join()
    if process.returncode:  # under a memory limit: refused by the preflight (exit 2) or killed (-9)
        last = [line for line in err.splitlines() if line.strip()][-1:] or [""]
        result = {"exit_code": process.returncode, "error": last[0][:300]}
        print(f"run {name} failed with exit code {process.returncode}: {last[0][:300]}", file=sys.stderr)
    else:
        result = json.loads(out.strip().splitlines()[-1])
    result.update({f"peak_{k}_gib": round(v / GIB, 2) for k, v in peaks.items()})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on the CPU")
    add_llama_shape(parser)
    parser.add_argument("--metric", default="wanda")
    parser.add_argument("--allocation", default="uniform")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--runs", default="plain,offload-dir")
    parser.add_argument("--workdir", default=None, help="where the model and the scratch files go (default: tmp)")
    parser.add_argument("--limit-gib", type=float, default=None,
                        help="run each job in a memory cgroup of this size (root, cgroup v1 or v2)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cgroup", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.child:
        args.run = args.child
        child(args)
        return
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="mrprune-host-memory-")
    sys.argv += ["--workdir", args.workdir]
    model_dir = Path(args.workdir) / "model"
    if not model_dir.exists():
        start = time.perf_counter()
        build(args, model_dir)
        print(f"built and saved the model in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    group = memory_cgroup(args.limit_gib)
    try:
        rows = {name: run(args, name, group) for name in args.runs.split(",")}
    finally:
        if group is not None:
            group.rmdir()
    sums = [row.pop("checksum") for row in rows.values() if "checksum" in row]
    same = all(s == sums[0] for s in sums)
    limit = f", memory limit {args.limit_gib} GiB" if args.limit_gib else ""
    print(f"model files {size / GIB:.2f} GiB{limit}; weights identical across finished runs: {same}")
    print("| run | wall s | peak anonymous RSS GiB | peak file-backed RSS GiB | peak RSS (VmHWM) GiB |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        wall = row.get("seconds", f"exit {row.get('exit_code')}")
        print(f"| {name} | {wall} | {row.get('peak_RssAnon_gib')} | {row.get('peak_RssFile_gib')} | "
              f"{row.get('peak_VmHWM_gib')} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "model_gib": round(size / GIB, 2),
                                               "identical": same, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
