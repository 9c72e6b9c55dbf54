"""`moecc.graph_step` and compile's cuda_graph option, on the CPU: what graph_step refuses before it would
capture (bad warm-up counts, optimizers that cannot be captured, a model off the GPU), and what cuda_graph=True
changes in the cost model (no host lane, so token chunks are weighed against the device's gaps only). The
capture and replay themselves run on a GPU: tests/test_gpu.py and tests/test_gpu_ep.py."""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import pytest
import torch
import torch.fx as fx

import moecc
from moecc import cost, ir, testing
from moecc.backends import torch_backend
from moecc.examples import mixtral_style
from moecc.options import MoeccError
from moecc.passes.fuse_experts import refuse_host_sized_exchanges


def _train(cm: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    loss = testing.lm_loss(cm(ids), ids)
    loss.backward()
    return loss.detach()


def test_graph_step_refuses_what_it_cannot_capture() -> None:
    model, _ = mixtral_style.build(seed=0)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(MoeccError, match=r"graph_step\(_train\): warmup=.* must be an integer >= 1"):
            moecc.graph_step(_train, model, warmup=bad)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # capturable defaults to False
    with pytest.raises(MoeccError, match=r"AdamW param group 0 has capturable=False.*capturable=True"):
        moecc.graph_step(_train, model, optimizers=[opt])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
    with pytest.raises(MoeccError, match=r"parameters of MixtralStyleLM are on \['cpu'\]; move the model to a CUDA"):
        moecc.graph_step(_train, model, optimizers=[opt])


def _host_costing_profile(tmp_path: Path) -> Path:
    ops = (("moecc.grouped_mm", 300e-6),)
    p = dataclasses.replace(cost.PROFILES["cpu"], host_op=40e-6, host_view=5e-6, host_ops=ops)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(p.to_json()))
    return path


def test_cuda_graph_option_takes_the_host_out_of_the_cost_model(tmp_path: Path) -> None:
    profile = _host_costing_profile(tmp_path)
    model, (ids,) = mixtral_style.build(seed=0)
    plans = {}
    for graphed in (False, True):
        cm = moecc.compile(model, profile=profile, cuda_graph=graphed)
        _train(cm, ids)
        assert cm.options.cuda_graph is graphed
        plans[graphed] = [ctx.plan for ctx in cm.session.contexts]
        names = {ctx.profile.name for ctx in cm.session.contexts}
        assert names == ({"cpu, replayed"} if graphed else {"cpu"}), names
    host = {g: sum(sum(p.get("predicted_host_us", {}).values()) for p in ps) for g, ps in plans.items()}
    step = {g: sum(sum(p.get("predicted_us", {}).values()) for p in ps) for g, ps in plans.items()}
    assert host[False] > 0 and host[True] == 0, host
    # the host set the pace with its costs; replayed, the step is the device's time alone
    assert 0 < step[True] < step[False], step


def test_replayed_profile_makes_chunks_weigh_the_device_gap_only() -> None:
    from moecc.passes import schedule_overlap as so

    hosted = dataclasses.replace(cost.PROFILES["h200"], host_op=60e-6)
    replayed = cost.replayed(hosted)
    assert replayed.host_op == replayed.host_view == 0 and replayed.host_ops == ()
    assert replayed.op_overhead == hosted.op_overhead and replayed.gemm_flops == hosted.gemm_flops
    layer = dict(T=8192, H=2048, K=6, elt=2, gemm_flops=2 * 8192 * 6 * 3 * 2048 * 1408, experts=16, nodes=60)
    n_hosted, _, best_hosted = so.choose_chunks(hosted, ep=4, **layer)
    n_replayed, _, best_replayed = so.choose_chunks(replayed, ep=4, **layer)
    assert n_replayed > n_hosted and best_replayed < best_hosted, (n_hosted, n_replayed)


def _unfused_with_cuda_graph(rank: int, world: int) -> None:
    # the torch backend: regions are not fused across ranks
    cm = moecc.compile(mixtral_style.build(seed=0)[0], ep=world, cuda_graph=True, exchange="counted")
    ids = torch.randint(0, 64, mixtral_style.build(seed=0)[1][0].shape, generator=torch.Generator().manual_seed(rank))
    with pytest.raises(
        MoeccError,
        match=r"cuda_graph=True\): these MoE regions exchange tokens by all-to-alls whose row counts the host reads "
        r"every step.*layers.0.moe.experts \(not fused: the torch backend has no fused dispatch/combine kernels\)",
    ):
        cm(ids)
    torch._dynamo.reset()
    plain = moecc.compile(mixtral_style.build(seed=0)[0], ep=world)  # without the promise it runs, counted
    want = testing.lm_loss(plain(ids), ids)
    torch._dynamo.reset()
    before = torch_backend.COUNTERS["ep.plans_padded"]
    padded = moecc.compile(mixtral_style.build(seed=0)[0], ep=world, cuda_graph=True)  # exchange="auto": padded
    torch.testing.assert_close(testing.lm_loss(padded(ids), ids), want, rtol=1e-5, atol=1e-5)
    assert torch_backend.COUNTERS["ep.plans_padded"] > before
    notes = [m for c in padded.session.contexts for m in c.notes]
    assert any("the step can be replayed" in m for m in notes), notes


def test_cuda_graph_option_refuses_regions_whose_exchange_sizes_come_from_the_host() -> None:
    """compile(cuda_graph=True) with expert parallelism on the unfused path (the torch backend here; on GPUs
    MOECC_FUSED_EP=0 or an ep-group across hosts) with exchange="counted" is an error at compile time that
    names the regions and why they were not fused, instead of a capture that fails later; the default exchange
    is then padded (no row counts on the host) and gives the counted exchange's loss."""
    testing.spawn(_unfused_with_cuda_graph, 2, backend="gloo")


def test_cuda_graph_check_names_unfused_regions_only() -> None:
    """The check behind cuda_graph=True on a graph holding one fused region (whose routing plan is dead code
    at the Dynamo stage) and one refused region: only the refused one is named, with its reason."""
    g = fx.Graph()
    idx = g.placeholder("idx_TK")
    for path in ("layers.0.experts", "layers.1.experts"):
        ir.tag_region(g.call_function(torch.ops.moecc.ep_plan.default, (idx, 8, 2, "g")), path, "shard")
    # a padded plan's counts are known without the device: never named
    ir.tag_region(g.call_function(torch.ops.moecc.ep_plan.default, (idx, 8, 2, "g", True)), "layers.2.experts", "shard")
    ir.tag_region(g.call_function(torch.ops.moecc.ep_dispatch_gemm.default, (idx,)), "layers.0.experts", "fuse")
    g.output(None)
    gm = fx.GraphModule(torch.nn.Module(), g)
    notes: list[str] = []
    ctx = types.SimpleNamespace(plan={"fuse_refused": {"layers.1.experts": "a per-expert bias"}}, note=notes.append)
    with pytest.raises(MoeccError, match=r"replay: layers.1.experts \(not fused: a per-expert bias\)\. Only"):
        refuse_host_sized_exchanges(gm, ctx)
    ctx.plan["fuse_refused"] = {}
    gm.graph.erase_node(next(n for n in gm.graph.nodes if ir.facts(n).get("region") == "layers.1.experts"))
    refuse_host_sized_exchanges(gm, ctx)  # the fused region alone: nothing to refuse, and the dumps say so
    assert notes == ["cuda_graph=True: no sharded region reads its row counts on the host; the step can be replayed"]
