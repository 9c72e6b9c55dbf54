"""schedule: order compute and communication for overlap, using the cost model.

Every node gets its predicted time (`cost_us`) and a stream. On the backward graph, the gradient all-reduces
sync_grads inserted (one per gradient) are bucketed: gradients of one process group and dtype are packed, in
the order they are produced, into buckets of about the size the cost model says hides the collective's
latency (`HardwareProfile.bucket_bytes`, or the `bucket_mb` option); each bucket's all-reduce starts as soon
as its last gradient is ready and is waited on just before the graph returns.

    before (sync_grads)                          after
    ar_a = all_reduce(g_a, "sum", world)         flat = cat([g_a.reshape(-1), g_b.reshape(-1)])   # after g_b
    ar_b = all_reduce(g_b, "sum", world)         ar = all_reduce(flat, "sum", world)
    ... wait_tensor(ar_a) ... wait_tensor(ar_b)  a, b = split(wait_tensor(ar), [n_a, n_b]); view each back

The order of the collectives is a function of the graph alone, so it is the same on every rank; it is
recorded in the plan (`collective_order`). The Dynamo graph's collective order is checked across ranks when
its passes are done (`check_collective_order`); the forward and backward graphs are deterministic functions
of it, and no collective runs during AOTAutograd's compilation (a rank that finds a graph in a cache would
not take part). The predicted timeline
(a list schedule over a compute and a comm stream, in graph order; collectives that block the host, like the
row all-to-all, hold both streams) is dumped as a Chrome trace.

Not done yet (the rest of the schedule work): token chunking of MoE layers, moving independent compute
(shared experts, weight-gradient GEMMs) across all-to-alls, and giving all-to-all priority over gradient
buckets.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from moecc import cost, ir
from moecc import dist as mdist
from moecc.pass_manager import CompileContext

_AR = torch.ops._c10d_functional.all_reduce.default
_WAIT = torch.ops._c10d_functional.wait_tensor.default
# collectives that hold the host until done (nothing else is issued meanwhile)
BLOCKING = {"moecc.all_to_all_rows.default", "moecc.ep_plan.default"}


def predicted_timeline(gm: fx.GraphModule) -> tuple[list[dict], float]:
    """Chrome-trace events of a list schedule in graph order; a node starts when its inputs are done and
    its stream is free (a blocking collective waits for, and holds, both streams)."""
    done: dict[fx.Node, float] = {}
    free = {"compute": 0.0, "comm": 0.0}
    events = []
    for n in gm.graph.nodes:
        f = n.meta.get("moecc") or {}
        dur = f.get("cost_us", 0.0)
        stream = f.get("stream", "compute")
        blocking = str(n.target) in BLOCKING
        ready = max([0.0, *(done.get(a, 0.0) for a in n.all_input_nodes)])
        start = max(ready, *free.values()) if blocking else max(ready, free[stream])
        done[n] = start + dur
        if dur > 0:
            for s in free if blocking else (stream,):
                free[s] = done[n]
            events.append(
                {
                    "name": n.name,
                    "cat": ir.op_name(n),
                    "ph": "X",
                    "ts": start,
                    "dur": dur,
                    "pid": 0,
                    "tid": 0 if stream == "compute" else 1,
                }
            )
    return events, max(done.values(), default=0.0)


def bucket_gradients(gm: fx.GraphModule, ctx: CompileContext) -> tuple[int, int]:
    """Pack the per-gradient all-reduces of sync_grads into buckets; returns (buckets, gradients in them)."""
    limit = ctx.options.bucket_mb * 2**20 if ctx.options.bucket_mb is not None else ctx.profile.bucket_bytes()
    starts = [n for n in gm.graph.nodes if n.target is _AR and ir.facts(n).get("created_by") == "sync_grads"]
    groups: dict[tuple, list[fx.Node]] = {}
    for s in starts:  # graph order: the order the gradients are produced in
        g = s.args[0]
        v = g.meta.get("val")
        groups.setdefault((s.args[2], v.dtype, v.device), []).append(s)
    buckets: list[list[fx.Node]] = []
    for members in groups.values():
        cur: list[fx.Node] = []
        size = 0
        for s in members:
            cur.append(s)
            size += cost._nbytes(cost._val(s.args[0]))
            if size >= limit:
                buckets.append(cur)
                cur, size = [], 0
        if cur:
            buckets.append(cur)
    n_buckets = n_grads = 0
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for bucket in buckets:
        if len(bucket) < 2:
            continue
        waits = [next(u for u in s.users if u.target is _WAIT) for s in bucket]
        grads: list[fx.Node] = [s.args[0] for s in bucket]  # type: ignore[misc]
        group = bucket[0].args[2]
        last = max(bucket, key=order.__getitem__)
        vals = [g.meta["val"] for g in grads]
        sizes = [v.numel() for v in vals]
        with vals[0].fake_mode:  # fake values for the new nodes, so that later passes can cost them
            flat_val = torch.empty(sum(sizes), dtype=vals[0].dtype, device=vals[0].device)
            piece_vals = [torch.empty(v.shape, dtype=v.dtype, device=v.device) for v in vals]
        with gm.graph.inserting_before(last.next):  # in creation order (inserting_after reverses it)
            flats = [gm.graph.call_function(torch.ops.aten.reshape.default, (g, [-1])) for g in grads]
            cat = gm.graph.call_function(torch.ops.aten.cat.default, (flats,))
            start = gm.graph.call_function(_AR, (cat, "sum", group))
        first_wait = min(waits, key=order.__getitem__)
        with gm.graph.inserting_before(first_wait):
            done = gm.graph.call_function(_WAIT, (start,))
            parts = gm.graph.call_function(torch.ops.aten.split_with_sizes.default, (done, sizes))
            views = []
            for i in range(len(grads)):
                piece = gm.graph.call_function(operator.getitem, (parts, i))
                views.append(gm.graph.call_function(torch.ops.aten.view.default, (piece, list(vals[i].shape))))
                views[-1].meta["val"] = piece_vals[i]
        for node in (cat, start, done):
            node.meta["val"] = flat_val
        for w, v in zip(waits, views, strict=True):
            w.replace_all_uses_with(v)
        for w, s in zip(waits, bucket, strict=True):
            gm.graph.erase_node(w)
            gm.graph.erase_node(s)
        ir.set_facts(start, stream="comm", created_by="schedule", collective=f"all_reduce(bucket of {len(grads)})")
        ir.set_facts(done, stream="comm", created_by="schedule")
        n_buckets += 1
        n_grads += len(grads)
    gm.graph.lint()
    gm.recompile()
    return n_buckets, n_grads


def collective_order(gm: fx.GraphModule, mesh: Any) -> list[str]:
    """The collectives of a graph in issue order, with their group's role and size: what every rank must agree
    on (group names differ between replicas; their roles do not)."""
    roles = {mesh.world_group: "world", mesh.dp_group: "dp", mesh.ep_group: "ep", "": "local"}
    out = []
    for n in gm.graph.nodes:
        name = str(n.target)
        if name in cost.COLLECTIVE_KIND or "moecc.ep_" in name:
            groups = [roles[a] for a in n.args if isinstance(a, str) and a in roles]
            v = cost._val(n.args[0]) if n.args else None
            shape = list(v.shape) if isinstance(v, torch.Tensor) else []
            out.append(f"{ir.op_name(n)}{groups}{shape}")
    return out


def check_collective_order(gm: fx.GraphModule, ctx: CompileContext) -> None:
    """Every rank's Dynamo graph issues the same collectives in the same order (raises naming the ranks)."""
    order = collective_order(gm, ctx.mesh)
    ctx.plan.setdefault("collective_order", {})["dynamo"] = order
    mdist.check_same_on_all_ranks(f"the collective order of graph {ctx.graph_id}", order)


