"""Grouped GEMM throughput: moecc's Triton kernels against `torch._grouped_mm`, side by side in one run.

For each MoE shape (one GPU, all experts local, uniform random routing) it times, in bf16 with medians of
many iterations after warm-up, the four grouped GEMMs of an expert FFN layer:
  gemm1 (x @ w1, gate+up), gemm2 (h @ w2), dX of gemm1 (dy @ w1^T) and dW of gemm1 (x^T @ dy),
for the torch backend's native path and for moecc's Triton kernels (each Triton config of a small sweep;
the best is reported; on Hopper the dW is the Gluon kernel, timed once and recorded as such), and checks
that both give the same result. Writes a dated JSON to --out.

    python benchmarks/bench_grouped_gemm.py --out benchmarks/results
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

from moecc.backends import triton_backend  # noqa: E402

SHAPES = {  # hidden, expert ffn, experts, top-k, tokens
    "mixtral": (4096, 14336, 8, 2, 8192),
    "deepseek": (7168, 2048, 256, 8, 8192),
    "qwen3": (2048, 768, 128, 8, 16384),
}
SWEEP = [  # (BM, BN, BK, warps, stages, GROUP_M[, programs per SM]); GROUP_M is ignored by the dW kernel
    (128, 256, 64, 8, 3, 1),
    (128, 256, 64, 8, 3, 8),
    (128, 256, 64, 8, 4, 8),
    (256, 128, 64, 8, 3, 8),
    (128, 128, 64, 8, 4, 8),
    (128, 128, 128, 8, 3, 8),
    (128, 128, 64, 8, 3, 8, 2),
    (128, 128, 64, 4, 3, 8, 2),
]


def time_ms(fn, iters: int = 30, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def bench_shape(shape: str, dev: torch.device, gen: torch.Generator, only: list[str] | None = None) -> list[dict]:
    H, F, E, K, T = SHAPES[shape]
    S = T * K
    idx = torch.randint(0, E, (S,), device=dev, generator=gen)
    offs = torch.cumsum(torch.bincount(idx, minlength=E), 0).to(torch.int32)
    x = torch.randn(S, H, device=dev, dtype=torch.bfloat16, generator=gen) * 0.1
    w1 = torch.randn(E, 2 * F, H, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02  # Linear layout
    w2 = torch.randn(E, H, F, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02
    h = torch.randn(S, F, device=dev, dtype=torch.bfloat16, generator=gen) * 0.1
    dy1 = torch.randn(S, 2 * F, device=dev, dtype=torch.bfloat16, generator=gen) * 0.1
    gemms = {  # name: (native fn, triton fn, flops)
        "gemm1": (lambda: torch._grouped_mm(x, w1.transpose(1, 2), offs=offs),
                  lambda: triton_backend.grouped_mm(x, w1.transpose(1, 2), offs), 2 * S * H * 2 * F),
        "gemm2": (lambda: torch._grouped_mm(h, w2.transpose(1, 2), offs=offs),
                  lambda: triton_backend.grouped_mm(h, w2.transpose(1, 2), offs), 2 * S * F * H),
        "dx1": (lambda: torch._grouped_mm(dy1, w1, offs=offs),
                lambda: triton_backend.grouped_mm(dy1, w1, offs), 2 * S * 2 * F * H),
        "dw1": (lambda: torch._grouped_mm(x.t(), dy1, offs=offs),
                lambda: triton_backend.grouped_mm_wgrad(x, dy1, offs), 2 * S * H * 2 * F),
    }  # fmt: skip
    records = []
    for name, (native, triton_fn, flops) in gemms.items():
        if only and name not in only:
            continue
        ref = native().reshape(-1)[: 1 << 24].float()  # a sample: the full fp32 copies would not fit
        kernel = "grouped_mm_wgrad" if name.startswith("dw") else "grouped_mm"
        native_ms = time_ms(native)
        best = None
        sweep: dict[str, float] = {}
        # on Hopper the dW runs in the Gluon kernel (`gluon_wgrad`), which has its own tiles: no Triton sweep
        gluon = name.startswith("dw") and triton_backend.wgrad_refusal(x, dy1, E, 1) is None
        for cfg in SWEEP[:1] if gluon else SWEEP:
            triton_backend.set_config(kernel, cfg)
            try:
                got = triton_fn().reshape(-1)[: 1 << 24].float()
            except Exception as e:  # a config the compiler rejects (e.g. shared memory): skip it
                print(f"{shape} {name} {cfg}: {type(e).__name__}")
                continue
            err = ((got - ref).abs().max() / (ref.abs().max() + 1e-6)).item()
            ms = time_ms(triton_fn)
            sweep[",".join(map(str, cfg))] = ms
            if best is None or ms < best[0]:
                best = (ms, cfg, err)
        assert best is not None
        ms, cfg, err = best
        # the winner and native once more, interleaved, so that the ratio is not skewed by drift over the sweep
        triton_backend.set_config(kernel, cfg)
        pairs = [(time_ms(native), time_ms(triton_fn)) for _ in range(3)]
        native_ms = statistics.median(p[0] for p in pairs)
        ms = statistics.median(p[1] for p in pairs)
        rec = {"shape": shape, "gemm": name, "native_ms": native_ms, "triton_ms": ms,
               "native_tflops": flops / native_ms / 1e9, "triton_tflops": flops / ms / 1e9,
               "triton_over_native": native_ms / ms, "triton_config": "gluon_wgrad" if gluon else cfg,
               "max_rel_err": err,
               "sweep_ms": sweep}  # fmt: skip
        records.append(rec)
        print(json.dumps(rec), flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--tag", default="", help="suffix of the results file name (several runs a day)")
    parser.add_argument("--gemms", nargs="*", default=None, help="a subset of gemm1 gemm2 dx1 dw1")
    args = parser.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    records = []
    for shape in args.shapes:
        records += bench_shape(shape, dev, gen, args.gemms)
        torch.cuda.empty_cache()
    result = {**bench_moe_layer.run_header(dev, 1), "records": records}
    print(f"wrote {bench_moe_layer.write_results(args.out, 'grouped_gemm', args.tag, result)}")


if __name__ == "__main__":
    main()
