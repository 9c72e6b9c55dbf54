"""One MoE layer under expert parallelism: hand-written eager EP, the same under torch.compile, and moecc.

For each MoE shape (T tokens per rank, E/W experts per rank on W ranks) it builds one layer in plain PyTorch:
a router (Linear H -> E, float32 softmax, top-k, renormalised), E SwiGLU experts stored as stacked weights
`gate_up_proj [E, 2F, H]` / `down_proj [E, H, F]` behind the transformers experts interface (which moecc
lifts by interface) and, for deepseek, a shared SwiGLU expert on every token. With the same weights and
inputs on every variant, it times medians of many iterations after warm-up (CUDA events on GPU,
perf_counter on CPU; ranks aligned by a barrier before each iteration, the slowest rank's median reported):
  fwd      the forward under no_grad;
  fwd_bwd  forward + backward of out.float().square().mean(), then the gradient contract of DDP (replicated
           gradients averaged over the ranks, expert gradients scaled by 1/W; moecc does it in its graph),
for these variants:
  eager           expert parallelism the way it is written by hand today: all_to_all_single of per-expert
                  counts, of token rows (one per (token, slot)) with host-synced split sizes, a sort by local
                  expert, torch._grouped_mm (a per-expert matmul loop where it does not run: see "gemm"),
                  all_to_all_single back, a weighted index_add; autograd through the functional collectives;
  eager_compiled  the same module under torch.compile (graph breaks allowed and counted);
  moecc_torch     moecc.compile(layer, ep=W, backend="torch");
  moecc_triton    moecc.compile(layer, ep=W, backend="triton") (on the CPU only under TRITON_INTERPRET=1);
  bound           max over ranks of max(GEMM FLOPs of the rank / measured dense matmul rate, minimal bytes the
                  rank sends through all-to-all / measured all_to_all_single rate), both rates measured in
                  this run; minimal bytes: each token once per distinct remote rank of its top-k experts,
                  dispatch and combine; fwd_bwd counts 3x the FLOPs and 2x the bytes.
Outputs, input gradients and (samples of) parameter gradients are compared with eager's, and eager's with a
single-process reference (all experts on every rank). A variant that fails is recorded with its error and
the run goes on. Rank 0 writes `moe_layer_<date><tag>.json` to --out and prints a markdown table.

    torchrun --nproc-per-node 4 benchmarks/bench_moe_layer.py --out benchmarks/results
    torchrun --nproc-per-node 2 benchmarks/bench_moe_layer.py --tiny --out /tmp/bench_tiny   # CPU, gloo

Legend: T tokens per rank, K top-k slots, S routed rows, H hidden, F expert FFN width, E experts (E_loc on
this rank), W world size, P peer ranks (W of them).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import importlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

# this checkout's moecc (whose commit the result records), also where another copy is installed
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moecc  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    ffn: int
    experts: int
    top_k: int
    tokens: int  # per rank
    shared_ffn: int = 0  # 0: no shared expert


SHAPES = {
    "mixtral": Shape(4096, 14336, 8, 2, 8192),
    "deepseek": Shape(7168, 2048, 256, 8, 8192, shared_ffn=2048),
    "qwen3": Shape(2048, 768, 128, 8, 16384),
}
TINY_SHAPES = {
    "mixtral": Shape(64, 32, 8, 2, 64),
    "deepseek": Shape(64, 32, 8, 4, 64, shared_ffn=32),
    "qwen3": Shape(64, 32, 16, 4, 64),
}
VARIANTS = ("eager", "eager_compiled", "moecc_torch", "moecc_triton")
PHASES = ("fwd", "fwd_bwd")
BACKEND_MODULES = ("torch_backend", "triton_backend", "triton_ep")  # moecc.backends modules with COUNTERS
GRAD_SAMPLE = 1 << 22  # elements of each parameter gradient kept for the comparison (strided over the tensor)

# ---------------------------------------------------------------------------------------------------------
# the layer, in plain PyTorch


class SharedExpert(nn.Module):
    """The always-active shared expert: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, ffn: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, ffn, bias=False, dtype=dtype)
        self.up = nn.Linear(hidden, ffn, bias=False, dtype=dtype)
        self.down = nn.Linear(ffn, hidden, bias=False, dtype=dtype)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x_TH)) * self.up(x_TH))