def schedule_overlap(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    buckets = grads = 0
    if ctx.graph_kind == "backward" and ctx.mesh.world > 1:
        buckets, grads = bucket_gradients(gm, ctx)
        ctx.counters["schedule.buckets"] += buckets
        ctx.counters["schedule.bucketed_grads"] += grads
    top_k: dict[Any, int] = {r.path: max(r.top_k, 1) for r in ctx.regions}  # outside any region: top-2
    for n in gm.graph.nodes:
        if n.op == "call_function":
            k = top_k.get(ir.facts(n).get("region"), 2)
            ir.set_facts(n, cost_us=cost.estimate_us(n, ctx.profile, top_k=k, ep=ctx.mesh.ep))
            ir.facts(n).setdefault("stream", "comm" if str(n.target) in cost.COLLECTIVE_KIND else "compute")
    order = collective_order(gm, ctx.mesh)
    ctx.plan.setdefault("collective_order", {})[ctx.graph_kind] = order
    events, total = predicted_timeline(gm)
    ctx.plan.setdefault("predicted_us", {})[ctx.graph_kind] = total
    bucket_note = f", {grads} gradient all-reduces in {buckets} bucket(s)" if buckets else ""
    ctx.note(
        f"1 token chunk; {len(order)} collective(s){bucket_note}; predicted {total:.1f} us on profile "
        f"{ctx.profile.name} ({ctx.profile.source})"
    )
    if ctx.dumper is not None:
        meta: list[dict[str, Any]] = [
            {"name": "thread_name", "ph": "M", "pid": 0, "tid": t, "args": {"name": s}}
            for t, s in ((0, "compute"), (1, "comm"))
        ]
        ctx.dumper.write_json(f"timeline.{ctx.graph_kind}.json", {"traceEvents": meta + events})
    return gm
