"""fuse: replace a region's dispatch + expert GEMM 1 and expert GEMM 2 + combine by the fused kernels.

Runs on the Dynamo graph after shard (before the autograd split: the fused ops bring their own backward,
which is again a pair of fused kernels). A fusion is a pattern plus a checker: a region is fused only where
the selected backend has the kernels and the checker accepts the region; every refusal is recorded with its
reason and counted (`fuse.refused`), every fusion counted (`fuse.fused`), so that a silent fallback cannot
pass a test.

    before (sharded; ep = 1 has no ep_plan / all_to_all_rows)       after
    tok_R, idx_RK, sel_RK, n_P, m_P = ep_plan(idx_TK, E, ep, g)
    rx_RH = all_to_all_rows(x_TH[tok_R], n_P, m_P, g)  ...          h_SF, x_SH, plan = ep_dispatch_gemm(x_TH, idx_TK,
    x_SH, src_S, eid_S, offs_E = route_permute(rx_RH, ...)                                   w1, ep, g)
    h_SF = grouped_mm(x_SH, w1, offs_E)
    a_SF = <activation>(h_SF)                                       a_SF = <activation>(h_SF)  [1]
    y_SH = grouped_mm(a_SF, w2, offs_E)                             out_TH, y_TKH = ep_gemm_combine(a_SF, w2, w_TK,
    part_RH = unpermute_combine(y_SH, src_S, offs_E, rw_RK)                                          plan, ep, g)
    out_TH = zeros_like(x_TH).index_add(0, tok_R, all_to_all_rows(part_RH, ...))

[1] h_SF has room for the worst case, S = ep * T * K rows (every token of every rank routed to this rank's
experts), ep times what a rank receives on average. A GLU activation becomes ep_glu(h_SF, plan, kind) and a
plain one (silu, relu, gelu) ep_act(h_SF, plan, kind), which compute only the rows the plan counts; any other
code between the GEMMs runs over all S rows (the rows past the received ones are never read).
"""

from __future__ import annotations

import operator
import os
from typing import Any

import torch
import torch.fx as fx

from moecc import cost, ir, ops
from moecc.backends import torch_backend
from moecc.options import MoeccError
from moecc.pass_manager import CompileContext
from moecc.passes.lift_moe import _GraphEmitter, call_activation
from moecc.passes.lower_backend import graph_device, resolve_backend

FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FUSED_EP_ENV = "MOECC_FUSED_EP"


def _outputs(rp: fx.Node) -> dict[int, fx.Node]:
    return {u.args[1]: u for u in rp.users if u.target is operator.getitem}  # type: ignore[misc]


