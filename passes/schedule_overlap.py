"""schedule: order compute and communication for overlap, using the cost model.

It runs twice. On the Dynamo graph (before the autograd split, so that the backward is chunked too) it splits
each sharded, unfused MoE region into n token chunks (n from the cost model, 1 to 8, or the `chunks`
option): chunk i's tokens are dispatched, computed and combined by a copy of the region, and the outputs are
concatenated. On the forward and backward graphs it then

1. splits every row all-to-all into a start and a wait (`moecc.all_to_all_rows_start`, then
   `_c10d_functional.wait_tensor` on its result), so that compute can run while the rows travel;
2. packs the per-gradient all-reduces sync_grads inserted into buckets (per group and dtype, in the order the
   gradients are produced, of the size the cost model says hides an all-reduce's latency:
   `HardwareProfile.bucket_bytes`, or `bucket_mb`);
3. reorders the graph with a list schedule over a compute and a communication stream (`reorder`). It issues
   each all-to-all as early as its inputs allow and pulls forward the cheap work that feeds one (the next
   chunk's routing plan and row gather); it waits for the rows only where they are needed, and in the
   meantime runs whatever is ready and independent, in the original order: the shared expert, another
   chunk's experts, weight-gradient GEMMs. A gradient bucket's all-reduce waits while an all-to-all is
   in flight (all-to-alls have priority).

    before (one chunk, after shard)              after
    plan = ep_plan(idx)                          plan0 = ep_plan(idx[:T0]); plan1 = ep_plan(idx[T0:])
    rx = all_to_all_rows(x[tok], ...)            s0 = a2a_start(x[:T0][tok0]); s1 = a2a_start(x[T0:][tok1])
    h = experts(rx) ...                          sh = shared_expert(x)            # while s0, s1 travel
    out = combine(all_to_all_rows(h, ...))       h0 = experts(wait(s0)); c0 = a2a_start(h0)
    y = out + shared_expert(x)                   h1 = experts(wait(s1)); c1 = a2a_start(h1)
                                                 y = cat([combine(wait(c0)), combine(wait(c1))]) + sh

The order is a function of the graph and the profile alone, so it is the same on every rank; it is recorded
in the plan (`collective_order`, by group role). The Dynamo graph's collective order is checked across ranks
when its passes are done (`check_collective_order`); the forward and backward graphs are deterministic
functions of it, and no collective runs during AOTAutograd's compilation (a rank that finds a graph in a
cache would not take part). The predicted timeline of the final order is dumped as a Chrome trace.
"""

from __future__ import annotations

import functools
import heapq
import math
import operator
from typing import Any

import torch
import torch.fx as fx
from torch._functorch.partitioners import must_recompute

from moecc import cost, ir
from moecc import dist as mdist
from moecc.pass_manager import CompileContext

_AR = torch.ops._c10d_functional.all_reduce.default
_WAIT = torch.ops._c10d_functional.wait_tensor.default
_A2A = torch.ops.moecc.all_to_all_rows.default
_A2A_START = torch.ops.moecc.all_to_all_rows_start.default
_PLAN = torch.ops.moecc.ep_plan.default
# collectives that hold the host until done (nothing else is issued meanwhile; a padded ep_plan does not)
BLOCKING = {"moecc.all_to_all_rows.default", "moecc.ep_plan.default"}
MAX_CHUNKS = 8
BUCKET_SHARE = 1 / 8  # the largest share of a graph's gradients the cost model's bucket may hold


# ---------------------------------------------------------------------------------------------------------
# token chunks (Dynamo graph)


def pipeline_us(profile: cost.HardwareProfile, *, ep: int, T: int, H: int, K: int, elt: int, gemm_flops: float,
                experts: int, nodes: int, n: int, padded: bool = False) -> float:  # fmt: skip
    """Predicted forward + backward time of one MoE region in n token chunks: per chunk a dispatch d, expert
    compute x (2x in backward) and a combine b, the all-to-alls sharing one stream; n chunks pipeline as
    d + x + b + (n - 1) max(x, d + b), and each chunk pays the region's per-op overheads again (the device's
    gap or the host's time per op, whichever is longer: the two overlap). A chunk's grouped GEMMs run at the
    rate for its rows per expert (a rank receives T*K/n rows a chunk on average, over its `experts`), which
    falls as the chunks shrink. `padded`: the all-to-alls send every token to every rank."""
    moved = cost.exchanged_rows(T / n, ep, K, padded) * H * elt
    d = b = 1e6 * profile.comm_s("all_to_all", moved)
    rate = profile.rate("grouped", T * K / n / max(experts, 1))
    x = 1e6 * (gemm_flops / n / rate + max(profile.op_overhead, profile.host_op) * nodes)
    fwd = d + x + b + (n - 1) * max(x, d + b)
    bwd = d + 2 * x + b + (n - 1) * max(2 * x, d + b)
    return fwd + bwd


