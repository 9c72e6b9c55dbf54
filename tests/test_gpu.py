"""GPU checks (run on a CUDA machine; skipped elsewhere): the torch backend's native grouped GEMM path
really runs on the GPU, and compiled bf16 models match eager there."""

from __future__ import annotations

import pytest
import torch

import moecc
from moecc import testing
from moecc.backends import torch_backend, triton_backend, triton_ep
from moecc.examples import deepseek_style, mixtral_style

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


@pytest.mark.parametrize("build", [mixtral_style.build, deepseek_style.build], ids=["mixtral", "deepseek"])
def test_bf16_on_gpu_matches_eager_and_uses_native_grouped_mm(build) -> None:
    model, (ids,) = build(dtype=torch.bfloat16, tokens=256)
    model, ids = model.cuda(), ids.cuda()
    before = torch_backend.COUNTERS["grouped_mm.native"] + torch_backend.COUNTERS["grouped_mm_wgrad.native"]
    loops = torch_backend.COUNTERS["grouped_mm.loop"]
    cm = moecc.compile(model, backend="torch")
    out = cm(ids)
    ref = model(ids)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
    grads = torch.autograd.grad(_lm_loss(out, ids), list(cm.parameters()), allow_unused=True)
    ref_grads = torch.autograd.grad(_lm_loss(ref, ids), list(model.parameters()), allow_unused=True)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads, strict=True):
        if r is None:
            continue
        scale = r.float().abs().max().item() + 1e-6
        assert (g.float() - r.float()).abs().max().item() <= 5e-2 * scale + 1e-4, name
    after = torch_backend.COUNTERS["grouped_mm.native"] + torch_backend.COUNTERS["grouped_mm_wgrad.native"]
    assert after > before, "torch._grouped_mm did not run on the GPU"
    assert torch_backend.COUNTERS["grouped_mm.loop"] == loops, "the per-expert loop fallback ran on the GPU"
    assert all(r.status == "lifted" for r in cm.regions)


def test_auto_backend_on_gpu_is_triton_and_matches_eager() -> None:
    model, (ids,) = mixtral_style.build(dtype=torch.bfloat16, tokens=256)
    model, ids = model.cuda(), ids.cuda()
    before = dict(triton_ep.COUNTERS)
    cm = moecc.compile(model)
    out = cm(ids)
    torch.testing.assert_close(out.float(), model(ids).float(), atol=3e-2, rtol=3e-2)
    _lm_loss(out, ids).backward()
    for name in triton_ep.PHASE_COUNTERS:
        assert triton_ep.COUNTERS[name] - before.get(name, 0) == len(cm.regions), f"fused kernels did not run: {name}"
    assert cm.session.counters()["lower.triton"] > 0
    assert cm.session.counters()["fuse.fused"] == len(cm.regions)