class _Match:
    """The nodes of one lifted region that the fused ops replace, or why the region cannot be fused."""

    def __init__(self, gm: fx.GraphModule, ctx: CompileContext, region: ir.MoERegion) -> None:
        self.reason: str | None = None
        nodes = [n for n in gm.graph.nodes if ir.facts(n).get("region") == region.path]
        rps = [n for n in nodes if n.target is torch.ops.moecc.route_permute.default]
        ucs = [n for n in nodes if n.target is torch.ops.moecc.unpermute_combine.default]
        gms = [n for n in nodes if n.target is torch.ops.moecc.grouped_mm.default]
        if len(rps) != 1 or len(ucs) != 1 or len(gms) != 2:
            self.reason = (
                f"expected one dispatch, two expert GEMMs and one combine, found {len(rps)}/{len(gms)}/{len(ucs)}"
            )
            return
        self.rp, self.uc = rps[0], ucs[0]
        outs = _outputs(self.rp)
        x_SH, src_S, eid_S, offs_E = (outs.get(i) for i in range(4))
        first = [g for g in gms if g.args[0] is x_SH]
        if len(first) != 1:
            self.reason = "the first expert GEMM does not read the dispatched rows directly"
            return
        self.gm1 = first[0]
        self.gm2 = next(g for g in gms if g is not self.gm1)
        if self.uc.args[0] is not self.gm2:
            self.reason = "something runs between the second expert GEMM and the combine (an output bias?)"
            return
        if eid_S is not None and eid_S.users:
            self.reason = "the experts read each row's expert id (per-expert biases); the fused kernels have no bias"
            return
        if x_SH is not None and set(x_SH.users) != {self.gm1}:
            self.reason = "the dispatched rows are used by more than the first expert GEMM"
            return
        if src_S is not None and set(src_S.users) - {self.uc}:
            self.reason = "the row order of the dispatch is used outside the combine"
            return
        if offs_E is not None and set(offs_E.users) - {self.gm1, self.gm2, self.uc}:
            self.reason = "the expert offsets are used outside the expert GEMMs and the combine"
            return
        if len(self.rp.args) > 3 and self.rp.args[3] != -1:
            self.reason = (
                "capacity-limited routing drops rows by their order over the whole group; the fused kernels are "
                "dropless (compile without capacity_factor to fuse)"
            )
            return
        io = ctx.plan.get("sharded_io", {}).get(region.path)
        by_name = {n.name: n for n in gm.graph.nodes}
        if io is not None:
            self.x, self.idx, self.w, self.out = (by_name[io[k]] for k in ("x", "idx", "w", "out"))
        else:
            self.x, self.idx = self.rp.args[0], self.rp.args[1]
            self.w, self.out = self.uc.args[3], self.uc
        xv = cost._val(self.x)
        if isinstance(xv, torch.Tensor) and xv.dtype not in FUSED_DTYPES:
            self.reason = f"tokens of dtype {xv.dtype}; the fused kernels take {', '.join(map(str, FUSED_DTYPES))}"


def fusion_refusal(
    backend: str, device: torch.device, ep: int, ep_hosts: int = 1, peer_access: bool = True
) -> str | None:
    """Why no region of a graph can be fused on `backend` (None if regions can be, subject to the checker).
    `ep_hosts`: the most hosts one ep-group spans (Mesh.ep_hosts); `peer_access`: Mesh.ep_peer_access."""
    if backend == "torch":
        return "the torch backend has no fused dispatch/combine kernels"
    if ep > 1 and device.type != "cuda":
        return f"expert parallelism over {ep} ranks needs symmetric memory (CUDA devices); this graph runs on {device}"
    if ep > 1 and ep_hosts > 1:
        return (
            f"an ep-group of {ep} ranks spans {ep_hosts} hosts: the fused kernels reach their peers through "
            f"symmetric memory, within one node; the ranks exchange rows with all-to-alls instead (an ep of at "
            f"most the GPUs of one node keeps the fused kernels)"
        )
    if ep > 1 and not peer_access:
        return (
            f"the GPUs of an ep-group of {ep} ranks cannot access each other's memory directly (no peer-to-peer "
            f"between some of them), which the fused kernels' loads and stores through symmetric memory need; "
            f"the ranks exchange rows with all-to-alls instead"
        )
    if ep > 1 and not fused_ep_enabled():
        return (
            f"{FUSED_EP_ENV}=0 switches fusion across ranks off: the {ep} ranks exchange rows with all-to-alls "
            f"and run the plain Triton grouped GEMMs"
        )
    return None