class Experts(nn.Module):
    """SwiGLU experts as stacked weights, with the transformers experts interface (the attributes its
    `use_experts_implementation` decorator sets and `forward(hidden_states, top_k_index, top_k_weights)`),
    which moecc recognises by interface; no dependency on transformers."""

    has_gate = True
    has_bias = False
    is_transposed = False  # gate_up_proj [E, 2F, H], down_proj [E, H, F]: nn.Linear layout
    is_concatenated = True  # [gate; up] along 2F

    def __init__(self, experts: int, hidden: int, ffn: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * ffn, hidden, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, ffn, dtype=dtype))
        self.act_fn = nn.SiLU()

    def _apply_gate(self, h_SF2: torch.Tensor) -> torch.Tensor:
        gate, up = h_SF2.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, x_TH: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """All experts in this process, token by token (the single-process reference), float32 combine."""
        out_TH = torch.zeros_like(x_TH, dtype=torch.float32)
        for e in range(self.gate_up_proj.shape[0]):
            tok, slot = torch.where(idx_TK == e)
            y = F.linear(self._apply_gate(F.linear(x_TH[tok], self.gate_up_proj[e])), self.down_proj[e])
            out_TH.index_add_(0, tok, y.float() * w_TK[tok, slot, None].float())
        return out_TH.to(x_TH.dtype)


