"""The fused expert-parallel ops kernel by kernel, against the plain grouped GEMMs they fuse, in one run.

On one GPU (one rank: the dispatch and combine move rows within the GPU) and for each MoE shape of
bench_moe_layer.py, it profiles the four fused ops of a SwiGLU expert layer, in bf16, with the weights in
nn.Linear's layout:
  fwd1  ep_dispatch_gemm           rows to their experts + GEMM 1 (gate and up)
  fwd2  ep_gemm_combine            GEMM 2 + rows back to their tokens + the gate-weighted sum
  bwd2  ep_gemm_combine_backward   dY to the experts + dX of GEMM 2 (gates in its epilogue), dW of GEMM 2
  bwd1  ep_dispatch_gemm_backward  dX of GEMM 1 + rows back to their tokens, dW of GEMM 1
and the same GEMMs on already-sorted rows through moecc's plain Triton grouped GEMM and `torch._grouped_mm`;
and the SwiGLU activation between the GEMMs, forward and backward, as the graph's own ops (aten_glu) and as
moecc's kernels (triton_glu).
Every kernel's time is the profiler's device time per call (mean of --iters calls after warm-up), so a fused
kernel can be set beside the plain GEMM it replaces; `host_us` is the host's time to issue one call (median
of 3 * --iters calls, each after a synchronize, so that the device is idle and no launch waits for a full
queue): what the op costs the host, launches, torch ops and Python, whatever the device does. Writes
`fused_ops_<date><tag>.json` to --out.

Tile sweeps: each `--config` is one variant, a `+`-separated list of `kernel=BM,BN,BK,warps,stages,group_m`
overrides of `triton_backend.CONFIGS`, with an optional seventh integer for its programs per SM
(`triton_backend.PROGRAMS_PER_SM`; an empty string: the defaults); every case runs under every variant, in
one process, one variant after the other, and each record names its variant.

    python benchmarks/bench_fused_ops.py --out benchmarks/results
    python benchmarks/bench_fused_ops.py --shapes qwen3 --cases fused_fwd1 fused_bwd2 \
        --config "" --config "ep_dispatch_gemm=128,128,64,8,4,8+ep_gemm_scatter=128,128,64,8,4,8"
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_moe_layer as bench  # noqa: E402

import moecc.ops  # noqa: E402, F401  (registers torch.ops.moecc)
from moecc.backends import triton_backend  # noqa: E402
from moecc.profile import host_issue_us  # noqa: E402


def kernel_ms(fn: Callable[[], Any], iters: int, warmup: int = 3) -> dict[str, float]:
    """Device time per call of every kernel fn launches (ms), largest first."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0:
            times[e.key[:60]] += e.self_device_time_total / iters / 1000
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def parse_config(text: str) -> dict[str, tuple[int, ...]]:
    """`kernel=BM,BN,BK,warps,stages,group_m[,programs per SM][+kernel=...]` -> overrides of
    triton_backend.CONFIGS (and PROGRAMS_PER_SM where a seventh integer is given)."""
    out: dict[str, tuple[int, ...]] = {}
    for part in filter(None, text.split("+")):
        kernel, _, values = part.partition("=")
        if kernel not in triton_backend.CONFIGS:
            raise SystemExit(f"--config: unknown kernel {kernel!r}; known: {sorted(triton_backend.CONFIGS)}")
        cfg = tuple(int(v) for v in values.split(","))
        n = len(triton_backend.CONFIGS[kernel])
        if len(cfg) not in (n, n + 1):
            raise SystemExit(f"--config {part!r}: {n} integers expected, or {n + 1} with programs per SM")
        if kernel.startswith("ep_") and cfg[0] != triton_backend.CONFIGS[kernel][0]:
            raise SystemExit(f"--config {part!r}: keep BM {triton_backend.CONFIGS[kernel][0]}: the fused plan is "
                             f"made once per shape, with the default BM")  # fmt: skip
        out[kernel] = cfg
    return out


def apply_config(text: str) -> None:
    for kernel, cfg in parse_config(text).items():
        triton_backend.set_config(kernel, cfg)