def fused_ep_enabled() -> bool:
    """Whether fusion across ranks is on: it is unless MOECC_FUSED_EP=0 (an opt-out, for comparing the fused
    kernels with the all-to-all path); any value but 0 or 1 is an error, not a guess."""
    value = os.environ.get(FUSED_EP_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{FUSED_EP_ENV}={value!r}: expected 1 (fuse across ranks, the default) or 0 (don't)")
    return value == "1"


def fuse_region(gm: fx.GraphModule, ctx: CompileContext, region: ir.MoERegion, m: _Match) -> bool:
    """-> whether the activation between the ops (a GLU: ep_glu; a plain one: ep_act) now stops at the received
    rows."""
    ep, group = ctx.mesh.ep, (ctx.mesh.ep_group if ctx.mesh.ep > 1 else "")
    em = _GraphEmitter(gm.graph)
    with gm.graph.inserting_before(m.gm1):
        h, _, plan = ops.ep_dispatch_gemm(em.proxy(m.x), em.proxy(m.idx), em.proxy(m.gm1.args[1]), ep, group)
    m.gm1.replace_all_uses_with(h.node)
    act, bounded = m.gm2.args[0], False
    # the activation between the ops (a GLU, or a plain one of a non-GLU MLP expert) computes only the rows
    # this rank received, not the worst case's room
    if isinstance(act, fx.Node) and act.args and act.args[0] is h.node and set(act.users) == {m.gm2}:
        if act.target is torch.ops.moecc.glu.default:
            op, kind = ops.ep_glu, act.args[1]
        else:
            op, kind = ops.ep_act, call_activation(act)
        if kind in torch_backend.GLU_ACTS:
            with gm.graph.inserting_before(act):
                a = op(h, plan, kind)
            act.replace_all_uses_with(a.node)
            gm.graph.erase_node(act)
            bounded = True
    with gm.graph.inserting_before(m.out):
        out, _ = ops.ep_gemm_combine(em.proxy(m.gm2.args[0]), em.proxy(m.gm2.args[1]), em.proxy(m.w), plan, ep, group)
    m.out.replace_all_uses_with(out.node)
    for n in em.created:
        ir.tag_region(n, region.path, "fuse")
    # what the fused ops replaced is dead now: the dispatch, the expert GEMMs, the combine, the all-to-alls
    for n in reversed(list(gm.graph.nodes)):
        if ir.facts(n).get("region") == region.path and not n.users and n.op == "call_function" and n not in em.created:
            gm.graph.erase_node(n)
    return bounded


def fuse_experts(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    device = graph_device(gm)
    backend = resolve_backend(ctx.options.backend, device)
    blocked = fusion_refusal(backend, device, ctx.mesh.ep, ctx.mesh.ep_hosts, ctx.mesh.ep_peer_access)
    present = {ir.facts(n).get("region") for n in gm.graph.nodes if n.target is torch.ops.moecc.grouped_mm.default}
    refused = ctx.plan.setdefault("fuse_refused", {})
    for r in ctx.regions:
        if r.path not in present:
            continue
        reason = blocked if r.status == "lifted" else "region not lifted"
        m = None
        if reason is None:
            m = _Match(gm, ctx, r)
            reason = m.reason
        if reason is not None or m is None:
            ctx.counters["fuse.refused"] += 1
            ctx.note(f"not fused {r.path}: {reason}")
            refused[r.path] = str(reason)
            continue
        choices = kernel_choices(gm, m, device, ctx.mesh.ep)  # before fusing: the match's nodes are replaced
        bounded = fuse_region(gm, ctx, r, m)
        ctx.counters["fuse.fused"] += 1
        ctx.note(
            f"fused {r.path}: dispatch + expert GEMM 1, expert GEMM 2 + combine (ep={ctx.mesh.ep})"
            + ("; the activation between them over the rows received only" if bounded else "")
        )
        ctx.plan.setdefault("fused_kernels", {})[r.path] = choices
        ctx.note(
            f"kernels of {r.path} on {device} (chosen per call from the tensors; counted as fused_gemm.gluon and "
            "grouped_mm_wgrad.gluon): " + "; ".join(f"{k}: {v}" for k, v in choices.items())
        )
    gm.graph.lint()
    gm.recompile()
    return gm


def _meta_value(gm: fx.GraphModule, n: Any, depth: int = 0) -> Any:
    """A meta tensor of node n's shape, strides and dtype: its example value where it has one, else its op run on
    its inputs' meta tensors (the experts' weights are stacked, sliced and transposed by nodes the passes made,
    which carry none). None where that is not possible."""
    if not isinstance(n, fx.Node):
        return n
    v = cost._val(n)
    if n.op == "get_attr" and v is None:
        v = gm
        for part in str(n.target).split("."):
            v = getattr(v, part, None)
    if isinstance(v, torch.Tensor):
        return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
    if depth > 32 or n.op not in ("call_function", "call_method"):
        return None
    args = fx.node.map_arg(n.args, lambda a: _meta_value(gm, a, depth + 1))
    kwargs = fx.node.map_arg(n.kwargs, lambda a: _meta_value(gm, a, depth + 1))
    try:
        if n.op == "call_method":
            return getattr(args[0], str(n.target))(*args[1:], **kwargs)
        return n.target(*args, **kwargs)  # type: ignore[operator]
    except Exception:
        return None  # an input without a value, or an op meta tensors do not run: said in the dumps


def kernel_choices(gm: fx.GraphModule, m: _Match, device: torch.device, ep: int) -> dict[str, str]:
    """Which kernel each GEMM of the fused region will run (`triton_ep.kernel_choices`), from the tokens', the
    routing's and the local experts' weights' shapes, strides and dtypes; where one is not known, says so."""
    x, idx, w1, w2 = (_meta_value(gm, n) for n in (m.x, m.idx, m.gm1.args[1], m.gm2.args[1]))
    if not all(isinstance(t, torch.Tensor) for t in (x, idx, w1, w2)):
        return {"all": "unknown at compile time (the operands' shapes could not be worked out from the graph)"}
    from moecc.backends import triton_ep  # (not at import: the triton backend imports Triton)

    T, K, H = cost._size(x.shape[0]), cost._size(idx.shape[-1]), cost._size(x.shape[-1])
    try:
        return triton_ep.kernel_choices(device, w1.dtype, T, K, ep, H, w1, w2)
    except Exception as e:  # a record for the dumps: its failure is written there and blocks no compile
        return {"all": f"unknown at compile time ({type(e).__name__}: {e})"}


def refuse_host_sized_exchanges(gm: fx.GraphModule, ctx: CompileContext) -> None:
    """cuda_graph=True promises a step a CUDA graph can replay; an unfused sharded region breaks that promise:
    its routing plan (ep_plan) copies the all-to-alls' row counts to the host every step, and a replay would
    reuse the captured counts. Said at compile time (after the Dynamo-stage passes, whichever ran), rather
    than as a failed capture later."""
    refused = ctx.plan.get("fuse_refused", {})
    fused = fused_regions(gm)  # their plan is dead code at this stage (the autograd trace drops it)
    synced = [
        ir.facts(n).get("region")
        for n in gm.graph.nodes
        if n.target is torch.ops.moecc.ep_plan.default
        and not cost.is_padded_plan(n)
        and ir.facts(n).get("region") not in fused
    ]
    if not synced:
        ctx.note("cuda_graph=True: no sharded region reads its row counts on the host; the step can be replayed")
        return
    lines = [f"{path} (not fused: {refused.get(path, 'the fuse pass did not run')})" for path in dict.fromkeys(synced)]
    raise MoeccError(
        "moecc.compile(cuda_graph=True): these MoE regions exchange tokens by all-to-alls whose row counts the "
        "host reads every step, which a CUDA graph cannot replay: " + "; ".join(lines) + ". Only regions fused "
        "across ranks (backend 'triton' on the GPUs of one node, MOECC_FUSED_EP unset) or exchanging padded rows "
        "(exchange='padded' or 'auto': every token to every rank, no row counts) run without the host; "
        "or compile without cuda_graph=True and run the step without moecc.graph_step"
    )


def fused_regions(gm: fx.GraphModule) -> set[str | None]:
    return {ir.facts(n).get("region") for n in gm.graph.nodes if n.target is torch.ops.moecc.ep_dispatch_gemm.default}


def check_fused(gm: fx.GraphModule, ctx: CompileContext) -> None:
    """Invariant: a fused region has no unfused dispatch, expert GEMM or collective left."""
    fused = fused_regions(gm)
    for n in gm.graph.nodes:
        if ir.facts(n).get("region") in fused and ir.is_moe_op(n) and n.target not in FUSED_OPS:
            raise AssertionError(f"fused region {ir.facts(n)['region']} still has {n.format_node()}")


FUSED_OPS = {
    torch.ops.moecc.ep_dispatch_gemm.default,
    torch.ops.moecc.ep_gemm_combine.default,
    torch.ops.moecc.ep_glu.default,
    torch.ops.moecc.ep_act.default,
    torch.ops.moecc.glu.default,  # another activation's GLU (none today: a GLU between the ops becomes ep_glu)
}