def route(router: nn.Linear, x_TH: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (float32) top-k, renormalised: (w_TK float32, idx_TK)."""
    probs_TE = torch.softmax(router(x_TH), dim=-1, dtype=torch.float32)
    w_TK, idx_TK = torch.topk(probs_TE, top_k, dim=-1)
    return w_TK / w_TK.sum(dim=-1, keepdim=True), idx_TK


class MoELayer(nn.Module):
    """The model moecc compiles: router -> experts (all E of them) -> (+ shared expert)."""

    def __init__(self, s: Shape, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.top_k = s.top_k
        self.router = nn.Linear(s.hidden, s.experts, bias=False, dtype=dtype)
        self.experts = Experts(s.experts, s.hidden, s.ffn, dtype)
        self.shared = SharedExpert(s.hidden, s.shared_ffn, dtype) if s.shared_ffn else None

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        w_TK, idx_TK = route(self.router, x_TH, self.top_k)
        out_TH = self.experts(x_TH, idx_TK, w_TK)
        if self.shared is not None:
            out_TH = out_TH + self.shared(x_TH)
        return out_TH


def build_layer(s: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> MoELayer:
    """The full layer with weights drawn from `seed` on `device`: the same on every rank and every call."""
    with torch.device(device):
        layer = MoELayer(s, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():  # fan-in scaling keeps activations O(1)
            p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
    return layer


# ---------------------------------------------------------------------------------------------------------
# hand-written eager expert parallelism


def ffn_grouped(x_SH: torch.Tensor, w1_EFH: torch.Tensor, w2_EHF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    h_SF = torch._grouped_mm(x_SH, w1_EFH.transpose(1, 2), offs=offs_E)
    gate, up = h_SF.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, w2_EHF.transpose(1, 2), offs=offs_E)


def ffn_loop(x_SH: torch.Tensor, w1_EFH: torch.Tensor, w2_EHF: torch.Tensor, counts: list[int]) -> torch.Tensor:
    outs, lo = [], 0
    for e, n in enumerate(counts):
        gate, up = F.linear(x_SH[lo : lo + n], w1_EFH[e]).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(gate) * up, w2_EHF[e]))
        lo += n
    return torch.cat(outs) if outs else x_SH.new_zeros(0, w2_EHF.shape[1])


def grouped_mm_refusal(device: torch.device, dtype: torch.dtype, s: Shape) -> str | None:
    """None where torch._grouped_mm runs the expert FFN forward and backward, eagerly and under torch.compile
    (eager and eager_compiled run the same code), matching the per-expert loop; else why not."""
    gen = torch.Generator(device=device).manual_seed(7)
    x = torch.randn(24, s.hidden, device=device, dtype=dtype, generator=gen)
    w1 = torch.randn(2, 2 * s.ffn, s.hidden, device=device, dtype=dtype, generator=gen) * s.hidden**-0.5
    w2 = torch.randn(2, s.hidden, s.ffn, device=device, dtype=dtype, generator=gen) * s.ffn**-0.5
    offs = torch.tensor([10, 24], dtype=torch.int32, device=device)

    def ffn(fn: Callable[..., torch.Tensor], *args: Any) -> list[torch.Tensor]:
        a, b, c = (t.clone().requires_grad_() for t in (x, w1, w2))
        y = fn(a, b, c, *args)
        y.float().square().sum().backward()
        return [y.detach()] + [t.grad for t in (a, b, c) if t.grad is not None]

    want = ffn(ffn_loop, [10, 14])
    traced = torch.compile(ffn_grouped, backend="aot_eager", fullgraph=True)  # fake tensors, no code generation
    # a refusal under torch.compile is an answer here, recorded below, not an error for the log: the fake-tensor
    # propagation would print its traceback first
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        for how, fn in (("eagerly", ffn_grouped), ("under torch.compile", traced)):
            try:
                for g, w in zip(ffn(fn, offs), want, strict=True):
                    scale = float(w.float().abs().max())
                    torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2 * scale)
            except Exception as e:  # whatever torch raises for an unsupported device, dtype or layout
                return f"{how}: {type(e).__name__}: {' '.join(str(e).split())[:240]}"
    finally:
        quiet.setLevel(level)
    return None


def grouped_mm_choice(run: Run, dtype: torch.dtype, s: Shape) -> dict[str, str]:
    """What eager's expert FFN runs, the same on every rank: {"gemm": "torch._grouped_mm"}, or the per-expert
    loop with the first rank's reason (`grouped_mm_refusal`) where any rank refuses it."""
    refusals = [r for r in run.gather(grouped_mm_refusal(run.device, dtype, s)) if r]
    if refusals:
        return {"gemm": "per-expert loop", "gemm_refusal": refusals[0]}
    return {"gemm": "torch._grouped_mm"}


class EagerEPLayer(nn.Module):
    """The layer with this rank's E/W experts, dispatching tokens with hand-written all-to-alls."""

    def __init__(self, full: MoELayer, rank: int, world: int, grouped: bool) -> None:
        super().__init__()
        E = full.experts.gate_up_proj.shape[0]
        self.num_experts, self.top_k, self.world, self.grouped = E, full.top_k, world, grouped
        H, F_ = full.router.in_features, full.experts.down_proj.shape[2]
        lo, hi = rank * E // world, (rank + 1) * E // world
        w = full.router.weight
        # this rank's copies of the replicated weights and of its slice of the experts
        with torch.device(w.device):
            self.router = nn.Linear(H, E, bias=False, dtype=w.dtype)
            self.experts = Experts(hi - lo, H, F_, w.dtype)
            self.shared = SharedExpert(H, full.shared.gate.out_features, w.dtype) if full.shared else None
        with torch.no_grad():
            self.router.weight.copy_(w)
            self.experts.gate_up_proj.copy_(full.experts.gate_up_proj[lo:hi])
            self.experts.down_proj.copy_(full.experts.down_proj[lo:hi])
            if self.shared is not None and full.shared is not None:
                self.shared.load_state_dict(full.shared.state_dict())

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        T, H = x_TH.shape
        W, E, K = self.world, self.num_experts, self.top_k
        E_loc = E // W
        group = dist.group.WORLD
        assert group is not None
        w_TK, idx_TK = route(self.router, x_TH, K)
        # dispatch: one row per (token, slot), sorted by expert, hence by destination rank
        flat_S = idx_TK.reshape(-1)
        order_S = torch.argsort(flat_S, stable=True)
        tok_S = order_S // K
        send_x_SH = x_TH.index_select(0, tok_S)
        counts_E = torch.zeros(E, dtype=torch.int64, device=x_TH.device)
        counts_E.scatter_add_(0, flat_S, torch.ones_like(flat_S))  # not bincount: no sync, a static shape
        recv_counts = funcol.all_to_all_single(counts_E, None, None, group)  # [W * E_loc]: (source, local expert)
        send_P = counts_E.view(W, E_loc).sum(1)
        host = torch.cat([send_P, recv_counts]).tolist()  # the host sync of split sizes
        send_splits, recv_counts_host = host[:W], host[W:]
        recv_splits = [sum(recv_counts_host[p * E_loc : (p + 1) * E_loc]) for p in range(W)]
        n_recv = sum(recv_splits)
        recv_x_SH = funcol.all_to_all_single_autograd(send_x_SH, recv_splits, send_splits, group)
        # rows arrive in (source rank, local expert) blocks: group them by local expert
        blocks = torch.arange(E_loc, device=x_TH.device).repeat(W)
        eid_S = torch.repeat_interleave(blocks, recv_counts.view(-1), output_size=n_recv)
        perm_S = torch.argsort(eid_S, stable=True)
        x_SH = recv_x_SH.index_select(0, perm_S)
        w1, w2 = self.experts.gate_up_proj, self.experts.down_proj
        if self.grouped:
            offs_E = torch.cumsum(recv_counts.view(W, E_loc).sum(0), 0).to(torch.int32)
            y_SH = ffn_grouped(x_SH, w1, w2, offs_E)
        else:
            per_expert = [sum(recv_counts_host[p * E_loc + e] for p in range(W)) for e in range(E_loc)]
            y_SH = ffn_loop(x_SH, w1, w2, per_expert)
        inv_S = torch.empty_like(perm_S).scatter_(0, perm_S, torch.arange(n_recv, device=x_TH.device))
        back_SH = funcol.all_to_all_single_autograd(y_SH.index_select(0, inv_S), send_splits, recv_splits, group)
        # combine: weighted sum per token in float32
        w_S = w_TK.reshape(-1).index_select(0, order_S)
        out_TH = torch.zeros(T, H, dtype=torch.float32, device=x_TH.device)
        out_TH = out_TH.index_add(0, tok_S, back_SH.float() * w_S[:, None]).to(x_TH.dtype)
        if self.shared is not None:
            out_TH = out_TH + self.shared(x_TH)
        return out_TH


def ddp_grad_sync(params: dict[str, nn.Parameter], world: int) -> None:
    """What DDP (plus expert parallelism) does after backward: replicated gradients averaged over the
    ranks, expert gradients (already summed over every rank's tokens) scaled by 1/W."""
    for name, p in params.items():
        if p.grad is None:
            continue
        if not name.startswith("experts.") and world > 1:
            dist.all_reduce(p.grad)
        p.grad.div_(world)


# ---------------------------------------------------------------------------------------------------------
# measuring


@dataclasses.dataclass
class Run:
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    iters: int
    warmup: int
    dump_dir: str | None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def gather(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def time_ms(self, fn: Callable[[], Any]) -> float:
        """This rank's median of `iters` calls after `warmup`; ranks start each call together."""
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.iters):
            self.sync()
            dist.barrier()
            self.sync()
            if self.device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    @property
    def tolerance(self) -> tuple[float, float]:
        """(rtol, atol relative to the reference's largest magnitude)."""
        return (1e-4, 1e-4) if self.dtype == torch.float32 else (2e-2, 2e-2)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip()[:600]}"


