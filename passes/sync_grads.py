"""sync_grads: gradient synchronisation as collectives of the backward graph (not hooks), so that the
scheduler can move them. The contract (DDP's): training on W ranks with per-rank batch b gives the
gradients of eager training on the concatenated batch with loss = mean of the per-rank losses.

- a replicated parameter's gradient is summed over all W ranks and divided by W;
- a local expert weight already holds the sum over its ep-group's tokens (the backward all-to-all brought
  them); it is summed over the ranks holding the same experts (dp of them) and divided by W.

    before                         after
    return (g_w1, None, g_emb)     ar_0 = _c10d_functional.all_reduce(g_w1, "sum", dp_group)  # start
                                   ...
                                   g_w1_s = mul(wait_tensor(ar_0), 1/W)                       # wait
                                   return (g_w1_s, None, g_emb_s)

Each all_reduce starts right where its gradient is produced and is waited on just before the output.

An expert weight gradient's 1/W costs no pass of its own where it can be folded: the kernel that computes it
(`ops.WGRAD_SCALE`: the dW GEMMs, the fused backward ops) multiplies its float32 sums by 1/W before the store,
where the gradient is that kernel's result seen through views and sums (token chunks) that nothing else
reads. At 256 experts of 7168 x 2048 on 2 ranks, the multiplication it replaces read and wrote 22 GB a step
(5.3 ms of a 54 ms layer on an H200). Where dp > 1 the all-reduce then sums the scaled gradients (DDP's
predivision).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from moecc import cost, ir, ops
from moecc.options import MoeccError
from moecc.pass_manager import CompileContext

_AR = torch.ops._c10d_functional.all_reduce.default
_WAIT = torch.ops._c10d_functional.wait_tensor.default


def sync_grads(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    if ctx.graph_kind != "backward" or ctx.mesh.world == 1:
        return gm
    kinds = ctx.plan.get("input_kinds")
    if kinds is None:
        raise MoeccError("sync_grads needs the input kinds the shard pass records; do not disable shard with ep/dp > 1")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    grads = list(out.args[0])
    if len(grads) != len(kinds):
        raise MoeccError(f"sync_grads: the backward graph returns {len(grads)} gradients for {len(kinds)} inputs")
    W = ctx.mesh.world
    synced = {"replicated": 0, "expert": 0}
    # the 1/W goes into the kernels that produce the expert weight gradients where they can (before the sum
    # over the replicas where dp > 1, as DDP's predivision: the same sum); the others get a multiplication
    expert_grads = {g for g, kind in zip(grads, kinds, strict=True) if isinstance(g, fx.Node) and kind == "expert"}
    expert_grads -= {g for g, kind in zip(grads, kinds, strict=True) if kind != "expert"}  # also returned as another
    folded = fold_scales(gm, out, expert_grads, 1.0 / W)
    for i, (g, kind) in enumerate(zip(grads, kinds, strict=True)):
        if not isinstance(g, fx.Node) or kind not in synced:
            continue
        group = ctx.mesh.world_group if kind == "replicated" else ctx.mesh.dp_group
        prescaled = kind == "expert" and g in folded
        if kind == "expert" and ctx.mesh.dp == 1:
            scaled = g
            if not prescaled:
                with gm.graph.inserting_before(out):
                    scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (g, 1.0 / W))
        else:
            with gm.graph.inserting_after(g):
                start = gm.graph.call_function(_AR, (g, "sum", group))
            with gm.graph.inserting_before(out):
                scaled = done = gm.graph.call_function(_WAIT, (start,))
                if not prescaled:
                    scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (done, 1.0 / W))
            ir.set_facts(start, stream="comm", created_by="sync_grads", collective=f"all_reduce({kind})")
            ir.set_facts(done, stream="comm", created_by="sync_grads")
        grads[i] = scaled
        synced[kind] += 1
    out.args = (tuple(grads),)
    gm.graph.lint()
    gm.recompile()
    ctx.note(
        f"gradient sync: {synced['replicated']} replicated (all ranks), {synced['expert']} expert "
        f"(dp={ctx.mesh.dp} replicas), scaled by 1/{W} ({len(folded)} expert gradients scaled in their kernels)"
    )
    ctx.counters["sync_grads.scale_folded"] += len(folded)
    return gm


def fold_scales(gm: fx.GraphModule, out: fx.Node, expert_grads: set[fx.Node], scale: float) -> set[fx.Node]:
    """Multiply expert weight gradients by `scale` in the kernels that produce them (ops.WGRAD_SCALE): where a
    gradient is such a kernel's weight-gradient output, seen through views (the nn.Linear layout's transpose;
    for ModuleList experts, the unbind back to each expert's parameters) and sums (token chunks' gradients),
    all of them linear, and nothing but the graph's output, at expert-gradient positions, reads the kernel's
    result on the way. -> the output nodes so scaled; for the others the graph is unchanged."""
    closures: dict[fx.Node, tuple[set[fx.Node], set[fx.Node]]] = {}
    for g in expert_grads:
        c = _linear_closure(g)
        if c is not None:
            closures[g] = c
    while True:  # drop the gradients whose way is read by something outside the ways kept
        inside = set().union(*(nodes for nodes, _ in closures.values())) if closures else set()
        bad = {n for n in inside if any(u not in inside and u is not out for u in n.users)}
        bad |= {n for n in inside if out in n.users and n not in expert_grads}
        dropped = [g for g, (nodes, _) in closures.items() if nodes & bad]
        if not dropped:
            break
        for g in dropped:
            del closures[g]
    for _, producers in closures.values():
        for node in producers:
            arg = ops.WGRAD_SCALE[node.target][0]  # type: ignore[index]
            node.update_kwarg(arg, scale)
            ir.set_facts(node, wgrad_scale=scale)
    return set(closures)


def _linear_closure(g: fx.Node) -> tuple[set[fx.Node], set[fx.Node]] | None:
    """(the nodes from the producing kernels' results to g, the producing kernels) where g is a view or sum of
    weight-gradient results of ops.WGRAD_SCALE kernels whose scale is not set yet; else None."""
    nodes: set[fx.Node] = set()
    producers: set[fx.Node] = set()
    todo = [g]
    while todo:
        n = todo.pop()
        if n in nodes:
            continue
        if not isinstance(n, fx.Node) or n.op != "call_function":
            return None
        nodes.add(n)
        producer, index = n, None
        if n.target is operator.getitem:
            producer, index = n.args  # type: ignore[assignment]
        if isinstance(producer, fx.Node) and producer.target in ops.WGRAD_SCALE:
            arg, outputs = ops.WGRAD_SCALE[producer.target]
            if index not in outputs or cost.schema_args(producer).get(arg) != 1.0:
                return None
            producers.add(producer)
        elif n.target is operator.getitem or cost.is_view(n):
            todo.append(n.args[0])  # type: ignore[arg-type]
        elif n.target is torch.ops.aten.add.Tensor and n.kwargs.get("alpha", 1) == 1 and len(n.args) == 2:
            todo.extend(n.args)  # type: ignore[arg-type]
        else:
            return None
    return nodes, producers