def bench_shape(name: str, s: bench.Shape, iters: int, cases_wanted: list[str] | None = None,
                configs: list[str] = ("",)) -> list[dict[str, Any]]:  # fmt: skip
    T, H, Fd, E, K = s.tokens, s.hidden, s.ffn, s.experts, s.top_k
    dev, bf = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(T, H, device=dev, dtype=bf, generator=gen)
    w_TK, idx = torch.softmax(torch.randn(T, E, device=dev, generator=gen), -1).topk(K, -1)
    w_TK = w_TK / w_TK.sum(-1, keepdim=True)
    # nn.Linear's layout: [E, out, in] storage, used as [E, in, out] views
    w1 = (torch.randn(E, 2 * Fd, H, device=dev, dtype=bf, generator=gen) * H**-0.5).transpose(1, 2)
    w2 = (torch.randn(E, H, Fd, device=dev, dtype=bf, generator=gen) * Fd**-0.5).transpose(1, 2)
    ops = torch.ops.moecc
    h, x_SH, plan = ops.ep_dispatch_gemm(x, idx, w1, 1, "")
    a = F.silu(h[:, :Fd]) * h[:, Fd:]
    out, y_TKH = ops.ep_gemm_combine(a, w2, w_TK, plan, 1, "")
    dout = torch.randn_like(out)
    dh = torch.randn_like(h)
    S = T * K
    order = idx.flatten().argsort(stable=True)
    offs = torch.bincount(idx.flatten(), minlength=E).cumsum(0).to(torch.int32)
    x_sorted = x[order // K]
    a_sorted, dh_sorted = a[:S].contiguous(), dh[:S].contiguous()
    flops1, flops2 = 2 * S * H * 2 * Fd, 2 * S * Fd * H
    dout_SF = torch.randn(h.shape[0], Fd, device=dev, dtype=bf, generator=gen)
    h_leaf = h.detach().requires_grad_()

    def aten_glu() -> None:
        torch.autograd.grad(F.silu(h_leaf[:, :Fd]) * h_leaf[:, Fd:], h_leaf, dout_SF)

    def triton_glu() -> None:
        triton_backend.glu(h, "silu")
        triton_backend.glu_backward(dout_SF, h, "silu")

    cases: dict[str, tuple[Callable[[], Any], int]] = {
        "fused_fwd1": (lambda: ops.ep_dispatch_gemm(x, idx, w1, 1, ""), flops1),
        "fused_fwd2": (lambda: ops.ep_gemm_combine(a, w2, w_TK, plan, 1, ""), flops2),
        "fused_bwd2": (lambda: ops.ep_gemm_combine_backward(dout, a, w2, w_TK, y_TKH, plan, ""), 2 * flops2),
        "fused_bwd1": (lambda: ops.ep_dispatch_gemm_backward(dh, x_SH, w1, plan, T, K, ""), 2 * flops1),
        "triton_gemm1": (lambda: triton_backend.grouped_mm(x_sorted, w1, offs), flops1),
        "triton_gemm2": (lambda: triton_backend.grouped_mm(a_sorted, w2, offs), flops2),
        "triton_dx2": (lambda: triton_backend.grouped_mm(x_sorted, w2.transpose(1, 2), offs), flops2),
        "triton_dx1": (lambda: triton_backend.grouped_mm(dh_sorted, w1.transpose(1, 2), offs), flops1),
        # the activation between the GEMMs, forward and backward: the graph's own ops, and moecc's kernel
        "aten_glu": (aten_glu, 0),
        "triton_glu": (triton_glu, 0),
        "native_gemm1": (lambda: torch._grouped_mm(x_sorted, w1, offs=offs), flops1),
        "native_gemm2": (lambda: torch._grouped_mm(a_sorted, w2, offs=offs), flops2),
    }
    records = []
    print(f"== {name}: H {H}, F {Fd}, E {E}, top-{K}, T {T}", flush=True)
    defaults, per_sm = dict(triton_backend.CONFIGS), dict(triton_backend.PROGRAMS_PER_SM)
    for config in configs:
        apply_config(config)
        if len(configs) > 1:
            print(f" -- config {config or 'default'}", flush=True)
        try:
            for case, (fn, flops) in cases.items():
                if cases_wanted and case not in cases_wanted:
                    continue
                kernels = kernel_ms(fn, iters)
                total = sum(kernels.values())
                host = host_issue_us(fn, 3 * iters)  # after kernel_ms's warm-up and calls
                records.append({"shape": name, "case": case, "config": config, "total_ms": total,
                                "gemm_flops": flops, "tflops": flops / total / 1e9, "host_us": host,
                                "kernels_ms": kernels})  # fmt: skip
                top = ", ".join(f"{k[:28]} {v:.3f}" for k, v in list(kernels.items())[:3])
                print(
                    f"  {case:13s} {total:7.3f} ms  {flops / total / 1e9:6.0f} TFLOP/s  host {host:6.0f} us | {top}",
                    flush=True,
                )
        finally:
            triton_backend.CONFIGS.clear()
            triton_backend.CONFIGS.update(defaults)
            triton_backend.PROGRAMS_PER_SM.clear()
            triton_backend.PROGRAMS_PER_SM.update(per_sm)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--shapes", nargs="*", default=list(bench.SHAPES), choices=list(bench.SHAPES))
    parser.add_argument("--tag", default="", help="suffix of the file name: fused_ops_<date><tag>.json")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--cases", nargs="*", default=None, help="only these cases (default: all)")
    parser.add_argument("--config", action="append", default=None,
                        help="a variant of triton_backend.CONFIGS (see above); repeat for a sweep")  # fmt: skip
    args = parser.parse_args()
    for c in args.config or []:
        parse_config(c)  # bad input fails before any GPU work
    if not torch.cuda.is_available():
        raise SystemExit("bench_fused_ops.py needs a CUDA device")
    records = []
    for name in args.shapes:
        records += bench_shape(name, bench.SHAPES[name], args.iters, args.cases, args.config or [""])
        torch.cuda.empty_cache()
    result = {**bench.run_header(torch.device("cuda"), 1), "records": records}
    print(f"wrote {bench.write_results(args.out, 'fused_ops', args.tag, result)}", flush=True)


if __name__ == "__main__":
    main()