def compare(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: tuple[float, float]) -> dict[str, Any]:
    """Per tensor: max abs error and max error relative to the reference's largest magnitude; failures of
    assert_close(rtol, atol = tol * max |ref|)."""
    abs_err, rel_err, failures = {}, {}, []
    for k, r in ref.items():
        g = got.get(k)
        if g is None or g.shape != r.shape:
            failures.append(f"{k}: missing or shape {None if g is None else tuple(g.shape)} != {tuple(r.shape)}")
            continue
        r32, g32 = r.float(), g.float()
        scale = float(r32.abs().max()) if r32.numel() else 0.0
        err = float((g32 - r32).abs().max()) if r32.numel() else 0.0
        abs_err[k], rel_err[k] = err, err / scale if scale else err
        try:
            torch.testing.assert_close(g32, r32, rtol=tol[0], atol=tol[1] * scale)
        except AssertionError as e:
            failures.append(f"{k}: {' '.join(str(e).split())[:300]}")
    return {"abs": abs_err, "rel": rel_err, "failures": failures}


def merge_numerics(per_rank: list[dict[str, Any]], vs: str) -> dict[str, Any]:
    keys = list(per_rank[0]["abs"])
    failures = [f"rank {r}: {f}" for r, d in enumerate(per_rank) for f in d["failures"]]
    out: dict[str, Any] = {
        "numerics_vs": vs,
        "numerics_ok": not failures,
        "max_abs_err": {k: max(d["abs"].get(k, float("nan")) for d in per_rank) for k in keys},
        "max_rel_err": {k: max(d["rel"].get(k, float("nan")) for d in per_rank) for k in keys},
    }
    if failures:
        out["numerics_error"] = failures[:6]
    return out


def grad_sample(g: torch.Tensor) -> torch.Tensor:
    flat = g.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // GRAD_SAMPLE)][:GRAD_SAMPLE].clone()


@dataclasses.dataclass
class Variant:
    """A module to time: what to call, its parameters by the model's names, what runs after backward, and
    what to record about it after its first call."""

    module: Callable[[torch.Tensor], torch.Tensor]
    params: dict[str, nn.Parameter]
    after_backward: Callable[[], None] | None = None
    describe: Callable[[], dict[str, Any]] = dict


def call(v: Variant, phase: str, x: torch.Tensor, keep: bool = False) -> dict[str, torch.Tensor]:
    """One forward (fwd) or training step's forward and backward (fwd_bwd); with `keep`, the output, the
    input gradient and samples of the parameter gradients for the comparisons."""
    if phase == "fwd":
        with torch.no_grad():
            return {"out": v.module(x)}
    x.grad = None
    for p in v.params.values():
        p.grad = None
    out = v.module(x)
    out.float().square().mean().backward()
    if v.after_backward is not None:
        v.after_backward()
    if not keep:
        return {}
    assert x.grad is not None
    got = {"out": out.detach(), "x_grad": x.grad}
    got.update({f"grad.{n}": grad_sample(p.grad) for n, p in v.params.items() if p.grad is not None})
    return got


