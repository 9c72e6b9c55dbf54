"""shard: make the program SPMD over the mesh: keep each rank's expert shard, put dispatch/combine
all-to-all around the expert GEMMs and gradient synchronisation into the backward graph.

On a 1 x 1 mesh there is nothing to exchange: the pass marks every parameter input's placement
(expert weights "expert-sharded", the rest "replicated") and inserts no collective.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from moecc import ir
from moecc.options import MoeccError
from moecc.pass_manager import CompileContext


def shard_experts(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    if ctx.mesh.world != 1:
        raise MoeccError(
            f"world size {ctx.mesh.world}: expert parallelism across processes is not available "
            "in this build; run in one process"
        )
    weights = set()
    for n in gm.graph.nodes:
        if n.target is torch.ops.moecc.grouped_mm.default:
            todo = [n.args[1]]  # back through transpose/stack/cat to the parameter inputs
            while todo:
                w = todo.pop()
                if isinstance(w, fx.Node):
                    if w.op == "placeholder":
                        weights.add(w)
                    else:
                        todo.extend(w.all_input_nodes)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            ir.set_facts(n, placement="expert-sharded" if n in weights else "replicated")
        elif ir.is_moe_op(n):
            ir.set_facts(n, stream="compute")
    ctx.note(f"mesh 1x1: no collectives inserted; {len(weights)} expert weight input(s) marked expert-sharded")
    return gm
