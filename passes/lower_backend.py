"""lower: hand the graph to a backend, which returns what runs.

The `torch` backend runs the moecc ops with stock PyTorch (`moecc.backends.torch_backend`); "auto"
resolves to the fastest backend available for the graph's device (only `torch` in this build).
"""

from __future__ import annotations

import torch.fx as fx

from moecc import ir
from moecc.pass_manager import CompileContext


def resolve_backend(requested: str) -> str:
    return "torch" if requested in ("auto", "torch") else requested


def lower_backend(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    backend = resolve_backend(ctx.options.backend)
    count = 0
    for n in gm.graph.nodes:
        if ir.is_moe_op(n):
            ir.set_facts(n, backend=backend)
            count += 1
    ctx.note(f"backend {backend}: {count} moecc op(s)")
    gm.recompile()
    return gm
