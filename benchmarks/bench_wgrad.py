"""The dW grouped GEMM: the warp-specialised Gluon kernel (`gluon_wgrad`), the stock Triton kernel and
`torch._grouped_mm`, side by side in one run (one Hopper GPU, bf16, uniform random routing).

For each MoE shape it times both weight gradients of an expert FFN, in both orientations of the weight
(dW1 = x^T dy1 as [E, H, 2F] and dy1^T x as [E, 2F, H]; dW2 likewise), with the experts' rows as one segment
each (nsrc = 1, the plain path) and as two sources' segments (nsrc = 2, the fused expert-parallel path's
receive buffer; native runs on the expert-sorted copy there). Rounds alternate the kernels, and each kernel's
median over the rounds' medians is reported; every Gluon configuration of --gluon-configs is timed, and each
result is checked against native's.

    python benchmarks/bench_wgrad.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_moe_layer  # noqa: E402  (the results file's header and its writing)
from bench_grouped_gemm import SHAPES, time_ms  # noqa: E402  (the same shapes, the same timer)

from moecc.backends import gluon_wgrad, triton_backend  # noqa: E402

DEFAULTS = dict(gluon_wgrad.CONFIGS)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|, expert by expert (a float32 copy of the whole would not fit)."""
    num = den = 0.0
    for g, r in zip(got, ref, strict=True):
        num = max(num, (g.float() - r.float()).abs().max().item())
        den = max(den, r.float().abs().max().item())
    return num / (den + 1e-12)


def _kernels(a, b, a_s, b_s, o, offs1, nsrc: int, E: int, configs: list[tuple[int, ...]]) -> dict:
    """name -> a call computing the dW of (a, b): native on the expert-sorted rows, the Triton and Gluon
    kernels on the (a_s, b_s) rows of nsrc sources' segments."""

    def native():
        return torch._grouped_mm(a.t(), b, offs=offs1)

    def triton_fn():
        triton_backend.GLUON_WGRAD = False
        try:
            return triton_backend.grouped_mm_wgrad_segments(a_s, b_s, o, nsrc, E)
        finally:
            triton_backend.GLUON_WGRAD = True

    def gluon_fn(cfg):
        def run():
            if cfg:
                gluon_wgrad.CONFIGS.update(short=cfg[:4], long=cfg[:4])
                gluon_wgrad.LOADER_REGS = cfg[4]
            else:
                gluon_wgrad.CONFIGS.update(DEFAULTS)
            before = triton_backend.COUNTERS["grouped_mm_wgrad.gluon"]
            dw = triton_backend.grouped_mm_wgrad_segments(a_s, b_s, o, nsrc, E)
            assert triton_backend.COUNTERS["grouped_mm_wgrad.gluon"] == before + 1, "the Gluon kernel did not run"
            return dw

        return run

    kernels = {"native": native, "triton": triton_fn}
    kernels.update({"gluon " + (",".join(map(str, c)) or "default"): gluon_fn(c) for c in configs})
    return kernels


def bench(shape: str, configs: list[tuple[int, ...]], rounds: int, iters: int, dev: torch.device) -> list[dict]:
    H, F, E, K, T = SHAPES[shape]
    S = T * K
    gen = torch.Generator(device=dev).manual_seed(0)
    idx = torch.randint(0, E, (S,), device=dev, generator=gen)
    counts = torch.bincount(idx, minlength=E)
    x = torch.randn(S, H, device=dev, dtype=torch.bfloat16, generator=gen) * 0.1
    h = torch.randn(S, F, device=dev, dtype=torch.bfloat16, generator=gen) * 0.1
    dy1 = torch.randn(S, 2 * F, device=dev, dtype=torch.bfloat16, generator=gen) * 0.1
    dy2 = torch.randn(S, H, device=dev, dtype=torch.bfloat16, generator=gen) * 0.1
    # two sources: each expert's rows split in halves, source 0's segments of every expert, then source 1's
    half = counts // 2
    seg2 = torch.cat([half, counts - half])
    offs = {1: torch.cumsum(counts, 0).to(torch.int32), 2: torch.cumsum(seg2, 0).to(torch.int32)}
    # row i of the two-source layout -> its row in the expert-sorted layout (native's operands)
    starts = torch.cumsum(counts, 0) - counts
    src_rows = torch.cat([torch.arange(int(c), device=dev) + int(s) for c, s in zip(half, starts, strict=True)]
                         + [torch.arange(int(c - hh), device=dev) + int(s) + int(hh)
                            for c, hh, s in zip(counts, half, starts, strict=True)])  # fmt: skip
    products = {"dw1": (x, dy1), "dw1_t": (dy1, x), "dw2": (h, dy2), "dw2_t": (dy2, h)}
    records = []
    for name, (a, b) in products.items():
        flops = 2 * S * a.shape[1] * b.shape[1]
        for nsrc in (1, 2):
            a_s, b_s = (a, b) if nsrc == 1 else (a[src_rows], b[src_rows])  # the fused layout's rows
            o = offs[nsrc]

            kernels = _kernels(a, b, a_s, b_s, o, offs[1], nsrc, E, configs)
            native = kernels["native"]
            ref = native()
            errs = {}
            for k, fn in list(kernels.items()):
                try:
                    errs[k] = rel_err(fn(), ref)
                except Exception as e:  # a configuration the compiler or the GPU rejects: reported, not timed
                    print(f"{shape} {name} nsrc={nsrc} {k}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    del kernels[k]
            del ref
            torch.cuda.synchronize()
            times: dict[str, list[float]] = {k: [] for k in kernels}
            for _ in range(rounds):
                for k, fn in kernels.items():
                    times[k].append(time_ms(fn, iters, warmup=0))  # each ran once above
            med = {k: statistics.median(v) for k, v in times.items()}
            rec = {"shape": shape, "product": name, "nsrc": nsrc, "K": a.shape[1], "N": b.shape[1],
                   "median_ms": med, "rounds_ms": times, "max_rel_err": errs,
                   "tflops": {k: flops / v / 1e9 for k, v in med.items()},
                   "over_native": {k: med["native"] / v for k, v in med.items()}}  # fmt: skip
            records.append(rec)
            print(json.dumps({k: rec[k] for k in ("shape", "product", "nsrc", "median_ms", "over_native",
                                                   "max_rel_err")}), flush=True)  # fmt: skip
        torch.cuda.empty_cache()
    return records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--tag", default="")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--gluon-configs", nargs="*", default=["default"],
                        help="BK,BN,BS,stages,loader registers, or default (the shape's)")  # fmt: skip
    args = parser.parse_args()
    configs = [tuple(int(v) for v in c.split(",")) if c != "default" else () for c in args.gluon_configs]
    dev = torch.device("cuda")
    records = []
    for shape in args.shapes:
        records += bench(shape, configs, args.rounds, args.iters, dev)
    result = {**bench_moe_layer.run_header(dev, 1), "records": records}
    print(f"wrote {bench_moe_layer.write_results(args.out, 'wgrad_gluon', args.tag, result)}")


if __name__ == "__main__":
    main()
