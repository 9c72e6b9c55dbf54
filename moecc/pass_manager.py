"""The pass manager: runs the pipeline (`moecc.passes.PIPELINE`) on a graph, times and checks each pass,
and feeds the dumps.

A pass is `fn(gm, ctx) -> gm`. Passes of stage "dynamo" run on the graph Dynamo captured, before
AOTAutograd splits it (so that what they insert gets an autograd formula); passes of stage "aot" run on
the forward graph and on the backward graph AOTAutograd produced.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch.fx as fx

from moecc import ir
from moecc.cost import HardwareProfile
from moecc.options import CompileOptions


@dataclasses.dataclass(frozen=True)
class Mesh:
    """dp x ep = world; in one process 1 x 1. Group names are torch.distributed process-group names."""

    dp: int = 1
    ep: int = 1
    rank: int = 0
    ep_group: str = ""  # the ranks that split one copy of the experts between them
    dp_group: str = ""  # the ranks holding the same experts as this one
    world_group: str = ""
    # the most hosts any ep-group's ranks are spread over (1: every ep-group within one node, where the fused
    # kernels can reach their peers through symmetric memory)
    ep_hosts: int = 1
    # whether every GPU of an ep-group can load from and store to the others' memory directly (peer to peer),
    # as the fused kernels do through symmetric memory; the same on every rank
    ep_peer_access: bool = True

    @property
    def world(self) -> int:
        return self.dp * self.ep

    @property
    def ep_index(self) -> int:
        """Which slice of the experts this rank holds."""
        return self.rank % self.ep


@dataclasses.dataclass(frozen=True)
class Pass:
    name: str
    stage: str  # "dynamo" | "aot"
    fn: Callable[[fx.GraphModule, CompileContext], fx.GraphModule]
    expects: str
    guarantees: str
    invariant: Callable[[fx.GraphModule, CompileContext], None] | None = None


@dataclasses.dataclass
class PassRecord:
    graph_id: int
    graph_kind: str  # "dynamo" | "forward" | "backward"
    pass_name: str
    took_ms: float
    added: dict[str, int]
    removed: dict[str, int]
    predicted_us: float | None
    notes: list[str]
    disabled: bool = False


@dataclasses.dataclass
class CompileContext:
    """What passes see besides the graph: options, mesh, cost model and what earlier passes decided."""

    options: CompileOptions
    mesh: Mesh
    profile: HardwareProfile
    graph_id: int
    module_regions: dict[str, ir.MoERegion]  # experts modules recognised by interface at capture
    released: frozenset[str] = frozenset()  # parameter names of other ranks' experts (stand-ins here)
    regions: list[ir.MoERegion] = dataclasses.field(default_factory=list)
    records: list[PassRecord] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    counters: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    plan: dict[str, Any] = dataclasses.field(default_factory=dict)
    graph_kind: str = "dynamo"
    final_graphs: dict[str, fx.GraphModule] = dataclasses.field(default_factory=dict)  # after the last pass
    dumper: Any = None  # moecc.dump.Dumper | None

    def note(self, msg: str) -> None:
        """A decision worth showing in the dumps (and printed at MOECC_DEBUG >= 2)."""
        self.notes.append(msg)
        if self.options.debug >= 2:
            print(f"[moecc] graph {self.graph_id} {self.graph_kind}: {msg}")


class PassCheckError(AssertionError):
    pass


def _predicted_total(gm: fx.GraphModule) -> float | None:
    costs = [n.meta.get("moecc", {}).get("cost_us") for n in gm.graph.nodes]
    known = [c for c in costs if c is not None]
    return sum(known) if known else None


def run_stage(gm: fx.GraphModule, ctx: CompileContext, stage: str, graph_kind: str) -> fx.GraphModule:
    from moecc.passes import PIPELINE

    ctx.graph_kind = graph_kind
    if stage == "aot":
        ir.restore_regions(gm)
    ran: list[str] = []
    for p in PIPELINE:
        if p.stage != stage:
            continue
        if not ctx.options.enabled(p.name):
            ctx.records.append(PassRecord(ctx.graph_id, graph_kind, p.name, 0.0, {}, {}, None, [], disabled=True))
            continue
        before = ir.op_counts(gm)
        notes_at = len(ctx.notes)
        t0 = time.perf_counter()
        gm = p.fn(gm, ctx)
        took = (time.perf_counter() - t0) * 1e3
        ran.append(p.name)
        if ctx.options.debug >= 1:
            try:
                ir.check_graph(gm, stage=stage)
                if p.invariant is not None:
                    p.invariant(gm, ctx)
            except Exception as e:
                raise PassCheckError(
                    f"check failed after pass {p.name!r} on graph {ctx.graph_id} ({graph_kind}); "
                    f"passes run before it: {ran[:-1]}: {e}"
                ) from e
        after = ir.op_counts(gm)
        rec = PassRecord(
            ctx.graph_id,
            graph_kind,
            p.name,
            took,
            dict(after - before),
            dict(before - after),
            _predicted_total(gm),
            ctx.notes[notes_at:],
        )
        ctx.records.append(rec)
        if ctx.options.debug >= 1:
            print(f"[moecc] graph {ctx.graph_id} {graph_kind}: {p.name} took {took:.1f} ms")
        if ctx.options.debug >= 3:
            print(ir.readable(gm, f"# after {p.name}"))
        if ctx.dumper is not None:
            ctx.dumper.write_graph(gm, p.name, graph_kind, took)
    ctx.final_graphs[graph_kind] = gm
    return gm
