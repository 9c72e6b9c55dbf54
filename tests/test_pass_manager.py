"""The pass manager: one ordered list, switchable by name, checked after every pass in debug mode."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.fx as fx

import moecc
from moecc import passes
from moecc.examples import switch_style
from moecc.pass_manager import CompileContext, PassCheckError


def test_pipeline_order() -> None:
    assert passes.PASS_NAMES == ["lift_moe", "plan", "shard", "fuse", "schedule", "sync_grads", "lower"]
    assert [p.name for p in passes.PIPELINE if p.stage == "aot"] == ["sync_grads", "schedule", "lower"]
    assert [p.stage for p in passes.PIPELINE] == ["dynamo"] * 5 + ["aot"] * 3


def _drop_moe_ops(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """A broken pass: replaces every combine by zeros (the graph stays well-formed, the answer is wrong)."""
    for n in list(gm.graph.nodes):
        if n.target is torch.ops.moecc.unpermute_combine.default:
            x_TH = next(p for p in gm.graph.nodes if p.target is torch.ops.moecc.route_permute.default).args[0]
            with gm.graph.inserting_before(n):
                z = gm.graph.call_function(torch.zeros_like, (x_TH,))
            n.replace_all_uses_with(z)
            gm.graph.erase_node(n)
    gm.recompile()
    return gm


def test_checker_names_the_failing_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = dataclasses.replace(passes.PIPELINE[1], fn=_drop_moe_ops, invariant=passes.PIPELINE[0].invariant)
    monkeypatch.setattr(passes, "PIPELINE", [passes.PIPELINE[0], broken, *passes.PIPELINE[2:]])
    model, (ids,) = switch_style.build()
    cm = moecc.compile(model, debug=1)
    with pytest.raises(PassCheckError, match=r"after pass 'plan'.*passes run before it: \['lift_moe'\]"):
        cm(ids)


def test_dumps_show_every_pass(tmp_path: Path) -> None:
    model, (ids,) = switch_style.build()
    cm = moecc.compile(model, dump_dir=tmp_path)
    cm(ids).float().sum().backward()
    g = cm.dump_root / "graph_0"
    names = sorted(p.name for p in g.iterdir())
    assert names == sorted(
        [
            "00_capture.py",
            "01_lift_moe.py",
            "02_plan.py",
            "03_shard.py",
            "04_fuse.py",
            "05_schedule.py",
            "06_sync_grads.fwd.py",
            "06_sync_grads.bwd.py",
            "07_schedule.fwd.py",
            "07_schedule.bwd.py",
            "08_lower.fwd.py",
            "08_lower.bwd.py",
            "index.json",
            "index.md",
            "plan.md",
            "timeline.forward.json",
            "timeline.backward.json",
        ]
    )
    lifted = (g / "01_lift_moe.py").read_text()
    assert lifted.startswith("# Constructed by lift_moe (took ")
    assert "torch.ops.moecc.route_permute" in lifted and "# moecc: region=layers.0.moe.experts" in lifted
    assert "index_add_" not in lifted and "index_add_" in (g / "00_capture.py").read_text()
    bwd = (g / "08_lower.bwd.py").read_text()
    assert "moecc.grouped_mm_wgrad" in bwd, "the backward graph carries the moecc weight-gradient op"
    index = (g / "index.md").read_text()
    assert "+2 moecc.route_permute" in index and "-8 method.index_add_" in index
    assert "not fused layers.0.moe.experts: the torch backend has no fused" in index
    summary = (cm.dump_root / "summary.md").read_text()
    assert "layers.1.moe.experts" in summary and "mlp_gelu" in summary


def test_disabled_pass_is_skipped_and_reported(tmp_path: Path) -> None:
    model, (ids,) = switch_style.build()
    cm = moecc.compile(model, dump_dir=tmp_path, disable_passes=["schedule"])
    out = cm(ids)
    torch.testing.assert_close(out, model(ids))
    out.sum().backward()
    g = cm.dump_root / "graph_0"
    assert not (g / "07_schedule.fwd.py").exists() and not (g / "timeline.forward.json").exists()
    assert not (g / "05_schedule.py").exists()
    rows = [r.split("|")[1:4] for r in (g / "index.md").read_text().splitlines() if r.startswith("| schedule")]
    assert [[c.strip() for c in r] for r in rows] == [
        ["schedule", "dynamo", "disabled"],
        ["schedule", "forward", "disabled"],
        ["schedule", "backward", "disabled"],
    ]


def test_lift_disabled_leaves_model_code(tmp_path: Path) -> None:
    model, (ids,) = switch_style.build()
    cm = moecc.compile(model, dump_dir=tmp_path, disable_passes=["lift_moe"])
    torch.testing.assert_close(cm(ids), model(ids))
    lowered = (cm.dump_root / "graph_0" / "08_lower.fwd.py").read_text()
    assert "torch.ops.moecc" not in lowered
    assert cm.regions == []


def test_sync_grads_folds_the_scale_only_where_nothing_else_reads_the_gradient() -> None:
    """sync_grads' 1/W goes into a dW kernel where the gradient is its result seen through views and sums that
    only the output reads; a result something else reads, or a gradient that is not an expert's, keeps its
    value (a multiplication follows it instead)."""
    from moecc.passes import sync_grads

    wgrad = torch.ops.moecc.grouped_mm_wgrad.default
    g = fx.Graph()
    x, dy, offs = (g.placeholder(n) for n in ("x", "dy", "offs"))
    # folded: a transposed result (the nn.Linear layout), and the sum of two token chunks' results
    a = g.call_function(wgrad, (x, dy, offs))
    a_t = g.call_function(torch.ops.aten.transpose.int, (a, 1, 2))
    b1, b2 = g.call_function(wgrad, (x, dy, offs)), g.call_function(wgrad, (x, dy, offs))
    b = g.call_function(torch.ops.aten.add.Tensor, (b1, b2))
    # not folded: a result something else reads too, and one that reaches a replicated gradient
    c = g.call_function(wgrad, (x, dy, offs))
    c_other = g.call_function(torch.ops.aten.sum.default, (c,))
    d = g.call_function(wgrad, (x, dy, offs))
    out = g.output((a_t, b, c, c_other, d))
    gm = fx.GraphModule(torch.nn.Module(), g)
    folded = sync_grads.fold_scales(gm, out, {a_t, b, c}, 0.25)
    assert folded == {a_t, b}
    scales = {n.name: n.kwargs.get("scale", 1.0) for n in gm.graph.nodes if n.target is wgrad}
    assert scales == {a.name: 0.25, b1.name: 0.25, b2.name: 0.25, c.name: 1.0, d.name: 1.0}, scales