def choose_chunks(profile: cost.HardwareProfile, **shape: Any) -> tuple[int, float, float]:
    """The chunk count in 1..MAX_CHUNKS with the least predicted time (1 unless another saves >= 2%);
    returns (n, predicted us at 1 chunk, predicted us at n)."""
    times = {n: pipeline_us(profile, n=n, **shape) for n in range(1, MAX_CHUNKS + 1)}
    best = min(times, key=lambda n: (times[n], n))
    if times[best] > 0.98 * times[1]:
        best = 1
    return best, times[1], times[best]


def _by_name(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


def _closure(start: list[fx.Node], step: Any) -> set[fx.Node]:
    seen: set[fx.Node] = set(start)
    todo = list(start)
    while todo:
        for m in step(todo.pop()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def region_body(inputs: list[fx.Node], out: fx.Node) -> list[fx.Node]:
    """The nodes on a path from the region's inputs to its output, in graph order (the output included; the
    inputs, and what they are computed from, excluded: one input may be computed from another)."""
    below = _closure(inputs, lambda n: n.users)
    above = _closure([out], lambda n: n.all_input_nodes)
    upstream = _closure(inputs, lambda n: n.all_input_nodes)
    body = (below & above) - upstream
    return [n for n in out.graph.nodes if n in body]


def _expert_weights(body: list[fx.Node]) -> list[torch.Tensor]:
    """The (traced) [E, K, N] weights of the region's grouped GEMMs."""
    ws = [cost._val(n.args[1]) for n in body if n.target is torch.ops.moecc.grouped_mm.default]
    return [w for w in ws if isinstance(w, torch.Tensor) and w.dim() == 3]


def _gemm_flops(body: list[fx.Node], rows: int) -> float:
    """FLOPs of the region's grouped GEMMs when `rows` (token, slot) rows go through them."""
    return sum(2.0 * rows * cost._size(w.shape[1]) * cost._size(w.shape[2]) for w in _expert_weights(body))


def _experts(body: list[fx.Node]) -> int:
    """The local experts of a region: its grouped GEMMs' weights' first dimension."""
    ws = _expert_weights(body)
    return cost._size(ws[0].shape[0]) if ws else 1


def _padded(ctx: CompileContext, region: str | None) -> bool:
    """Whether shard gave a region's row all-to-alls the padded exchange (`shard_experts.choose_exchange`)."""
    return ctx.plan.get("exchange", {}).get(region) == "padded"


def _chunk_count(gm: fx.GraphModule, ctx: CompileContext, r: ir.MoERegion) -> tuple[int, str, Any]:
    """(n, why, (x, idx, w, out, body)) for one region."""
    if ctx.mesh.ep == 1:
        return 1, "ep = 1: no all-to-all to overlap", None
    if not any(n.target is _PLAN and ir.facts(n).get("region") == r.path for n in gm.graph.nodes):
        return 1, "fused: its kernels overlap their own transfers", None
    if ctx.options.capacity_factor is not None:
        return 1, "capacity-limited routing (chunks would change which pairs are dropped)", None
    io = ctx.plan["sharded_io"][r.path]
    nodes = _by_name(gm)
    x, idx, w, out = (nodes[io[k]] for k in ("x", "idx", "w", "out"))
    for n in list(gm.graph.nodes):  # unused outputs of the region's ops (route_permute's expert ids, ...)
        if n.target is operator.getitem and not n.users:
            gm.graph.erase_node(n)
    body = region_body([x, idx, w], out)
    inside = set(body)
    for n in body:
        escaped = [u.name for u in n.users if u not in inside] if n is not out else []
        if escaped:
            return 1, f"{n.name}, inside the region, is also used by {escaped} outside it", None
    xv, iv = cost._val(x), cost._val(idx)
    if not all(isinstance(d, int) for d in (*xv.shape, *iv.shape)):
        return 1, f"symbolic token count {tuple(xv.shape)} (dynamic shapes): chunk sizes need a static one", None
    T, H, K = int(xv.shape[0]), int(xv.shape[1]), int(iv.shape[1])
    if ctx.options.chunks is not None:
        n = min(ctx.options.chunks, T)
        why = f"chunks={ctx.options.chunks} (option)" + (
            f", at most one per token ({T})" if n < ctx.options.chunks else ""
        )
        return n, why, (x, idx, w, out, body)
    shape = dict(ep=ctx.mesh.ep, T=T, H=H, K=K, elt=xv.element_size(), gemm_flops=_gemm_flops(body, T * K),
                 experts=_experts(body), nodes=len(body), padded=_padded(ctx, r.path))  # fmt: skip
    n, one, best = choose_chunks(ctx.profile, **shape)
    n = min(n, T)
    return n, f"cost model: {one:.0f} us forward + backward in 1 chunk, {best:.0f} us in {n}", (x, idx, w, out, body)


def _renamed(env: dict[fx.Node, fx.Node], a: fx.Node) -> fx.Node:
    return env.get(a, a)


def split_region(gm: fx.GraphModule, r: ir.MoERegion, n: int, found: Any) -> fx.Node:
    """Replace the region by n copies over consecutive token ranges (sizes differ by at most one), and
    concatenate their outputs; returns the concatenation."""
    x, idx, w, out, body = found
    T = int(cost._val(x).shape[0])
    sizes = [T // n + (1 if i < T % n else 0) for i in range(n)]
    g = gm.graph
    outs = []
    created = []
    with g.inserting_before(out.next):  # in creation order
        start = 0
        for i, size in enumerate(sizes):
            env: dict[fx.Node, fx.Node] = {}
            for src in (x, idx, w):
                env[src] = g.call_function(torch.narrow, (src, 0, start, size))
                created.append(env[src])
            for node in body:
                c = g.node_copy(node, functools.partial(_renamed, env))
                # per-chunk facts; the Dynamo example values have the whole region's shapes: dropped
                c.meta = {k: v for k, v in node.meta.items() if k not in ("example_value", "val")}
                c.meta["moecc"] = {**node.meta.get("moecc", {}), "chunk": i}
                c.meta["custom"] = {**node.meta.get("custom", {}), "moecc_chunk": i}
                env[node] = c
            outs.append(env[out])
            start += size
        cat = g.call_function(torch.cat, (outs, 0))
        created.append(cat)
    for c in created:
        ir.tag_region(c, r.path, "schedule")
    out.replace_all_uses_with(cat)
    for node in reversed(body):
        g.erase_node(node)
    return cat


def chunk_moe(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Dynamo-graph half of the schedule pass: token chunks of every sharded, unfused MoE region."""
    chunks = ctx.plan.setdefault("chunks", {})
    for r in ctx.regions:
        if r.status != "lifted":
            continue
        n, why, found = _chunk_count(gm, ctx, r)
        if n > 1:
            cat = split_region(gm, r, n, found)
            ctx.plan["sharded_io"][r.path]["out"] = cat.name
            ctx.counters["schedule.chunked_regions"] += 1
        chunks[r.path] = n
        ctx.note(f"{r.path}: {n} token chunk(s) ({why})")
    gm.graph.lint()
    gm.recompile()
    return gm


# ---------------------------------------------------------------------------------------------------------
# start / wait, buckets (forward and backward graphs)


def split_collectives(gm: fx.GraphModule) -> int:
    """Each row all-to-all becomes a start and a wait, the wait right after it (reorder moves them apart)."""
    count = 0
    for n in list(gm.graph.nodes):
        if n.target is not _A2A:
            continue
        with gm.graph.inserting_before(n):
            start = gm.graph.call_function(_A2A_START, n.args, n.kwargs)
            done = gm.graph.call_function(_WAIT, (start,))
        for new in (start, done):
            new.meta = {**n.meta, "moecc": {**n.meta.get("moecc", {}), "created_by": "schedule"}}
        ir.set_facts(start, stream="comm", collective="all_to_all_rows")
        ir.set_facts(done, stream="comm")
        n.replace_all_uses_with(done)
        gm.graph.erase_node(n)
        count += 1
    return count


def bucket_gradients(gm: fx.GraphModule, ctx: CompileContext) -> tuple[int, int]:
    """Pack the per-gradient all-reduces of sync_grads into buckets; returns (buckets, gradients in them).

    before (sync_grads)                          after
    ar_a = all_reduce(g_a, "sum", world)         flat = cat([g_a.reshape(-1), g_b.reshape(-1)])   # after g_b
    ar_b = all_reduce(g_b, "sum", world)         ar = all_reduce(flat, "sum", world)
    ... wait_tensor(ar_a) ... wait_tensor(ar_b)  a, b = split(wait_tensor(ar), [n_a, n_b]); view each back
    """
    starts = [n for n in gm.graph.nodes if n.target is _AR and ir.facts(n).get("created_by") == "sync_grads"]
    if ctx.options.bucket_mb is not None:
        limit = ctx.options.bucket_mb * 2**20
    else:
        # a bucket's flat copy lives beside the gradients it holds until their all-reduce is issued: at most
        # BUCKET_SHARE of the graph's gradients in one bucket bounds what bucketing adds to the memory
        total = sum(cost._nbytes(cost._val(s.args[0])) for s in starts)
        limit = min(ctx.profile.bucket_bytes(), max(total * BUCKET_SHARE, 1.0))
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


# ---------------------------------------------------------------------------------------------------------
# the time model and the list schedule


def _kind(n: fx.Node) -> str:
    if n.target is _A2A_START:
        return "a2a"
    if n.target is _AR:
        return "all_reduce"
    if n.target is _WAIT:
        return "wait"
    if str(n.target) in BLOCKING and cost.collective_kind(n) is not None:  # a padded plan runs no collective
        return "blocking"
    return "compute"


class Streams:
    """Predicted time on a compute stream and a communication stream, as the host issues the graph's nodes.

    The host issues the nodes one after another, each taking its `host_us` (the profile's host costs); an
    op reaches its stream when the host has issued it. Then:
    compute   starts when the compute stream is free (an op with no device time, a view, only takes host
              time);
    a start   (all-to-all, all-reduce) starts when the comm stream is free and everything issued on the
              compute stream before it is done (what NCCL's stream waits for), and holds the comm stream;
    a wait    holds the compute stream until its collective is done;
    blocking  (ep_plan's count exchange and host copy, an unsplit all-to-all) waits for both streams and
              holds both, and the host until it is done.
    """

    LANES = ("compute", "comm", "host")

    def __init__(self) -> None:
        self.compute = 0.0
        self.comm = 0.0
        self.host = 0.0
        self.done: dict[fx.Node, float] = {}
        self.events: list[dict[str, Any]] = []

    def issue(self, n: fx.Node) -> None:
        dur = ir.facts(n).get("cost_us", 0.0)
        host = ir.facts(n).get("host_us", 0.0)
        if host > 0:
            self._event(n, self.host, host, 2)
            self.host += host
        ready = self.host
        kind = _kind(n)
        if kind in ("a2a", "all_reduce"):
            start = max(self.comm, self.compute, ready)
            self.comm = start + dur
            end, lane = self.comm, 1
        elif kind == "wait":
            src = n.args[0]
            start = self.compute
            self.compute = max(self.compute, self.done.get(src, 0.0))  # type: ignore[arg-type]
            end, lane = self.compute, 0
            dur = end - start  # a stall, if any
        elif kind == "blocking":
            start = max(self.compute, self.comm, ready)
            self.compute = self.comm = self.host = start + dur
            end, lane = self.compute, 1
        elif dur > 0:
            start = max(self.compute, ready)
            self.compute = start + dur
            end, lane = self.compute, 0
        else:
            start = end = ready
            lane = 0
        self.done[n] = end
        if dur > 0:
            self._event(n, start, dur, lane)

    def _event(self, n: fx.Node, start: float, dur: float, lane: int) -> None:
        self.events.append(
            {"name": n.name, "cat": ir.op_name(n), "ph": "X", "ts": start, "dur": dur, "pid": 0, "tid": lane}
        )

    @property
    def total(self) -> float:
        return max(self.compute, self.comm, self.host)


def _in_graph_order(gm: fx.GraphModule) -> Streams:
    """The predicted streams of the graph's nodes issued in graph order."""
    s = Streams()
    for n in gm.graph.nodes:
        if n.op == "call_function":
            s.issue(n)
    return s


def predicted_timeline(gm: fx.GraphModule) -> tuple[list[dict], float]:
    """Chrome-trace events of the graph's nodes issued in graph order, and the predicted end."""
    s = _in_graph_order(gm)
    return s.events, s.total


def _mutates(n: fx.Node) -> bool:
    return isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable


def _comm_distance(body: list[fx.Node]) -> dict[fx.Node, tuple[float, float]]:
    """Per node: (compute time from it to the nearest all-to-all start or blocking op it feeds, the predicted
    time of that collective); (inf, 0) where it feeds none."""
    dist: dict[fx.Node, tuple[float, float]] = {}
    for n in reversed(body):
        kind = _kind(n)
        if kind in ("a2a", "blocking"):
            dist[n] = (0.0, ir.facts(n).get("cost_us", 0.0))
            continue
        best = (math.inf, 0.0)
        for u in n.users:
            if u in dist and dist[u][0] < best[0]:
                best = dist[u]
        own = ir.facts(n).get("cost_us", 0.0) if kind == "compute" else 0.0
        dist[n] = (best[0] + own, best[1])
    return dist


def reorder(gm: fx.GraphModule) -> tuple[int, Streams]:
    """List-schedule the graph (see the module docstring); returns how many nodes changed position, and the
    predicted streams of the new order (what `predicted_timeline` gives for it).

    Among the nodes whose inputs are issued, in this priority: blocking ops; all-to-all starts; an
    all-reduce start when the comm stream is idle; a wait whose collective is predicted done; compute that
    frees at least the memory it takes (the last use of its inputs, such as the sum of token chunks' weight
    gradients, which would otherwise wait in graph order while the chunks' gradients pile up); compute that
    feeds an all-to-all at a cost no larger than that all-to-all's time; other compute, in original order;
    then a pending all-reduce; then the wait that is done first.

    Ops that mutate an argument (an input mutation's copy_ at the end of a forward graph) are barriers: what
    comes before one in the graph stays before it and what comes after stays after, since a read of the
    mutated tensor does not show as an input of the mutation."""
    nodes = list(gm.graph.nodes)
    body = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output")]
    inside = set(body)
    pos = {n: i for i, n in enumerate(body)}
    missing = {n: sum(1 for a in n.all_input_nodes if a in inside) for n in body}
    # barriers: segment j is the nodes between barrier j - 1 and barrier j; barrier j waits for its segment,
    # and the nodes after it for it
    barriers = [n for n in body if _mutates(n)]
    segment: dict[fx.Node, int] = {}
    members: list[list[fx.Node]] = [[] for _ in range(len(barriers) + 1)]
    j = 0
    for n in body:
        segment[n] = j
        if j < len(barriers) and n is barriers[j]:
            j += 1
        else:
            members[j].append(n)
    for j, b in enumerate(barriers):
        missing[b] += len(members[j]) + (1 if j else 0)
        for n in members[j + 1]:
            missing[n] += 1
    dist = _comm_distance(body)
    queues: dict[str, list] = {
        k: [] for k in ("blocking", "a2a", "all_reduce", "wait", "frees", "feeds", "compute")
    }  # fmt: skip
    issued: set[fx.Node] = set()

    def frees(n: fx.Node) -> bool:
        """Whether issuing n now frees at least as many bytes as it allocates: it is the last user of inputs
        (made by this graph) of that size, such as the sum of two token chunks' weight gradients."""
        last = [a for a in n.all_input_nodes if a in inside and all(u is n or u in issued for u in a.users)]
        return bool(last) and cost._nbytes(cost._val(n)) <= sum(cost._nbytes(cost._val(a)) for a in last)

    def push(n: fx.Node) -> None:
        kind = _kind(n)
        if kind == "compute" and dist[n][0] <= dist[n][1]:
            kind = "feeds"
        elif kind == "compute" and not cost.is_view(n) and frees(n):
            kind = "frees"
        heapq.heappush(queues[kind], (pos[n], n.name, n))

    for n in body:
        if missing[n] == 0:
            push(n)
    s = Streams()
    order: list[fx.Node] = []

    def take(kind: str) -> fx.Node:
        return heapq.heappop(queues[kind])[2]

    while len(order) < len(body) and any(queues.values()):
        q = queues
        done_wait = next((i for i, (_, _, w) in enumerate(q["wait"]) if s.done[w.args[0]] <= s.compute), None)
        if q["blocking"]:
            n = take("blocking")
        elif q["a2a"]:
            n = take("a2a")
        elif q["all_reduce"] and s.comm <= s.compute:
            n = take("all_reduce")
        elif done_wait is not None:
            n = q["wait"].pop(done_wait)[2]
            heapq.heapify(q["wait"])
        elif q["frees"]:
            n = take("frees")
        elif q["feeds"]:
            n = take("feeds")
        elif q["compute"]:
            n = take("compute")
        elif q["all_reduce"]:
            n = take("all_reduce")
        else:
            first = min(range(len(q["wait"])), key=lambda i: (s.done[q["wait"][i][2].args[0]], q["wait"][i][0]))
            n = q["wait"].pop(first)[2]
            heapq.heapify(q["wait"])
        s.issue(n)
        order.append(n)
        issued.add(n)
        j = segment[n]
        if j < len(barriers) and n is barriers[j]:  # the barrier: the next segment and barrier may go
            after = [*members[j + 1], *barriers[j + 1 : j + 2]]
        else:
            after = barriers[j : j + 1]
        for u in [*(u for u in n.users if u in inside), *after]:
            missing[u] -= 1
            if missing[u] == 0:
                push(u)
    if len(order) < len(body):
        raise AssertionError(f"schedule: {len(body) - len(order)} node(s) never became ready (a cycle?)")
    moved = sum(1 for i, n in enumerate(order) if body[i] is not n)
    out = nodes[-1]
    for n in order:
        out.prepend(n)
    gm.graph.lint()
    gm.recompile()
    return moved, s


# ---------------------------------------------------------------------------------------------------------
# the collective order


def sink_recomputed(gm: fx.GraphModule) -> int:
    """Move every node the partition marked for recomputation (the stacked expert weights,
    `capture.weight_stacks`) to just before its first user, and return how many moved. `reorder` may have
    pulled one forward as cheap work feeding an all-to-all (its inputs, parameters, are ready from the start),
    which keeps a copy of a layer's expert weights alive across the backward: the memory the recomputation is
    there to save. Such a node reads only parameters and other such nodes, so running it later is always
    valid."""
    moved = 0
    for n in reversed(list(gm.graph.nodes)):
        if n.op != "call_function" or not must_recompute(n) or _mutates(n) or not n.users:
            continue
        first = n.next  # the first user: the graph's current order, nodes moved so far included
        while first not in n.users:
            first = first.next
        if n.next is not first:
            first.prepend(n)
            moved += 1
    return moved


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
            padded = "padded" if n.target is _PLAN and cost.is_padded_plan(n) else ""
            out.append(f"{ir.op_name(n)}{groups}{shape}{padded}")
    return out


def check_collective_order(gm: fx.GraphModule, ctx: CompileContext) -> None:
    """Every rank's Dynamo graph issues the same collectives in the same order, and every rank schedules with
    the same hardware profile: the forward and backward graphs' order is a function of both (raises naming
    the ranks)."""
    order = collective_order(gm, ctx.mesh)
    ctx.plan.setdefault("collective_order", {})["dynamo"] = order
    mdist.check_same_on_all_ranks(f"the collective order of graph {ctx.graph_id}", order)
    figures = {k: v for k, v in ctx.profile.to_json().items() if k != "source"}  # the same file may sit elsewhere
    mdist.check_same_on_all_ranks(
        f"the hardware profile the schedule orders graph {ctx.graph_id} by ({ctx.profile.source}; "
        f"pass the same profile= or {cost.PROFILE_ENV} to every rank)",
        figures,
    )


_WGRADS = (torch.ops.moecc.grouped_mm_wgrad.default, torch.ops.moecc.triton_grouped_mm_wgrad.default)
_ADD = torch.ops.aten.add.Tensor
_TRANSPOSE = torch.ops.aten.transpose.int


def accumulate_wgrads(gm: fx.GraphModule) -> int:
    """Fold `add(s, dW)` (a sum of token chunks' weight gradients, dW a dW GEMM's result, directly or through
    the nn.Linear layout's transpose, read by nothing else) into the GEMM's accumulator: `dW(..., acc=s)`. The
    sum then holds one partial sum at a time instead of a partial sum, a chunk's gradient and their sum.
    The GEMM moves to the add's place (after s exists); returns how many adds were folded."""
    folded = 0
    for add in list(gm.graph.nodes):
        if add.target is not _ADD or len(add.args) != 2 or add.kwargs:
            continue
        for i in (0, 1):
            b, s = add.args[i], add.args[1 - i]
            if not isinstance(b, fx.Node) or not isinstance(s, fx.Node):
                continue
            t = None
            if b.target is _TRANSPOSE and len(b.users) == 1:
                t, b = b, b.args[0]
                if not isinstance(b, fx.Node):
                    continue
            if b.target not in _WGRADS or len(b.users) != 1 or b.kwargs.get("acc") is not None:
                continue
            sv, av, bv = cost._val(s), cost._val(add), cost._val(t if t is not None else b)
            if not all(isinstance(v, torch.Tensor) for v in (sv, av, bv)):
                continue
            if not (sv.shape == bv.shape == av.shape and sv.dtype == bv.dtype == av.dtype):
                continue  # broadcasting or type promotion: the add is not a plain sum in the GEMM's dtype
            acc = s
            if t is not None:  # the sum in the GEMM's own layout
                with gm.graph.inserting_before(add):
                    acc = gm.graph.call_function(_TRANSPOSE, (s, *t.args[1:]))
                d0, d1 = int(t.args[1]), int(t.args[2])  # type: ignore[arg-type]
                acc.meta = {**t.meta, "val": sv.transpose(d0, d1)}
            add.prepend(b)  # after s and the acc view
            b.update_kwarg("acc", acc)
            if t is not None:
                add.prepend(t)
            add.replace_all_uses_with(t if t is not None else b)
            gm.graph.erase_node(add)
            folded += 1
            break
    if folded:
        gm.graph.lint()
        gm.recompile()
    return folded


def schedule_overlap(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Forward/backward-graph half of the schedule pass."""
    if ctx.graph_kind == "backward":
        ctx.counters["schedule.accumulated_wgrads"] += accumulate_wgrads(gm)
    split = split_collectives(gm)
    buckets = grads = 0
    if ctx.graph_kind == "backward" and ctx.mesh.world > 1:
        buckets, grads = bucket_gradients(gm, ctx)
        ctx.counters["schedule.buckets"] += buckets
        ctx.counters["schedule.bucketed_grads"] += grads
    ctx.counters["schedule.split_all_to_alls"] += split
    top_k: dict[Any, int] = {r.path: max(r.top_k, 1) for r in ctx.regions}  # outside any region: top-2
    for n in gm.graph.nodes:
        if n.op == "call_function":
            k = top_k.get(ir.facts(n).get("region"), 2)
            us = cost.estimate_us(
                n, ctx.profile, top_k=k, ep=ctx.mesh.ep, padded=_padded(ctx, ir.facts(n).get("region"))
            )
            ir.set_facts(n, cost_us=us)
            ir.set_facts(n, host_us=cost.host_us(n, ctx.profile))
            ir.facts(n).setdefault("stream", "comm" if cost.collective_kind(n) is not None else "compute")
    _, before = predicted_timeline(gm)
    moved, scheduled = reorder(gm)
    sunk = sink_recomputed(gm)
    if sunk:
        scheduled = _in_graph_order(gm)
        ctx.counters["schedule.sunk_recomputed"] += sunk
    ctx.counters["schedule.moved_nodes"] += moved
    order = collective_order(gm, ctx.mesh)
    ctx.plan.setdefault("collective_order", {})[ctx.graph_kind] = order
    events, total = scheduled.events, scheduled.total
    ctx.plan.setdefault("predicted_us", {})[ctx.graph_kind] = total
    ctx.plan.setdefault("predicted_host_us", {})[ctx.graph_kind] = scheduled.host
    ctx.plan.setdefault("predicted_unscheduled_us", {})[ctx.graph_kind] = before
    chunks = ctx.plan.get("chunks", {})
    chunk_note = ", ".join(f"{p}: {c}" for p, c in chunks.items()) or "none"
    bucket_note = f", {grads} gradient all-reduces in {buckets} bucket(s)" if buckets else ""
    ctx.note(
        f"token chunks {chunk_note}; {split} all-to-all(s) split into start/wait, {moved} node(s) moved; "
        f"{len(order)} collective(s){bucket_note}; predicted {total:.1f} us (graph order: {before:.1f} us) on "
        f"profile {ctx.profile.name} ({ctx.profile.source})"
    )
    if ctx.dumper is not None:
        meta: list[dict[str, Any]] = [
            {"name": "thread_name", "ph": "M", "pid": 0, "tid": t, "args": {"name": s}}
            for t, s in enumerate(Streams.LANES)
        ]
        ctx.dumper.write_json(f"timeline.{ctx.graph_kind}.json", {"traceEvents": meta + events})
    return gm
