"""plan: the expert placement of each lifted region on the mesh (dp x ep), checked to be the same on every
rank.

The mesh itself is chosen when the model is compiled (moecc.dist.choose_ep: the user's ep, or the largest
divisor of the world size dividing every region's expert count), because the expert weights are sharded
before tracing. The plan is recorded in `ctx.plan` and on the region's nodes, and dumped as tables; shard
reads it. In one process the mesh is 1 x 1.
"""

from __future__ import annotations

import torch.fx as fx

from moecc import dist, ir
from moecc.options import MoeccError
from moecc.pass_manager import CompileContext


def plan_mesh(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    ep = ctx.mesh.ep
    rows = []
    for r in ctx.regions:
        if r.status != "lifted":
            continue
        if r.num_experts % ep:
            ok = [d for d in dist.divisors(r.num_experts) if ctx.mesh.world % d == 0]
            raise MoeccError(f"{r.path}: {r.num_experts} experts do not divide ep={ep}; pick ep in {ok} or pad experts")
        per_rank = r.num_experts // ep
        placement = {i: list(range(i * per_rank, (i + 1) * per_rank)) for i in range(ep)}  # by ep index
        ctx.plan.setdefault("regions", {})[r.path] = {
            "ep": ep,
            "experts_per_rank": per_rank,
            "placement": placement,
        }
        rows.append([r.path, r.num_experts, ep, per_rank, f"{placement[0][0]}..{placement[0][-1]}"])
    ctx.plan["mesh"] = {"dp": ctx.mesh.world // ep, "ep": ep, "world": ctx.mesh.world}
    for n in gm.graph.nodes:
        region = ir.facts(n).get("region") if n.meta.get("moecc") else None
        if region in ctx.plan.get("regions", {}):
            ir.set_facts(n, placement="token-partitioned" if ir.is_moe_op(n) else "replicated")
    dist.check_same_on_all_ranks(f"the plan of graph {ctx.graph_id}", ctx.plan)
    ctx.note(f"mesh dp={ctx.plan['mesh']['dp']} x ep={ep}; {len(rows)} lifted region(s)")
    if ctx.dumper is not None:
        from tabulate import tabulate

        text = "# plan\n\n## mesh\n\n" + tabulate(
            [[ctx.plan["mesh"]["dp"], ep, ctx.mesh.world]], headers=["dp", "ep", "world"], tablefmt="github"
        )
        text += "\n\n## expert placement\n\n" + (
            tabulate(rows, headers=["region", "experts", "ep", "per rank", "rank 0 holds"], tablefmt="github")
            if rows
            else "no lifted region"
        )
        text += "\n\n## MoE regions\n\n" + (
            tabulate([r.row() for r in ctx.regions], headers=ir.MoERegion.HEADERS, tablefmt="github")
            if ctx.regions
            else "none"
        )
        ctx.dumper.write_text("plan.md", text + "\n")
    return gm
