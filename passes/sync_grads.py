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
"""

from __future__ import annotations

import torch
import torch.fx as fx

from moecc import ir
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
    for i, (g, kind) in enumerate(zip(grads, kinds, strict=True)):
        if not isinstance(g, fx.Node) or kind not in synced:
            continue
        group = ctx.mesh.world_group if kind == "replicated" else ctx.mesh.dp_group
        if kind == "expert" and ctx.mesh.dp == 1:
            with gm.graph.inserting_before(out):
                scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (g, 1.0 / W))
        else:
            with gm.graph.inserting_after(g):
                start = gm.graph.call_function(_AR, (g, "sum", group))
            with gm.graph.inserting_before(out):
                done = gm.graph.call_function(_WAIT, (start,))
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
        f"(dp={ctx.mesh.dp} replicas), scaled by 1/{W}"
    )
    return gm
