"""The moecc custom ops against the eager definition of an MoE layer (`ops.moe_reference`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moecc import ops
from moecc.backends import torch_backend

E, H, FF = 4, 32, 16


def _routing(T: int, K: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])


def _params(T: int, K: int, dtype: torch.dtype, seed: int = 0, hidden: int = H):
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, hidden, generator=gen).to(dtype).requires_grad_()
    w = torch.rand(T, K, generator=gen).to(dtype).requires_grad_()
    w1 = (torch.randn(E, hidden, 2 * FF, generator=gen) / hidden**0.5).to(dtype).requires_grad_()
    w2 = (torch.randn(E, FF, hidden, generator=gen) / FF**0.5).to(dtype).requires_grad_()
    return x, w, w1, w2


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    g, u = h.chunk(2, dim=-1)
    return F.silu(g) * u


def moe_ops(x, idx, w, w1, w2):
    """A SwiGLU MoE layer made of the moecc ops."""
    x_SH, src_S, _eid_S, offs_E = ops.route_permute(x, idx, E)
    h = _swiglu(ops.grouped_mm(x_SH, w1, offs_E))
    y = ops.grouped_mm(h, w2, offs_E)
    return ops.unpermute_combine(y, src_S, offs_E, w)


def moe_eager(x, idx, w, w1, w2):
    fns = [lambda r, e=e: _swiglu(r @ w1[e]) @ w2[e] for e in range(E)]
    return ops.moe_reference(x, idx, w, fns)


def _fwd_bwd(fn, idx, tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    x, w, w1, w2 = leaves
    out = fn(x, idx, w, w1, w2)
    gen = torch.Generator().manual_seed(7)
    out.backward(torch.randn(out.shape, generator=gen).to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


NAMES = ["x", "w_TK", "w1", "w2"]


def _compare(idx, tensors, atol, rtol=0.0, scaled=False):
    out, grads = _fwd_bwd(moe_ops, idx, tensors)
    ref, ref_grads = _fwd_bwd(moe_eager, idx, tensors)
    assert out.dtype == ref.dtype == tensors[0].dtype
    pairs = [("out", out, ref)] + [(f"d{n}", g, r) for n, g, r in zip(NAMES, grads, ref_grads, strict=True)]
    for name, got, expect in pairs:
        assert got is not None, name
        if scaled:
            got, expect = got.float(), expect.float()
            tol = atol * (expect.abs().max().item() + 1e-3)
            assert (got - expect).abs().max().item() <= tol, name
        else:
            torch.testing.assert_close(got, expect, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
    return out, grads


@pytest.mark.parametrize("T,K", [(37, 2), (16, 1), (9, 4)])
def test_float32_forward_and_grads_match_reference(T, K):
    idx = _routing(T, K, seed=T)
    _compare(idx, _params(T, K, torch.float32, seed=T), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T,K", [(37, 2), (16, 1)])
def test_bfloat16_forward_and_grads_match_reference(T, K):
    idx = _routing(T, K, seed=T)
    _compare(idx, _params(T, K, torch.bfloat16, seed=T), atol=3e-2, scaled=True)


def test_expert_with_no_tokens_gets_exactly_zero_weight_grad():
    T, K = 20, 2
    idx = _routing(T, K)
    idx[idx == 2] = 3  # expert 2 receives nothing (an expert appears at most once per token: use 0/1/3)
    idx[:, 1] = torch.where(idx[:, 0] == idx[:, 1], (idx[:, 0] + 1) % 2, idx[:, 1])
    assert not (idx == 2).any()
    _, grads = _compare(idx, _params(T, K, torch.float32), atol=1e-5, rtol=1e-5)
    dw1, dw2 = grads[2], grads[3]
    assert torch.equal(dw1[2], torch.zeros_like(dw1[2]))
    assert torch.equal(dw2[2], torch.zeros_like(dw2[2]))
    assert dw1[0].abs().sum() > 0 and dw2[3].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_tokens_to_one_expert(dtype):
    T = 24
    idx = torch.full((T, 1), 1)
    out, grads = _compare(idx, _params(T, 1, dtype), atol=1e-5 if dtype == torch.float32 else 3e-2, scaled=True)
    for e in (0, 2, 3):
        assert torch.equal(grads[2][e], torch.zeros_like(grads[2][e]))
        assert torch.equal(grads[3][e], torch.zeros_like(grads[3][e]))
    assert out.abs().sum() > 0


def test_top1_routing():
    T = 33
    idx = _routing(T, 1, seed=3)
    _compare(idx, _params(T, 1, torch.float32, seed=3), atol=1e-5, rtol=1e-5)


def test_out_of_range_indices_are_dropped():
    T, K = 12, 2
    idx = _routing(T, K, seed=5)
    idx[0, 0] = -1
    idx[3, 1] = E
    idx[7] = torch.tensor([-1, E])  # token 7 goes nowhere
    tensors = _params(T, K, torch.float32, seed=5)
    out, grads = _compare(idx, tensors, atol=1e-5, rtol=1e-5)
    # dropped slots contribute nothing: the same as routing the slot to nowhere with weight 0
    assert torch.equal(out[7], torch.zeros_like(out[7]))
    assert torch.equal(grads[0][7], torch.zeros_like(grads[0][7]))
    dw = grads[1]
    assert dw[0, 0] == 0 and dw[3, 1] == 0 and dw[7].abs().sum() == 0
    # and the rows that were routed are unaffected by the dropped ones
    keep = torch.tensor([t not in (0, 3, 7) for t in range(T)])
    idx_clean = idx.clone()
    idx_clean[0, 0], idx_clean[3, 1] = idx[0, 1] ^ 1, idx[3, 0] ^ 1  # some valid, different expert
    out_clean, _ = _fwd_bwd(moe_ops, idx_clean, tensors)
    torch.testing.assert_close(out[keep], out_clean[keep], atol=1e-6, rtol=1e-6)


def test_route_permute_layout():
    T, K = 10, 2
    idx = _routing(T, K, seed=11)
    idx[4, 1] = -1
    x = torch.randn(T, H)
    x_SH, src_S, eid_S, offs_E = ops.route_permute(x, idx, E)
    assert x_SH.shape == (T * K, H) and src_S.shape == eid_S.shape == (T * K,) and offs_E.shape == (E,)
    assert offs_E.dtype == torch.int32
    counts = torch.bincount(idx[idx >= 0].flatten(), minlength=E)
    torch.testing.assert_close(offs_E.long(), torch.cumsum(counts, 0))
    live = int(offs_E[-1])
    assert live == T * K - 1
    flat = idx.flatten()
    assert torch.equal(eid_S[:live], flat[src_S[:live]])
    assert torch.equal(eid_S[:live], torch.sort(eid_S[:live]).values)  # grouped by expert
    assert torch.equal(x_SH, x[src_S // K])
    assert 0 <= int(eid_S.min()) and int(eid_S.max()) < E  # the dropped row's id stays in range


def test_empty_batch():
    idx = torch.zeros(0, 2, dtype=torch.int64)
    x, w, w1, w2 = _params(0, 2, torch.float32)
    out = moe_ops(x, idx, w, w1, w2)
    assert out.shape == (0, H)
    out.sum().backward()
    assert torch.equal(w1.grad, torch.zeros_like(w1))


# ---------------------------------------------------------------------------------------------------------
# opcheck


def _opcheck_cases():
    T, K = 11, 2
    x, w, w1, _ = _params(T, K, torch.float32, seed=2)
    idx = _routing(T, K, seed=2)
    idx[1, 0] = -1
    x_SH, src_S, _eid, offs_E = ops.route_permute(x.detach(), idx, E)
    dy = torch.randn(T * K, 2 * FF)
    y = torch.randn(T * K, H, requires_grad=True)
    return {
        "route_permute": (torch.ops.moecc.route_permute.default, (x, idx, E)),
        "grouped_mm": (torch.ops.moecc.grouped_mm.default, (x_SH.requires_grad_(), w1, offs_E)),
        "grouped_mm_wgrad": (torch.ops.moecc.grouped_mm_wgrad.default, (x_SH.detach(), dy, offs_E)),
        "grouped_mm_wgrad_acc": (
            torch.ops.moecc.grouped_mm_wgrad.default,
            (x_SH.detach(), dy, offs_E, 0.5, torch.randn(E, H, 2 * FF)),
        ),
        "unpermute_combine": (torch.ops.moecc.unpermute_combine.default, (y, src_S, offs_E, w)),
        "route_permute_backward": (torch.ops.moecc.route_permute_backward.default, (torch.randn(T * K, H), src_S, T)),
        "unpermute_combine_backward": (
            torch.ops.moecc.unpermute_combine_backward.default,
            (torch.randn(T, H), y.detach(), src_S, offs_E, w.detach(), True, True),
        ),
        "unpermute_combine_backward_w_only": (
            torch.ops.moecc.unpermute_combine_backward.default,
            (torch.randn(T, H), y.detach(), src_S, offs_E, w.detach(), False, True),
        ),
    }


@pytest.mark.parametrize("name", ["route_permute", "grouped_mm", "grouped_mm_wgrad", "grouped_mm_wgrad_acc",
                                  "unpermute_combine",
                                  "route_permute_backward", "unpermute_combine_backward",
                                  "unpermute_combine_backward_w_only"])  # fmt: skip
def test_opcheck(name):
    op, args = _opcheck_cases()[name]
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_every_moe_op_is_opchecked():
    # ep_plan and all_to_all_rows need a process group: tests/test_distributed.py opchecks them (and checks
    # all_to_all_rows_start, which has no autograd formula, against all_to_all_rows); the triton kernels' ops
    # (and native_grouped_mm's) are opchecked in tests/test_triton_backend.py, the fused ones in tests/test_triton_ep.py
    names = ("route_permute", "grouped_mm", "grouped_mm_wgrad", "unpermute_combine", "unpermute_combine_backward",
             "route_permute_backward", "ep_plan", "all_to_all_rows", "all_to_all_rows_start")  # fmt: skip
    assert {op.name() for op in ops.MOE_OPS} == {f"moecc::{n}" for n in names} | {
        "moecc::triton_grouped_mm",
        "moecc::triton_grouped_mm_wgrad",
        "moecc::native_grouped_mm",
        "moecc::native_grouped_mm_wgrad",
        "moecc::triton_unpermute_combine",
        "moecc::triton_unpermute_combine_backward",
        "moecc::triton_route_permute_backward",
        "moecc::ep_dispatch_gemm",
        "moecc::ep_dispatch_gemm_backward",
        "moecc::ep_gemm_combine",
        "moecc::ep_gemm_combine_backward",
    }


# ---------------------------------------------------------------------------------------------------------
# the two grouped GEMM paths of the torch backend


def _grouped_inputs(hidden: int, dtype=torch.float32, n_out: int = 8, T: int = 13, K: int = 2):
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(T, hidden, generator=gen).to(dtype)
    idx = _routing(T, K, seed=hidden)
    if K == 1:
        idx[idx == 1] = 0  # expert 1 gets no rows
    x_SH, _src, _eid, offs_E = ops.route_permute(x, idx, E)
    w = torch.randn(E, hidden, n_out, generator=gen).to(dtype)
    dy = torch.randn(T * K, n_out, generator=gen).to(dtype)
    return x_SH, w, dy, offs_E


def _per_expert(x_SH, w, dy, offs_E):
    y = torch.zeros(x_SH.shape[0], w.shape[2], dtype=torch.float32)
    dw = torch.zeros(w.shape, dtype=torch.float32)
    lo = 0
    for e, hi in enumerate(offs_E.tolist()):
        y[lo:hi] = x_SH[lo:hi].float() @ w[e].float()
        dw[e] = x_SH[lo:hi].float().t() @ dy[lo:hi].float()
        lo = hi
    return y, dw


def _run_backend(x_SH, w, dy, offs_E):
    before = torch_backend.COUNTERS.copy()
    y = torch_backend.grouped_mm(x_SH, w, offs_E)
    dw = torch_backend.grouped_mm_wgrad(x_SH, dy, offs_E)
    ran = torch_backend.COUNTERS - before
    return y, dw, dict(ran)


def test_grouped_mm_native_path_on_aligned_operands():
    x_SH, w, dy, offs_E = _grouped_inputs(hidden=32)
    assert torch_backend.can_use_native_grouped_mm(x_SH, w, w.shape[0])
    y, dw, ran = _run_backend(x_SH, w, dy, offs_E)
    assert ran == {"grouped_mm.native": 1, "grouped_mm_wgrad.native": 1}
    ry, rdw = _per_expert(x_SH, w, dy, offs_E)
    torch.testing.assert_close(y, ry, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw, rdw, atol=1e-5, rtol=1e-5)


def test_grouped_mm_refuses_the_native_kernel_past_its_group_limit():
    """torch._grouped_mm stops at 1023 groups ("Can't process more than 1024 groups" on an H200 with 1024):
    more experts take the loop, with the same results."""
    x_SH, w, dy, offs_E = _grouped_inputs(hidden=32)
    limit = torch_backend.NATIVE_MAX_GROUPS
    assert torch_backend.native_grouped_mm_refusal(x_SH, w, limit) is None
    why = torch_backend.native_grouped_mm_refusal(x_SH, w, limit + 1)
    assert why == f"{limit + 1} experts: torch._grouped_mm takes at most {limit} groups", why
    E, H = limit + 1, 16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * E, H, generator=gen)
    many = torch.randn(E, H, 8, generator=gen)
    offs = torch.arange(2, 2 * E + 1, 2, dtype=torch.int32)
    before = dict(torch_backend.COUNTERS)
    y = torch_backend.grouped_mm(x, many, offs)
    assert torch_backend.COUNTERS["grouped_mm.loop"] == before.get("grouped_mm.loop", 0) + 1
    torch.testing.assert_close(y, torch.bmm(x.view(E, 2, H), many).view(2 * E, 8), atol=1e-5, rtol=1e-5)


def test_grouped_mm_loop_path_on_unaligned_strides():
    x_SH, w, dy, offs_E = _grouped_inputs(hidden=6)  # a row is 24 bytes: not 16-byte aligned
    assert not torch_backend.can_use_native_grouped_mm(x_SH, w, w.shape[0])
    y, dw, ran = _run_backend(x_SH, w, dy, offs_E)
    assert ran == {"grouped_mm.loop": 1, "grouped_mm_wgrad.loop": 1}
    ry, rdw = _per_expert(x_SH, w, dy, offs_E)
    torch.testing.assert_close(y, ry, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw, rdw, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 2])
def test_grouped_mm_native_and_loop_paths_agree(monkeypatch, dtype, K):
    x_SH, w, dy, offs_E = _grouped_inputs(hidden=32, dtype=dtype, K=K)
    counts = torch.diff(offs_E, prepend=offs_E.new_zeros(1))
    assert K == 2 or counts[1] == 0
    y_n, dw_n, ran_n = _run_backend(x_SH, w, dy, offs_E)
    assert ran_n == {"grouped_mm.native": 1, "grouped_mm_wgrad.native": 1}
    monkeypatch.setattr(torch_backend, "can_use_native_grouped_mm", lambda a, b, groups: False)
    y_l, dw_l, ran_l = _run_backend(x_SH, w, dy, offs_E)
    assert ran_l == {"grouped_mm.loop": 1, "grouped_mm_wgrad.loop": 1}
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y_n, y_l, **tol)
    torch.testing.assert_close(dw_n, dw_l, **tol)
    for e in torch.nonzero(counts == 0).flatten().tolist():  # experts without rows: exactly zero on both
        assert torch.equal(dw_n[e], torch.zeros_like(dw_n[e])) and torch.equal(dw_l[e], torch.zeros_like(dw_l[e]))


def test_grouped_mm_rows_past_the_last_offset_are_zero():
    x_SH, w, dy, offs_E = _grouped_inputs(hidden=32)
    offs_E = offs_E.clone()
    offs_E[-1] -= 3  # the last 3 rows belong to no expert (dropped)
    y_n, dw_n, _ = _run_backend(x_SH, w, dy, offs_E)
    assert torch.equal(y_n[-3:], torch.zeros_like(y_n[-3:]))
    y6, w6, dy6, offs6 = _grouped_inputs(hidden=6)
    offs6 = offs6.clone()
    offs6[-1] -= 3
    y_l, _, ran = _run_backend(y6, w6, dy6, offs6)
    assert ran["grouped_mm.loop"] == 1
    assert torch.equal(y_l[-3:], torch.zeros_like(y_l[-3:]))


def test_moe_layer_with_unaligned_hidden_uses_loop_path_and_matches_reference():
    T, K, hidden = 15, 2, 6
    idx = _routing(T, K, seed=4)
    tensors = _params(T, K, torch.float32, seed=4, hidden=hidden)
    before = torch_backend.COUNTERS.copy()
    out, grads = _fwd_bwd(moe_ops, idx, tensors)
    ran = torch_backend.COUNTERS - before
    assert ran["grouped_mm.loop"] >= 1 and ran["grouped_mm_wgrad.loop"] >= 1
    ref, ref_grads = _fwd_bwd(moe_eager, idx, tensors)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, g, r in zip(NAMES, grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


# ---------------------------------------------------------------------------------------------------------
# capacity: an expert keeps the first C (token, slot) pairs in order and drops the rest


def test_capacity_drops_overflow_in_token_order():
    T, K, E, H, C = 24, 2, 4, 8, 5
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(T, H, generator=gen, requires_grad=True)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    idx[:10, 0] = 0  # expert 0 overflows
    w = torch.rand(T, K, generator=gen, requires_grad=True)
    w1 = torch.randn(E, H, H, generator=gen, requires_grad=True)

    kept = torch.zeros(T, K, dtype=torch.bool)  # the policy, written out
    seen = [0] * E
    for t in range(T):
        for k in range(K):
            e = int(idx[t, k])
            if seen[e] < C:
                kept[t, k] = True
            seen[e] += 1
    assert not kept.all(), "the test must overflow some expert"
    xs, src, eid, offs = ops.route_permute(x, idx, E, C)
    assert torch.diff(offs, prepend=offs.new_zeros(1)).max() <= C
    out = ops.unpermute_combine(ops.grouped_mm(xs, w1, offs), src, offs, w)
    ref = ops.moe_reference(x, torch.where(kept, idx, -1), w, [lambda r, e=e: r @ w1[e] for e in range(E)])
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, w, w1), g), torch.autograd.grad(ref, (x, w, w1), g), strict=True):
        torch.testing.assert_close(a, b)


def test_capacity_formula_and_dropless_default():
    assert ops.expert_capacity(None, 100, 2, 8) == -1
    assert ops.expert_capacity(1.0, 100, 2, 8) == 25
    assert ops.expert_capacity(1.25, 10, 2, 8) == 4  # ceil(3.125)


def test_combine_same_dtype_path_matches_float32_path():
    """unpermute_combine with weights in y's dtype (gathers each token's rows and multiplies them in a batched
    matmul) against weights in float32 (float32 copies and a scatter-add), forward and both gradients, with
    dropped rows past offs[-1] holding finite garbage that must not reach the results."""
    gen = torch.Generator().manual_seed(3)
    T, K, H = 13, 3, 24
    S = T * K
    src_S = torch.randperm(S, generator=gen)
    offs_E = torch.tensor([10, 10, 30], dtype=torch.int32)  # rows 30.. are dropped
    y = torch.randn(S, H, generator=gen).to(torch.bfloat16)
    w = torch.rand(T, K, generator=gen).to(torch.bfloat16)
    gout = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    results = []
    for w_dtype, path in ((torch.bfloat16, "combine.bmm"), (torch.float32, "combine.scatter_add")):
        before = dict(torch_backend.COUNTERS)
        yl, wl = y.clone().requires_grad_(), w.clone().to(w_dtype).requires_grad_()
        out = ops.unpermute_combine(yl, src_S, offs_E, wl)
        out.backward(gout)
        results.append((out.float(), yl.grad.float(), wl.grad.float()))
        assert torch_backend.COUNTERS[path] == before.get(path, 0) + 1, path
    for name, a, b in zip(("out", "dy", "dw"), *results, strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2, msg=lambda m, n=name: f"{n}: {m}")
    dropped = torch.zeros(S, dtype=torch.bool)
    dropped[src_S[30:]] = True  # slots whose row is dropped
    assert not results[0][2].reshape(-1)[dropped].any(), "dropped slots must get a zero weight gradient"
    assert not results[0][1][30:].any(), "dropped rows must get a zero gradient"


def test_grouped_mm_wgrad_adds_its_accumulator() -> None:
    """acc + scale * x^T dy, in both backends' dW (the torch backend's here), against the sum done apart; a
    wrongly shaped accumulator is refused with both shapes named."""
    T, K = 13, 2
    x, w, w1, _ = _params(T, K, torch.float32, seed=4)
    x_SH, _src, _eid, offs_E = ops.route_permute(x.detach(), _routing(T, K, seed=4), E)
    dy = torch.randn(T * K, 2 * FF)
    acc = torch.randn(E, H, 2 * FF)
    got = torch.ops.moecc.grouped_mm_wgrad(x_SH, dy, offs_E, 0.5, acc)
    torch.testing.assert_close(got, acc + torch.ops.moecc.grouped_mm_wgrad(x_SH, dy, offs_E, 0.5))
    with pytest.raises(Exception, match=r"acc is \[8, 4, 4\]"):
        torch.compile(lambda a: torch.ops.moecc.grouped_mm_wgrad(x_SH, dy, offs_E, 1.0, a), backend="eager",
                      fullgraph=True)(torch.randn(8, 4, 4))  # fmt: skip


def _plan_rows_reference(idx_TK: torch.Tensor, E: int, ep: int):
    """ep_plan's rows written the plain way, with nonzero (which waits for the device on a GPU)."""
    T, K = idx_TK.shape
    E_l = E // ep
    dest = torch.where((idx_TK >= 0) & (idx_TK < E), idx_TK // E_l, -1)
    tok, idx, sel = (
        torch.zeros(ep * T, dtype=torch.int64),
        torch.full((ep * T, K), -1),
        torch.zeros(ep * T, K, dtype=torch.bool),
    )
    r = 0
    for p in range(ep):
        for t in range(T):
            hit = dest[t] == p
            if hit.any():
                tok[r], sel[r] = t, hit
                idx[r] = torch.where(hit, idx_TK[t] - p * E_l, -1)
                r += 1
    counts = torch.tensor([int(((dest == p).any(-1)).sum()) for p in range(ep)])
    return tok, idx, sel, counts


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_plan_rows_matches_the_plain_plan_with_dropped_slots(ep: int) -> None:
    gen = torch.Generator().manual_seed(ep)
    T, K, E = 37, 3, 8
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    drop = torch.rand(T, K, generator=gen) < 0.2
    idx = torch.where(drop, torch.where(torch.rand(T, K, generator=gen) < 0.5, -1, E + 3), idx)  # out of range
    idx[5] = -1  # a token that goes nowhere
    got = torch_backend.plan_rows(idx, E, ep)
    for g, w, name in zip(got, _plan_rows_reference(idx, E, ep), ("tok", "idx", "sel", "counts"), strict=True):
        assert torch.equal(g, w), name


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_padded_plan_holds_every_token_once_per_rank_with_the_plain_plans_slots(ep: int) -> None:
    """Row d * T + t of the padded plan is token t for rank d: the plain plan's row for (d, t) where t has an
    expert on d, else padding (every slot -1, so the receiver drops it and its experts never see it)."""
    gen = torch.Generator().manual_seed(10 + ep)
    T, K, E = 29, 2, 8
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    idx[3, 1] = -1
    idx[7] = E  # out of range: dropped
    tok, sel_idx, sel, n_P, m_P = torch_backend.padded_plan(idx, E, ep)
    assert n_P.device.type == m_P.device.type == "cpu" and n_P.tolist() == m_P.tolist() == [T] * ep
    assert torch.equal(tok, torch.arange(T).repeat(ep))
    assert torch.equal(sel_idx >= 0, sel)
    ref_tok, ref_idx, ref_sel, counts = _plan_rows_reference(idx, E, ep)
    live = ref_sel.any(-1)
    rows = torch.repeat_interleave(torch.arange(ep), counts) * T + ref_tok[live]  # (d, t) of each plain row
    assert torch.equal(sel_idx[rows], ref_idx[live]) and torch.equal(sel[rows], ref_sel[live])
    padding = torch.ones(ep * T, dtype=torch.bool)
    padding[rows] = False
    assert (sel_idx[padding] == -1).all() and not sel[padding].any()
