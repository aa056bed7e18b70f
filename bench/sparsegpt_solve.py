"""Where SparseGPT's per-layer time goes on one device: inverting the Hessian and the column-block solve,
for the LLaMA-2-7B layer shapes, at several leaf widths of the blocked triangular solve.

    python bench/sparsegpt_solve.py --device cuda --leaves 8,16,32,64,128 --json solve.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mrprune.metrics import SparsityPattern
from mrprune.metrics import sparsegpt as sgpt

#: (out, in) of the linear layers of one LLaMA-2-7B block, and how many of each
SHAPES = {"q/k/v/o": ((4096, 4096), 4), "gate/up": ((11008, 4096), 2), "down": ((4096, 11008), 1)}


def timed(fn, device, repeat: int) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def inverse_by_cholesky_inverse(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """An alternative to ``inverse_hessian_factor``: invert H by cholesky_inverse, then factorise H^-1."""
    eye = torch.eye(hessian.shape[0], device=hessian.device, dtype=hessian.dtype)
    lower = torch.linalg.cholesky(hessian + percdamp * torch.diag(hessian).mean() * eye)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=16384, help="calibration tokens behind each Hessian")
    parser.add_argument("--leaves", default="8,16,32,64,128")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator(device).manual_seed(0)
    rows = []
    for label, ((out, cols), count) in SHAPES.items():
        x = torch.randn(args.tokens, cols, device=device, generator=gen, dtype=torch.bfloat16)
        hessian = x.float().t() @ x.float()
        weight = torch.randn(out, cols, device=device, generator=gen, dtype=torch.bfloat16)
        row = {"layer": label, "shape": [out, cols], "per_block": count,
               "invert_s": timed(lambda: sgpt.invert_hessian(hessian, 0.01), device, args.repeat),
               "invert_cholesky_inverse_s": timed(lambda: inverse_by_cholesky_inverse(hessian, 0.01), device,
                                                  args.repeat)}
        inverse = sgpt.invert_hessian(hessian, 0.01)
        reference = None
        for leaf in [int(v) for v in args.leaves.split(",")]:
            sgpt.LEAF = {device.type: leaf}
            row[f"solve_leaf{leaf}_s"] = timed(
                lambda: sgpt.sparsegpt_prune(weight, None, 0.5, SparsityPattern(), inverse=inverse), device,
                args.repeat)
            pruned = sgpt.sparsegpt_prune(weight, None, 0.5, SparsityPattern(), inverse=inverse)[0]
            reference = pruned if reference is None else reference
            row[f"leaf{leaf}_max_rel_diff"] = float((pruned - reference).abs().max() / reference.abs().max())
        rows.append(row)
        print(json.dumps(row), flush=True)
        del x, hessian, weight, inverse
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "tokens": args.tokens, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