def kernel_counters() -> dict[str, int]:
    """The counters of moecc's backends (which grouped GEMM path ran, all-to-all rows and bytes, fused
    kernels), as `<backend module>.<counter>`."""
    out: dict[str, int] = {}
    for name in BACKEND_MODULES:
        try:
            module = importlib.import_module(f"moecc.backends.{name}")
        except ImportError:
            continue
        out.update({f"{name}.{k}": n for k, n in getattr(module, "COUNTERS", {}).items()})
    return out


def bench_variant(
    run: Run,
    shape: str,
    name: str,
    build: Callable[[], Variant],
    x: dict[str, torch.Tensor],
    ref: dict[str, dict[str, torch.Tensor]] | None,
    ref_name: str,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, torch.Tensor]]]:
    """Build, check and time one variant for both phases. Returns its records and its results (for the
    variants checked against it). Errors are recorded, never raised; every rank takes the same branches."""
    records: list[dict[str, Any]] = []
    results: dict[str, dict[str, torch.Tensor]] = {}
    variant: Variant | None = None
    err: str | None = None
    try:
        variant = build()
    except Exception as e:
        err = _error(e)
        traceback.print_exc()
    build_errs = run.gather(err)
    for phase in PHASES:
        rec: dict[str, Any] = {"shape": shape, "variant": name, "phase": phase, "median_ms": None}
        records.append(rec)
        if any(build_errs):
            rec["error"] = "; ".join(f"rank {r}: {e}" for r, e in enumerate(build_errs) if e)
            continue
        assert variant is not None
        v, err = variant, None
        got: dict[str, torch.Tensor] = {}
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        try:  # a first call (which compiles, for the compiled variants), then a checked call
            t0 = time.perf_counter()
            call(v, phase, x[phase])
            run.sync()
            rec["first_call_s"] = round(time.perf_counter() - t0, 3)
            before = kernel_counters()
            got = results[phase] = call(v, phase, x[phase], keep=True)
            run.sync()
            after = kernel_counters()
            if name.startswith("moecc"):
                rec["kernel_calls"] = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
            rec.update(v.describe())
        except Exception as e:
            err = _error(e)
            traceback.print_exc()
        rec["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values()) - breaks
        errs = run.gather(err)
        if any(errs):
            rec["error"] = "; ".join(f"rank {r}: {e}" for r, e in enumerate(errs) if e)
            run.log(f"  {shape} {name} {phase}: error: {rec['error'][:300]}")
            continue
        if ref is not None and phase in ref:
            rec.update(merge_numerics(run.gather(compare(got, ref[phase], run.tolerance)), ref_name))
        ms: float | None = None
        try:
            ms = run.time_ms(functools.partial(call, v, phase, x[phase]))
        except Exception as e:
            err = _error(e)
            traceback.print_exc()
        per_rank = run.gather((ms, err))
        if any(e for _, e in per_rank):
            rec["error"] = "; ".join(f"rank {r}: {e}" for r, (_, e) in enumerate(per_rank) if e)
            run.log(f"  {shape} {name} {phase}: error: {rec['error'][:300]}")
            continue
        rec["median_ms"] = max(m for m, _ in per_rank)
        rec["median_ms_per_rank"] = [m for m, _ in per_rank]
        run.log(f"  {shape} {name} {phase}: {rec['median_ms']:.3f} ms" + _numerics_note(rec))
    return records, results


def _numerics_note(rec: dict[str, Any]) -> str:
    if "numerics_ok" not in rec:
        return ""
    worst = max(rec["max_rel_err"].values(), default=0.0)
    ok = "ok" if rec["numerics_ok"] else "MISMATCH"
    return f"  (vs {rec['numerics_vs']}: {ok}, max rel err {worst:.2e})"


# ---------------------------------------------------------------------------------------------------------
# the bound


def routing_traffic(run: Run, s: Shape, idx_TK: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
    """tokens[p][q]: tokens of rank p with at least one top-k expert on rank q (the minimal rows p sends
    q); pairs[p][e]: (token, slot) pairs of rank p routed to expert e. Gathered from every rank."""
    E_loc = s.experts // run.world
    dest_TK = idx_TK // E_loc
    hit_TP = torch.zeros(idx_TK.shape[0], run.world, dtype=torch.bool, device=idx_TK.device)
    hit_TP.scatter_(1, dest_TK, True)
    pairs_E = torch.zeros(s.experts, dtype=torch.int64, device=idx_TK.device)
    pairs_E.scatter_add_(0, idx_TK.reshape(-1), torch.ones_like(idx_TK.reshape(-1)))
    mine = (hit_TP.sum(0).tolist(), pairs_E.tolist())
    gathered = run.gather(mine)
    return [t for t, _ in gathered], [p for _, p in gathered]


def measure_rates(run: Run, s: Shape, a2a_rows: int) -> tuple[float, float | None]:
    """(this rank's dense matmul FLOP/ms on an [T*K, H] @ [H, 2F] GEMM; all_to_all_single remote bytes per
    rank per ms with `a2a_rows` rows of H per rank split evenly, timed by the slowest rank; None on one rank)."""
    gen = torch.Generator(device=run.device).manual_seed(3)
    M = s.tokens * s.top_k
    a = torch.randn(M, s.hidden, device=run.device, dtype=run.dtype, generator=gen)
    b = torch.randn(s.hidden, 2 * s.ffn, device=run.device, dtype=run.dtype, generator=gen)
    flop_per_ms = 2 * M * s.hidden * 2 * s.ffn / run.time_ms(functools.partial(torch.mm, a, b))
    del a, b
    if run.world == 1:
        return flop_per_ms, None
    rows = max(run.world, -(-a2a_rows // run.world) * run.world)
    send = torch.randn(rows, s.hidden, device=run.device, dtype=run.dtype, generator=gen)
    recv = torch.empty_like(send)
    a2a_ms = max(run.gather(run.time_ms(functools.partial(dist.all_to_all_single, recv, send))))
    return flop_per_ms, rows * (run.world - 1) // run.world * s.hidden * send.element_size() / a2a_ms


def bound_records(run: Run, shape: str, s: Shape, idx_TK: torch.Tensor) -> list[dict[str, Any]]:
    tokens, pairs = routing_traffic(run, s, idx_TK)
    W, E_loc, elem = run.world, s.experts // run.world, torch.empty((), dtype=run.dtype).element_size()
    sent = [sum(tokens[p]) for p in range(W)]
    flop_per_ms, byte_per_ms = measure_rates(run, s, max(sent))
    per_rank = []
    for r in range(W):
        rows_here = sum(pairs[p][e] for p in range(W) for e in range(r * E_loc, (r + 1) * E_loc))
        flops = 6 * rows_here * s.hidden * s.ffn + 2 * s.tokens * s.hidden * s.experts
        flops += 6 * s.tokens * s.hidden * s.shared_ffn
        # dispatch sends each token once per distinct remote rank; combine sends back what dispatch received
        rows_remote = sum(tokens[r][q] for q in range(W) if q != r) + sum(tokens[p][r] for p in range(W) if p != r)
        eager_rows = sum(pairs[r][e] for e in range(s.experts) if e // E_loc != r)
        eager_rows += sum(pairs[p][e] for p in range(W) if p != r for e in range(r * E_loc, (r + 1) * E_loc))
        per_rank.append((flops, rows_remote * s.hidden * elem, eager_rows * s.hidden * elem))
    rates = run.gather((flop_per_ms, byte_per_ms))
    records = []
    for phase, mult_flops, mult_bytes in (("fwd", 1, 1), ("fwd_bwd", 3, 2)):
        compute = [mult_flops * f / rates[r][0] for r, (f, _, _) in enumerate(per_rank)]
        comm = [mult_bytes * b / rates[r][1] if rates[r][1] else 0.0 for r, (_, b, _) in enumerate(per_rank)]
        bound = [max(c, m) for c, m in zip(compute, comm, strict=True)]
        records.append(
            {
                "shape": shape,
                "variant": "bound",
                "phase": phase,
                "median_ms": max(bound),
                "bound_ms_per_rank": bound,
                "compute_ms": max(compute),
                "comm_ms": max(comm),
                "flops_per_rank": [mult_flops * f for f, _, _ in per_rank],
                "a2a_bytes_per_rank": [mult_bytes * b for _, b, _ in per_rank],
                "eager_a2a_bytes_per_rank": [mult_bytes * b for _, _, b in per_rank],
                "matmul_tflops_per_rank": [r[0] / 1e9 for r in rates],
                "a2a_gbytes_per_s_per_rank": [r[1] / 1e6 if r[1] else None for r in rates],
            }
        )
    run.log(
        f"  {shape} bound: fwd {records[0]['median_ms']:.3f} ms (compute {records[0]['compute_ms']:.3f}, "
        f"all-to-all {records[0]['comm_ms']:.3f}); matmul {flop_per_ms / 1e9:.1f} TFLOP/s, all-to-all "
        + (f"{byte_per_ms / 1e6:.1f} GB/s" if byte_per_ms else "none (one rank)")
    )
    return records


# ---------------------------------------------------------------------------------------------------------
# one shape


def reference(run: Run, s: Shape, x_TH: torch.Tensor) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
    """The single-process reference on this rank's tokens (every expert here, token by token): its output
    and input gradient per phase, and the routing (idx_TK)."""
    full = build_layer(s, run.device, run.dtype)
    full.requires_grad_(False)
    x_ref = x_TH.clone().requires_grad_()
    out = full(x_ref)
    out.float().square().mean().backward()
    assert x_ref.grad is not None
    with torch.no_grad():
        _, idx_TK = route(full.router, x_TH, s.top_k)
    return {"fwd": {"out": out.detach()}, "fwd_bwd": {"out": out.detach(), "x_grad": x_ref.grad}}, idx_TK


def bench_eager(
    run: Run, shape: str, s: Shape, variants: list[str], x: dict[str, torch.Tensor], ref: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, dict[str, torch.Tensor]]]:
    """eager and eager_compiled (the same module); returns their records and eager's results."""
    gemm = grouped_mm_choice(run, run.dtype, s)
    full = build_layer(s, run.device, run.dtype)
    eager = EagerEPLayer(full, run.rank, run.world, grouped="gemm_refusal" not in gemm)
    del full
    _free(run)
    params = dict(eager.named_parameters())

    def variant(module: Callable[[torch.Tensor], torch.Tensor]) -> Variant:
        return Variant(module, params, lambda: ddp_grad_sync(params, run.world), lambda: gemm)

    records, results = bench_variant(run, shape, "eager", lambda: variant(eager), x, ref, "reference")
    if "eager_compiled" in variants:
        recs, _ = bench_variant(
            run, shape, "eager_compiled", lambda: variant(torch.compile(eager)), x, results or None, "eager"
        )
        records += recs
    return records, results


def bench_moecc(
    run: Run, shape: str, s: Shape, backend: str, x: dict[str, torch.Tensor], ref: dict[str, Any] | None
) -> list[dict[str, Any]]:
    name = f"moecc_{backend}"
    if backend == "triton" and run.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        why = "the triton backend runs on the CPU only under TRITON_INTERPRET=1"
        run.log(f"  {shape} {name}: skipped ({why})")
        return [{"shape": shape, "variant": name, "phase": p, "median_ms": None, "skipped": why} for p in PHASES]

    def build() -> Variant:
        layer = build_layer(s, run.device, run.dtype)
        cm = moecc.compile(layer, ep=run.world, backend=backend, dump_dir=run.dump_dir)
        del layer  # sharded in place: this rank's experts live on in `cm`

        def describe() -> dict[str, Any]:
            regions = [f"{r.path}: {r.kind}, {r.status}, {r.expert_fn}" for r in cm.regions]
            fusion = sorted({n for c in cm.session.contexts for n in c.notes if "fused" in n})  # fused, or why not
            return {"moecc_regions": regions, "moecc_counters": cm.session.counters(), "moecc_fusion": fusion}

        return Variant(cm, dict(cm.named_parameters()), None, describe)

    records, _ = bench_variant(run, shape, name, build, x, ref, "eager")
    return records


def bench_shape(run: Run, shape: str, s: Shape, variants: list[str]) -> list[dict[str, Any]]:
    run.log(f"{shape}: H {s.hidden}, F {s.ffn}, E {s.experts}, top-{s.top_k}, T {s.tokens} per rank, W {run.world}")
    if s.experts % run.world:
        why = f"{s.experts} experts do not divide the world size {run.world}"
        return [{"shape": shape, "variant": v, "phase": p, "median_ms": None, "error": why}
                for v in [*variants, "bound"] for p in PHASES]  # fmt: skip
    gen = torch.Generator(device=run.device).manual_seed(1000 + run.rank)
    x_TH = torch.randn(s.tokens, s.hidden, device=run.device, dtype=run.dtype, generator=gen)
    x = {"fwd": x_TH, "fwd_bwd": x_TH.clone().requires_grad_()}
    ref, idx_TK = reference(run, s, x_TH)
    _free(run)
    records = bound_records(run, shape, s, idx_TK)
    recs, eager_results = bench_eager(run, shape, s, variants, x, ref)
    records += recs
    _free(run)
    for backend in ("torch", "triton"):
        if f"moecc_{backend}" in variants:
            records += bench_moecc(run, shape, s, backend, x, eager_results or None)
            _free(run)
    del x, ref, eager_results
    torch._dynamo.reset()
    _free(run)
    return records


def _free(run: Run) -> None:
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# output


def table(records: list[dict[str, Any]], variants: list[str]) -> str:
    def ms(r: dict[str, Any] | None) -> float | None:
        return r["median_ms"] if r is not None and r.get("median_ms") else None

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        if r.get("median_ms"):
            return f"{r['median_ms']:.3f}" + ("" if r.get("numerics_ok", True) else " (wrong)")
        return "skipped" if "skipped" in r else "error"

    others = [v for v in variants if v != "eager"]
    head = ["shape", "phase", "eager ms", *(f"{v} ms" for v in others), *(f"eager/{v}" for v in others)]
    head += ["bound ms", *(f"{v}/bound" for v in variants)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_key = {(r["shape"], r["phase"], r["variant"]): r for r in records}
    for shape in dict.fromkeys(r["shape"] for r in records):
        for phase in PHASES:
            got = {v: by_key.get((shape, phase, v)) for v in [*variants, "bound"]}
            eager_ms, bound_ms = ms(got["eager"]), ms(got["bound"])
            row = [shape, phase, cell(got["eager"]), *(cell(got[v]) for v in others)]
            for v in others:
                m = ms(got[v])
                row.append(f"{eager_ms / m:.2f}" if eager_ms and m else "-")
            row.append(cell(got["bound"]))
            for v in variants:
                m = ms(got[v])
                row.append(f"{m / bound_ms:.2f}" if bound_ms and m else "-")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def add_ratios(records: list[dict[str, Any]]) -> None:
    """speedup_vs_eager, over_bound and TFLOP/s (of the busiest rank's FLOPs) on every timed record."""
    by_key = {(r["shape"], r["phase"], r["variant"]): r for r in records}
    for r in records:
        if not r.get("median_ms") or r["variant"] == "bound":
            continue
        eager = by_key.get((r["shape"], r["phase"], "eager"), {})
        bound = by_key.get((r["shape"], r["phase"], "bound"), {})
        if eager.get("median_ms"):
            r["speedup_vs_eager"] = eager["median_ms"] / r["median_ms"]
        if bound.get("median_ms"):
            r["over_bound"] = r["median_ms"] / bound["median_ms"]
            r["tflops"] = max(bound["flops_per_rank"]) / r["median_ms"] / 1e9


def run_header(device: torch.device, world: int) -> dict[str, Any]:
    """What every results file starts with: date, hardware, commit, versions, world size."""
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "date": datetime.date.today().isoformat(),
        "hardware": f"{hardware} x {world}",
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton_version,
        "world_size": world,
    }


def write_results(folder: str, kind: str, tag: str, result: dict[str, Any]) -> Path:
    """Write `<kind>_<date><tag>.json` into folder (made if missing); returns its path."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{kind}_{result['date']}{tag}.json"
    path.write_text(json.dumps(result, indent=1))
    return path


def git_commit() -> str:
    """MOECC_COMMIT where set (a copy of the tree whose .git, if any, is not the tree's), else git's HEAD."""
    if os.environ.get("MOECC_COMMIT"):
        return os.environ["MOECC_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).resolve().parent
        ).stdout.strip()
    except OSError:
        out = ""
    return out or "unknown"


def init_distributed(device: str, timeout_s: float) -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:  # a plain `python` launch: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = datetime.timedelta(seconds=timeout_s)
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", timeout=timeout, device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return dist.get_rank(), dist.get_world_size(), dev


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result (rank 0 writes)")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (H 64, F 32, E 8-16, T 64): a smoke test")
    parser.add_argument("--tag", default="", help="suffix of the file name: moe_layer_<date><tag>.json")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default 20; 5 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 3; 1 with --tiny)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                        help="auto: bfloat16 on GPU, float32 on CPU")  # fmt: skip
    parser.add_argument("--dump-dir", default=None, help="moecc pass-level dumps")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="process-group timeout")
    args = parser.parse_args()
    if "eager" not in args.variants:
        args.variants.insert(0, "eager")  # the baseline every other variant is checked and divided by
    rank, world, device = init_distributed(args.device, args.timeout_s)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    iters = args.iters if args.iters is not None else (5 if args.tiny else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    run = Run(rank, world, device, dtype, iters, warmup, args.dump_dir)
    shapes = TINY_SHAPES if args.tiny else SHAPES
    variants = [v for v in VARIANTS if v in args.variants]
    records: list[dict[str, Any]] = []
    for shape in args.shapes:
        records += bench_shape(run, shape, shapes[shape], variants)
    add_ratios(records)
    if rank == 0:
        result = {
            **run_header(device, world),
            "config": {"dtype": str(dtype).removeprefix("torch."), "iters": iters, "warmup": warmup,
                       "tiny": args.tiny, "shapes": {k: dataclasses.asdict(shapes[k]) for k in args.shapes}},
            "records": records,
        }  # fmt: skip
        path = write_results(args.out, "moe_layer", args.tag, result)
        print("\n" + table(records, variants) + "\n", flush=True)
        print(f"wrote {path}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
