"""AlphaPruning's spectra: the eigenvalues of W^T W as mrprune computes them (float64 Gram of the shorter side,
``mrprune.allocate.alpha.esd``) against a float32 SVD (what it did before), per matrix shape of LLaMA-2-7B and
LLaMA-2-70B, on one device. Reports seconds per matrix (median of --repeat) and how far the PL_Alpha_Hill
exponent moves. Random Gaussian weights with uneven column scales: timing is what matters here; each method's
spectrum is compared with a float64 SVD of the same matrix (max |error| / largest eigenvalue). The exponent of
a random matrix is ill-conditioned (its spectrum is no power law, so the KS choice of x_min jumps between
candidates with the last digits): its columns show that, not which spectrum is right.

    python bench/alpha_esd.py --device cuda --json alpha_esd.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mrprune.allocate.alpha import esd, pl_alpha_hill

SHAPES = {  # (out, in) of the decoder matrices
    "7B q/k/v/o": (4096, 4096), "7B gate/up": (11008, 4096), "7B down": (4096, 11008),
    "70B q/o": (8192, 8192), "70B k/v (GQA)": (1024, 8192), "70B gate/up": (28672, 8192), "70B down": (8192, 28672),
}


def svd_esd(weight: torch.Tensor) -> torch.Tensor:
    return torch.sort(torch.linalg.svdvals(weight.float()).square()).values


def gram32_esd(weight: torch.Tensor) -> torch.Tensor:
    """For comparison: the same Gram in float32 (faster where float64 is slow, less accurate at the bottom)."""
    w = weight.float() if weight.shape[0] <= weight.shape[1] else weight.float().T
    return torch.linalg.eigvalsh(w @ w.T)


def timed(fn, weight: torch.Tensor, repeat: int, device: torch.device) -> tuple[float, torch.Tensor]:
    seconds = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn(weight)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names from SHAPES")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for name in args.shapes.split(","):
        out_f, in_f = SHAPES[name]
        g = torch.Generator(device=device).manual_seed(0)
        weight = (torch.randn(out_f, in_f, generator=g, device=device)
                  * torch.rand(in_f, generator=g, device=device)).to(torch.bfloat16)
        esd(weight), svd_esd(weight), gram32_esd(weight)  # warm-up: kernels, workspaces
        t_gram, e_gram = timed(esd, weight, args.repeat, device)
        t_svd, e_svd = timed(svd_esd, weight, args.repeat, device)
        t_g32, e_g32 = timed(gram32_esd, weight, args.repeat, device)
        a_gram, a_svd = pl_alpha_hill(e_gram)[0], pl_alpha_hill(e_svd)[0]
        reference = torch.sort(torch.linalg.svdvals(weight.double()).square()).values
        errors = {f"error_{key}": float((e.double() - reference).abs().max() / reference[-1])
                  for key, e in (("gram_float64", e_gram), ("svd_float32", e_svd), ("gram_float32", e_g32))}
        rows.append({"shape": name, "out": out_f, "in": in_f, "gram_float64_s": t_gram, "svd_float32_s": t_svd,
                     "speedup": t_svd / t_gram, "gram_float32_s": t_g32, "alpha_gram": a_gram, "alpha_svd": a_svd,
                     "alpha_gram_float32": pl_alpha_hill(e_g32)[0], **errors,
                     "alpha_rel_diff": abs(a_gram - a_svd) / abs(a_svd)})
        print(f"{name:15s} {out_f:6d} x {in_f:6d}: Gram float64 {t_gram:7.3f} s, SVD float32 {t_svd:7.3f} s "
              f"({t_svd / t_gram:5.1f}x), Gram float32 {t_g32:7.3f} s; alpha {a_gram:.5f} vs {a_svd:.5f}; "
              f"errors {errors['error_gram_float64']:.1e} / {errors['error_svd_float32']:.1e} / "
              f"{errors['error_gram_float32']:.1e}", flush=True)
        del weight, e_gram, e_svd, e_g32, reference
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "repeat": args.repeat}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
