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
from moecc.passes.lower_backend import graph_device, resolve_backend


def fusion_refusal(backend: str, region: ir.MoERegion) -> str | None:
    """Why a region cannot be fused on `backend` (None if it can)."""
    if backend == "torch":
        return "the torch backend has no fused dispatch/combine kernels"
    # triton: grouped GEMM kernels so far; the fused dispatch/combine kernels are not built yet
    return "the triton backend has no fused dispatch+GEMM / GEMM+combine kernels yet (grouped GEMMs only)"


def fuse_experts(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    backend = resolve_backend(ctx.options.backend, graph_device(gm))
    present = {
        ir.facts(n).get("region")
        for n in gm.graph.nodes
        if n.target is torch.ops.moecc.grouped_mm.default and n.meta.get("moecc")
    }
    for r in ctx.regions:
        if r.path not in present:
            continue
        reason = fusion_refusal(backend, r) if r.status == "lifted" else "region not lifted"
        if reason is not None:
            ctx.counters["fuse.refused"] += 1
            ctx.note(f"not fused {r.path}: {reason}")
    return gm
