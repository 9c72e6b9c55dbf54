"""The schedule pass and the cost model: gradient buckets (same gradients as unscheduled and as eager), the
collective order (the same on every rank), calibrated hardware profiles (measured, saved, picked up by
compile), and the predicted timeline."""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import moecc
from moecc import cost, ir, profile, testing
from moecc.examples import deepseek_style, mixtral_style
from moecc.options import MoeccError


def _grads(cm, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = testing.lm_loss(cm(ids), ids)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in cm.named_parameters() if p.grad is not None}
    for p in cm.parameters():
        p.grad = None
    return loss.detach(), grads


def _bucketed_like_unscheduled(rank: int, world: int) -> None:
    for build in (mixtral_style.build, deepseek_style.build):
        model, (ids,) = build(seed=0)
        gen = torch.Generator().manual_seed(7)
        batches = [torch.randint(0, 64, ids.shape, generator=gen) for _ in range(world)]
        replicated = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." not in n)
        variants = {
            "one bucket": {"bucket_mb": 64},  # the tiny model's gradients fit in one
            "many buckets": {"bucket_mb": replicated / 4 / 2**20},  # a quarter of the replicated gradients each
            # the cost model's size, which holds at most an eighth of the graph's gradients (BUCKET_SHARE)
            "cost model": {},
            "unscheduled": {"disable_passes": ["schedule"]},
        }
        results = {}
        compiled = {}
        for name, opts in variants.items():
            m = copy.deepcopy(model)
            compiled[name] = cm = moecc.compile(m, ep=world, **opts)
            results[name] = _grads(cm, batches[rank])
        base_loss, base = results["unscheduled"]
        for name in ("one bucket", "many buckets", "cost model"):
            loss, grads = results[name]
            assert torch.equal(loss, base_loss), name
            assert grads.keys() == base.keys(), name
            for k in base:  # bucketing changes what travels together, never the sums
                torch.testing.assert_close(
                    grads[k], base[k], rtol=0, atol=0, msg=lambda m, k=k, n=name: f"{n} {k}: {m}"
                )
        one = compiled["one bucket"].session.counters()
        many = compiled["many buckets"].session.counters()
        assert one["schedule.buckets"] == 1 and one["schedule.bucketed_grads"] > 2, one
        assert many["schedule.buckets"] >= 3 and many["schedule.bucketed_grads"] > 2 * many["schedule.buckets"], many
        by_cost = compiled["cost model"].session.counters()
        assert by_cost["schedule.buckets"] >= 2, by_cost
        assert "schedule.buckets" not in compiled["unscheduled"].session.counters()
        # and the scheduled program trains like eager on the global batch (the DDP contract)
        cm = moecc.compile(copy.deepcopy(model), ep=world)
        ref = copy.deepcopy(model)
        opts = (torch.optim.SGD(cm.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1))
        testing.step_against_eager(cm, ref, opts, batches, rank, cm.session.mesh.ep_index, build.__module__)
        # every rank issues the same collectives in the same order
        orders = [c.plan.get("collective_order") for c in cm.session.contexts]
        gathered: list = [None] * world
        dist.all_gather_object(gathered, orders)
        assert all(g == gathered[0] for g in gathered), gathered
        assert any("all_reduce" in op for o in orders if o for op in o.get("backward", [])), orders
        torch._dynamo.reset()


def test_gradient_buckets_give_the_unscheduled_gradients() -> None:
    testing.spawn(_bucketed_like_unscheduled, 2, backend="gloo")


