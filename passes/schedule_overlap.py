"""schedule: order compute and communication for overlap, using the cost model.

Every node gets its predicted time (`cost_us`) and a stream; the predicted timeline (list schedule over
a compute and a comm stream, in graph order) is dumped as a Chrome trace. With no collectives in the
graph (1 x 1 mesh) there is nothing to overlap, so the order is left as it is (one token chunk).
"""

from __future__ import annotations

import torch.fx as fx

from moecc import cost, ir
from moecc.pass_manager import CompileContext


def predicted_timeline(gm: fx.GraphModule) -> tuple[list[dict], float]:
    """Chrome-trace events of a list schedule in graph order; a node starts when its inputs are done and
    its stream is free."""
    done: dict[fx.Node, float] = {}
    free = {"compute": 0.0, "comm": 0.0}
    events = []
    for n in gm.graph.nodes:
        f = n.meta.get("moecc") or {}
        dur = f.get("cost_us", 0.0)
        stream = f.get("stream", "compute")
        start = max([free[stream], *(done.get(a, 0.0) for a in n.all_input_nodes)])
        done[n] = start + dur
        if dur > 0:
            free[stream] = done[n]
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


def schedule_overlap(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    for n in gm.graph.nodes:
        if n.op == "call_function":
            ir.set_facts(n, cost_us=cost.estimate_us(n, ctx.profile))
            ir.facts(n).setdefault("stream", "compute")
    events, total = predicted_timeline(gm)
    ctx.plan.setdefault("predicted_us", {})[ctx.graph_kind] = total
    ctx.note(f"1 token chunk; predicted {total:.1f} us on profile {ctx.profile.name}")
    if ctx.dumper is not None:
        meta = [
            {"name": "thread_name", "ph": "M", "pid": 0, "tid": t, "args": {"name": s}}
            for t, s in ((0, "compute"), (1, "comm"))
        ]
        ctx.dumper.write_json(f"timeline.{ctx.graph_kind}.json", {"traceEvents": meta + events})
    return gm
