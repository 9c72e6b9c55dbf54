"""The `torch` backend: reference implementations of the moecc ops with stock PyTorch.

Portable to CPU and GPU. Grouped GEMMs go through `torch._grouped_mm` where it supports the device, dtype
and strides, and through a per-expert loop of dense matmuls elsewhere; which path ran is counted in
`COUNTERS` so that tests and dumps can tell.

Shape suffixes: T tokens, K top-k slots, S = T*K routed rows, H hidden, E experts, N/F output features.
"""

from __future__ import annotations

import collections
from typing import Any

import torch

NAME = "torch"

# "grouped_mm.native" / "grouped_mm.loop" / "grouped_mm_wgrad.native" / "grouped_mm_wgrad.loop"
COUNTERS: collections.Counter[str] = collections.Counter()


# torch._grouped_mm refuses 1024 groups or more ("Can't process more than 1024 groups", torch 2.11 on an
# H200, 1024 included)
NATIVE_MAX_GROUPS = 1023


def native_grouped_mm_refusal(a: torch.Tensor, b: torch.Tensor, groups: int, base: bool = True) -> str | None:
    """Why `torch._grouped_mm` cannot run these operands in `groups` groups (device, dtype, group count,
    16-byte strides except unit ones and, with `base`, a 16-byte aligned base pointer: traced values have none
    to check); None where it can."""
    if groups > NATIVE_MAX_GROUPS:
        return f"{groups} experts: torch._grouped_mm takes at most {NATIVE_MAX_GROUPS} groups"
    if a.device != b.device or a.dtype != b.dtype:
        return f"operands on {a.device} / {b.device} in {a.dtype} / {b.dtype}: one device and dtype needed"
    if a.device.type == "cuda":
        if torch.cuda.get_device_capability(a.device)[0] < 9:
            return f"torch._grouped_mm needs compute capability 9.0 or newer, {a.device} has less"
        if a.dtype != torch.bfloat16:
            return f"torch._grouped_mm runs bfloat16 on CUDA, the operands are {a.dtype}"
    elif a.device.type == "cpu":
        if a.dtype not in (torch.float32, torch.bfloat16):
            return f"torch._grouped_mm on the CPU runs float32 and bfloat16, the operands are {a.dtype}"
    else:
        return f"torch._grouped_mm does not run on {a.device}"
    elt = a.element_size()
    for name, t in (("a", a), ("b", b)):
        if any(st != 1 and (st * elt) % 16 for st in t.stride()):
            return f"operand {name}'s strides {tuple(t.stride())} are not 16-byte multiples"
        if base and t.data_ptr() % 16:
            return f"operand {name}'s base pointer is not 16-byte aligned"
    return None


def can_use_native_grouped_mm(a: torch.Tensor, b: torch.Tensor, groups: int) -> bool:
    """Whether `torch._grouped_mm` runs these operands in `groups` groups on their device and dtype."""
    return native_grouped_mm_refusal(a, b, groups) is None


