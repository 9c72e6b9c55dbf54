"""The pass pipeline: the one place that says which passes run, in which order, and why.

| pass     | expects                                       | guarantees                                         |
|----------|-----------------------------------------------|----------------------------------------------------|
| lift_moe | a Dynamo graph                                | recognised experts computations are moecc ops      |
| plan     | lifted regions                                | a mesh and an expert placement in ctx.plan         |
| shard    | lifted regions, the plan                      | SPMD program: local experts, dispatch/combine      |
| fuse     | sharded graphs                                | each region fused or refused with a reason         |
| sync_grads | the backward graph                          | gradients synchronised over the mesh               |
| schedule | sharded regions (Dynamo graph); explicit      | token chunks; collectives as start/wait, reordered |
|          | collectives (forward and backward graphs)     | for overlap, buckets; costs; deterministic order   |
| lower    | a scheduled graph                             | a callable for the chosen backend                  |
"""

from __future__ import annotations

from moecc.pass_manager import Pass
from moecc.passes import (
    fuse_experts,
    lift_moe,
    lower_backend,
    plan_mesh,
    schedule_overlap,
    shard_experts,
    sync_grads,
)

PIPELINE = [
    # before the autograd split, so that the lifted ops bring their own backward formulas
    Pass(
        "lift_moe",
        "dynamo",
        lift_moe.lift_moe,
        "a Dynamo graph",
        "experts computations are moecc ops",
        lift_moe.check_lifted,
    ),
    # sizes the mesh from the regions lift_moe found; shard needs it on both graphs
    Pass("plan", "dynamo", plan_mesh.plan_mesh, "lifted regions", "mesh and expert placement in ctx.plan"),
    # before the autograd split too: dispatch/combine all-to-alls bring their backward (the reverse all-to-all)
    Pass(
        "shard",
        "dynamo",
        shard_experts.shard_experts,
        "the plan",
        "SPMD program: local experts, all-to-alls",
        shard_experts.check_sharded,
    ),
    # after shard, so that dispatch/combine collectives exist to fuse with the expert GEMMs; before the autograd
    # split, so that the fused ops bring their backward (the mirror-image fused kernels)
    Pass(
        "fuse",
        "dynamo",
        fuse_experts.fuse_experts,
        "sharded graphs",
        "each region fused or refused with a reason",
        fuse_experts.check_fused,
    ),
    # the schedule pass's first half, on the Dynamo graph so that the backward is chunked too: token chunks of
    # sharded, unfused MoE regions (after fuse: fused regions overlap their own transfers)
    Pass(
        "schedule",
        "dynamo",
        schedule_overlap.chunk_moe,
        "sharded, fused-or-refused regions",
        "each region in n token chunks (cost model)",
    ),
    # on the backward graph: gradient all-reduces as graph collectives the scheduler can move
    Pass("sync_grads", "aot", sync_grads.sync_grads, "the backward graph", "gradients synchronised over the mesh"),
    # after fuse: it schedules the kernels that will actually run
    Pass(
        "schedule",
        "aot",
        schedule_overlap.schedule_overlap,
        "explicit collectives",
        "start/wait collectives, overlap order, buckets, costs, deterministic order",
    ),
    # last: turns the graph into what runs
    Pass("lower", "aot", lower_backend.lower_backend, "a scheduled graph", "a callable for the backend"),
]

PASS_NAMES = list(dict.fromkeys(p.name for p in PIPELINE))  # schedule runs in both stages
