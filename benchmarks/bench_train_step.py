"""A full training step of a small DeepSeek-style MoE model: eager expert parallelism, moecc without its
`schedule` pass, and moecc, in one run.

The model (config "deepseek_small", DeepSeek-V2-Lite-like sizes) is plain PyTorch: a token embedding, L
decoder layers, a final RMSNorm and an untied LM head. Each layer is pre-RMSNorm causal self-attention (one
qkv and one output projection, F.scaled_dot_product_attention, no positional encoding) followed by a
pre-RMSNorm MoE block, bench_moe_layer's `MoELayer`: a router (Linear H -> E, float32 softmax top-k,
renormalised), E routed SwiGLU experts as stacked weights behind the transformers experts interface (which
moecc lifts) and the shared experts as one SwiGLU of their summed width. The loss, next-token cross-entropy
in float32, is computed in the model's forward. Weights are drawn from a fixed seed, the same on every rank;
each rank draws its own B x S tokens (T = B * S per rank).

A step is forward + loss + backward, including the gradient synchronisation across ranks; there is no
optimizer step. `.grad` is set to None before each step. Variants:
  eager             every MoE block replaced by bench_moe_layer's `EagerEPLayer` (this rank's E/W experts,
                    hand-written all_to_all_single dispatch and combine with host-synced split sizes,
                    torch._grouped_mm, or a per-expert loop where it does not run), and after backward
                    bench_moe_layer's `ddp_grad_sync`: one all_reduce per replicated gradient (attention,
                    norms, embedding, routers, shared experts, LM head), averaged over the ranks, and expert
                    gradients scaled by 1/W; not bucketed, not overlapped with the backward;
  moecc_noschedule  moecc.compile(model, ep=W, backend=--backend, disable_passes=["schedule"]);
  moecc             moecc.compile(model, ep=W, backend=--backend);
  moecc_graphed, moecc_noschedule_graphed  the two above compiled with cuda_graph=True and run through
                    moecc.graph_step: the step (forward, loss, backward, gradient synchronisation) captured in
                    one CUDA graph after its warm-up steps and replayed (GPU only).
Per variant (built, measured and freed before the next one is built, unless --interleave keeps them):
  step_ms           median of --iters steps after --warmup (ranks aligned by a barrier before each step; CUDA
                    events on GPU, perf_counter on CPU), the slowest rank's median;
  step_ms_interleaved  with --interleave R: the variants timed again after all were measured, one after the
                    other in R rounds (the median over rounds of each round's median), so that drift over the
                    run does not favour the variant timed first or last;
  tokens_per_s      W * T / step time: global tokens;
  mfu               model FLOPs of the step / (step time * W * peak). Model FLOPs (all ranks' tokens):
                    6 * N_act * W*T + 6 * L * S * H * W*T, with N_act the matmul parameters one token
                    activates (per layer attention projections 4H^2, K routed experts K*3HF, shared experts
                    3H*F_shared, router H*E; the LM head H*V; no embedding lookup) and the second term the
                    causal attention scores (QK^T and AV: 4*S*H per token and layer forward, halved for causal,
                    x3 for forward + backward). Peak: --peak-tflops, else 989 TFLOP/s (H200 dense bf16) for a
                    GPU in bf16, else the dense matmul rate measured on this machine;
  comm_ms           from one more step under torch.profiler: the time this rank's device timeline is covered
                    by communication (union of intervals): NCCL kernels on a GPU; on the CPU (gloo), the ops
                    whose names contain all_to_all, alltoall, all_reduce, allreduce or c10d (time the host
                    spends issuing or waiting for a collective);
  exposed_comm_ms   the part of comm_ms that no other activity overlaps: on a GPU every other kernel, memcpy
                    and memset on any stream; on the CPU every other op that has no communication inside or
                    around it. Both are the mean over ranks, with per-rank lists. NCCL kernels include the time
                    they wait for their peers; transfers inside fused moecc kernels (the default at ep > 1
                    on GPUs; MOECC_FUSED_EP=0 turns them off) count as compute. The profiled step's own wall
                    time (profiling slows it) is recorded beside them;
  predicted_step_ms moecc's cost model: the sum over the compiled graphs of plan["predicted_us"], the forward
                    and backward critical paths the schedule pass predicts; none for eager, and none for
                    moecc_noschedule (the schedule pass is what predicts);
  host_issue_ms     the host's time to issue one step (from its start, the device idle, until it returns; the
                    median of 5, the slowest rank): where it nears step_ms, the host sets the pace;
  predicted_host_ms the cost model's host lane for the same (moecc): its predicted time to issue the graphs;
  peak_mem_gib      torch.cuda.max_memory_allocated during the variant (reset before it), the rank max; GPU only;
  numerics          the first step's loss relative to eager's, and samples of the gradients of the first and
                    last layers, the embedding, the final norm and the LM head against eager's (recorded and
                    printed, not asserted). Below float32 an elementwise comparison with eager cannot pass:
                    rounding flips top-k choices, and the flips compound over the layers (in bf16 at 8 layers
                    moecc's and eager's gradients differ by up to ~16 % of their largest element, in float32
                    by 5e-6). So the run also takes eager's first step in float32 (the same weights, upcast; the
                    same tokens) and measures every variant's loss and gradient samples against it
                    (`*_vs_float32`): a moecc variant's numerics are ok when each sampled gradient is within
                    2x eager's own error against float32, plus 1e-3 of the gradient's largest element
                    (`numerics_vs`: "float32 eager, within 2x eager's error"); the elementwise comparison
                    with eager stays recorded (`numerics_ok_elementwise`, `max_rel_err`).
A variant that fails is recorded with its error and the run goes on. Rank 0 writes
`train_step_<date><tag>.json` to --out and prints a markdown table.

    torchrun --nproc-per-node 8 benchmarks/bench_train_step.py --out benchmarks/results
    torchrun --nproc-per-node 2 benchmarks/bench_train_step.py --tiny --out /tmp/ts   # CPU, gloo

Legend: B batch, S sequence, T = B*S tokens per rank, L layers, H hidden, F expert FFN width, E experts,
K top-k, V vocabulary, W world size.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd import DeviceType

# the sibling layer benchmark, which also puts this checkout's moecc first on sys.path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_moe_layer as layer_bench  # noqa: E402

import moecc  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    layers: int
    hidden: int
    heads: int
    experts: int
    top_k: int
    ffn: int  # routed expert FFN width
    shared_ffn: int  # the shared experts as one SwiGLU of their summed width; 0: none
    vocab: int
    batch: int
    seq: int

    @property
    def tokens(self) -> int:
        """T, per rank."""
        return self.batch * self.seq

    def moe_shape(self) -> layer_bench.Shape:
        return layer_bench.Shape(self.hidden, self.ffn, self.experts, self.top_k, self.tokens, self.shared_ffn)


CONFIGS = {
    "deepseek_small": Config(8, 2048, 16, 64, 6, 1408, 2 * 1408, 32768, 4, 2048),
    "deepseek_small_tiny": Config(2, 64, 4, 8, 2, 32, 64, 128, 2, 32),
}
VARIANTS = ("eager", "moecc_noschedule", "moecc", "moecc_noschedule_graphed", "moecc_graphed")
H200_BF16_PEAK_TFLOPS = 989.0  # dense, no sparsity
COMM_NAMES = ("all_to_all", "alltoall", "all_reduce", "allreduce", "c10d")  # CPU (gloo) communication ops

# ---------------------------------------------------------------------------------------------------------
# the model, in plain PyTorch


class Attention(nn.Module):
    """Causal multi-head self-attention; no positional encoding (timing does not depend on one)."""

    def __init__(self, c: Config, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.heads = c.heads
        self.qkv = nn.Linear(c.hidden, 3 * c.hidden, bias=False, dtype=dtype)
        self.o = nn.Linear(c.hidden, c.hidden, bias=False, dtype=dtype)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        B, S, H = x_BSH.shape
        qkv = self.qkv(x_BSH).view(B, S, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, S, head_dim] each
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, S, H))


class Block(nn.Module):
    """``x + attn(attn_norm(x))``, then ``x + moe(moe_norm(x))`` over the flattened tokens."""

    def __init__(self, c: Config, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(c.hidden, eps=1e-6, dtype=dtype)
        self.attn = Attention(c, dtype)
        self.moe_norm = nn.RMSNorm(c.hidden, eps=1e-6, dtype=dtype)
        self.moe: nn.Module = layer_bench.MoELayer(c.moe_shape(), dtype)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        B, S, H = x_BSH.shape
        x_BSH = x_BSH + self.attn(self.attn_norm(x_BSH))
        return x_BSH + self.moe(self.moe_norm(x_BSH).reshape(B * S, H)).view(B, S, H)


class Model(nn.Module):
    """Embedding, blocks, final norm, LM head; returns the next-token cross-entropy (float32)."""

    def __init__(self, c: Config, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(c.vocab, c.hidden, dtype=dtype)
        self.layers = nn.ModuleList(Block(c, dtype) for _ in range(c.layers))
        self.norm = nn.RMSNorm(c.hidden, eps=1e-6, dtype=dtype)
        self.lm_head = nn.Linear(c.hidden, c.vocab, bias=False, dtype=dtype)

    def forward(self, ids_BS: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
        x_BSH = self.embed(ids_BS)
        for layer in self.layers:
            x_BSH = layer(x_BSH)
        logits_BSV = self.lm_head(self.norm(x_BSH))
        return F.cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]).float(), targets_BS.reshape(-1))


def build_model(c: Config, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Model:
    """The full model (every expert) with weights drawn from `seed`: the same on every rank and every call."""
    with torch.device(device):
        model = Model(c, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:  # fan-in scaling, as bench_moe_layer's build_layer; norms stay at one
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
    return model


def batch(c: Config, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's tokens and next-token targets, [B, S] each."""
    gen = torch.Generator(device=device).manual_seed(1000 + rank)
    tokens = torch.randint(0, c.vocab, (c.batch, c.seq + 1), device=device, generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def model_flops(c: Config, world: int) -> dict[str, float]:
    """Model FLOPs of one training step over all ranks' tokens (see the module docstring)."""
    H, L = c.hidden, c.layers
    per_layer = 4 * H * H + c.top_k * 3 * H * c.ffn + 3 * H * c.shared_ffn + H * c.experts
    activated = L * per_layer + H * c.vocab
    tokens = world * c.tokens
    attention = 6 * L * c.seq * H * tokens  # 3 x (4 S H / 2) per token and layer
    return {"activated_params_per_token": activated, "model_flops": 6 * activated * tokens + attention}


# ---------------------------------------------------------------------------------------------------------
# the variants


@dataclasses.dataclass
class StepModel:
    """What a step calls, the parameters whose gradients it produces (by the model's names), what runs after
    backward, and what to record about it after its first step."""

    module: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    params: dict[str, nn.Parameter]
    after_backward: Callable[[], None] | None = None
    describe: Callable[[], dict[str, Any]] = dict
    graphed: moecc.GraphStep | None = None  # the whole step, replayed from a CUDA graph after its warm-up


def grad_sync(params: dict[str, nn.Parameter], world: int) -> None:
    """bench_moe_layer's DDP contract over the whole model: its ddp_grad_sync tells expert weights by an
    "experts." prefix, which the model's names carry inside ("layers.3.moe.experts.gate_up_proj")."""
    layer_bench.ddp_grad_sync({(f"experts.{n}" if ".experts." in n else n): p for n, p in params.items()}, world)


def build_eager(run: layer_bench.Run, c: Config, gemm: dict[str, str], upcast: bool = False) -> StepModel:
    """Eager expert parallelism; with `upcast`, the model built in the run's dtype and then converted to
    float32 (the same weights as every other variant's, which a float32 draw would not give)."""
    model = build_model(c, run.device, run.dtype)
    if upcast:
        model = model.float()
    grouped = "gemm_refusal" not in gemm
    for block in model.layers:  # one layer's expert slice copied at a time; the full MoELayer goes
        block.moe = layer_bench.EagerEPLayer(block.moe, run.rank, run.world, grouped)
    params = dict(model.named_parameters())
    return StepModel(model, params, functools.partial(grad_sync, params, run.world), lambda: dict(gemm))


def build_moecc(
    run: layer_bench.Run,
    c: Config,
    backend: str,
    disable: tuple[str, ...],
    chunks: int | None = None,
    graphed: bool = False,
) -> StepModel:
    model = build_model(c, run.device, run.dtype)
    cm = moecc.compile(
        model,
        ep=run.world,
        backend=backend,
        disable_passes=disable,
        dump_dir=run.dump_dir,
        chunks=chunks,
        cuda_graph=graphed,
    )
    del model  # sharded in place: this rank's experts live on in `cm`

    def train(ids_BS: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
        loss = cm(ids_BS, targets_BS)
        loss.backward()
        return loss.detach()

    def describe() -> dict[str, Any]:
        s = cm.session
        return {
            "moecc_graphs": len(s.contexts),
            "moecc_regions": [f"{r.path}: {r.kind}, {r.status}, {r.expert_fn}" for r in cm.regions],
            "moecc_counters": s.counters(),
            "moecc_chunks": {p: n for ctx in s.contexts for p, n in ctx.plan.get("chunks", {}).items()},
            "moecc_hooked_params": list(s.hooked),
        }

    step = moecc.graph_step(train, cm, warmup=run.warmup) if graphed else None
    return StepModel(cm, dict(cm.named_parameters()), None, describe, step)


FLOOR_FACTOR, FLOOR_SLACK = 2.0, 1e-3  # a variant's error vs float32 may be 2x eager's, + 1e-3 of the scale


def float32_reference(run: layer_bench.Run, c: Config) -> dict[str, Any]:
    """Eager's first step in float32 on this rank's tokens: its loss and gradient samples, the reference for a
    run in a lower precision (see the module docstring, numerics)."""
    gemm = layer_bench.grouped_mm_choice(run, torch.float32, c.moe_shape())
    m = build_eager(run, c, gemm, upcast=True)
    ids_BS, targets_BS = batch(c, run.rank, run.device)
    loss = float(step(m, ids_BS, targets_BS))
    grads = grad_samples(m, c.layers)
    del m
    torch._dynamo.reset()
    layer_bench._free(run)
    return {"loss": loss, "grads": grads, "gemm": gemm["gemm"]}


def within_floor(err: dict[str, float], floor: dict[str, float]) -> list[str]:
    """The sampled gradients whose error against float32 exceeds FLOOR_FACTOR x eager's, + FLOOR_SLACK."""
    return [
        f"{k}: {err.get(k, float('inf')):.3g} against eager's {f:.3g}"
        for k, f in floor.items()
        if not err.get(k, float("inf")) <= FLOOR_FACTOR * f + FLOOR_SLACK
    ]


def predicted_ms(m: StepModel, key: str = "predicted_us") -> float | None:
    """The cost model's step time: forward + backward critical paths over the compiled graphs (with key
    "predicted_host_us": the host's time to issue them)."""
    contexts = getattr(getattr(m.module, "session", None), "contexts", [])
    total = sum(sum(ctx.plan.get(key, {}).values()) for ctx in contexts)
    return total / 1e3 if total else None


def step(m: StepModel, ids_BS: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    if m.graphed is not None:  # it sets the gradients to None itself (each step's replace .grad)
        return m.graphed(ids_BS, targets_BS)
    for p in m.params.values():
        p.grad = None
    loss = m.module(ids_BS, targets_BS)
    loss.backward()
    if m.after_backward is not None:
        m.after_backward()
    return loss.detach()


def grad_samples(m: StepModel, layers: int) -> dict[str, torch.Tensor]:
    """Samples of the gradients compared across variants (see `sampled`), by parameter name."""
    return {
        n: layer_bench.grad_sample(p.grad) for n, p in m.params.items() if p.grad is not None and sampled(n, layers)
    }


def sampled(name: str, layers: int) -> bool:
    """The gradients compared across variants: first and last layer, embedding, final norm, LM head."""
    return not name.startswith("layers.") or name.startswith(("layers.0.", f"layers.{layers - 1}."))


# ---------------------------------------------------------------------------------------------------------
# communication on the timeline


def _merge(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(s for s in spans if s[1] > s[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _overlap(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    """Length of the intersection of two merged interval lists."""
    total, i, j = 0.0, 0, 0
    while i < len(xs) and j < len(ys):
        total += max(0.0, min(xs[i][1], ys[j][1]) - max(xs[i][0], ys[j][0]))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def _device_work(e: Any) -> bool:
    """A kernel, memcpy or memset on the GPU: not the ranges of record_function that the profiler mirrors onto
    the device timeline (gpu_user_annotation), nor synchronisation events (cuda_sync)."""
    if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
        return False
    kind = getattr(e, "activity_type", None) or ""  # kineto's activity type, where this torch exposes it
    return "annotation" not in kind and "sync" not in kind


def comm_spans(events: list[Any], cuda: bool) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(communication, other activity) intervals in us of a profiled step on this rank's device."""
    if cuda:  # every stream
        dev = [e for e in events if _device_work(e)]
        comm = [(e.time_range.start, e.time_range.end) for e in dev if "nccl" in e.name.lower()]
        busy = [(e.time_range.start, e.time_range.end) for e in dev if "nccl" not in e.name.lower()]
        return comm, busy
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    is_comm = {id(e) for e in cpu if any(k in e.name.lower() for k in COMM_NAMES)}
    near_comm = set(is_comm)  # comm ops, what they call, and what calls them (autograd nodes, compiled regions)
    for e in cpu:
        if id(e) in is_comm:
            p = e.cpu_parent
            while p is not None:
                near_comm.add(id(p))
                p = p.cpu_parent
        else:
            p = e.cpu_parent
            while p is not None and id(p) not in is_comm:
                p = p.cpu_parent
            if p is not None:
                near_comm.add(id(e))
    comm = [(e.time_range.start, e.time_range.end) for e in cpu if id(e) in is_comm]
    busy = [(e.time_range.start, e.time_range.end) for e in cpu if id(e) not in near_comm]
    return comm, busy


def profile_comm(run: layer_bench.Run, fn: Callable[[], Any]) -> tuple[float, float, float]:
    """(comm_ms, exposed_comm_ms, wall ms) of one call of `fn` on this rank, from torch.profiler's timeline."""
    cuda = run.device.type == "cuda"
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    run.sync()
    dist.barrier()
    run.sync()
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        run.sync()
        wall_ms = (time.perf_counter() - t0) * 1e3
    comm, busy = comm_spans(list(prof.events()), cuda)
    comm, busy = _merge(comm), _merge(busy)
    comm_us = sum(b - a for a, b in comm)
    return comm_us / 1e3, (comm_us - _overlap(comm, busy)) / 1e3, wall_ms


# ---------------------------------------------------------------------------------------------------------
# measuring one variant


def attempt(run: layer_bench.Run, what: str, fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """fn() on every rank: (its value, None), or (None, every failing rank's error) if it failed anywhere, so
    that all ranks take the same branch."""
    value, err = None, None
    try:
        value = fn()
    except Exception as e:
        err = layer_bench._error(e)
        traceback.print_exc()
    errs = run.gather(err)
    if any(errs):
        return None, f"{what}: " + "; ".join(f"rank {r}: {e}" for r, e in enumerate(errs) if e)
    return value, None


def bench_variant(
    run: layer_bench.Run,
    c: Config,
    model_name: str,
    name: str,
    build: Callable[[], StepModel],
    flops: float,
    peak_flops: float,
    eager: dict[str, Any] | None,
    truth: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None, Callable[[], Any] | None]:
    """Build, check, time and profile one variant; returns its record, its first step's loss and gradient
    samples (what the later variants are compared with) and its step (for the interleaved timing, None
    after an error). Errors are recorded, never raised."""
    rec: dict[str, Any] = {"model": model_name, "variant": name}
    rec.update(dict.fromkeys(("step_ms", "tokens_per_s", "mfu", "comm_ms", "exposed_comm_ms", "predicted_step_ms")))
    cuda = run.device.type == "cuda"
    if cuda:
        rec["mem_at_start_gib"] = max(run.gather(torch.cuda.memory_allocated(run.device) / 2**30))
        torch.cuda.reset_peak_memory_stats(run.device)
    ids_BS, targets_BS = batch(c, run.rank, run.device)
    m, err = attempt(run, "build", build)
    if err is not None:
        rec["error"] = err
        run.log(f"  {name}: error: {err[:400]}")
        return rec, None, None
    call = functools.partial(step, m, ids_BS, targets_BS)
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())

    def first() -> dict[str, Any]:
        t0 = time.perf_counter()
        loss = call()
        run.sync()
        seconds = time.perf_counter() - t0
        return {"s": seconds, "loss": float(loss), "grads": grad_samples(m, c.layers)}

    got, err = attempt(run, "first step", first)
    rec["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values()) - breaks
    if err is not None:
        rec["error"] = err
        run.log(f"  {name}: error: {err[:400]}")
        return rec, None, None
    rec["first_step_s"] = max(run.gather(round(got["s"], 3)))
    rec["loss_per_rank"] = run.gather(got["loss"])
    rec.update(m.describe())
    if eager is not None:
        rel = abs(got["loss"] - eager["loss"]) / max(abs(eager["loss"]), 1e-30)
        rec["loss_rel_err_vs_eager"] = max(run.gather(rel))
        grads = layer_bench.compare(got["grads"], eager["grads"], run.tolerance)
        rec.update(layer_bench.merge_numerics(run.gather(grads), "eager"))
    if truth is not None:
        rel = abs(got["loss"] - truth["loss"]) / max(abs(truth["loss"]), 1e-30)
        rec["loss_rel_err_vs_float32"] = max(run.gather(rel))
        per_rank = run.gather(layer_bench.compare(got["grads"], truth["grads"], run.tolerance)["rel"])
        got["err_vs_float32"] = {k: max(d[k] for d in per_rank) for k in per_rank[0]}
        rec["grad_rel_err_vs_float32"] = got["err_vs_float32"]
        if eager is not None and "err_vs_float32" in eager:
            over = within_floor(got["err_vs_float32"], eager["err_vs_float32"])
            rec["numerics_ok_elementwise"] = rec["numerics_ok"]
            rec["numerics_ok"], rec["numerics_vs"] = not over, f"float32 eager, within {FLOOR_FACTOR:g}x eager's error"
            if over:
                rec["numerics_error"] = over[:6]
            else:
                rec.pop("numerics_error", None)
    ms, err = attempt(run, "timing", lambda: run.time_ms(call))
    if err is None:
        per_rank = run.gather(ms)
        rec["step_ms"], rec["step_ms_per_rank"] = max(per_rank), per_rank
        rec["tokens_per_s"] = run.world * c.tokens / (rec["step_ms"] / 1e3)
        rec["model_flops"] = flops
        rec["mfu"] = flops / (rec["step_ms"] / 1e3) / (run.world * peak_flops)
        # the host's time to issue a step, the device idle at each start
        host, err = attempt(run, "host issue time", lambda: moecc.profile.host_issue_us(call, 5) / 1e3)
        if err is None:
            rec["host_issue_ms_per_rank"] = run.gather(host)
            rec["host_issue_ms"] = max(rec["host_issue_ms_per_rank"])
        comm, err = attempt(run, "profiled step", lambda: profile_comm(run, call))
    if err is None and m.graphed is not None:
        # the first step ran as it is (warm-up); a replay of the same tokens must give its loss and gradients
        def replay() -> dict[str, Any]:
            return {"loss": float(call()), "grads": grad_samples(m, c.layers)}

        replayed, err = attempt(run, "replayed step", replay)
        if err is None:
            rel = abs(replayed["loss"] - got["loss"]) / max(abs(got["loss"]), 1e-30)
            vs_first = layer_bench.compare(replayed["grads"], got["grads"], run.tolerance)
            rec["replayed_vs_first_step"] = {
                "loss_rel_err": max(run.gather(rel)),
                **layer_bench.merge_numerics(run.gather(vs_first), "the first (warm-up, not replayed) step"),
            }
            rec["graph_replays"] = m.graphed.replays
    if err is None:
        per_rank = run.gather(comm)
        rec["comm_ms_per_rank"] = [c_ for c_, _, _ in per_rank]
        rec["exposed_comm_ms_per_rank"] = [x for _, x, _ in per_rank]
        rec["profiled_step_ms_per_rank"] = [w for _, _, w in per_rank]  # the step comm_ms is measured on
        rec["comm_ms"] = statistics.mean(rec["comm_ms_per_rank"])
        rec["exposed_comm_ms"] = statistics.mean(rec["exposed_comm_ms_per_rank"])
        rec["comm_over_ranks"] = "mean"
    else:
        rec["error"] = err
    if name != "eager":
        rec["predicted_step_ms"] = predicted_ms(m)
        rec["predicted_host_ms"] = predicted_ms(m, "predicted_host_us")
        if rec["predicted_step_ms"] is None:
            rec["predicted_note"] = "no plan['predicted_us'] in the compiled graphs (the schedule pass predicts)"
    if cuda:
        rec["peak_mem_gib_per_rank"] = run.gather(torch.cuda.max_memory_allocated(run.device) / 2**30)
        rec["peak_mem_gib"] = max(rec["peak_mem_gib_per_rank"])
    run.log(f"  {name}: " + summary(rec))
    result = {k: got[k] for k in ("loss", "grads", "err_vs_float32") if k in got}
    return rec, result, (call if "error" not in rec else None)


def release(call: Callable[[], Any] | None) -> None:
    """Release a variant's CUDA graph, if it has one: NCCL cannot tear down a communicator that a live graph
    holds, and destroy_process_group would wait for it."""
    m = call.args[0] if isinstance(call, functools.partial) else None
    if isinstance(m, StepModel) and m.graphed is not None:
        m.graphed.close()


def interleaved_timing(
    run: layer_bench.Run, steps: dict[str, Callable[[], Any]], rounds: int, records: list[dict[str, Any]]
) -> None:
    """Time the variants again in `rounds` rounds, each variant `run.iters` steps per round, one variant after
    the other within a round, so that drift over the run (clocks, temperature, the allocator) falls on all of
    them alike; adds step_ms_interleaved (the median over rounds of each round's median, slowest rank) and
    the per-round medians to the records."""
    per_round: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, call in steps.items():
            per_round[name].append(max(run.gather(run.time_ms(call))))
    for rec in records:
        if rec["variant"] in per_round:
            rec["step_ms_interleaved_rounds"] = per_round[rec["variant"]]
            rec["step_ms_interleaved"] = statistics.median(per_round[rec["variant"]])
    medians = ", ".join(f"{n} {statistics.median(v):.2f} ms" for n, v in per_round.items())
    run.log(f"interleaved ({rounds} rounds): {medians}")


def summary(rec: dict[str, Any]) -> str:
    if rec.get("step_ms") is None:
        return f"error: {rec.get('error', '?')[:400]}"
    out = f"{rec['step_ms']:.2f} ms, {rec['tokens_per_s']:.0f} tokens/s, MFU {100 * rec['mfu']:.1f} %"
    if rec.get("comm_ms") is not None:
        out += f", comm {rec['comm_ms']:.2f} ms ({rec['exposed_comm_ms']:.2f} exposed)"
    if rec.get("predicted_step_ms") is not None:
        out += f", predicted {rec['predicted_step_ms']:.2f} ms"
    if "loss_rel_err_vs_eager" in rec:
        ok = "ok" if rec.get("numerics_ok") else "MISMATCH"
        worst = max(rec.get("max_rel_err", {}).values(), default=0.0)
        out += f"; loss vs eager {rec['loss_rel_err_vs_eager']:.1e}, grads {ok} (max rel err {worst:.1e}"
        if "grad_rel_err_vs_float32" in rec:
            out += f"; vs float32 {max(rec['grad_rel_err_vs_float32'].values(), default=0.0):.1e}"
        out += ")"
    elif "grad_rel_err_vs_float32" in rec:
        out += f"; grads vs float32: max rel err {max(rec['grad_rel_err_vs_float32'].values(), default=0.0):.1e}"
    if rec.get("error"):
        out += f"; error: {rec['error'][:300]}"
    return out


def measured_peak(run: layer_bench.Run) -> float:
    """The dense matmul rate of this machine in FLOP/s (mean over ranks), where no nominal peak applies."""
    n = 4096 if run.device.type == "cuda" else 1024
    gen = torch.Generator(device=run.device).manual_seed(3)
    a, b = (torch.randn(n, n, device=run.device, dtype=run.dtype, generator=gen) for _ in range(2))
    ms = dataclasses.replace(run, iters=10, warmup=2).time_ms(functools.partial(torch.mm, a, b))
    return statistics.mean(run.gather(2 * n**3 / (ms / 1e3)))


# ---------------------------------------------------------------------------------------------------------
# output


def table(records: list[dict[str, Any]]) -> str:
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    head = ["model", "variant", "step ms", "tokens/s", "MFU", "comm ms", "exposed comm ms", "predicted ms"]
    head += ["prediction error"]
    interleaved = any("step_ms_interleaved" in r for r in records)
    head += ["interleaved step ms"] if interleaved else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        step_ms, pred = r.get("step_ms"), r.get("predicted_step_ms")
        err = f"{100 * (pred - step_ms) / step_ms:+.0f} %" if step_ms and pred else "-"
        mfu = r.get("mfu")
        cells = [r["model"], r["variant"], num(step_ms, ".2f") if step_ms else "error"]
        cells += [num(r.get("tokens_per_s"), ".0f"), "-" if mfu is None else f"{100 * mfu:.1f} %"]
        cells += [num(r.get("comm_ms"), ".2f"), num(r.get("exposed_comm_ms"), ".2f"), num(pred, ".2f"), err]
        cells += [num(r.get("step_ms_interleaved"), ".2f")] if interleaved else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result (rank 0 writes)")
    parser.add_argument("--tag", default="", help="suffix of the file name: train_step_<date><tag>.json")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (L 2, H 64, E 8, T 64): a smoke test")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                        help="default: all (the _graphed ones on a GPU only)")  # fmt: skip
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default 10; 3 with --tiny)")
    parser.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                        help="then time the variants again, one after the other in ROUNDS rounds (all models "
                             "stay in memory): step_ms_interleaved")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; 1 with --tiny)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                        help="auto: bfloat16 on GPU, float32 on CPU")  # fmt: skip
    parser.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto",
                        help="moecc backend (auto: triton on GPU, torch on CPU)")  # fmt: skip
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the config's)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per rank (default: the config's)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: the config's)")
    parser.add_argument("--experts", type=int, default=None, help="routed experts (default: the config's)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="experts per token (default: the config's); the unfused path's exchange='auto' "
                             "pads or counts by it")  # fmt: skip
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"peak per device for MFU (default: {H200_BF16_PEAK_TFLOPS:g} in bf16 on GPU, else "
                        "the matmul rate measured here)")  # fmt: skip
    parser.add_argument("--dump-dir", default=None, help="moecc pass-level dumps")
    parser.add_argument("--chunks", type=int, default=None,
                        help="token chunks per sharded, unfused MoE layer for the moecc variant (default: the "
                             "cost model's choice)")  # fmt: skip
    parser.add_argument("--timeout-s", type=float, default=600.0, help="process-group timeout")
    args = parser.parse_args()
    rank, world, device = layer_bench.init_distributed(args.device, args.timeout_s)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    iters = args.iters if args.iters is not None else (3 if args.tiny else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    run = layer_bench.Run(rank, world, device, dtype, iters, warmup, args.dump_dir)
    model_name = "deepseek_small_tiny" if args.tiny else "deepseek_small"
    sizes = {
        k: v
        for k, v in (
            ("layers", args.layers), ("batch", args.batch), ("seq", args.seq), ("experts", args.experts),
            ("top_k", args.top_k),
        )
        if v is not None
    }  # fmt: skip
    c = dataclasses.replace(CONFIGS[model_name], **sizes)
    variants = [v for v in VARIANTS if v in args.variants and (device.type == "cuda" or not v.endswith("_graphed"))]
    if args.peak_tflops is not None:
        peak, peak_source = args.peak_tflops * 1e12, "--peak-tflops"
    elif device.type == "cuda" and dtype == torch.bfloat16:
        peak, peak_source = H200_BF16_PEAK_TFLOPS * 1e12, "H200 dense bf16 (nominal)"
    else:
        peak, peak_source = measured_peak(run), "dense matmul rate measured in this run"
    flops = model_flops(c, world)
    run.log(
        f"{model_name}: L {c.layers}, H {c.hidden}, E {c.experts}, top-{c.top_k}, F {c.ffn}, shared {c.shared_ffn}, "
        f"V {c.vocab}, T {c.tokens} ({c.batch} x {c.seq}) per rank, W {world}, {str(dtype).removeprefix('torch.')}, "
        f"{flops['model_flops'] / 1e12:.2f} TFLOP per step, peak {peak / 1e12:.3g} TFLOP/s ({peak_source})"
    )
    records: list[dict[str, Any]] = []
    if c.experts % world:
        why = f"{c.experts} experts do not divide the world size {world}"
        records = [{"model": model_name, "variant": v, "step_ms": None, "error": why} for v in variants]
    eager: dict[str, Any] | None = None
    truth: dict[str, Any] | None = None
    reference: dict[str, Any] = {}
    if dtype != torch.float32 and "eager" in variants and not records:
        truth, err = attempt(run, "float32 reference", functools.partial(float32_reference, run, c))
        reference = {"loss": truth["loss"], "gemm": truth["gemm"]} if truth else {"error": err}
        run.log(f"  float32 reference: {reference}")
    alive: dict[str, Callable[[], Any]] = {}
    for name in variants if not records else []:
        if name == "eager":
            gemm = layer_bench.grouped_mm_choice(run, dtype, c.moe_shape())
            torch._dynamo.reset()
            build: Callable[[], StepModel] = functools.partial(build_eager, run, c, gemm)
        else:
            disable = ("schedule",) if name.startswith("moecc_noschedule") else ()
            graphed = name.endswith("_graphed")
            build = functools.partial(build_moecc, run, c, args.backend, disable, args.chunks, graphed)
        rec, result, call = bench_variant(run, c, model_name, name, build, flops["model_flops"], peak, eager, truth)
        records.append(rec)
        if name == "eager":
            eager = result
        if args.interleave and call is not None:
            alive[name] = call  # its model stays, for the interleaved timing below
        else:
            release(call)
            torch._dynamo.reset()
        layer_bench._free(run)
    if alive:
        interleaved_timing(run, alive, args.interleave, records)
    if rank == 0:
        result = {
            **layer_bench.run_header(device, world),
            "peak_tflops": peak / 1e12,
            "peak_source": peak_source,
            "config": {"model": model_name, **dataclasses.asdict(c), "tokens_per_rank": c.tokens,
                       "dtype": str(dtype).removeprefix("torch."), "backend": args.backend, "iters": iters,
                       "warmup": warmup, "tiny": args.tiny, "variants": variants, **flops,
                       "MOECC_FUSED_EP": os.environ.get("MOECC_FUSED_EP"),
                       "MOECC_EXCHANGE": os.environ.get("MOECC_EXCHANGE"), "chunks": args.chunks},
            "float32_reference": reference if dtype != torch.float32 else None,
            "records": records,
        }  # fmt: skip
        path = layer_bench.write_results(args.out, "train_step", args.tag, result)
        print("\n" + table(records) + "\n", flush=True)
        print(f"wrote {path}", flush=True)
    for call in alive.values():
        release(call)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