def _step(cm, ids: torch.Tensor, repeats: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """A training step's loss, gradients and the peak memory of its compiled graphs: the median over `repeats`
    steps (the measured peak of one program varies by a tensor or so between steps: 634 554 or 635 962 bytes
    for the same one)."""
    from moecc.profile import graph_memory

    peaks = []
    for _ in range(repeats):
        with graph_memory() as mem:
            loss, grads = _grads(cm, ids)
        peaks.append(mem.peak)
    return loss, grads, sorted(peaks)[len(peaks) // 2]


def _positions(gm: torch.fx.GraphModule) -> dict[str, int]:
    return {n.name: i for i, n in enumerate(gm.graph.nodes)}


def _op_counts(cm) -> collections.Counter[str]:
    """Ops of the forward and backward graphs that run."""
    graphs = [c.final_graphs[k] for c in cm.session.contexts for k in ("forward", "backward")]
    return collections.Counter(ir.op_name(n) for g in graphs for n in g.graph.nodes)


def _overlaps(gm: torch.fx.GraphModule, pred) -> list[str]:
    """Nodes matching pred that run between an all-to-all start and its wait."""
    pos = _positions(gm)
    spans = [
        (pos[n.name], pos[w.name])
        for n in gm.graph.nodes
        if n.target is torch.ops.moecc.all_to_all_rows_start.default
        for w in n.users
    ]
    return [n.name for n in gm.graph.nodes if pred(n) and any(a < pos[n.name] < b for a, b in spans)]


def _chunked_like_unscheduled(rank: int, world: int) -> None:

    T = 22  # tokens per rank: 3 chunks of 8, 7 and 7
    model, (ids,) = deepseek_style.build(seed=0, tokens=T)
    gen = torch.Generator().manual_seed(11)
    batch = [torch.randint(0, 64, ids.shape, generator=gen) for _ in range(world)][rank]
    skewed = copy.deepcopy(model)
    for m in skewed.modules():  # every token picks rank 0's experts: rank 1 receives nothing in any chunk
        if isinstance(m, deepseek_style.DeepSeekStyleMoE):
            m.e_score_correction_bias[: m.num_experts // world] = 10.0
    for routing, base_model in (("uniform", model), ("skewed", skewed)):
        variants = {
            "unscheduled": {"disable_passes": ["schedule"]},
            "cost model": {},
            "3 chunks": {"chunks": 3},  # top-4 over ep = 2: exchange="auto" pads
            "3 chunks, counted": {"chunks": 3, "exchange": "counted"},  # row counts through the host
        }
        out = {}
        for name, opts in variants.items():
            cm = moecc.compile(copy.deepcopy(base_model), ep=world, **opts)
            _grads(cm, batch)  # compiles
            out[name] = (cm, *_step(cm, batch, repeats=3))
        base_cm, base_loss, base_grads, base_peak = out["unscheduled"]
        assert base_peak >= batch.numel() * 64 * 4, base_peak  # at least the logits the graph returns
        for name in ("cost model", "3 chunks", "3 chunks, counted"):
            cm, loss, grads, peak = out[name]
            msg = f"{routing} routing, {name}"
            torch.testing.assert_close(loss, base_loss, rtol=1e-6, atol=0, msg=msg)
            assert grads.keys() == base_grads.keys(), msg
            for k in base_grads:  # chunks sum expert gradients in another order: equal up to rounding
                torch.testing.assert_close(
                    grads[k], base_grads[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k, msg=msg: f"{msg} {k}: {m}"
                )
            # the memory bound: at most 10% above the unscheduled program
            assert peak <= 1.10 * base_peak, (msg, peak, base_peak)
        # the unscheduled program is the one before this pass; the scheduled one splits every all-to-all
        ops = {name: _op_counts(cm) for name, (cm, *_) in out.items()}
        assert ops["unscheduled"]["moecc.all_to_all_rows"] > 0 and not ops["unscheduled"]["moecc.all_to_all_rows_start"]
        for name in ("cost model", "3 chunks", "3 chunks, counted"):
            assert ops[name]["moecc.all_to_all_rows_start"] > 0 and not ops[name]["moecc.all_to_all_rows"], name
        exchanges = {
            name: set(c.plan["exchange"].values()) for name, (cm, *_) in out.items() for c in cm.session.contexts
        }
        assert exchanges["3 chunks"] == {"padded"} and exchanges["3 chunks, counted"] == {"counted"}, exchanges
        chunked = out["3 chunks"][0]
        assert chunked.session.counters()["schedule.chunked_regions"] == 2
        # the chunks' expert weight gradients are summed in the dW GEMMs' accumulator, not by adds (two weights
        # a region, 2 regions, the 2 later chunks of 3 each)
        assert chunked.session.counters()["schedule.accumulated_wgrads"] == 2 * 2 * 2, chunked.session.counters()
        assert ops["3 chunks"]["moecc.ep_plan"] == 3 * ops["unscheduled"]["moecc.ep_plan"]
        (ctx,) = chunked.session.contexts
        assert set(ctx.plan["chunks"].values()) == {3}
        fwd, bwd = ctx.final_graphs["forward"], ctx.final_graphs["backward"]
        # overlap: the shared expert runs while rows travel; chunk 1 is dispatched before chunk 0 computes;
        # weight-gradient GEMMs run while an all-to-all is in flight
        shared = [
            n
            for n in fwd.graph.nodes
            if n.target is torch.ops.aten.mm.default
            and "shared" in str(n.meta.get("stack_trace", "")) + str(n.meta.get("nn_module_stack", ""))
        ]
        assert shared and _overlaps(fwd, lambda n, shared=shared: n in shared), (
            "the shared expert does not overlap an all-to-all"
        )
        pos = _positions(fwd)
        starts = [n for n in fwd.graph.nodes if n.target is torch.ops.moecc.all_to_all_rows_start.default]
        first_gemm = next(n for n in fwd.graph.nodes if n.target is torch.ops.moecc.grouped_mm.default)
        chunk_of = lambda n: (n.meta.get("custom") or {}).get("moecc_chunk")  # noqa: E731
        assert any(chunk_of(n) == 1 and pos[n.name] < pos[first_gemm.name] for n in starts), "chunk 1 dispatched late"
        assert _overlaps(bwd, lambda n: n.target is torch.ops.moecc.grouped_mm_wgrad.default)
        # the same order on every rank
        orders = [c.plan["collective_order"] for c in chunked.session.contexts]
        gathered: list = [None] * world
        dist.all_gather_object(gathered, orders)
        assert all(g == gathered[0] for g in gathered), gathered
        torch._dynamo.reset()
    # at most one chunk per token
    few = moecc.compile(deepseek_style.build(seed=0, tokens=6)[0], ep=world, chunks=8)
    few_ids = batch[:, :3]  # 6 tokens per rank
    _grads(few, few_ids)
    (ctx,) = few.session.contexts
    assert set(ctx.plan["chunks"].values()) == {6}, ctx.plan["chunks"]
    assert any("chunks=8 (option), at most one per token (6)" in note for note in ctx.notes), ctx.notes


def test_token_chunks_and_overlap_keep_gradients_and_memory() -> None:
    testing.spawn(_chunked_like_unscheduled, 2, timeout_s=300, backend="gloo")


def test_reorder_overlaps_waits_and_keeps_mutations_in_place() -> None:
    from moecc.passes import schedule_overlap as so

    aten = torch.ops.aten
    g = torch.fx.Graph()
    x, buf, counts = g.placeholder("x"), g.placeholder("buf"), g.placeholder("counts")
    start = g.call_function(torch.ops.moecc.all_to_all_rows_start.default, (x, counts, counts, "ep"))
    rows = g.call_function(torch.ops._c10d_functional.wait_tensor.default, (start,))
    reads = g.call_function(aten.mul.Tensor, (buf, rows))  # reads buf before it is overwritten
    shared = g.call_function(aten.mm.default, (x, x))  # independent of the rows: fills the wait
    copy = g.call_function(aten.copy_.default, (buf, x))  # an input mutation: a barrier
    after = g.call_function(aten.add.Tensor, (buf, 1))  # independent of the rows, after the mutation
    g.output((reads, after, shared))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    for n, us in ((start, 100.0), (reads, 1.0), (copy, 1.0), (after, 1.0), (shared, 50.0)):
        ir.set_facts(n, cost_us=us)
    _, scheduled = so.reorder(gm)
    order = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert order.index("aten.mm.default") < order.index("_c10d_functional.wait_tensor.default"), order
    # the mutation stays between what the graph had before and after it
    assert order.index("aten.mul.Tensor") < order.index("aten.copy_.default") < order.index("aten.add.Tensor"), order
    _, total = so.predicted_timeline(gm)
    assert total == pytest.approx(100.0 + 3.0), total  # the GEMM hidden behind the all-to-all
    assert scheduled.total == total and scheduled.events == so.predicted_timeline(gm)[0]


def test_predicted_timeline_has_a_host_lane() -> None:
    """The host issues nodes one after another: where its time per node exceeds the device's, it sets the
    pace; a view costs host time only; a blocking op holds the host until it is done; the dumps' trace has the
    host's track beside compute and comm."""
    from moecc.passes import schedule_overlap as so

    aten = torch.ops.aten
    g = torch.fx.Graph()
    x = g.placeholder("x")
    y = x
    for _ in range(10):
        y = g.call_function(aten.add.Tensor, (y, 1))
    v = g.call_function(aten.t.default, (y,))
    big = g.call_function(aten.mm.default, (v, v))
    plan = g.call_function(torch.ops.moecc.ep_plan.default, (big,))  # blocking: a copy to the host
    g.output((plan,))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    for n in nodes:
        ir.set_facts(n, cost_us=1.0, host_us=5.0)
    ir.set_facts(v, cost_us=0.0, host_us=2.0)
    ir.set_facts(big, cost_us=100.0, host_us=5.0)
    ir.set_facts(plan, cost_us=10.0, host_us=5.0)
    events, total = so.predicted_timeline(gm)
    # 10 adds: the host's 50 us, the device's 10; the view 2 us of host; the mm starts once issued (57 us)
    # and runs 100 us; ep_plan waits for it and holds everything for 10 us
    assert total == pytest.approx(50 + 2 + 5 + 100 + 10), total
    lanes = {e["tid"] for e in events if e["name"] == v.name}
    assert lanes == {2}, "a view takes host time only"
    for n in nodes:
        ir.set_facts(n, host_us=0.0)
    assert so.predicted_timeline(gm)[1] == pytest.approx(10 + 100 + 10), "without host costs: the device's time"
    # the costs come from the profile: views and ops their own figures, multi-kernel ops theirs by name
    p = dataclasses.replace(cost.PROFILES["h200"], host_op=4e-6, host_view=1e-6, host_ops=(("moecc.ep_plan", 30e-6),))
    assert cost.host_us(nodes[0], p) == pytest.approx(4.0) and cost.host_us(v, p) == pytest.approx(1.0)
    assert cost.host_us(plan, p) == pytest.approx(30.0)
    back = cost.HardwareProfile.from_json(p.to_json(), source="x")
    assert back.host_ops == p.host_ops and back.host_op == p.host_op


def test_chunk_count_follows_the_cost_model() -> None:
    from moecc.passes import schedule_overlap as so

    # replayed from a CUDA graph (no host lane): each chunk's ops cost the device's gap only
    h200 = cost.replayed(cost.PROFILES["h200"])
    deepseek = dict(T=8192, H=7168, K=8, elt=2, gemm_flops=2 * 8192 * 8 * 3 * 7168 * 2048, experts=64, nodes=40)
    n, one, best = so.choose_chunks(h200, ep=4, **deepseek)
    assert 1 < n <= so.MAX_CHUNKS and best < one  # a layer whose all-to-alls take as long as its GEMMs
    assert so.choose_chunks(h200, ep=1, **deepseek)[0] == 1  # nothing to overlap
    tiny = dict(T=16, H=32, K=2, elt=4, gemm_flops=2 * 16 * 2 * 3 * 32 * 16, experts=2, nodes=40)
    assert so.choose_chunks(cost.PROFILES["cpu"], ep=2, **tiny)[0] == 1  # per-op overhead dominates
    for bad in (0, 9, True, 2.0):
        with pytest.raises(MoeccError, match=r"chunks=.* must be an integer from 1 to 8"):
            moecc.compile(mixtral_style.build()[0], chunks=bad)


def test_attention_and_fused_op_costs() -> None:

    from torch.fx.experimental.proxy_tensor import make_fx

    from moecc import ops

    B, H, S, D = 2, 4, 16, 8
    q = torch.randn(B, H, S, D, requires_grad=True)

    for causal in (False, True):

        def attention(q: torch.Tensor, causal: bool = causal) -> tuple[torch.Tensor, ...]:
            out = torch.nn.functional.scaled_dot_product_attention(q, q * 2, q * 3, is_causal=causal)
            return torch.autograd.grad(out.sum(), q)

        g = make_fx(functools.partial(attention, causal=causal))(q)
        flops = {str(n.target): float(cost.flops_formula(n)) for n in g.graph.nodes if "scaled_dot" in str(n.target)}
        fwd = 4 * B * H * S * S * D * (0.5 if causal else 1.0)  # QK^T and AV
        assert sorted(flops.values()) == [fwd, 2.5 * fwd], flops
        # at the profile's attention rates where calibrate measured them (forward and backward apart), else at
        # the dense GEMM rate
        dense = dataclasses.replace(
            cost.PROFILES["h200"], mem_bw=1e30, op_overhead=0.0, attention_flops=None, attention_bwd_flops=None
        )
        measured = dataclasses.replace(dense, attention_flops=dense.gemm_flops / 2, attention_bwd_flops=1e12)
        for n in g.graph.nodes:
            if "scaled_dot" in str(n.target):
                f = flops[str(n.target)]
                assert cost.estimate_us(n, dense) == pytest.approx(1e6 * f / dense.gemm_flops)
                want = f / 1e12 if "backward" in str(n.target) else 2 * f / dense.gemm_flops
                assert cost.estimate_us(n, measured) == pytest.approx(1e6 * want)
    # the fused expert-parallel ops run at the profile's fused rate where it has one
    g = make_fx(lambda x, i, w: ops.ep_dispatch_gemm(x, i, w, 1, ""), tracing_mode="fake")(
        torch.randn(4096, 512), torch.randint(0, 8, (4096, 2)), torch.randn(8, 512, 1024)
    )
    (node,) = [n for n in g.graph.nodes if n.target is torch.ops.moecc.ep_dispatch_gemm.default]
    flops = 2 * 4096 * 2 * 512 * 1024
    base = dataclasses.replace(
        cost.PROFILES["h200"],
        fused_gemm_flops=None,
        mem_bw=1e30,
        op_overhead=0.0,
        rate_curves=(),  # single rates (the curves' own test is below)
        fused_ep_gemm_flops=(),
        fused_ep_rows=(),
    )
    slow = dataclasses.replace(base, fused_gemm_flops=base.grouped_gemm_flops / 4)
    assert cost.estimate_us(node, base) == pytest.approx(1e6 * flops / base.grouped_gemm_flops)
    assert cost.estimate_us(node, slow) == pytest.approx(4 * cost.estimate_us(node, base))
    # across ranks: the rate calibrate measured at that ep, with the transfers in it; an ep it did not measure
    # keeps the one-rank rate (and the transfer time as a floor)
    across = dataclasses.replace(slow, fused_ep_gemm_flops=((2, base.grouped_gemm_flops / 8),))
    assert cost.estimate_us(node, across, top_k=2, ep=2) == pytest.approx(8 * cost.estimate_us(node, base))
    assert cost.estimate_us(node, across, top_k=2, ep=4) == cost.estimate_us(node, slow, top_k=2, ep=4)
    assert cost.estimate_us(node, across) == cost.estimate_us(node, slow)  # one rank: the one-rank rate
    back = cost.HardwareProfile.from_json({k: v for k, v in across.to_json().items() if k != "source"}, "test")
    assert back.fused_ep_gemm_flops == across.fused_ep_gemm_flops


def test_rate_curves_charge_small_gemms_their_measured_rate() -> None:
    """A profile's GEMM rates by size: between measured points linear in log(size), below the smallest the
    smallest's time (a rate proportional to the size), beyond the largest its rate; a grouped GEMM node and a
    fused op node are charged at the rows per expert they get on average, a dense mm at its FLOPs, and a
    fused op across ranks at the rate measured there, moved along the one-rank curve."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from moecc import ops

    flat = dataclasses.replace(cost.PROFILES["h200"], rate_curves=(), mem_bw=1e30, op_overhead=0.0)
    curves = {"dense": [[1e9, 200e12], [1e12, 800e12]], "grouped": [[64, 100e12], [1024, 500e12]],
              "fused": [[64, 50e12], [1024, 400e12]]}  # fmt: skip
    p = cost.HardwareProfile.from_json({**flat.to_json(), "rate_curves": curves}, source="test")
    assert p.rate("grouped", 256) == pytest.approx(300e12)  # halfway in log(rows) from 64 to 1024
    assert p.rate("grouped", 32) == pytest.approx(50e12)  # half the smallest's rows: the same time
    assert p.rate("grouped", 1e6) == 500e12 and p.rate("dense", 1e15) == 800e12
    assert p.rate("dense", math.sqrt(1e9 * 1e12)) == pytest.approx(500e12)
    assert flat.rate("grouped", 8) == flat.grouped_gemm_flops and flat.rate("dense", 1) == flat.gemm_flops
    assert flat.rate("fused", 8) == flat.fused_gemm_flops  # no curve: the single rates, whatever the size
    # below the smallest dense probe its rate, not its time: a tiny matmul costs what its bytes cost
    assert p.rate("dense", 1e6) == 200e12
    grouped_only = dataclasses.replace(p, rate_curves=(("grouped", dict(p.rate_curves)["grouped"]),))
    no_fused = dataclasses.replace(grouped_only, fused_gemm_flops=None)
    assert no_fused.rate("fused", 256) == p.rate("grouped", 256)  # no fused rate of any kind: the grouped curve
    back = cost.HardwareProfile.from_json({k: v for k, v in p.to_json().items() if k != "source"}, "x")
    assert back.rate_curves == p.rate_curves

    E, H, N = 8, 512, 1024
    for rows in (64, 256):  # rows per expert
        x, w = torch.randn(E * rows, H), torch.randn(E, H, N)
        offs = torch.arange(1, E + 1, dtype=torch.int32) * rows
        g = make_fx(lambda x, w, o: ops.grouped_mm(x, w, o), tracing_mode="fake")(x, w, offs)
        (node,) = [n for n in g.graph.nodes if n.target is torch.ops.moecc.grouped_mm.default]
        flops = 2.0 * E * rows * H * N
        assert cost.estimate_us(node, p) == pytest.approx(1e6 * flops / p.rate("grouped", rows))
        assert cost.estimate_us(node, flat) == pytest.approx(1e6 * flops / flat.grouped_gemm_flops)
        # at ep = 2 the rows are a receive buffer with room for twice what a rank gets on average: half of them
        # count, at half the rows' rate
        half = 1e6 * flops / 2 / p.rate("grouped", rows / 2)
        assert cost.estimate_us(node, p, ep=2) == pytest.approx(half)
    g = make_fx(torch.mm, tracing_mode="fake")(torch.randn(1000, 1000), torch.randn(1000, 1000))
    (mm,) = [n for n in g.graph.nodes if n.op == "call_function"]
    assert cost.estimate_us(mm, p) == pytest.approx(1e6 * 2e9 / p.rate("dense", 2e9))
    g = make_fx(torch.mm, tracing_mode="fake")(torch.randn(500, 1000), torch.randn(1000, 500))
    (small,) = [n for n in g.graph.nodes if n.op == "call_function"]
    assert cost.estimate_us(small, p) == pytest.approx(1e6 * 5e8 / 200e12)  # 0.5 GFLOP: the smallest probe's rate

    T, K = 4096, 2  # T*K/E = 1024 rows per expert in one rank
    g = make_fx(lambda x, i, w: ops.ep_dispatch_gemm(x, i, w, 1, ""), tracing_mode="fake")(
        torch.randn(T, H), torch.randint(0, E, (T, K)), torch.randn(E, H, N)
    )
    (node,) = [n for n in g.graph.nodes if n.target is torch.ops.moecc.ep_dispatch_gemm.default]
    flops = 2.0 * T * K * H * N
    assert cost.estimate_us(node, p) == pytest.approx(1e6 * flops / 400e12)
    # measured across 2 ranks at 256 rows per expert (where the one-rank curve says 225 TFLOP/s) at 100
    # TFLOP/s: at 1024 rows (400 on the curve), 400 / 225 of that
    across = dataclasses.replace(p, fused_ep_gemm_flops=((2, 100e12),), fused_ep_rows=((2, 256.0),), a2a_bw=1e30)
    assert p.rate("fused", 256) == pytest.approx(225e12)
    assert across.fused_rate(1024, 2) == pytest.approx(100e12 * 400 / 225)
    assert across.fused_rate(1024, 4) == pytest.approx(400e12)  # an ep not measured: the one-rank curve
    assert cost.estimate_us(node, across, top_k=K, ep=2) == pytest.approx(1e6 * flops / across.fused_rate(1024, 2))
    # no rows recorded with the rate across ranks (a profile from before the curves): that rate as it is
    old = dataclasses.replace(across, fused_ep_rows=())
    assert old.fused_rate(64, 2) == 100e12
    for bad in ({"dense": []}, {"sparse": [[1, 1e12]]}, {"grouped": [[0, 1e12]]}):
        with pytest.raises(ValueError, match="rate_curves"):
            cost.HardwareProfile.from_json({**flat.to_json(), "rate_curves": bad}, source="test")


def test_chunks_weigh_the_grouped_gemm_rate_at_their_rows() -> None:
    """Token chunks cut the rows each expert's GEMM gets; where the measured rate falls with them, the cost
    model chooses fewer chunks than the single large-size rate would have it choose."""
    from moecc.passes import schedule_overlap as so

    flat = dataclasses.replace(cost.replayed(cost.PROFILES["h200"]), rate_curves=())  # no host lane
    # the grouped GEMM's rate halves with every halving of the rows below 768 per expert
    curve = tuple((768.0 / 2**i, flat.grouped_gemm_flops / 2**i) for i in range(4, -1, -1))
    steep = dataclasses.replace(flat, rate_curves=(("grouped", curve),))
    layer = dict(T=8192, H=7168, K=8, elt=2, gemm_flops=2 * 8192 * 8 * 3 * 7168 * 2048, experts=64, nodes=40)
    n_flat, _, _ = so.choose_chunks(flat, ep=4, **layer)
    n_steep, one, best = so.choose_chunks(steep, ep=4, **layer)
    assert n_flat > 1 and n_steep < n_flat, (n_flat, n_steep)
    # one chunk (1024 rows per expert) is at the top of the curve: the same time with either profile
    assert so.pipeline_us(steep, n=1, ep=4, **layer) == pytest.approx(so.pipeline_us(flat, n=1, ep=4, **layer))


def test_profile_curves_interpolate_and_stay_monotone() -> None:
    p = cost.HardwareProfile.from_json(
        {
            "name": "t",
            "gemm_flops": 1e12,
            "grouped_gemm_flops": 1e12,
            "mem_bw": 1e11,
            "a2a_bw": 1e10,
            "a2a_latency": 1e-5,
            # a noisy probe (the 1 KiB point slower than 4 KiB) is capped by the larger message's time
            "curves": {"all_reduce": [[4096, 2e-5], [1024, 5e-5], [1 << 20, 1e-4]]},
        },
        source="test",
    )
    assert p.comm_s("all_reduce", 1024) == pytest.approx(2e-5)
    assert p.comm_s("all_reduce", 100) == pytest.approx(2e-5)  # below the smallest probe: its time
    mid = (4096 + (1 << 20)) / 2
    assert p.comm_s("all_reduce", mid) == pytest.approx(6e-5)
    assert p.comm_s("all_reduce", 2 << 20) == pytest.approx(1e-4 + 8e-5 * (1 << 20) / ((1 << 20) - 4096))
    assert p.comm_s("all_to_all", 1e6) == pytest.approx(1e-5 + 1e6 / 1e10)  # no curve: latency + bytes / bw
    assert (1 << 20) <= p.bucket_bytes() <= (64 << 20)


def test_calibrated_profile_is_picked_up_by_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moecc import calibrate

    path = calibrate.calibrate(tmp_path / "p.json", world_size=2, device="cpu", quick=True)
    data = json.loads(path.read_text())
    assert data["name"] == "calibrated:cpu:2" and data["gemm_flops"] > 0 and data["mem_bw"] > 0
    assert data["fused_ep_gemm_flops"] == {}  # the fused ops across ranks need GPUs (symmetric memory)
    for kind in ("all_to_all", "all_reduce"):
        pts = data["curves"][kind]
        assert len(pts) == 4 and all(t > 0 for _, t in pts)
    loaded = cost.load_profile(path)
    times = [t for _, t in dict(loaded.curves)["all_to_all"]]
    assert times == sorted(times)

    model, (ids,) = mixtral_style.build(seed=0)
    cm = moecc.compile(model, profile=path)
    cm(ids)
    assert {c.profile.source for c in cm.session.contexts} == {str(path)}
    assert set(data["rate_curves"]) == {"dense", "grouped"}  # "fused" needs a GPU
    for kind, pts in data["rate_curves"].items():
        assert len(pts) == 3 and all(size > 0 and rate > 0 for size, rate in pts), (kind, pts)
    slow = dict(data, gemm_flops=data["gemm_flops"] / 1000, grouped_gemm_flops=data["grouped_gemm_flops"] / 1000)
    slow["rate_curves"] = {k: [[x, r / 1000] for x, r in pts] for k, pts in data["rate_curves"].items()}
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    monkeypatch.setenv(cost.PROFILE_ENV, str(tmp_path / "slow.json"))
    cm_slow = moecc.compile(copy.deepcopy(model))
    cm_slow(ids)
    assert {c.profile.source for c in cm_slow.session.contexts} == {str(tmp_path / "slow.json")}
    fast_us = sum(c.plan["predicted_us"]["forward"] for c in cm.session.contexts)
    slow_us = sum(c.plan["predicted_us"]["forward"] for c in cm_slow.session.contexts)
    assert slow_us > 5 * fast_us, (fast_us, slow_us)  # the GEMMs dominate once they are 1000x slower

    (tmp_path / "bad.json").write_text('{"name": "x"}')
    with pytest.raises(MoeccError, match=r"bad.json.*missing.*moecc calibrate"):
        moecc.compile(model, profile=tmp_path / "bad.json")


def test_profile_step_compares_every_node_with_its_prediction(tmp_path: Path) -> None:
    model, (ids,) = mixtral_style.build(seed=0)
    cm = moecc.compile(model, profile_nodes=True, dump_dir=tmp_path / "dumps")

    def step() -> None:
        testing.lm_loss(cm(ids), ids).backward()

    with pytest.raises(ValueError, match="run the step once"):
        moecc.profile_step(cm, step, tmp_path)
    step()
    res = moecc.profile_step(cm, step, tmp_path)
    ops = res["ops"]
    # the expert GEMMs of both MoE layers, forward (2 per layer) and backward (2 dX per layer), were measured
    assert ops["moecc.grouped_mm"]["nodes"] == 8 and ops["moecc.grouped_mm"]["measured_us"] > 0
    assert ops["moecc.grouped_mm_wgrad"]["nodes"] == 4
    assert all(r["predicted_us"] >= 0 and r["measured_us"] > 0 for r in ops.values())
    assert res["wall_us"] > 0 and res["predicted_us"] > 0 and res["error"] > -1
    assert 0 < res["host_us"] <= res["wall_us"] and res["predicted_host_us"] == 0  # no host lane on the CPU
    # the step's times come from a run without the profiler; the host costs are scaled to it
    assert 0 < res["profiled_host_us"] <= res["profiled_wall_us"]
    assert res["host_scale"] == pytest.approx(res["host_us"] / res["profiled_host_us"])
    assert res["host_less_per_node_us"] == 0 and res["host_ranges"] >= sum(r["nodes"] for r in ops.values())
    # against the host's time for the step without node ranges, what a range costs comes off every node
    again = moecc.profile_step(cm, step, tmp_path, host_reference_us=0.5 * res["host_us"])
    assert again["host_less_per_node_us"] == pytest.approx(
        max(again["host_us"] - 0.5 * res["host_us"], 0.0) / again["host_ranges"]
    )
    with torch.profiler.profile() as prof:
        step()
    events = prof.events()
    full, less = profile.host_costs(cm, events), profile.host_costs(cm, events, 1.0, 50.0)
    assert max(full["host_op"] - 50e-6, 0.0) - 1e-12 <= less["host_op"] <= full["host_op"]
    none = profile.host_costs(cm, events, 1.0, 1e12)
    assert none["host_op"] == none["host_view"] == 0 and not any(none["host_ops"].values())
    assert res["busy_us"] == pytest.approx(sum(r["measured_us"] for r in ops.values()))
    table = (tmp_path / "timeline.md").read_text()
    assert "| moecc.grouped_mm | 8 |" in table and "error" in table and "to issue the step" in table
    # the host's time per node, as a profile's host fields: the moecc ops by the name the cost model uses
    host = res["host_costs"]
    assert host["host_op"] > 0 and host["host_view"] > 0
    assert {"moecc.grouped_mm", "moecc.route_permute", "moecc.unpermute_combine"} <= set(host["host_ops"])
    p = cost.HardwareProfile.from_json({**cost.PROFILES["cpu"].to_json(), **host}, source="step")
    assert dict(p.host_ops)["moecc.grouped_mm"] == host["host_ops"]["moecc.grouped_mm"] > 0
    trace = json.loads((tmp_path / "measured.json").read_text())
    assert any(e.get("name", "").startswith("moecc/") for e in trace["traceEvents"])
    plain = moecc.compile(copy.deepcopy(model))
    with pytest.raises(ValueError, match="profile_nodes=True"):
        moecc.profile_step(plain, step)


def test_measured_time_is_the_ranges_own_kernels() -> None:
    import types

    from moecc.profile import PREFIX, measured_us

    cpu, gpu = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def ev(name, device, device_us, cpu_us):
        return types.SimpleNamespace(name=name, device_type=device, device_time_total=device_us, cpu_time_total=cpu_us)

    events = [
        ev(PREFIX + "0/forward/mm", cpu, 40.0, 9.0),  # the range: its ops' kernels took 40 us
        ev(PREFIX + "0/forward/mm", gpu, 300.0, 0.0),  # its span on the device timeline: not its time
        ev(PREFIX + "0/forward/mm", cpu, 60.0, 7.0),  # the same node in a second graph call
        ev("aten::mm", cpu, 40.0, 5.0),  # not a node range
    ]
    assert measured_us(events, cuda=True) == {PREFIX + "0/forward/mm": 100.0}
    assert measured_us(events, cuda=False) == {PREFIX + "0/forward/mm": 16.0}


def _order_differs(rank: int, world: int) -> None:
    import moecc.passes.schedule_overlap as so

    if rank == 1:  # as if this rank's graph issued its collectives in another order
        real = so.collective_order
        so.collective_order = lambda gm, mesh: list(reversed(real(gm, mesh)))
    model, (ids,) = mixtral_style.build(seed=0)
    cm = moecc.compile(model, ep=world)
    with pytest.raises(MoeccError, match=r"collective order of graph 0 differs across ranks: rank\(s\) \[1\]"):
        cm(ids)


def test_a_rank_with_another_collective_order_is_named() -> None:
    testing.spawn(_order_differs, 2, backend="gloo")


def _profile_differs(rank: int, world: int, folder: str) -> None:
    path = Path(folder) / f"rank{rank}.json"  # each rank its own file; rank 1's GEMMs twice as fast
    data = cost.PROFILES["cpu"].to_json()
    data.pop("source")
    data["gemm_flops"] *= 1 + rank
    path.write_text(json.dumps(data))
    os.environ[cost.PROFILE_ENV] = str(path)  # not an option: compile's options agree across ranks
    model, (ids,) = mixtral_style.build(seed=0)
    cm = moecc.compile(model, ep=world)
    with pytest.raises(MoeccError, match=r"hardware profile .* differs across ranks: rank\(s\) \[1\]"):
        cm(ids)


def test_a_rank_with_another_hardware_profile_is_named(tmp_path: Path) -> None:
    testing.spawn(_profile_differs, 2, str(tmp_path), backend="gloo")


def _wgrad_sum_graph(fn, *inputs):
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    gm = torch.fx.symbolic_trace(fn)
    FakeTensorProp(gm).propagate(*inputs)
    return gm


@pytest.mark.parametrize("case", ["plain", "transposed", "promoted", "read_twice"])
def test_chunk_weight_gradient_sums_fold_into_the_accumulator_only_where_exact(case: str) -> None:
    """accumulate_wgrads turns add(s, dW) into dW(..., acc=s) (through the nn.Linear layout's transpose), with
    the same values; not where the add promotes the dtype or the GEMM's result is read elsewhere."""
    from moecc.passes import schedule_overlap

    wg = torch.ops.moecc.grouped_mm_wgrad.default
    gen = torch.Generator().manual_seed(3)
    x, dy = torch.randn(10, 6, generator=gen), torch.randn(10, 5, generator=gen)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)
    if case == "plain":
        s = torch.randn(3, 6, 5, generator=gen)
        fn = lambda x, dy, offs, s: torch.ops.aten.add.Tensor(s, wg(x, dy, offs, scale=0.5))  # noqa: E731
    elif case == "transposed":
        s = torch.randn(3, 5, 6, generator=gen)
        fn = lambda x, dy, offs, s: torch.ops.aten.add.Tensor(  # noqa: E731
            torch.ops.aten.transpose.int(wg(x, dy, offs), 1, 2), s
        )
    elif case == "promoted":
        x, dy = x.bfloat16(), dy.bfloat16()
        s = torch.randn(3, 6, 5, generator=gen)  # float32 + bf16 -> float32: not the GEMM's dtype
        fn = lambda x, dy, offs, s: torch.ops.aten.add.Tensor(s, wg(x, dy, offs))  # noqa: E731
    else:
        s = torch.randn(3, 6, 5, generator=gen)

        def fn(x, dy, offs, s):
            w = wg(x, dy, offs)
            return torch.ops.aten.add.Tensor(s, w), w

    want = fn(x, dy, offs, s)
    gm = _wgrad_sum_graph(fn, x, dy, offs, s)
    folded = schedule_overlap.accumulate_wgrads(gm)
    got = gm(x, dy, offs, s)
    assert folded == (1 if case in ("plain", "transposed") else 0)
    adds = [n for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor]
    assert len(adds) == 1 - folded
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b)


def test_padded_exchange_costs_every_token_and_no_host_copy() -> None:
    """exchange="padded": a row all-to-all moves every token to every other rank (the counted one, the tokens
    with an expert there, expected under uniform routing); the padded plan runs no collective and does not
    hold the host (its counts need no device)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from moecc import ops
    from moecc.passes import schedule_overlap as so

    T, K, E, H, ep = 64, 2, 8, 16, 4
    counts = torch.full((ep,), T)
    rows = make_fx(lambda x, c: ops.all_to_all_rows_start(x, c, c, "ep"), tracing_mode="fake")(
        torch.randn(ep * T, H), counts
    )
    (a2a,) = [n for n in rows.graph.nodes if n.target is torch.ops.moecc.all_to_all_rows_start.default]
    row_bytes = H * 4
    assert cost.comm_bytes(a2a, K, padded=True) == pytest.approx(T * (ep - 1) * row_bytes)
    assert cost.comm_bytes(a2a, K) == pytest.approx(T * cost.expected_destinations(ep, K) * (ep - 1) / ep * row_bytes)
    h200 = cost.PROFILES["h200"]
    assert cost.estimate_us(a2a, h200, top_k=K, padded=True) > cost.estimate_us(a2a, h200, top_k=K)
    g = torch.fx.Graph()
    i = g.placeholder("idx")
    counted = g.call_function(torch.ops.moecc.ep_plan.default, (i, E, ep, "ep"))
    padded = g.call_function(torch.ops.moecc.ep_plan.default, (i, E, ep, "ep", True))
    g.output((counted, padded))
    assert not cost.is_padded_plan(counted) and cost.is_padded_plan(padded)
    assert cost.collective_kind(counted) == "all_to_all" and cost.collective_kind(padded) is None
    assert so._kind(counted) == "blocking" and so._kind(padded) == "compute"
    layer = dict(T=8192, H=2048, K=6, elt=2, gemm_flops=2 * 8192 * 6 * 3 * 2048 * 1408, experts=16, nodes=60)
    assert so.pipeline_us(h200, n=1, ep=4, padded=True, **layer) > so.pipeline_us(h200, n=1, ep=4, **layer)
    with pytest.raises(MoeccError, match=r"exchange='sometimes' \(or MOECC_EXCHANGE\) is not one of"):
        moecc.compile(mixtral_style.build()[0], exchange="sometimes")


def test_auto_exchange_pads_where_padding_costs_less_than_counting() -> None:
    """exchange="auto" weighs the rows padding adds to a layer's all-to-alls (four hidden-wide, three of the
    routing's) against what counting costs (the count exchange and the host synchronisation): on the H200
    profile padding wins over 2 ranks of 8192 tokens at top-1, 2 and 6, as measured on 2 x H200; over a slow
    link with few experts a token over 8 ranks counting wins; a token count that may change counts."""
    import types

    from moecc.options import CompileOptions
    from moecc.passes.shard_experts import choose_exchange

    h200, row = cost.PROFILES["h200"], 2048 * 2
    for k in (1, 2, 6):
        adds, saves = cost.exchange_costs_us(h200, 8192, row, 2, k)
        assert 0 < adds <= saves, (k, adds, saves)
    # what padding adds is what it sends over the needed rows: 4 x 4096 extra rows of 4 KiB at top-1
    adds1 = cost.exchange_costs_us(h200, 8192, row, 2, 1)[0]
    assert adds1 == pytest.approx(1e6 * 4 * 4096 * row / h200.a2a_bw, rel=0.01)
    assert cost.exchange_costs_us(h200, 8192, row, 2, 8)[0] < adds1 / 50  # top-8: 1 in 256 tokens pads
    nosync = dataclasses.replace(h200, host_sync=0.0)
    assert cost.exchange_costs_us(nosync, 8192, row, 2, 1)[1] == pytest.approx(1e6 * h200.comm_s("all_to_all", 16))
    slow = dataclasses.replace(h200, a2a_bw=25e9)  # 200 Gb/s a rank, across hosts
    adds, saves = cost.exchange_costs_us(slow, 8192, row, 8, 2)
    assert adds > saves, (adds, saves)
    ctx = types.SimpleNamespace(options=CompileOptions(exchange="auto"), profile=h200)
    assert choose_exchange(ctx, 2, 2, 8192, row)[0] is True
    ctx.profile = slow
    padded, why = choose_exchange(ctx, 8, 2, 8192, row)
    assert not padded and "4.27x the rows needed" in why, why
    ctx.options = CompileOptions(exchange="auto", cuda_graph=True)
    assert choose_exchange(ctx, 8, 2, 8192, row)[0] is True  # a replay needs it, whatever it costs
    ctx.options, ctx.profile = CompileOptions(exchange="auto"), h200
    env = torch.fx.experimental.symbolic_shapes.ShapeEnv()
    padded, why = choose_exchange(ctx, 2, 2, env.create_unbacked_symint(), row)
    assert not padded and "may change from step to step" in why and "data-dependent" in why, why
    # a token count from the input shapes (dynamic=True): equal on every rank by the per-call input check, and
    # priced at its traced value
    from torch._dynamo.source import ConstantSource

    T = env.create_symintnode(env.create_symbol(8192, ConstantSource("T")), hint=8192)
    padded, why = choose_exchange(ctx, 2, 2, T, row)
    assert padded and "decided at the traced 8192" in why, why
    assert choose_exchange(ctx, 8, 2, T, row)[1] == choose_exchange(ctx, 8, 2, 8192, row)[1] + why[why.index(" (the") :]
    ctx.options = CompileOptions(exchange="auto", check_inputs=False)
    padded, why = choose_exchange(ctx, 2, 2, T, row)
    assert not padded and "check_inputs=False" in why, why


def test_calibrate_takes_host_costs_from_a_profiled_step() -> None:
    """calibrate's host costs on a GPU node come from a profiled training step of a small model (as
    `moecc profile --host-costs-into`): per aten op, per view and per moecc op, forward and backward ones by
    their own names, in the form a profile takes. On the CPU the ops' own time is in them; only the form is
    checked here (tests/test_gpu.py checks the GPU's)."""
    from moecc import calibrate

    host = calibrate.measure_step_host(torch.device("cpu"), quick=True)
    assert set(host) == {"host_op", "host_view", "host_ops"}
    assert host["host_op"] > 0 and host["host_view"] >= 0
    ops = host["host_ops"]
    assert {"moecc.grouped_mm", "moecc.grouped_mm_wgrad", "moecc.route_permute"} <= set(ops), ops
    assert all(t > 0 for t in ops.values()), ops
    p = cost.HardwareProfile.from_json({**cost.PROFILES["h200"].to_json(), **host}, source="test")
    assert dict(p.host_ops) == pytest.approx(ops) and p.host_op == host["host_op"]
