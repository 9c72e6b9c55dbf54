"""Variants of the fused GEMMs' Gluon kernels (`backends/gluon_gemm.py`) side by side, on one GPU.

For each MoE shape of bench_moe_layer.py it profiles the fused ops that run the kernel through
bench_fused_ops.py, once per variant, the variants interleaved over --rounds rounds in one process, and prints
the kernel's device time per call (median over the rounds). The gathering GEMM (`_dispatch_ws_kernel`) runs in
fwd1 (the dispatch and GEMM 1) and bwd2 (the gated dX of GEMM 2, and dW); the scattering GEMM
(`_scatter_ws_kernel`) in fwd2 (GEMM 2 and the combine's send) and bwd1 (the dX of GEMM 1, and dW). Variants,
comma-separated:
  default          the gathering GEMM as the module sets it
  stages3          3 ring stages (DISPATCH_CONFIG)
  loader2          2 loader warps with 120 registers a thread
  regs112          4 loader warps with 112 registers
  nosave           no rows kept for dW (timing only: the result is not usable; what those stores cost)
  triton           the Triton gathering kernel (`triton_ep._dispatch_gemm_kernel`)
  scatter_s3       the Gluon scattering GEMM at every K (not only up to MAX_K), 3 stages
  scatter_s4       the same with 4 stages
  scatter_triton   the Triton scattering kernel (`triton_ep._gemm_scatter_kernel`)

    python benchmarks/sweep_gluon_fused.py --variants default,nosave,triton --out benchmarks/results
    python benchmarks/sweep_gluon_fused.py --variants scatter_s3,scatter_s4,scatter_triton --tag _scatter
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fused_ops as bf  # noqa: E402
import bench_moe_layer as bench  # noqa: E402

from moecc.backends import gluon_gemm, triton_ep  # noqa: E402

_dispatch_gemm = gluon_gemm.dispatch_gemm


def _nosave(*args: Any) -> None:
    args = list(args)
    args[13] = False  # save_a
    _dispatch_gemm(*args)


VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "stages3": {"DISPATCH_CONFIG": (128, 256, 64, 3)},
    "loader2": {"DISPATCH_LOADER_WARPS": 2, "DISPATCH_LOADER_REGS": 120},
    "regs112": {"DISPATCH_LOADER_REGS": 112},
    "nosave": {"dispatch_gemm": _nosave},
    "triton": {},
    "scatter_s3": {"MAX_K": 1 << 30, "CONFIG": (128, 256, 64, 3)},
    "scatter_s4": {"MAX_K": 1 << 30, "CONFIG": (128, 256, 64, 4)},
    "scatter_triton": {},
}
SETTINGS = ("DISPATCH_CONFIG", "DISPATCH_LOADER_WARPS", "DISPATCH_LOADER_REGS", "dispatch_gemm", "MAX_K", "CONFIG")


def _kernel(variant: str) -> str:
    return "scatter" if variant.startswith("scatter") else "dispatch"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="", help="suffix of the file name: gluon_sweep_<date><tag>.json")
    parser.add_argument("--variants", default="default,nosave,triton")
    parser.add_argument("--shapes", default=",".join(bench.SHAPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    names, shapes = args.variants.split(","), args.shapes.split(",")
    for n in names:
        if n not in VARIANTS:
            raise SystemExit(f"unknown variant {n!r}; choose from {', '.join(VARIANTS)}")
    if not torch.cuda.is_available():
        raise SystemExit("sweep_gluon_fused.py needs a CUDA device")
    base = {k: getattr(gluon_gemm, k) for k in SETTINGS}
    records = []
    for rnd in range(args.rounds):
        for shape in shapes:
            for v in names:
                for k, val in {**base, **VARIANTS[v]}.items():
                    setattr(gluon_gemm, k, val)
                triton_ep.GLUON_DISPATCH = v != "triton"
                triton_ep.GLUON_SCATTER = v != "scatter_triton"
                cases = ["fused_fwd2", "fused_bwd1"] if _kernel(v) == "scatter" else ["fused_fwd1", "fused_bwd2"]
                recs = bf.bench_shape(shape, bench.SHAPES[shape], args.iters, cases, [""])
                for r in recs:
                    r["variant"], r["round"] = v, rnd
                records += recs
                torch.cuda.empty_cache()
    for k, val in base.items():
        setattr(gluon_gemm, k, val)
    triton_ep.GLUON_DISPATCH = triton_ep.GLUON_SCATTER = True
    result = {**bench.run_header(torch.device("cuda"), 1), "records": records}
    print(f"wrote {bench.write_results(args.out, 'gluon_sweep', args.tag, result)}", flush=True)
    times: dict[tuple[str, str, str], list[float]] = {}
    for r in records:
        ms = [t for n, t in r["kernels_ms"].items() if _kernel(r["variant"]) in n]
        times.setdefault((r["shape"], r["case"], r["variant"]), []).append(ms[0] if ms else float("nan"))
    print("| shape | op | variant | the kernel's ms (median) | rounds |\n|---|---|---|---|---|")
    for (s, c, v), xs in sorted(times.items()):
        print(f"| {s} | {c} | {v} | {statistics.median(xs):.3f} | {', '.join(f'{x:.3f}' for x in xs)} |")


if __name__ == "__main__":
    main()