def test_moe_layer_forward_and_backward_capture_in_a_cuda_graph() -> None:
    """No device-to-host synchronisation in a compiled MoE layer (triton backend, one GPU): its forward and
    backward are captured in a CUDA graph and replayed with new inputs, matching eager."""
    torch.manual_seed(0)
    model, (ids,) = mixtral_style.build(dtype=torch.bfloat16, tokens=256)
    moe = model.layers[0].moe.cuda()
    cm = moecc.compile(moe, backend="triton")
    x = torch.randn(2, 128, moe.router.in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    new_x = torch.randn_like(x)
    out = testing.replay_in_cuda_graph(cm, x, g, new_x)
    assert cm.session.counters().get("fuse.fused") == 1, "the fused kernels were not in the captured graph"
    torch.cuda.synchronize()
    ref_x = new_x.detach().clone().requires_grad_()
    ref = moe(ref_x)
    ref.backward(g)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(x.grad.float(), ref_x.grad.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("way", ["pointer", "descriptor", "gluon"])
def test_fused_ep_kernels_in_a_simulated_world_on_one_gpu_bf16(way: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused dispatch/combine kernels compiled for the GPU (not interpreted), 4 simulated ranks on one
    device, bf16, skewed routing with empty experts, forward and backward against float32 torch; with the
    weights (and the scattering GEMM's rows) read through pointers, through tensor descriptors (TMA), as
    from K = 4096 on, and with the four fused GEMMs as the warp-specialised Gluon kernels (Hopper: both weight
    layouts, the gated dispatch in the dX of GEMM 2, N = 384 not a multiple of the tile)."""
    import torch.nn.functional as F

    from moecc.backends import gluon_wgrad

    desc = way != "pointer"
    monkeypatch.setattr(triton_backend, "DESCRIPTOR_MIN_K", 0 if desc else 1 << 30)
    monkeypatch.setattr(triton_ep, "GLUON_SCATTER", way == "gluon")
    monkeypatch.setattr(triton_ep, "GLUON_DISPATCH", way == "gluon")
    if way == "gluon" and (why := gluon_wgrad._common_refusal(torch.empty(1, device="cuda", dtype=torch.bfloat16))):
        pytest.skip(why)
    before = triton_ep.COUNTERS["fused_gemm.descriptor"]
    before_gluon = triton_ep.COUNTERS["fused_gemm.gluon"]

    ep, T, K, H, Fd, E_l = 4, 256, 4, 256, 384, 4
    E = ep * E_l
    gen = torch.Generator(device="cuda").manual_seed(0)
    world = triton_ep.SimWorld(ep, T, K, H, E_l, torch.bfloat16, torch.device("cuda"))
    w1 = torch.randn(E, H, Fd, device="cuda", generator=gen) * H**-0.5
    w2 = torch.randn(E, Fd, H, device="cuda", generator=gen) * Fd**-0.5
    xs = [torch.randn(T, H, device="cuda", generator=gen) for _ in range(ep)]
    scores = torch.rand(ep, T, E, device="cuda", generator=gen)
    scores[..., 3] += 1.0  # expert 3 gets most tokens
    scores[..., 8:12] -= 2.0  # experts 8..11 (all of rank 2's) get none
    idxs = list(scores.topk(K, -1).indices)
    ws = [torch.rand(T, K, device="cuda", generator=gen) for _ in range(ep)]
    douts = [torch.randn(T, H, device="cuda", generator=gen) for _ in range(ep)]
    bf = torch.bfloat16
    w1s = [w1[r * E_l : (r + 1) * E_l].to(bf) for r in range(ep)]
    w2s = [w2[r * E_l : (r + 1) * E_l].to(bf) for r in range(ep)]
    fwd1 = world.run(
        [triton_ep.dispatch_gemm_forward(world.ranks[r], xs[r].to(bf), idxs[r], w1s[r]) for r in range(ep)]
    )
    acts = [F.silu(h) for h, _, _ in fwd1]
    fwd2 = world.run(
        [triton_ep.gemm_combine_forward(world.ranks[r], acts[r], w2s[r], ws[r].to(bf), fwd1[r][2]) for r in range(ep)]
    )
    bwd2 = world.run(
        [
            triton_ep.gemm_combine_backward(
                world.ranks[r], douts[r].to(bf), acts[r], w2s[r], ws[r].to(bf), fwd2[r][1], fwd1[r][2]
            )
            for r in range(ep)
        ]
    )
    dhs = []
    for r in range(ep):
        h = fwd1[r][0].float().requires_grad_()
        (g,) = torch.autograd.grad(F.silu(h), h, bwd2[r][0].float())
        dhs.append(g.to(bf))
    bwd1 = world.run(
        [triton_ep.dispatch_gemm_backward(world.ranks[r], dhs[r], fwd1[r][1], w1s[r], fwd1[r][2]) for r in range(ep)]
    )
    # float32 reference on the bf16-rounded inputs
    leaves = [t.to(bf).float().requires_grad_() for t in (*xs, *ws)]
    w1r = w1.to(bf).float().requires_grad_()
    w2r = w2.to(bf).float().requires_grad_()
    refs = []
    for r in range(ep):
        out = torch.zeros(T, H, device="cuda")
        for k in range(K):
            e = idxs[r][:, k]
            y = torch.einsum("tf,tfh->th", F.silu(torch.einsum("th,thf->tf", leaves[r], w1r[e])), w2r[e])
            out = out + leaves[ep + r][:, k, None] * y
        refs.append(out)
    torch.autograd.backward(refs, douts)

    def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
        scale = want.abs().max().item() + 1e-6
        err = (got.float() - want).abs().max().item()
        assert err <= 3e-2 * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"

    for r in range(ep):
        close(fwd2[r][0], refs[r].detach(), f"rank {r} out")
        close(bwd1[r][0], leaves[r].grad, f"rank {r} dx")
        close(bwd2[r][2], leaves[ep + r].grad, f"rank {r} dgate")
        close(bwd1[r][1], w1r.grad[r * E_l : (r + 1) * E_l], f"rank {r} dw1")
        close(bwd2[r][1], w2r.grad[r * E_l : (r + 1) * E_l], f"rank {r} dw2")
    gluon = 4 * ep if way == "gluon" else 0  # all four fused GEMMs of every rank
    assert triton_ep.COUNTERS["fused_gemm.gluon"] - before_gluon == gluon
    assert triton_ep.COUNTERS["fused_gemm.descriptor"] - before == (4 * ep - gluon if desc else 0)
    assert not bwd1[2][1].any() and not bwd2[2][1].any(), "rank 2's experts got no tokens: zero weight gradients"


def test_autocast_on_gpu_runs_the_fused_kernels_in_bf16_and_matches_eager() -> None:
    """A float32 model under torch.autocast("cuda", bfloat16): the fused expert kernels (triton backend) get
    bf16 inputs, as the nn.Linear layers they replace do in eager, and the loss and gradients are eager's to
    bf16 precision."""
    torch.manual_seed(0)
    model, (ids,) = mixtral_style.build(dtype=torch.float32, tokens=256)
    model, ids = model.cuda(), ids.cuda()
    before = dict(triton_ep.COUNTERS)
    cm = moecc.compile(model, backend="triton")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = _lm_loss(cm(ids), ids)
        ref_loss = _lm_loss(model(ids), ids)
    grads = torch.autograd.grad(loss, list(cm.parameters()))
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    torch.testing.assert_close(loss, ref_loss, atol=2e-2, rtol=2e-2)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads, strict=True):
        assert g.dtype == torch.float32, name  # the parameters' gradients stay in their dtype
        scale = r.abs().max().item() + 1e-6
        assert (g - r).abs().max().item() <= 5e-2 * scale, name
    for name in triton_ep.PHASE_COUNTERS:
        assert triton_ep.COUNTERS[name] > before.get(name, 0), f"fused kernels did not run: {name}"
    gemms = [
        node
        for ctx in cm.session.contexts
        for node in ctx.final_graphs["forward"].graph.nodes
        if "ep_dispatch_gemm" in str(node.target) or "ep_gemm_combine" in str(node.target)
    ]
    assert gemms and all(
        a.meta["val"].dtype == torch.bfloat16
        for g in gemms
        for a in g.args
        if isinstance(a, torch.fx.Node) and a.meta["val"].is_floating_point()
    ), [(g.name, [a.meta["val"].dtype for a in g.args if isinstance(a, torch.fx.Node)]) for g in gemms]


def test_calibrate_measures_the_host_cost_of_every_expert_op() -> None:
    """The host lane's figures: an aten op, a view and each moecc op of an expert layer (fused ones
    included), positive and in an order a host can have (a view below an op, a fused op above an aten op)."""
    from moecc import calibrate, cost

    host = calibrate.measure_host(torch.device("cuda"), quick=True)
    ops = host["host_ops"]
    assert set(ops) >= {"moecc.grouped_mm", "moecc.glu", "moecc.ep_dispatch_gemm", "moecc.ep_gemm_combine_backward"}
    assert 0 < host["host_view"] < host["host_op"] < ops["moecc.ep_dispatch_gemm"], host
    gap = calibrate._device_gap_s(torch.ones(8, device="cuda"))
    assert 0 < gap < host["host_op"], (gap, host["host_op"])  # the device keeps up with the host on tiny ops
    p = cost.HardwareProfile.from_json({**cost.PROFILES["h200"].to_json(), **host}, source="test")
    assert dict(p.host_ops) == ops and p.host_op == host["host_op"]


def test_calibrate_takes_host_costs_from_a_profiled_step_on_the_gpu() -> None:
    """The steps' host costs: the fused ops (the default on a GPU) each cost the host more than an aten op,
    which costs more than a view, and an aten op in a step costs the host more than the same op issued alone
    back to back (what calibrate measured before); the all-to-all path's ops from a step with fusion off."""
    from moecc import calibrate

    host = calibrate.measure_step_host(torch.device("cuda"), quick=True)
    ops = host["host_ops"]
    assert {"moecc.ep_dispatch_gemm", "moecc.ep_gemm_combine", "moecc.ep_dispatch_gemm_backward"} <= set(ops), ops
    assert {"moecc.grouped_mm", "moecc.grouped_mm_wgrad", "moecc.route_permute"} <= set(ops), ops  # fusion off
    assert 0 < host["host_view"] < host["host_op"] < min(ops[k] for k in ops if k.startswith("moecc.ep_gemm")), host
    alone = calibrate.measure_host(torch.device("cuda"), quick=True)
    assert host["host_op"] > alone["host_op"], (host["host_op"], alone["host_op"])


def test_calibrate_measures_gemm_rates_by_size() -> None:
    """The rate curves: dense GEMMs by FLOPs, the grouped GEMM and the fused ops by rows per expert; real rates,
    the smallest sizes slower than the largest (what the single large-size rates missed), and a profile that
    holds them charges a small grouped GEMM at its measured rate."""
    from moecc import calibrate, cost

    dev = torch.device("cuda")
    curves = calibrate.measure_rate_curves(dev, quick=True)
    curves["fused"] = calibrate.measure_fused_curve(dev, quick=True)
    for kind, pts in curves.items():
        sizes = [x for x, _ in pts]
        assert sizes == sorted(sizes) and len(pts) == 3, (kind, pts)
        assert all(1e12 < r < 2e15 for _, r in pts), (kind, pts)
        assert pts[0][1] < pts[-1][1], (kind, pts)
    assert [x for x, _ in curves["fused"]] == [64.0, 256.0, 1024.0]  # 2048 x 4 tokens over 32 experts, scaled
    p = cost.HardwareProfile.from_json({**cost.PROFILES["h200"].to_json(), "rate_curves": curves}, source="test")
    (r0, rate0) = curves["grouped"][0]
    assert p.rate("grouped", r0) == rate0 and p.rate("grouped", r0 / 2) == pytest.approx(rate0 / 2)


def test_graph_step_trains_as_the_uncaptured_step() -> None:
    """`moecc.graph_step`: a training step with a capturable AdamW, captured after one warm-up step and replayed,
    gives the losses, gradients and weights of the same compiled model stepped without a graph; what it
    refuses at a replay (another shape, a changed hyperparameter) raises instead of replaying stale values."""
    import copy

    torch.manual_seed(0)
    model, (ids,) = mixtral_style.build(dtype=torch.bfloat16, tokens=256)
    model, ids = model.cuda(), ids.cuda()
    twin = copy.deepcopy(model)
    cm = moecc.compile(model, backend="triton", cuda_graph=True)
    ref = moecc.compile(twin, backend="triton")
    opt = torch.optim.AdamW(cm.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True)

    def train(ids: torch.Tensor) -> torch.Tensor:
        loss = _lm_loss(cm(ids), ids)
        loss.backward()
        opt.step()
        return loss.detach()

    step = moecc.graph_step(train, cm, optimizers=[opt], warmup=1)
    ran: dict[str, int] = dict.fromkeys(triton_ep.PHASE_COUNTERS, 0)  # fused kernels launched from Python
    losses = []
    for i in range(5):
        batch = torch.randint(0, int(ids.max()) + 1, ids.shape, device="cuda")
        opt.zero_grad(set_to_none=True)  # the replay puts the graph's gradients back
        before = dict(triton_ep.COUNTERS)
        got = step(batch)
        for name in ran:
            ran[name] += triton_ep.COUNTERS[name] - before.get(name, 0)
        ref_opt.zero_grad(set_to_none=True)
        want = _lm_loss(ref(batch), batch)
        want.backward()
        grads = {n: p.grad for n, p in cm.named_parameters()}
        for n, p in ref.named_parameters():
            if p.grad is not None:
                assert grads[n] is not None, f"step {i}: {n} has no gradient after the replay"
                scale = p.grad.float().abs().max().item() + 1e-6
                err = (grads[n].float() - p.grad.float()).abs().max().item()
                assert err <= 2e-2 * scale + 1e-5, f"step {i} grad {n}: {err:.3g} vs scale {scale:.3g}"
        ref_opt.step()
        torch.testing.assert_close(got, want.detach(), atol=1e-2, rtol=1e-2)
        losses.append(float(got))
    assert step.replays == 4 and len(set(losses)) == 5, (step.replays, losses)
    for (n, p), r in zip(cm.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.float(), r.float(), atol=2e-2, rtol=2e-2, msg=lambda m, n=n: f"{n}: {m}")
    # the fused kernels were launched by the warm-up and the capture only; the replays ran them from the graph
    assert ran == dict.fromkeys(triton_ep.PHASE_COUNTERS, 2 * len(cm.regions)), ran
    with pytest.raises(moecc.MoeccError, match=r"argument\[0\]\[0\] is torch.int64 \[2, 64\] .* captured with"):
        step(batch[:, :64].contiguous())
    opt.param_groups[0]["weight_decay"] = 0.5
    with pytest.raises(moecc.MoeccError, match=r"weight_decay=0.5, but the graph was captured with weight_decay=0.01"):
        step(batch)
    opt.param_groups[0]["weight_decay"] = 0.01
    step.close()  # the graph released: the next call warms up and captures again
    assert step.graph is None and float(step(batch)) > 0 and step.graph is None and step.replays == 4


def test_plan_rows_do_not_wait_for_the_device() -> None:
    """The unfused dispatch's routing plan copies its row counts to the host once (ep_plan's split sizes); the
    rows themselves are planned without a synchronisation (CUDA's sync debug mode raises on one)."""
    idx = torch.randint(0, 64, (4096, 6), device="cuda")
    torch_backend.plan_rows(idx, 64, 4)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tok, sel_idx, sel, counts = torch_backend.plan_rows(idx, 64, 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(counts.sum()) == int(sel.any(-1).sum())
    assert torch.equal(sel_idx >= 0, sel)


def _wgrad_reference(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor, nsrc: int, E: int, scale: float):
    ends = offs.tolist()
    dw = torch.zeros(E, x.shape[1], dy.shape[1], device=x.device, dtype=torch.float32)
    for seg, hi in enumerate(ends):
        lo = ends[seg - 1] if seg else 0
        dw[seg % E] += x[lo:hi].float().t() @ dy[lo:hi].float()
    return dw * scale


@pytest.mark.parametrize(("K", "N", "nsrc"), [(512, 384, 1), (256, 200, 2), (768, 128, 3)])
def test_gluon_wgrad_matches_a_float32_reference_with_tails_empty_experts_and_nan_room(K, N, nsrc) -> None:
    """The warp-specialised Gluon dW kernel (Hopper): random segment lengths (empty ones, and tails shorter
    than a row block), several sources a expert, a scale, and NaN in the rows past the last segment (the fused
    path's receive room), which must not reach the result."""
    from moecc.backends import gluon_wgrad

    dev = torch.device("cuda")
    gen = torch.Generator(device="cpu").manual_seed(K + N + nsrc)
    E = 5
    counts = torch.randint(0, 150, (nsrc * E,), generator=gen)
    counts[1] = 0  # an expert with no rows from the first source
    counts[0] = 5  # a segment shorter than one MMA's 16 rows
    counts[2] = 64 + 17  # one whole row block, then a tail past a 16-row slice
    if nsrc == 1:
        counts[3] = 0  # and one with no rows at all
    offs = torch.cumsum(counts, 0).to(torch.int32).to(dev)
    rows = int(counts.sum()) + 70
    x = torch.randn(rows, K, generator=gen).to(dev, torch.bfloat16)
    dy = torch.randn(rows, N, generator=gen).to(dev, torch.bfloat16)
    x[int(counts.sum()) :] = float("nan")
    dy[int(counts.sum()) :] = float("nan")
    ref = _wgrad_reference(x, dy, offs, nsrc, E, 0.5)
    for long, banded in ((False, True), (True, False)):  # both tiles, both tile orders
        if (why := gluon_wgrad.supported(x, dy, E, long)) is not None:
            pytest.skip(why)
        dw = gluon_wgrad.wgrad_segments(x, dy, offs, nsrc, E, 0.5, long, banded, programs=7)
        assert torch.isfinite(dw).all()
        torch.testing.assert_close(dw.float(), ref, atol=0.05, rtol=1e-2)
        if nsrc == 1:
            assert (dw[3] == 0).all()
    # the same through the backend's entry point, which picks the Gluon kernel on this GPU
    before = triton_backend.COUNTERS["grouped_mm_wgrad.gluon"]
    dw2 = triton_backend.grouped_mm_wgrad_segments(x, dy, offs, nsrc, E, 0.5)
    assert triton_backend.COUNTERS["grouped_mm_wgrad.gluon"] == before + 1
    torch.testing.assert_close(dw2.float(), ref, atol=0.05, rtol=1e-2)
