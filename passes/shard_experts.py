"""shard: make the program SPMD over the mesh. Each rank keeps its slice of every lifted region's experts;
tokens travel to the ranks holding their experts and back (dispatch / combine), each token at most once
per destination rank; the expert rank sums a token's partial results for its local experts first.

    before                                              after (ep > 1)
    x_SH, src_S, eid_S, offs_E = route_permute(x_TH,    tok_R, idx_RK, sel_RK, n_P, m_P = ep_plan(idx_TK, E, ep, g)
                                        idx_TK, E)      rx_RH = all_to_all_rows(x_TH[tok_R], n_P, m_P, g)   # dispatch
    ... grouped_mm(w_E..) ...                           ridx_RK = all_to_all_rows(idx_RK, n_P, m_P, g)
    out_TH = unpermute_combine(y_SH, src_S, offs_E,     x_SH, src_S, eid_S, offs_e = route_permute(rx_RH, ridx_RK, E/ep)
                               w_TK)                    ... grouped_mm(w_e..) ...          # local experts
                                                        rw_RK = all_to_all_rows(where(sel_RK, w_TK[tok_R], 0), ...)
                                                        part_RH = unpermute_combine(y_SH, src_S, offs_e, rw_RK)
                                                        back_RH = all_to_all_rows(part_RH, m_P, n_P, g)     # combine
                                                        out_TH = zeros_like(x_TH).index_add(0, tok_R, back_RH)

Runs before the autograd split: the all-to-alls bring their own backward (the reverse all-to-all). Also
records which graph inputs are replicated parameters, local expert parameters or released ones, for
sync_grads. On a 1 x 1 mesh (or ep = 1) no collective is inserted here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from moecc import cost, ir, ops
from moecc.pass_manager import CompileContext
from moecc.passes.lift_moe import _GraphEmitter, param_fqn


def input_kinds(gm: fx.GraphModule, ctx: CompileContext) -> list[str]:
    """Per graph input: "expert" (a local expert weight), "released" (a stand-in for another rank's
    expert weight), "replicated" (any other parameter) or "data"."""
    expert_paths = [r.path + "." for r in ctx.regions if r.status == "lifted"]
    kinds = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        fqn = param_fqn(n)
        if fqn is None:
            kinds.append("data")
        elif fqn in ctx.released:
            kinds.append("released")
        elif any(fqn.startswith(p) for p in expert_paths):
            kinds.append("expert")
        else:
            kinds.append("replicated")
    return kinds


def _region_nodes(gm: fx.GraphModule, path: str, target: object) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target is target and ir.facts(n).get("region") == path]


def choose_exchange(ctx: CompileContext, ep: int, top_k: int, T: Any, row_bytes: int) -> tuple[bool, str]:
    """(padded, why) for a region's row all-to-alls (compile's `exchange` option) of T tokens a rank (an int,
    or a symbolic size under dynamic shapes), rows of row_bytes: "auto" pads where the cost model puts the
    padding's extra rows at no more than the count exchange and host synchronisation it saves
    (`cost.exchange_costs_us`), and only where T is the same on every rank in a step (a padded exchange
    receives T rows from every rank): an int, or a symbolic T derived from the input shapes, which every call
    compares across ranks (compile's check_inputs), priced at its traced value."""
    opt = ctx.options.exchange
    if opt != "auto":
        return opt == "padded", f"exchange={opt!r}"
    if ctx.options.cuda_graph:
        return True, "cuda_graph=True (a replay cannot read row counts from the host)"
    varying = ""
    if not isinstance(T, int):
        # a symbolic token count: padding needs it equal on every rank in each step, which the per-call check
        # of the ranks' input shapes guarantees for a count derived from them (one with a hint); a
        # data-dependent one, or no check, counts
        hint = T.node.hint if isinstance(T, torch.SymInt) else None
        if hint is None or not ctx.options.check_inputs:
            why = "it is data-dependent" if hint is None else "check_inputs=False leaves that unchecked"
            return (
                False,
                f"the tokens a rank ({T}) may change from step to step and padding needs them equal on every "
                f"rank: {why}",
            )
        varying = (
            f" (the tokens a rank, {T}, may change from step to step: decided at the traced {hint}; every call "
            "checks that the ranks' inputs have the same shapes)"
        )
        T = int(hint)
    adds, saves = cost.exchange_costs_us(ctx.profile, T, row_bytes, ep, top_k)
    what = (
        f"padding sends {cost.padded_traffic_ratio(ep, top_k):.2f}x the rows needed (top-{top_k} over ep={ep}, "
        f"{T} tokens a rank): {adds:.0f} us more all-to-all a layer, against {saves:.0f} us for the count "
        f"exchange and host synchronisation ({ctx.profile.name}){varying}"
    )
    return adds <= saves, what


def shard_region(gm: fx.GraphModule, ctx: CompileContext, region: ir.MoERegion) -> None:
    mesh = ctx.mesh
    E, ep = region.num_experts, mesh.ep
    E_local = E // ep
    lo = mesh.ep_index * E_local
    (rp,) = _region_nodes(gm, region.path, torch.ops.moecc.route_permute.default)
    (uc,) = _region_nodes(gm, region.path, torch.ops.moecc.unpermute_combine.default)
    x_TH, idx_TK, _ = rp.args[:3]
    # an expert now serves the tokens of the whole ep-group: its capacity is counted over them (the token count
    # is read only then: it may be symbolic, and int() of it would specialise the graph on it)
    capacity = -1
    if ctx.options.capacity_factor is not None:
        T = int(x_TH.meta["example_value"].shape[0])  # type: ignore[union-attr]
        K = int(idx_TK.meta["example_value"].shape[1])  # type: ignore[union-attr]
        capacity = ops.expert_capacity(ctx.options.capacity_factor, T * ep, K, E)
    y_SH, src_S, offs_E, w_TK = uc.args
    group = mesh.ep_group
    em = _GraphEmitter(gm.graph)
    with gm.graph.inserting_before(rp):
        x, idx = em.proxy(x_TH), em.proxy(idx_TK)
        x_val = cost._val(x_TH)
        padded, why = choose_exchange(
            ctx,
            ep,
            cost._size(cost._val(idx_TK).shape[1]),
            x_val.shape[0],
            cost._size(x_val.shape[1]) * x_val.element_size(),
        )
        ctx.plan.setdefault("exchange", {})[region.path] = "padded" if padded else "counted"
        tok_R, idx_RK, sel_RK, n_P, m_P = ops.ep_plan(idx, E, ep, group, padded)
        recv_x = ops.all_to_all_rows(x.index_select(0, tok_R), n_P, m_P, group)
        recv_idx = ops.all_to_all_rows(idx_RK, n_P, m_P, group)
    rp.args = (recv_x.node, recv_idx.node, E_local, capacity)
    with gm.graph.inserting_before(uc):
        w = em.proxy(w_TK)
        send_w = torch.where(sel_RK, w.index_select(0, tok_R), 0.0)
        recv_w = ops.all_to_all_rows(send_w, n_P, m_P, group)
    uc.args = (y_SH, src_S, offs_E, recv_w.node)
    with gm.graph.inserting_before(uc.next):
        part = em.proxy(uc)
        back = ops.all_to_all_rows(part, m_P, n_P, group)
        out: Any = torch.zeros_like(x).index_add(0, tok_R, back)
    for u in list(uc.users):
        if u not in em.created:
            u.replace_input_with(uc, out.node)
    # the region's inputs and output as they were before sharding (what fuse needs to replace it whole)
    ctx.plan.setdefault("sharded_io", {})[region.path] = {
        "x": x_TH.name,  # type: ignore[union-attr]
        "idx": idx_TK.name,  # type: ignore[union-attr]
        "w": w_TK.name,  # type: ignore[union-attr]
        "out": out.node.name,
    }
    for n in em.created:
        ir.tag_region(n, region.path, "shard")
        if ir.is_moe_op(n) and "all_to_all" in str(n.target):
            ir.set_facts(n, stream="comm")
    # ModuleList experts are stacked from per-expert weights: keep this rank's slice
    for n in gm.graph.nodes:
        if n.target is torch.stack and ir.facts(n).get("region") == region.path:
            weights = list(n.args[0])
            if len(weights) == E:
                n.args = (weights[lo : lo + E_local], *n.args[1:])
    ctx.note(
        f"sharded {region.path}: experts {lo}..{lo + E_local - 1} of {E} on this rank, dispatch/combine over ep={ep}"
        + f"; {'padded' if padded else 'counted'} exchange: {why}"
    )


def shard_experts(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    ctx.plan["input_kinds"] = input_kinds(gm, ctx)
    ctx.plan["input_params"] = [param_fqn(n) for n in gm.graph.nodes if n.op == "placeholder"]
    if ctx.mesh.ep > 1:
        for r in ctx.regions:
            if r.status == "lifted":
                shard_region(gm, ctx, r)
        gm.graph.lint()
        gm.recompile()
    else:
        ctx.note(f"mesh {ctx.mesh.dp}x{ctx.mesh.ep}: experts replicated, no dispatch collectives")
    return gm


def check_sharded(gm: fx.GraphModule, ctx: CompileContext) -> None:
    """Invariant: with ep > 1 every lifted region dispatches and combines through all-to-alls, and no
    released weight feeds the graph."""
    if ctx.mesh.ep == 1:
        return
    a2a = {ir.facts(n).get("region") for n in gm.graph.nodes if n.target is torch.ops.moecc.all_to_all_rows.default}
    for r in ctx.regions:
        if r.status == "lifted" and r.path not in a2a:
            raise AssertionError(f"region {r.path} has no all-to-all after shard")
    kinds = ctx.plan["input_kinds"]
    for kind, n in zip(kinds, (n for n in gm.graph.nodes if n.op == "placeholder"), strict=True):
        if kind == "released" and n.users:
            raise AssertionError(f"released weight {n.name} is still used by {list(n.users)}")
