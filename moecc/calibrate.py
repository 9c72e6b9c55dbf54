"""`moecc calibrate`: measure this machine's rates and save a hardware profile that compile picks up.

Measured: the dense GEMM rate (a square matmul), the grouped GEMM rate (the torch backend's grouped GEMM over
8 experts), on a GPU the rate of moecc's fused expert-parallel ops (one rank, a SwiGLU MoE layer's forward
and backward), how these rates fall with the problem's size (dense GEMMs by FLOPs, the grouped GEMM and the
fused ops by rows per expert), device memory bandwidth (a large copy), and, over a local world of `world_size` processes
(gloo on the CPU, NCCL with one GPU per rank), the latency/bandwidth curves of `all_to_all_single` and
`all_reduce` (the median time per call at message sizes from a few KB to tens of MB per rank) and, on GPUs,
the fused ops' rate across those ranks, which the cost model charges them at ep = `world_size`.

The profile is written to `--out`, by default to the folder compile looks in for this device
(`~/.cache/moecc/profiles/<device>.json`); `MOECC_PROFILE=<path>` or `moecc.compile(..., profile=<path>)`
select another one.
"""

from __future__ import annotations

import functools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moecc import cost, testing
from moecc.backends import torch_backend
from moecc.options import MoeccError


def _time_s(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Median seconds per call of fn (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize(device)
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_compute(device: torch.device, quick: bool) -> dict[str, float]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = (4096 if quick else 8192) if device.type == "cuda" else (256 if quick else 1024)
    iters = 5 if quick else 20
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    gemm = 2 * n**3 / _time_s(lambda: a @ b, device, iters)
    E = 8
    offs = torch.arange(1, E + 1, device=device, dtype=torch.int32) * (n // E)
    w = torch.randn(E, n, n, device=device, dtype=dtype) / n
    grouped = 2 * n * n * n / _time_s(lambda: torch_backend.grouped_mm(a, w, offs), device, iters)
    big = torch.empty((64 if quick else 512) << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(big)
    bw = 2 * big.numel() / _time_s(lambda: dst.copy_(big), device, iters)
    tiny = torch.ones(8, device=device)
    if device.type == "cuda":
        overhead = _device_gap_s(tiny)
    else:  # the host runs the op: its whole cost
        overhead = _time_s(lambda: tiny.add(1.0), device, iters * 10)
    rates: dict[str, Any] = {"gemm_flops": gemm, "grouped_gemm_flops": grouped, "mem_bw": bw, "op_overhead": overhead}
    rates["rate_curves"] = measure_rate_curves(device, quick)
    if device.type == "cuda":
        curve = measure_fused_curve(device, quick)
        rates["rate_curves"]["fused"] = curve
        rates["fused_gemm_flops"] = curve[FUSED_SCALES[quick].index(1.0)][1]  # at the layer's own tokens
        rates.update(measure_attention(device, quick))
        # on the CPU the host runs the ops itself: their cost is on the compute stream (op_overhead)
        rates.update(measure_host(device, quick))
    return rates


def measure_rate_curves(device: torch.device, quick: bool) -> dict[str, list[list[float]]]:
    """GEMM rates by size (`HardwareProfile.rate_curves`): "dense", m x n x n matmuls with m from a few hundred
    rows to many thousands, by their FLOPs; "grouped", the grouped GEMM of `measure_compute` over 64 experts
    (8 on the CPU) at 64 to 2048 rows per expert, by those rows. Small problems fill fewer tiles and waves per
    FLOP: the rates of the large sizes alone overestimate a step with few tokens (on an H200 a step of 2048
    tokens per GPU was predicted 29 % short)."""
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    iters = 5 if quick else 20
    gen = torch.Generator(device=device).manual_seed(0)
    if gpu:
        n, ms = (2048, [256, 1024, 4096]) if quick else (4096, [256, 512, 1024, 2048, 4096, 8192, 16384])
        E, H, N = (32, 2048, 2048) if quick else (64, 4096, 3072)
        rows = [64, 256, 1024] if quick else [32, 64, 128, 256, 512, 1024, 2048]
    else:
        n, ms = 256, [16, 64, 256]
        E, H, N = 8, 128, 128
        rows = [8, 32, 128]
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    dense = []
    for m in ms:
        a = torch.randn(m, n, device=device, dtype=dtype, generator=gen)
        flops = 2.0 * m * n * n
        dense.append([flops, flops / _time_s(functools.partial(torch.matmul, a, b), device, iters)])
    w = torch.randn(E, H, N, device=device, dtype=dtype, generator=gen) * H**-0.5
    grouped = []
    for r in rows:
        x = torch.randn(E * r, H, device=device, dtype=dtype, generator=gen)
        offs = torch.arange(1, E + 1, device=device, dtype=torch.int32) * r
        flops = 2.0 * E * r * H * N
        t = _time_s(functools.partial(torch_backend.grouped_mm, x, w, offs), device, iters)
        grouped.append([float(r), flops / t])
    return {"dense": dense, "grouped": grouped}


# token counts of the fused curve's points, as multiples of `_fused_layer`'s (quick: its quick layer's)
FUSED_SCALES = {False: (0.125, 0.25, 0.5, 1.0, 2.0), True: (0.25, 1.0, 4.0)}


def measure_fused_curve(device: torch.device, quick: bool) -> list[list[float]]:
    """The rate of moecc's fused expert-parallel ops (what the triton backend runs on a GPU) in one rank by rows
    per expert (the "fused" curve), in FLOPs of the GEMMs per second: a MoE layer's forward and backward
    (`_fused_layer`) at FUSED_SCALES of its tokens. The point at its own tokens is the profile's
    fused_gemm_flops; the cost model charges the backward ops twice the forward's FLOPs."""
    points = []
    for scale in FUSED_SCALES[quick]:
        layer, flops, rows = _fused_layer(device, quick, tokens_scale=scale)
        points.append([rows, flops / _time_s(layer, device, 5 if quick else 20)])
        del layer
    return points


def measure_attention(device: torch.device, quick: bool) -> dict[str, float]:
    """Causal fused attention's rate through F.scaled_dot_product_attention (the kernel it picks by default:
    cuDNN's or flash on an H200), forward and backward, in the FLOPs `cost.attention_flops` counts for it:
    bf16, 16 heads of 128, 4 sequences of 2048 tokens (a small model's training shapes)."""
    B, Hh, S, D = 4, 16, 2048, 128
    iters = 5 if quick else 20
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(B, Hh, S, D, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_() for _ in range(3)
    )
    flops = 4.0 * B * Hh * S * S * D * 0.5
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    dout = torch.randn_like(out)
    fwd = _time_s(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device, iters)
    fwd_bwd = _time_s(
        lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), dout),
        device,
        iters,
    )
    return {"attention_flops": flops / fwd, "attention_bwd_flops": 2.5 * flops / max(fwd_bwd - fwd, 1e-9)}


def _host_s(fn: Callable[[], Any], device: torch.device, n: int) -> float:
    """Host seconds per call of fn, issued back to back (what the host spends; the device's work is tiny and
    is waited for after the clock stops)."""
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return t


def measure_host(device: torch.device, quick: bool) -> dict[str, Any]:
    """The host's time to issue one graph node on a GPU (`HardwareProfile.host_op`, `host_view`, `host_ops`):
    an aten op, a view, and each moecc op of an expert layer, called as a graph calls them on tiny inputs, so
    that the host's time is what is measured. The moecc ops run the Triton kernels the `auto` backend lowers
    them to on a GPU (the fused expert-parallel ops included) and are recorded under the name they have
    when the schedule pass costs them (before lowering). (On the CPU, under TRITON_INTERPRET=1, it runs for
    tests; its figures mean nothing there.)"""
    from moecc import ops
    from moecc.backends import triton_backend

    if not triton_backend.available(device):
        raise MoeccError(
            f"calibrate: the host costs are measured with the Triton kernels, which cannot run on {device}"
        )
    m = torch.ops.moecc
    n = 20 if quick else 200
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    T, H, F, E, K = 64, 128, 64, 8, 2
    x, idx, w_TK, w1, w2 = _layer_inputs(torch.Generator(device=device).manual_seed(0), device, dtype, T, H, F, E, K)
    x_SH, src_S, _, offs_E = ops.route_permute(x, idx, E, -1)
    mm, wgrad, glu, glu_bwd = m.triton_grouped_mm, m.triton_grouped_mm_wgrad, m.triton_glu, m.triton_glu_backward
    h = mm(x_SH, w1, offs_E)
    a = glu(h, "silu")
    y = mm(a, w2, offs_E)
    cases: dict[str, Callable[[], Any]] = {
        "moecc.route_permute": lambda: m.route_permute(x, idx, E, -1),
        "moecc.grouped_mm": lambda: mm(x_SH, w1, offs_E),
        "moecc.grouped_mm_wgrad": lambda: wgrad(x_SH, h, offs_E),
        "moecc.glu": lambda: glu(h, "silu"),
        "moecc.glu_backward": lambda: glu_bwd(a, h, "silu"),
        "moecc.unpermute_combine": lambda: m.unpermute_combine(y, src_S, offs_E, w_TK),
    }
    hf, xs, plan = m.ep_dispatch_gemm(x, idx, w1, 1, "")
    af = m.ep_glu(hf, plan, "silu")
    _, y_TKH = m.ep_gemm_combine(af, w2, w_TK, plan, 1, "")
    cases |= {
        "moecc.ep_glu": lambda: m.ep_glu(hf, plan, "silu"),
        "moecc.ep_glu_backward": lambda: m.ep_glu_backward(af, hf, plan, "silu"),
        "moecc.ep_dispatch_gemm": lambda: m.ep_dispatch_gemm(x, idx, w1, 1, ""),
        "moecc.ep_gemm_combine": lambda: m.ep_gemm_combine(af, w2, w_TK, plan, 1, ""),
        "moecc.ep_gemm_combine_backward": lambda: m.ep_gemm_combine_backward(x, af, w2, w_TK, y_TKH, plan, ""),
        "moecc.ep_dispatch_gemm_backward": lambda: m.ep_dispatch_gemm_backward(hf, xs, w1, plan, T, K, ""),
    }
    aten = torch.ops.aten
    return {
        "host_op": _host_s(lambda: aten.add.Tensor(x, x), device, n),
        "host_view": _host_s(lambda: aten.t.default(x), device, n),
        "host_ops": {name: _host_s(fn, device, n) for name, fn in cases.items()},
    }


def measure_step_host(device: torch.device, quick: bool, ep: int = 1) -> dict[str, Any]:
    """The host's time per graph node in a training step (`HardwareProfile.host_op`, `host_view`, `host_ops`),
    as `moecc profile --host-costs-into` measures it: a small DeepSeek-style model (the package's example:
    attention, routed experts with a shared one) compiled with `ep` (a world of `ep` processes must be up when
    ep > 1), trained a few steps, one step profiled node by node; each node range's CPU time, scaled by the
    step's host time without the profiler over its time with it and less what a range costs (from a copy
    compiled without ranges). Ops timed alone on tiny inputs (`measure_host`) came out 3-4x short of this on
    an H200 node: in a step the host also runs the graph's wrappers, autograd and the allocator for each
    node. On a GPU the step runs twice, with the fused expert ops (the default there: theirs, and the per-op
    and per-view figures) and with the fuse pass off (the all-to-all path's ops, and the one-rank plain grouped
    GEMMs'). On the CPU the ops' own time is in the figures."""
    fused = _step_host(device, quick, ep)
    if device.type != "cuda":
        return fused
    unfused = _step_host(device, quick, ep, disable_passes=("fuse",))
    return {**fused, "host_ops": {**unfused["host_ops"], **fused["host_ops"]}}


def _step_host(device: torch.device, quick: bool, ep: int, disable_passes: tuple[str, ...] = ()) -> dict[str, Any]:
    import copy

    import moecc
    from moecc import profile
    from moecc.examples import deepseek_style

    gpu = device.type == "cuda"
    model, (ids,) = deepseek_style.build(seed=0, dtype=torch.bfloat16 if gpu else torch.float32, tokens=64)
    model = model.to(device)
    ids = ids.to(device)
    steps = 2 if quick else 4

    def stepper(m: Any) -> Callable[[], None]:
        params = [p for p in m.parameters() if p.requires_grad]

        def step() -> None:
            logits = m(ids)
            F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
            for p in params:
                p.grad = None

        return step

    def compile(profile_nodes: bool) -> Any:  # the plain copy on a copy: compile releases other ranks' experts
        m = model if profile_nodes else copy.deepcopy(model)
        return moecc.compile(m, ep=ep, profile_nodes=profile_nodes, disable_passes=disable_passes)

    _, res = profile.profile_compiled_step(compile, stepper, steps, reference_calls=3 if quick else 7)
    torch._dynamo.reset()
    return res["host_costs"]


def _device_gap_s(tiny: torch.Tensor, n: int = 200) -> float:
    """The device's time per op with nothing to do, queued back to back (`HardwareProfile.op_overhead`):
    behind a 10 ms spin of the device, so that the host has queued them all before the device reaches the
    first and the host's own cost (the host lane's) is not in it."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(3):
        torch.cuda._sleep(20_000_000)  # clock cycles: about 10 ms
        start.record()
        for _ in range(n):
            tiny.add_(1.0)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / n)
    return statistics.median(times)


def _layer_inputs(
    gen: torch.Generator, device: torch.device, dtype: torch.dtype, T: int, H: int, F: int, E: int, K: int
) -> tuple[torch.Tensor, ...]:
    """A GLU MoE layer's inputs, drawn from gen: tokens x [T, H], top-K experts and their gates, the expert
    weights w1 [E, H, 2F] and w2 [E, F, H] (scaled so the activations stay of order one)."""
    x = torch.randn(T, H, device=device, dtype=dtype, generator=gen)
    idx = torch.rand(T, E, device=device, generator=gen).topk(K, dim=-1).indices
    w_TK = torch.rand(T, K, device=device, generator=gen).to(dtype)
    w1 = torch.randn(E, H, 2 * F, device=device, dtype=dtype, generator=gen) * H**-0.5
    w2 = torch.randn(E, F, H, device=device, dtype=dtype, generator=gen) * F**-0.5
    return x, idx, w_TK, w1, w2


def _fused_layer(
    device: torch.device, quick: bool, ep: int = 1, group: str = "", tokens_scale: float = 1.0
) -> tuple[Callable[[], None], float, float]:
    """One call of moecc's fused expert-parallel ops for a MoE layer's forward (dispatch + expert GEMM 1,
    expert GEMM 2 + combine) and backward (the mirror ops: dX and dW of both GEMMs), routing included, over
    `ep` ranks of `group` (this rank holds 1/ep of the experts; every rank draws its own tokens), the GEMM
    FLOPs one rank does in it, expected under the uniform routing drawn here, and the rows per expert that
    routing gives on average (T*K over a rank's E/ep experts). `tokens_scale` scales the tokens per rank. The
    activation between the two GEMMs is an op of its own, which the cost model charges by memory bandwidth: it
    is computed once, outside the call, so that its time does not count."""
    from moecc import dist as moecc_dist
    from moecc import ops

    T, H, F, E, K = (2048, 2048, 1024, 32, 4) if quick else (8192, 4096, 1536, 64, 6)
    T = max(int(T * tokens_scale), 1)
    rank = dist.get_rank(moecc_dist.group_by_name(group)) if ep > 1 else 0
    gen = torch.Generator(device=device).manual_seed(rank)
    x, idx, w_TK, w1, w2 = _layer_inputs(gen, device, torch.bfloat16, T, H, F, E, K)
    mine = slice(rank * E // ep, (rank + 1) * E // ep)
    w1, w2 = w1[mine].contiguous(), w2[mine].contiguous()
    dout = torch.randn(T, H, device=device, dtype=torch.bfloat16, generator=gen)

    h, _, _ = ops.ep_dispatch_gemm(x, idx, w1, ep, group)
    a = torch.nn.functional.silu(h[:, :F]) * h[:, F:]  # the same rows every call: the routing is fixed
    dh = torch.randn(h.shape, device=device, dtype=torch.bfloat16, generator=gen)

    def layer() -> None:
        _, x_SH, plan = ops.ep_dispatch_gemm(x, idx, w1, ep, group)
        _, y_TKH = ops.ep_gemm_combine(a, w2, w_TK, plan, ep, group)
        ops.ep_gemm_combine_backward(dout, a, w2, w_TK, y_TKH, plan, group)
        ops.ep_dispatch_gemm_backward(dh, x_SH, w1, plan, T, K, group)

    forward = 2 * T * K * H * 2 * F + 2 * T * K * F * H
    return layer, 3.0 * forward, T * K * ep / E


def _fused_ep_rate(device: torch.device, world: int, quick: bool) -> tuple[float, float]:
    """The fused ops' rate across the `world` ranks of this node (each rank's GEMM FLOPs over the slowest
    rank's time): with the rows' transfers to and from the other ranks, the waits for them and the remote
    stores, which the one-rank rate does not see (on 2 x H200 the fused layer took 12-20 % longer than on one
    GPU at the same tokens per rank), and the rows per expert it was measured at."""
    from moecc import dist as moecc_dist

    group = moecc_dist.make_mesh(world).ep_group
    layer, flops, rows = _fused_layer(device, quick, world, group)
    dist.barrier()
    t = _time_s(layer, device, 5 if quick else 20)
    worst = [0.0] * world
    dist.all_gather_object(worst, t)
    return flops / max(worst), rows


def _sizes(quick: bool) -> list[int]:
    """Bytes per rank of the collective probes."""
    return [4 << 10, 64 << 10, 1 << 20, 4 << 20] if quick else [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]


def _collectives(rank: int, world: int, quick: bool, out: str) -> None:
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    curves: dict[str, list[list[float]]] = {"all_to_all": [], "all_reduce": []}
    iters = 5 if quick else 20
    for nbytes in _sizes(quick):
        n = max(nbytes // 4 // world * world, world)
        x = torch.randn(n, device=device)
        y = torch.empty_like(x)

        def a2a(x: torch.Tensor = x, y: torch.Tensor = y) -> None:
            dist.all_to_all_single(y, x)

        def ar(x: torch.Tensor = x) -> None:
            dist.all_reduce(x)

        for kind, fn in (("all_to_all", a2a), ("all_reduce", ar)):
            dist.barrier()
            t = _time_s(fn, device, iters)
            worst = [0.0] * world
            dist.all_gather_object(worst, t)  # the slowest rank sets the pace of a collective
            curves[kind].append([float(n * 4), max(worst)])
    fused_ep, ep_rows, host = {}, {}, {}
    if device.type == "cuda":
        fused_ep[world], ep_rows[world] = _fused_ep_rate(device, world, quick)
        if not quick:
            host = measure_step_host(device, quick, world)
    if rank == 0:
        Path(out).write_text(
            json.dumps({"curves": curves, "fused_ep_gemm_flops": fused_ep, "fused_ep_rows": ep_rows, "host": host})
        )


def measure_collectives(world_size: int, quick: bool, device_type: str = "auto") -> dict[str, Any]:
    """Over a local world of `world_size` processes: the collectives' curves ("curves") and, on GPUs, the fused
    ops' rate across the ranks ("fused_ep_gemm_flops", by world size), the rows per expert it was measured
    at ("fused_ep_rows") and, unless quick, rank 0's host costs in a step at ep = `world_size` ("host").
    device_type "cpu": gloo on the CPU, whatever GPUs the machine has; "auto": NCCL where there are
    `world_size` GPUs, else gloo."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "curves.json")
        backend = "gloo" if device_type == "cpu" else None
        testing.spawn(_collectives, world_size, quick, out, timeout_s=300, backend=backend)
        return json.loads(Path(out).read_text())


def calibrate(out: str | Path | None, world_size: int = 2, device: str = "auto", quick: bool = False) -> Path:
    """Measure and save a profile; returns where it was written."""
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else (device if device != "auto" else "cpu")
    )
    if dev.type == "cuda" and world_size > torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise MoeccError(f"calibrate: --world-size {world_size} needs as many GPUs; this machine has {n}")
    rates: dict[str, Any] = dict(measure_compute(dev, quick))
    across = measure_collectives(world_size, quick, dev.type) if world_size > 1 else {}
    host_from = "ops alone on tiny inputs" if dev.type == "cuda" else None
    if dev.type == "cuda" and not quick:  # a step's host costs replace those of the ops timed alone
        step = across["host"] if world_size > 1 else measure_step_host(dev, quick)
        rates.update({**step, "host_ops": {**rates["host_ops"], **step["host_ops"]}})
        host_from = (
            f"profiled training steps of moecc.examples.deepseek_style at ep = {world_size}, with the fused "
            "expert ops and without; ops in neither step: timed alone on tiny inputs"
        )
    curves = across.get("curves", {})
    a2a = curves.get("all_to_all", [])
    builtin = cost.PROFILES["cpu" if dev.type == "cpu" else "h200"]  # for what one process cannot measure
    key = cost.device_key(dev)
    profile = cost.HardwareProfile.from_json(
        {
            "name": f"calibrated:{key}:{world_size}",
            **rates,
            # the largest probe's rate and the smallest probe's time stand for bandwidth and latency
            "a2a_bw": a2a[-1][0] / a2a[-1][1] if a2a else builtin.a2a_bw,
            "a2a_latency": a2a[0][1] if a2a else builtin.a2a_latency,
            "curves": curves,
            "fused_ep_gemm_flops": across.get("fused_ep_gemm_flops", {}),
            "fused_ep_rows": across.get("fused_ep_rows", {}),
            "host_sync": builtin.host_sync,  # not measured: see HardwareProfile.host_sync
        },
        source="measured",
    )
    path = Path(out) if out else cost.profile_dir() / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = profile.to_json()
    data.pop("source")
    data["measured"] = {"torch": torch.__version__, "world_size": world_size, "quick": quick, "device": key}
    if host_from:
        data["measured"]["host_costs_from"] = host_from
    path.write_text(json.dumps(data, indent=1))
    return path
