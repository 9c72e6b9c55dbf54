"""The fused dispatch+GEMM / GEMM+combine kernels in a simulated world of ep ranks inside one process.

Every rank's symmetric buffer is an ordinary tensor and the address tables hold their `data_ptr()`s; the
kernels run under TRITON_INTERPRET=1 on the CPU (on a GPU node, on one GPU). Each rank's flow is advanced to
its next wait point in turn, and results are checked against autograd through the eager per-token
definition on the global batch, forward and backward, over several calls that reuse the buffers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moecc.backends import triton_backend, triton_ep

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_backend.available(DEV), reason="needs CUDA or TRITON_INTERPRET=1")


def reference(xs, idxs, ws, w1, w2):
    """out[t] = sum_k w[t,k] * silu(x[t] @ w1[e]) @ w2[e] for every rank's tokens (float64)."""
    outs = []
    for x, idx, w in zip(xs, idxs, ws, strict=True):
        out = torch.zeros(x.shape, dtype=torch.float64)
        for k in range(idx.shape[1]):
            for t in range(x.shape[0]):
                e = int(idx[t, k])
                if 0 <= e < w1.shape[0]:
                    out[t] += w[t, k] * (F.silu(x[t] @ w1[e]) @ w2[e])
        outs.append(out)
    return outs


def run_layer(world: triton_ep.SimWorld, xs, idxs, ws, w1s, w2s, douts):
    """Forward and backward of one layer on every rank of the simulated world, phase by phase."""
    ep = len(world.ranks)
    fwd1 = world.run([triton_ep.dispatch_gemm_forward(world.ranks[r], xs[r], idxs[r], w1s[r]) for r in range(ep)])
    acts = [F.silu(h) for h, _, _ in fwd1]
    fwd2 = world.run(
        [triton_ep.gemm_combine_forward(world.ranks[r], acts[r], w2s[r], ws[r], fwd1[r][2]) for r in range(ep)]
    )
    outs = [o for o, _ in fwd2]
    bwd2 = world.run(
        [
            triton_ep.gemm_combine_backward(world.ranks[r], douts[r], acts[r], w2s[r], ws[r], fwd2[r][1], fwd1[r][2])
            for r in range(ep)
        ]
    )
    dhs = []
    for r in range(ep):
        h = fwd1[r][0]
        sig = torch.sigmoid(h.double())
        dhs.append((bwd2[r][0].double() * sig * (1 + h.double() * (1 - sig))).to(h.dtype))
    bwd1 = world.run(
        [triton_ep.dispatch_gemm_backward(world.ranks[r], dhs[r], fwd1[r][1], w1s[r], fwd1[r][2]) for r in range(ep)]
    )
    return outs, [b[0] for b in bwd1], [b[1] for b in bwd1], [b[1] for b in bwd2], [b[2] for b in bwd2], fwd1