def _segments(offs_E: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs_E.tolist()  # host sync: only on the loop fallback
    starts = [0, *ends[:-1]]
    return list(zip(starts, ends, strict=True))


def transposed_weight(w_EKN: torch.Tensor) -> bool:
    """w is the transposed view of an [E, N, K] parameter (nn.Linear layout): its weight gradient is best
    computed as dw^T, so that it lands in the parameter's own layout."""
    return w_EKN.stride(1) == 1 and w_EKN.stride(2) != 1


def grouped_mm(x_SK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """y[rows of expert e] = x[rows of expert e] @ w[e]; rows past offs[-1] are zero."""
    S, N = x_SK.shape[0], w_EKN.shape[2]
    if S > 0 and can_use_native_grouped_mm(x_SK, w_EKN, w_EKN.shape[0]):
        COUNTERS["grouped_mm.native"] += 1
        y_SN = torch._grouped_mm(x_SK, w_EKN, offs=offs_E)
        # the native kernel leaves rows past offs[-1] unwritten
        live_S = torch.arange(S, device=x_SK.device) < offs_E[-1]
        return torch.where(live_S[:, None], y_SN, y_SN.new_zeros(()))
    COUNTERS["grouped_mm.loop"] += 1
    y_SN = x_SK.new_zeros(S, N)
    for e, (lo, hi) in enumerate(_segments(offs_E)):
        if hi > lo:
            y_SN[lo:hi] = x_SK[lo:hi] @ w_EKN[e]
    return y_SN


def grouped_mm_wgrad(
    x_SK: torch.Tensor, dy_SN: torch.Tensor, offs_E: torch.Tensor, scale: float = 1.0, acc: torch.Tensor | None = None
) -> torch.Tensor:
    """dw[e] = scale * x[rows of e]^T @ dy[rows of e] (+ acc[e], added in dw's memory); an expert with no rows
    gets a zero gradient (acc[e])."""
    dw = _wgrad(x_SK, dy_SN, offs_E, scale)
    return dw if acc is None else dw.add_(acc)


def _wgrad(x_SK: torch.Tensor, dy_SN: torch.Tensor, offs_E: torch.Tensor, scale: float) -> torch.Tensor:
    E, K, N = offs_E.shape[0], x_SK.shape[1], dy_SN.shape[1]
    xt_KS = x_SK.t()
    if x_SK.shape[0] > 0 and can_use_native_grouped_mm(xt_KS, dy_SN, E):
        COUNTERS["grouped_mm_wgrad.native"] += 1
        dw_EKN = torch._grouped_mm(xt_KS, dy_SN, offs=offs_E)
        # experts with no rows are left unwritten by the native kernel
        counts_E = torch.diff(offs_E, prepend=offs_E.new_zeros(1))
        if scale != 1.0:
            dw_EKN = dw_EKN * scale
        return torch.where((counts_E > 0)[:, None, None], dw_EKN, dw_EKN.new_zeros(()))
    COUNTERS["grouped_mm_wgrad.loop"] += 1
    dw_EKN = x_SK.new_zeros(E, K, N)
    for e, (lo, hi) in enumerate(_segments(offs_E)):
        if hi > lo:
            torch.addmm(dw_EKN[e], x_SK[lo:hi].t(), dy_SN[lo:hi], beta=0, alpha=scale, out=dw_EKN[e])
    return dw_EKN


def _histogram(keys: torch.Tensor, n: int) -> torch.Tensor:
    """Counts of each key in [0, n). Unlike bincount, the output size does not depend on the data, so no
    device-to-host synchronisation happens (the MoE layer stays capturable in a CUDA graph)."""
    return torch.zeros(n, dtype=torch.int64, device=keys.device).scatter_add_(0, keys, torch.ones_like(keys))


def route_permute(
    x_TH: torch.Tensor, idx_TK: torch.Tensor, num_experts: int, capacity: int = -1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the T*K (token, slot) pairs by expert (stable) and gather their rows.

    Returns x_SH (rows grouped by expert), src_S (flat t*K+k of each row), eid_S (expert of each row) and
    offs_E (int32 end offset of each expert's rows). Indices outside [0, E) sort last and fall past
    offs[-1]: they are dropped (their eid is clamped to E-1 so that per-expert gathers stay in bounds).
    With capacity >= 0 an expert keeps at most `capacity` pairs, the first ones in (token, slot) order; the
    rest are dropped the same way.
    """
    K = idx_TK.shape[1]
    flat_S = idx_TK.reshape(-1).to(torch.int64)
    valid_S = (flat_S >= 0) & (flat_S < num_experts)
    key_S = torch.where(valid_S, flat_S, num_experts)
    if capacity >= 0:
        key_sorted_S, order_S = torch.sort(key_S, stable=True)
        counts = _histogram(key_S, num_experts + 1)
        pos_S = torch.arange(key_S.shape[0], device=key_S.device) - (torch.cumsum(counts, 0) - counts)[key_sorted_S]
        over_S = (pos_S >= capacity) & (key_sorted_S < num_experts)
        key_S = key_S.index_put((order_S[over_S],), torch.tensor(num_experts, device=key_S.device))
    key_sorted_S, src_S = torch.sort(key_S, stable=True)
    eid_S = key_sorted_S.clamp(max=num_experts - 1)  # dropped rows sit past offs[-1]; keep ids in range
    x_SH = x_TH.index_select(0, src_S // K)
    counts_E = _histogram(key_S, num_experts + 1)[:num_experts]
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    return x_SH, src_S, eid_S, offs_E


def route_permute_backward(gx_SH: torch.Tensor, src_S: torch.Tensor, T: int) -> torch.Tensor:
    """The gradient of route_permute for x: every row's gradient added to its token's."""
    K = gx_SH.shape[0] // T if T else 1
    return gx_SH.new_zeros(T, gx_SH.shape[1]).index_add(0, src_S // K, gx_SH)


def unpermute_combine(
    y_SH: torch.Tensor, src_S: torch.Tensor, offs_E: torch.Tensor, w_TK: torch.Tensor
) -> torch.Tensor:
    """out[t] = sum_k w[t, k] * y[row of (t, k)], accumulated in float32, returned in y's dtype."""
    T, K = w_TK.shape
    S, H = y_SH.shape
    if _same_16bit(y_SH, w_TK):
        # each token's K rows gathered next to each other, then one batched [1, K] @ [K, H] product a token
        # (float32 accumulation inside the matmul): no float32 copy of the S rows, no scatter-add
        row_TK, gate_TK = _slot_rows(src_S, offs_E, w_TK)
        y_TKH = y_SH.index_select(0, row_TK.reshape(-1)).view(T, K, H)
        COUNTERS["combine.bmm"] += 1
        return torch.bmm(gate_TK.unsqueeze(1), y_TKH).squeeze(1)
    COUNTERS["combine.scatter_add"] += 1  # float32, or weights in another dtype than the rows
    live_S = torch.arange(S, device=y_SH.device) < offs_E[-1]
    gate_S = torch.where(live_S, w_TK.reshape(-1).float()[src_S], 0.0)
    out_TH = y_SH.new_zeros(T, H, dtype=torch.float32)
    out_TH.index_add_(0, src_S // K, y_SH.float() * gate_S[:, None])
    return out_TH.to(y_SH.dtype)


def unpermute_combine_backward(
    gout_TH: torch.Tensor, y_SH: torch.Tensor, src_S: torch.Tensor, offs_E: torch.Tensor, w_TK: torch.Tensor,
    need_y: bool, need_w: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """Gradients of `unpermute_combine` for y (rows in y's order) and for w, where asked for."""
    T, K = w_TK.shape
    S, H = y_SH.shape
    gy_SH = gw_TK = None
    if _same_16bit(y_SH, w_TK, gout_TH):  # as the forward: in [T, K] order, no float32 copies
        row_TK, gate_TK = _slot_rows(src_S, offs_E, w_TK)
        if need_y:  # gy[row of (t, k)] = w[t, k] * gout[t]: one rounding of the product, as in float32
            gy_SH = (gout_TH.unsqueeze(1) * gate_TK.unsqueeze(2)).view(S, H).index_select(0, src_S)
        if need_w:  # gw[t, k] = <gout[t], y[row of (t, k)]>, float32 accumulation inside the matmul
            y_TKH = y_SH.index_select(0, row_TK.reshape(-1)).view(T, K, H)
            gw_TK = torch.bmm(y_TKH, gout_TH.unsqueeze(2)).squeeze(2)
            gw_TK = torch.where(row_TK < offs_E[-1], gw_TK, 0.0)
        return gy_SH, gw_TK
    live_S = torch.arange(S, device=y_SH.device) < offs_E[-1]
    g_SH = gout_TH.float().index_select(0, src_S // K)
    if need_y:
        gate_S = torch.where(live_S, w_TK.reshape(-1).float().index_select(0, src_S), 0.0)
        gy_SH = (g_SH * gate_S[:, None]).to(y_SH.dtype)
    if need_w:
        dot_S = torch.where(live_S, (g_SH * y_SH.float()).sum(-1), 0.0)
        gw_TK = dot_S.new_zeros(S).index_copy(0, src_S, dot_S).reshape(w_TK.shape).to(w_TK.dtype)
    return gy_SH, gw_TK


def _same_16bit(*ts: torch.Tensor) -> bool:
    """Whether the combine can run in the tensors' own 16-bit dtype. In float32 the scatter-add path copies
    nothing and measured faster on the CPU (1.1-1.3x), so it stays there."""
    return ts[0].dtype in (torch.bfloat16, torch.float16) and all(t.dtype == ts[0].dtype for t in ts)


def _slot_rows(src_S: torch.Tensor, offs_E: torch.Tensor, w_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The row of y that holds each (token, slot) (the inverse of the permutation src_S) and the slots' weights,
    zero for slots whose row is past offs[-1] (dropped)."""
    S = src_S.shape[0]
    row_S = torch.empty_like(src_S).scatter_(0, src_S, torch.arange(S, device=src_S.device))
    row_TK = row_S.view(w_TK.shape)
    return row_TK, torch.where(row_TK < offs_E[-1], w_TK, 0.0)


# ---------------------------------------------------------------------------------------------------------
# expert parallelism: routing plan and row all-to-all over torch.distributed (gloo on CPU, NCCL on GPU)
#
# Buffers have static shapes (R = ep * T rows, the most a rank can receive when each token goes at most
# once to each rank); the valid rows come first and the rest is zero, so that the graph around them keeps
# static shapes. Only the row counts cross to the host, inside these functions.


def _group(group_name: str):
    from moecc.dist import group_by_name

    return group_by_name(group_name)


def _collective(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        raise RuntimeError(
            f"moecc: rank {rank}: {what} failed ({e}); a peer rank may have died or stalled "
            "(the process group's timeout bounds the wait)"
        ) from e


def _hits(idx_TK: torch.Tensor, num_experts: int, ep: int) -> torch.Tensor:
    """[ep, T, K]: whether slot k of token t goes to rank d (an expert id outside [0, E) goes nowhere)."""
    E_local = num_experts // ep
    dest_TK = torch.where((idx_TK >= 0) & (idx_TK < num_experts), idx_TK // E_local, -1)
    return dest_TK.unsqueeze(0) == torch.arange(ep, device=idx_TK.device)[:, None, None]


def plan_rows(
    idx_TK: torch.Tensor, num_experts: int, ep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`ep_plan`'s rows, on the device and without waiting for it: (send_tok_R, send_idx_RK, send_sel_RK,
    send_counts_P). The (destination, token) pairs a token's slots hit are put first, in destination then token
    order, by a stable sort of the ep * T hit flags (a `nonzero` would copy its count to the host and wait)."""
    T, K = idx_TK.shape
    R = ep * T
    E_local = num_experts // ep
    hit_PTK = _hits(idx_TK, num_experts, ep)
    hit_PT = hit_PTK.any(-1)
    send_counts_P = hit_PT.sum(-1)
    # the hits first (key 0), each group in its original (destination-major) order
    order_R = torch.sort((~hit_PT).flatten().to(torch.uint8), stable=True).indices
    live_R = torch.arange(R, device=idx_TK.device) < send_counts_P.sum()
    peer_R, tok_R = order_R // T, order_R % T
    send_tok_R = torch.where(live_R, tok_R, 0)
    send_sel_RK = hit_PTK[peer_R, tok_R] & live_R[:, None]
    local_RK = idx_TK[tok_R] - (peer_R * E_local)[:, None]
    send_idx_RK = torch.where(send_sel_RK, local_RK, -1)
    return send_tok_R, send_idx_RK, send_sel_RK, send_counts_P


def padded_plan(
    idx_TK: torch.Tensor, num_experts: int, ep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`ep_plan(padded=True)`: row d * T + t is token t for rank d (see there). Few ops: in a step on a GPU each
    costs the host about 20 us."""
    T, K = idx_TK.shape
    E_local = num_experts // ep
    sel_PTK = _hits(idx_TK, num_experts, ep)
    idx_PTK = torch.where(sel_PTK, (idx_TK % E_local).unsqueeze(0), -1)
    tok_R = torch.arange(T, device=idx_TK.device).repeat(ep)
    counts_P = torch.full((ep,), T, dtype=torch.int64)  # on the host, known without the device
    COUNTERS["ep.plans_padded"] += 1
    return tok_R, idx_PTK.reshape(ep * T, K), sel_PTK.reshape(ep * T, K), counts_P, counts_P.clone()


def ep_plan(
    idx_TK: torch.Tensor, num_experts: int, ep: int, group_name: str, padded: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which token rows go to which rank, each token at most once per destination rank.

    Returns send_tok_R (token of each send row, grouped by destination rank; padding rows point at token 0),
    send_idx_RK (the row's top-k slots as expert ids local to the destination, -1 where the slot's expert
    lives elsewhere), send_sel_RK (those slots as a mask), send_counts_P and recv_counts_P (rows per peer,
    on the host: the one host synchronisation of a dispatch is here, so that the row all-to-alls that use
    these counts as split sizes can be issued without waiting for the device).

    padded: every token goes to every rank, row d * T + t to rank d; the rows of tokens with no expert there
    travel as padding (all their slots -1, so the receiver's permutation drops them and its combine returns
    zeros for them). The counts are T per peer, known without the device: no count exchange and no host
    synchronisation (a CUDA graph can replay it), for ep * T rows of traffic instead of the rows needed.
    """
    import torch.distributed as dist

    if padded:
        return padded_plan(idx_TK, num_experts, ep)
    send_tok_R, send_idx_RK, send_sel_RK, send_counts_P = plan_rows(idx_TK, num_experts, ep)
    recv_counts_P = torch.empty_like(send_counts_P)
    _collective(
        "the routing-count exchange", dist.all_to_all_single, recv_counts_P, send_counts_P, group=_group(group_name)
    )
    COUNTERS["ep.plans"] += 1
    counts = torch.stack([send_counts_P, recv_counts_P]).cpu()
    return send_tok_R, send_idx_RK, send_sel_RK, counts[0].clone(), counts[1].clone()  # one copy, unaliased


def all_to_all_rows(
    x_R: torch.Tensor, in_counts_P: torch.Tensor, out_counts_P: torch.Tensor, group_name: str
) -> torch.Tensor:
    """Send rows [0, sum(in_counts)) of x, in_counts[p] of them to peer p; receive out_counts[p] rows from
    each peer into the front of a zero buffer shaped like x. Counts rows and bytes sent to other ranks."""
    out, work = _start_rows(x_R, in_counts_P, out_counts_P, group_name)
    _collective("an all-to-all of token rows", work.wait)
    return out


def all_to_all_rows_start(
    x_R: torch.Tensor, in_counts_P: torch.Tensor, out_counts_P: torch.Tensor, group_name: str
) -> torch.Tensor:
    """`all_to_all_rows`, issued and not waited for: returns the receive buffer, which holds the rows once
    `torch.ops._c10d_functional.wait_tensor` has been called on it (the schedule pass places that wait just
    before the first use, so that independent compute runs meanwhile)."""
    out, work = _start_rows(x_R, in_counts_P, out_counts_P, group_name)
    torch._C._distributed_c10d._register_work(out, work)
    return out


def _start_rows(
    x_R: torch.Tensor, in_counts_P: torch.Tensor, out_counts_P: torch.Tensor, group_name: str
) -> tuple[torch.Tensor, Any]:
    import torch.distributed as dist

    group = _group(group_name)
    ins, outs = in_counts_P.tolist(), out_counts_P.tolist()  # host tensors (ep_plan): no device sync
    out = torch.zeros_like(x_R)
    n_in, n_out = sum(ins), sum(outs)
    if n_in > x_R.shape[0] or n_out > x_R.shape[0]:
        raise RuntimeError(
            f"moecc: all_to_all_rows: {n_in} rows to send / {n_out} to receive exceed the buffer of "
            f"{x_R.shape[0]} rows (ep times this rank's tokens): the ranks of the ep-group hold different "
            "token counts in this step; call the compiled model with inputs of the same shapes on every rank "
            "(compile's check_inputs, on by default, refuses such a call before it runs)"
        )
    work = _collective(
        "an all-to-all of token rows",
        dist.all_to_all_single,
        out[:n_out],
        x_R[:n_in].contiguous(),
        outs,
        ins,
        group=group,
        async_op=True,
    )
    me = dist.get_rank(group)
    row_bytes = x_R[0].numel() * x_R.element_size() if x_R.shape[0] else 0
    remote = n_in - ins[me]
    COUNTERS["a2a.calls"] += 1
    COUNTERS["a2a.rows_remote"] += remote
    COUNTERS["a2a.rows_local"] += ins[me]
    COUNTERS["a2a.bytes_remote"] += remote * row_bytes
    return out, work


# ---------------------------------------------------------------------------------------------------------
# the GLU activation of an expert FFN: act(gate) * up over h = [gate | up]

GLU_ACTS = ("silu", "gelu", "gelu_tanh", "relu")


def glu_name(act: str) -> str:
    """The expert-function name of act(gate) * up, as regions and dumps show it."""
    return {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}.get(act, f"glu_{act}")


def glu_act(fn: str) -> str | None:
    """The activation of an expert-function name that `glu` computes, else None."""
    return next((a for a in GLU_ACTS if glu_name(a) == fn), None)


def act(kind: str, g: torch.Tensor) -> torch.Tensor:
    """An expert's activation by name (silu, relu, gelu, gelu_tanh)."""
    if kind == "silu":
        return torch.nn.functional.silu(g)
    if kind == "relu":
        return torch.nn.functional.relu(g)
    return torch.nn.functional.gelu(g, approximate="tanh" if kind == "gelu_tanh" else "none")


def glu(h_SF2: torch.Tensor, kind: str) -> torch.Tensor:
    """act(gate) * up, gate and up the two halves of h's last dimension: the same ops as the model's."""
    COUNTERS["glu.torch"] += 1
    gate, up = h_SF2.chunk(2, dim=-1)
    return act(kind, gate) * up


def glu_backward(da_SF: torch.Tensor, h_SF2: torch.Tensor, kind: str) -> torch.Tensor:
    """[d gate | d up] of glu: the ops autograd runs for the model's chunk, act and multiply, in their order
    and dtype, so that the result is eager's to the bit."""
    COUNTERS["glu_backward.torch"] += 1
    gate, up = h_SF2.chunk(2, dim=-1)
    a = act(kind, gate)
    d_act = da_SF * up
    if kind == "silu":
        d_gate = torch.ops.aten.silu_backward(d_act, gate)
    elif kind == "relu":
        d_gate = torch.ops.aten.threshold_backward(d_act, a, 0)
    else:
        d_gate = torch.ops.aten.gelu_backward(d_act, gate, approximate="tanh" if kind == "gelu_tanh" else "none")
    return torch.cat([d_gate, da_SF * a], dim=-1)