def routing(kind: str, T: int, K: int, E: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "uniform":
        return torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    if kind == "skewed":  # nearly everything to expert 1; most experts get nothing
        idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
        idx[:, 0] = 1
        idx[:, 1:] = torch.where(idx[:, 1:] == 1, 0, idx[:, 1:])
        return idx
    if kind == "dropped":  # some slots routed nowhere (-1 or out of range): they contribute nothing
        idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
        idx[::3, 0] = -1
        idx[1::4, -1] = E + 2
        return idx
    raise ValueError(kind)


@pytest.mark.parametrize(
    ("ep", "kinds", "dt", "wide", "T", "desc"),
    [
        (1, ["uniform"], torch.float32, False, 12, False),
        (2, ["uniform", "skewed"], torch.float32, False, 12, False),
        (4, ["dropped", "uniform"], torch.float32, False, 12, False),
        (2, ["dropped"], torch.bfloat16, False, 12, False),
        # 64-bit row offsets, what buffers of 2^31 elements or more take
        (2, ["skewed"], torch.float32, True, 12, False),
        # segments of 3 m-tiles (48 rows from each source to expert 1, 16-row tiles on the CPU): the fused GEMMs
        # walk them in L2 groups of 2 m-tiles, the last group short
        (2, ["skewed", "dropped"], torch.float32, False, 48, True),
        # weights (and the scattering GEMM's rows) through tensor descriptors, as from K = 4096 on a GPU
        (4, ["uniform"], torch.bfloat16, False, 12, True),
    ],
)
def test_fused_layer_matches_eager(ep, kinds, dt, wide, T, desc, monkeypatch: pytest.MonkeyPatch):
    if wide:
        monkeypatch.setattr(triton_ep, "_wide", lambda *operands: True)
    monkeypatch.setattr(triton_backend, "DESCRIPTOR_MIN_K", 0 if desc else 1 << 30)
    before = dict(triton_ep.COUNTERS)
    K, H, Fd, E_l = 2, 16, 24, 2
    E = ep * E_l
    gen = torch.Generator().manual_seed(ep)
    w1 = torch.randn(E, H, Fd, generator=gen, dtype=torch.float64) * 0.3
    w2 = torch.randn(E, Fd, H, generator=gen, dtype=torch.float64) * 0.3
    world = triton_ep.SimWorld(ep, T, K, H, E_l, dt, DEV)
    w1s = [w1[r * E_l : (r + 1) * E_l].to(dt).to(DEV) for r in range(ep)]
    w2s = [w2[r * E_l : (r + 1) * E_l].to(dt).to(DEV) for r in range(ep)]
    for kind in kinds:  # several calls on the same buffers, none of them reset
        xs = [torch.randn(T, H, generator=gen, dtype=torch.float64) for _ in range(ep)]
        idxs = [routing(kind, T, K, E, gen) for _ in range(ep)]
        ws = [torch.rand(T, K, generator=gen, dtype=torch.float64) for _ in range(ep)]
        douts = [torch.randn(T, H, generator=gen, dtype=torch.float64) for _ in range(ep)]
        leaves = [t.clone().requires_grad_() for t in (*xs, *ws)]
        w1r, w2r = w1.clone().requires_grad_(), w2.clone().requires_grad_()
        ref = reference(leaves[:ep], idxs, leaves[ep:], w1r, w2r)
        torch.autograd.backward(ref, douts)

        def dev(ts):
            return [t.to(dt).to(DEV) for t in ts]

        outs, dxs, dw1s, dw2s, dws, fwd1 = run_layer(
            world, dev(xs), dev(idxs), dev(ws), w1s, w2s, dev(douts)
        )  # fmt: skip

        def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
            """float32 to 1e-4; bfloat16 to 4 % of the tensor's largest entry (at least 0.04): its rows are
            rounded to 8 bits on the way (h, the activation, the gated dout), which a float64 reference is not,
            and an entry that is a small sum of larger terms carries their rounding (a dW entry of 0.2 was off
            by 0.054 on an H200, of a tensor reaching several units)"""
            if dt == torch.float32:
                tol = {"rtol": 1e-4, "atol": 1e-4}
            else:
                tol = {"rtol": 4e-2, "atol": 4e-2 * max(1.0, float(want.detach().abs().max()))}
            torch.testing.assert_close(got.double().cpu(), want, **tol, msg=lambda m: f"{what}: {m}")

        for r in range(ep):
            what = f"ep={ep} {kind} rank {r}"
            close(outs[r], ref[r], f"{what} out")
            close(dxs[r], leaves[r].grad, f"{what} dx")
            close(dws[r], leaves[ep + r].grad, f"{what} dgate")
            sl = slice(r * E_l, (r + 1) * E_l)
            close(dw1s[r], w1r.grad[sl], f"{what} dw1")
            close(dw2s[r], w2r.grad[sl], f"{what} dw2")
            h, _, plan = fwd1[r]
            assert int(plan.rows) == int(plan.offs[-2]), f"{what}: the plan's row count is its segments' end"
            # local rows come first: the first segments are this rank's own tokens
            assert int(plan.seg_src[0]) == r
    for b in world.ranks:  # one completed call per phase and per call of the test
        assert b.epoch.tolist() == [len(kinds)] * triton_ep.NSIG
    ran = {k: triton_ep.COUNTERS[k] - before.get(k, 0) for k in ("fused_gemm.descriptor", "fused_gemm.pointer")}
    assert ran == {  # four fused GEMMs a layer: forward and backward, gathering and scattering
        "fused_gemm.descriptor": 4 * ep * len(kinds) if desc else 0,
        "fused_gemm.pointer": 0 if desc else 4 * ep * len(kinds),
    }, ran


def _source_plan_reference(ep: int, me: int, E_l: int, idx_TK: torch.Tensor) -> dict[str, torch.Tensor]:
    """The source side of the plan by its definition, in torch ops."""
    T, K = idx_TK.shape
    E = ep * E_l
    flat = idx_TK.reshape(-1).to(torch.int64)
    valid = (flat >= 0) & (flat < E)
    key = torch.where(valid, flat, E)
    key_sorted, order = torch.sort(key, stable=True)
    counts_E = torch.bincount(key, minlength=E + 1)[:E]
    dest_TK = torch.where(valid, flat // E_l, -1).view(T, K)
    hit_PT = (dest_TK.unsqueeze(0) == torch.arange(ep)[:, None, None]).any(-1)
    pos_PT = torch.where(hit_PT, torch.cumsum(hit_PT, 1) - 1, -1)
    dest_J = torch.where(key_sorted < E, key_sorted // E_l, -1)
    per_dest = counts_E.view(ep, E_l).sum(1)
    start_P = torch.cumsum(per_dest, 0) - per_dest
    dc = dest_J.clamp(min=0)
    return {
        "valid_TK": valid.view(T, K),
        "pos_PT": pos_PT,
        "dest_J": dest_J,
        "q_J": torch.arange(T * K) - start_P[dc],
        # this rank's own slots point at their token (read in place), others at the token's receive row
        "row_J": torch.where(dest_J == me, order // K, me * T + pos_PT[dc, order // K]),
        "slot_J": order,
        "counts_E": counts_E,
    }


@pytest.mark.parametrize("ep,me,E_l,T,K", [(1, 0, 8, 40, 2), (2, 1, 3, 37, 3), (4, 2, 4, 130, 4), (3, 0, 1, 5, 1)])
def test_source_plan_kernels_match_its_definition(ep: int, me: int, E_l: int, T: int, K: int) -> None:
    """The two routing kernels around the sort give the plan's definition exactly: skewed routing, slots
    routed nowhere (-1 and past the last expert), ranks that get no slot."""
    gen = torch.Generator().manual_seed(ep * 100 + T)
    E = ep * E_l
    idx = torch.randint(0, E, (T, K), generator=gen)
    idx[torch.rand(T, K, generator=gen) < 0.3] = 0  # skewed towards expert 0
    idx[torch.rand(T, K, generator=gen) < 0.1] = -1
    idx[torch.rand(T, K, generator=gen) < 0.05] = E + 2
    if ep > 2:
        idx[(idx >= E_l) & (idx < 2 * E_l)] = 0  # rank 1 gets nothing
    world = triton_ep.SimWorld(ep, T, K, 16, E_l, torch.float32, DEV)
    plan = triton_ep.Plan.empty(ep, T, K, E_l, 16, DEV)
    plan.packed.fill_(-7)  # garbage: the kernels must write every source field
    got = triton_ep._source_plan(world.ranks[me], idx.to(DEV), plan)
    for name in ("valid_TK", "pos_PT", "dest_J", "q_J", "slot_J"):
        got[name] = getattr(plan, name)
    want = _source_plan_reference(ep, me, E_l, idx)
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].dtype == torch.int32, name
        assert torch.equal(got[name].cpu().long(), w.long()), name


def _receiver_plan_reference(ep: int, me: int, E_l: int, S: int, bm: int, counts_PE: torch.Tensor):
    """The receiver side of the plan by its definition, in torch ops: segments (s', e), s = (me + s') % ep,
    then the tail up to S; the segment of every m-tile by a search of the cumulative tiles."""
    rot = (me + torch.arange(ep)) % ep
    cnt = counts_PE[rot].reshape(-1)
    ends = torch.cumsum(cnt, 0)
    offs = torch.cat([ends, torch.tensor([S])])
    tiles = torch.cat([(cnt + bm - 1) // bm, torch.tensor([(S - int(ends[-1]) + bm - 1) // bm])])
    cum = torch.cumsum(tiles, 0)
    nmt = -(-S // bm) + ep * E_l + 1
    zero = torch.zeros(1, dtype=torch.int64)
    return {
        "rows": ends[-1:],
        "offs": offs,
        "cum": cum,
        "mt_seg": torch.searchsorted(cum, torch.arange(nmt), right=True),
        "seg_src": torch.cat([rot.repeat_interleave(E_l), zero]),
        "seg_exp": torch.cat([torch.arange(E_l).repeat(ep), zero]),
        "seg_q0": torch.cat([((torch.cumsum(counts_PE, 1) - counts_PE)[rot]).reshape(-1), zero]),
    }


@pytest.mark.parametrize("ep,me,E_l,T,K,bm", [(1, 0, 8, 40, 2, 16), (2, 1, 3, 37, 3, 16), (4, 2, 5, 30, 4, 32),
                                              (3, 0, 1, 5, 1, 16), (4, 3, 40, 64, 6, 16)])  # fmt: skip
def test_receiver_plan_kernel_matches_its_definition(ep: int, me: int, E_l: int, T: int, K: int, bm: int) -> None:
    """One kernel builds the receiver side of the plan from the announced counts (skewed, with empty
    experts and a source that sends nothing) and copies the rowmap: exactly the definition."""
    gen = torch.Generator().manual_seed(ep * 1000 + E_l)
    world = triton_ep.SimWorld(ep, T, K, 16, E_l, torch.float32, DEV)
    buf = world.ranks[me]
    # every source sends at most its T*K slots, over this rank's E_l experts
    counts_PE = torch.zeros(ep, E_l, dtype=torch.int64)
    for s in range(ep):
        if ep > 1 and s == (me + 1) % ep:
            continue  # sends nothing
        n = int(torch.randint(0, T * K + 1, (1,), generator=gen))
        counts_PE[s] = torch.bincount(torch.randint(0, max(1, E_l // 2), (n,), generator=gen), minlength=E_l)[:E_l]
    buf.local["counts"].copy_(counts_PE.reshape(-1).to(torch.int32))
    buf.local["rowmap"].copy_(torch.randint(-(2**31), 2**31 - 1, buf.local["rowmap"].shape, generator=gen))
    plan = triton_ep.Plan.empty(ep, T, K, E_l, bm, DEV)
    plan.packed.fill_(-7)
    triton_ep._receiver_plan(buf, plan)
    want = _receiver_plan_reference(ep, me, E_l, ep * T * K, bm, counts_PE)
    for name, w in want.items():
        assert torch.equal(getattr(plan, name).cpu().long(), w), name
    assert torch.equal(plan.rowmap.cpu(), buf.local["rowmap"].cpu())


def test_plan_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match=r"int32 \[.*ep=2, T=4, K=2, E_l=3.*got torch.int64"):
        triton_ep.Plan.view(torch.zeros(5, dtype=torch.int64), 2, 4, 2, 3, 16)


def test_each_token_sent_once_per_destination():
    """A token whose top-k experts share a rank travels there once: the receive rows equal the distinct
    (token, rank) pairs, and a rank's slots for an expert all point at that one row. A rank's own tokens do
    not travel: its block of its own receive buffer is left as it was."""
    ep, T, K, H, E_l = 2, 6, 3, 16, 2
    world = triton_ep.SimWorld(ep, T, K, H, E_l, torch.float32, DEV)
    idx = torch.tensor([[0, 1, 2], [0, 1, 3], [2, 3, 0], [1, 0, 3], [3, 2, 1], [0, 2, 1]])
    xs = [torch.randn(T, H).to(DEV) for _ in range(ep)]
    w1s = [torch.randn(E_l, H, 8).to(DEV) for _ in range(ep)]
    for b in world.ranks:  # a sentinel, not the buffer's uninitialised contents (NaN never equals itself)
        b.local["recv"].fill_(7.0)
    fwd = world.run([triton_ep.dispatch_gemm_forward(world.ranks[r], xs[r], idx.to(DEV), w1s[r]) for r in range(ep)])
    for r in range(ep):
        pos = fwd[r][2].pos_PT.cpu()
        for d in range(ep):
            hit = (idx // E_l == d).any(1)
            assert int((pos[d] >= 0).sum()) == int(hit.sum())
            assert sorted(pos[d][hit].tolist()) == list(range(int(hit.sum())))
        recv = world.ranks[r].local["recv"].view(ep, T, H)
        hit = (idx // E_l == r).any(1)
        for s in range(ep):  # the rows rank s sent to r arrived in order; r's own stay in place, unsent
            if s != r:
                torch.testing.assert_close(recv[s, : int(hit.sum())], xs[s][hit])
        assert bool((recv[r] == 7.0).all()), f"rank {r}'s own block of its receive buffer was written"
        rowmap = fwd[r][2].rowmap.view(ep, T * K, 2).cpu()
        slots = (idx // E_l == r).sum().item()
        # r's own slots (sorted by expert) point at their tokens: rows of x, not of the receive buffer
        assert torch.equal(rowmap[r, :slots, 0], rowmap[r, :slots, 1] // K)


def test_fused_ops_opcheck():
    """The fused ops' schemas, fake implementations (shapes and strides, including weight gradients laid out
    like nn.Linear-layout parameters) and autograd registration, on a one-rank world."""
    from moecc import ops

    T, K, H, Fd, E = 8, 2, 16, 24, 4
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=gen).to(DEV).requires_grad_()
    idx = routing("uniform", T, K, E, gen).to(DEV)
    w1 = torch.randn(E, Fd, H, generator=gen).to(DEV).transpose(1, 2).requires_grad_()  # a view, as interfaces pass
    w2 = torch.randn(E, Fd, H, generator=gen).to(DEV).requires_grad_()
    w = torch.rand(T, K, generator=gen).to(DEV).requires_grad_()
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(ops.ep_dispatch_gemm, (x, idx, w1, 1, ""), test_utils=utils)
    h, x_SH, plan = ops.ep_dispatch_gemm(x, idx, w1, 1, "")
    a = F.silu(h).detach().requires_grad_()
    torch.library.opcheck(ops.ep_gemm_combine, (a, w2, w, plan, 1, ""), test_utils=utils)
    out, y = ops.ep_gemm_combine(a, w2, w, plan, 1, "")
    dout = torch.randn_like(out)
    args = (dout, a.detach(), w2.detach(), w.detach(), y, plan, "")
    torch.library.opcheck(ops.ep_gemm_combine_backward, args, test_utils=utils[:2])
    dh = torch.randn_like(h)
    torch.library.opcheck(ops.ep_dispatch_gemm_backward, (dh, x_SH, w1.detach(), plan, T, K, ""), test_utils=utils[:2])
    _, dw1 = ops.ep_dispatch_gemm_backward(dh, x_SH, w1.detach(), plan, T, K, "")
    assert dw1.transpose(1, 2).is_contiguous(), "the weight gradient is laid out like the [E, F, H] parameter"


def test_buffers_serve_every_token_count_up_to_the_largest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Token counts that change from call to call (dynamic shapes) share one allocation up to the largest seen,
    views of it with their own layout and the allocation's call counters, and a larger count allocates twice
    the room at least: layers of 12, 8, 20, 16, 12 and 8 tokens make two allocations (12, then 24), and every
    call's outputs and gradients match the eager definition."""
    from moecc import ops

    monkeypatch.setattr(triton_ep, "_SYMMETRIC", {})
    monkeypatch.setattr(triton_ep, "_ALLOCATED", {})
    K, H, Fd, E = 2, 16, 24, 4
    gen = torch.Generator().manual_seed(0)
    w1 = (torch.randn(E, Fd, H, generator=gen) / 4).transpose(1, 2).requires_grad_()
    w2 = (torch.randn(E, Fd, H, generator=gen) / 4).requires_grad_()
    allocations = []
    for T in (12, 8, 20, 16, 12, 8):
        x = torch.randn(T, H, generator=gen).requires_grad_()
        idx = routing("uniform", T, K, E, gen)
        w = torch.rand(T, K, generator=gen).requires_grad_()
        before = triton_ep.COUNTERS["symmetric.allocations"]
        h, _, plan = ops.ep_dispatch_gemm(x.to(DEV), idx.to(DEV), w1.to(DEV), 1, "")
        out, _ = ops.ep_gemm_combine(F.silu(h), w2.to(DEV), w.to(DEV), plan, 1, "")
        allocations.append(triton_ep.COUNTERS["symmetric.allocations"] - before)
        dout = torch.randn(T, H, generator=gen)
        got = torch.autograd.grad(out, (x, w, w1, w2), dout.to(DEV))
        xd, wd, w1d, w2d = (t.detach().double().requires_grad_() for t in (x, w, w1, w2))
        rows = [sum(wd[t, k] * (F.silu(xd[t] @ w1d[idx[t, k]]) @ w2d[idx[t, k]]) for k in range(K)) for t in range(T)]
        want_out = torch.stack(rows)
        want = torch.autograd.grad(want_out, (xd, wd, w1d, w2d), dout.double())
        torch.testing.assert_close(out.double().cpu(), want_out, rtol=1e-4, atol=1e-4, msg=f"T={T}: output")
        for name, g, r in zip(("x", "w", "w1", "w2"), got, want, strict=True):
            torch.testing.assert_close(g.double().cpu(), r, rtol=1e-4, atol=1e-4, msg=f"T={T}: grad of {name}")
    assert allocations == [1, 0, 1, 0, 0, 0], allocations
    (room,) = triton_ep._ALLOCATED.values()
    assert room.T == 24 and room.keep["raw"].numel() == triton_ep.buffer_bytes(1, 24, K, H, E, torch.float32)
    views = {k[1]: b for k, b in triton_ep._SYMMETRIC.items()}
    assert views[16].epoch is views[20].epoch is room.epoch  # views of the 24-token allocation
    assert views[8].epoch is views[12].epoch and views[8].epoch is not room.epoch  # of the first, kept


def test_fusion_refusal_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    from moecc.passes.fuse_experts import FUSED_EP_ENV, fusion_refusal

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert "torch backend has no fused" in fusion_refusal("torch", cpu, 1)
    assert fusion_refusal("triton", cpu, 1) is None  # one rank: the same kernels on a one-rank world
    assert "needs symmetric memory" in fusion_refusal("triton", cpu, 2)
    monkeypatch.delenv(FUSED_EP_ENV, raising=False)
    assert fusion_refusal("triton", cuda, 4) is None  # across ranks on GPUs: fused by default
    monkeypatch.setenv(FUSED_EP_ENV, "0")
    assert f"{FUSED_EP_ENV}=0 switches fusion across ranks off" in fusion_refusal("triton", cuda, 4)
    assert fusion_refusal("triton", cuda, 1) is None  # one rank has nothing to exchange: the opt-out is moot
    monkeypatch.setenv(FUSED_EP_ENV, "1")
    assert fusion_refusal("triton", cuda, 4) is None
    monkeypatch.setenv(FUSED_EP_ENV, "yes")
    with pytest.raises(ValueError, match="MOECC_FUSED_EP='yes': expected 1"):
        fusion_refusal("triton", cuda, 4)
