"""The moecc custom ops: the MoE-level operations of the IR (namespace `moecc`).

Each op has a fake (meta) implementation, so that Dynamo and AOTAutograd trace it without running it,
and an autograd formula whose backward is again made of moecc ops and stock ATen ops, so that the
backward graph AOTAutograd produces carries the same MoE structure as the forward.

A lifted MoE region reads

    x_SH, src_S, eid_S, offs_E = moecc.route_permute(x_TH, idx_TK, E)   # dispatch: sort rows by expert
    h_SF = moecc.grouped_mm(x_SH, w1_EHF, offs_E)                        # expert GEMM 1
    h_SF = <the expert's activation, as ordinary graph ops>
    y_SH = moecc.grouped_mm(h_SF, w2_EFH, offs_E)                        # expert GEMM 2
    out_TH = moecc.unpermute_combine(y_SH, src_S, offs_E, w_TK)          # combine: weighted sum per token

Legend: T tokens, K top-k slots, S = T*K routed rows, H hidden, F expert FFN width, E experts.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from moecc.backends import torch_backend

# ---------------------------------------------------------------------------------------------------------
# route_permute


@torch.library.custom_op("moecc::route_permute", mutates_args=())
def route_permute(
    x_TH: torch.Tensor, idx_TK: torch.Tensor, num_experts: int, capacity: int = -1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch_backend.route_permute(x_TH, idx_TK, num_experts, capacity)


@route_permute.register_fake
def _(x_TH: torch.Tensor, idx_TK: torch.Tensor, num_experts: int, capacity: int = -1):
    S = idx_TK.shape[0] * idx_TK.shape[1]
    return (
        x_TH.new_empty(S, x_TH.shape[1]),
        idx_TK.new_empty(S, dtype=torch.int64),
        idx_TK.new_empty(S, dtype=torch.int64),
        idx_TK.new_empty(num_experts, dtype=torch.int32),
    )


def _route_permute_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x_TH, idx_TK = inputs[:2]
    ctx.save_for_backward(output[1])
    ctx.T, ctx.K = x_TH.shape[0], idx_TK.shape[1]


def _route_permute_backward(ctx: Any, gx_SH, _gsrc, _geid, _goffs):
    (src_S,) = ctx.saved_tensors
    gx_TH = gx_SH.new_zeros(ctx.T, gx_SH.shape[1]).index_add(0, src_S // ctx.K, gx_SH)
    return gx_TH, None, None, None


route_permute.register_autograd(_route_permute_backward, setup_context=_route_permute_setup)

# ---------------------------------------------------------------------------------------------------------
# grouped_mm and its weight gradient


@torch.library.custom_op("moecc::grouped_mm", mutates_args=())
def grouped_mm(x_SK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return torch_backend.grouped_mm(x_SK, w_EKN, offs_E)


@grouped_mm.register_fake
def _(x_SK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor):
    torch._check(x_SK.shape[1] == w_EKN.shape[1], lambda: "moecc.grouped_mm: inner dimensions differ")
    return x_SK.new_empty(x_SK.shape[0], w_EKN.shape[2])


@torch.library.custom_op("moecc::grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad(x_SK: torch.Tensor, dy_SN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return torch_backend.grouped_mm_wgrad(x_SK, dy_SN, offs_E)


@grouped_mm_wgrad.register_fake
def _(x_SK: torch.Tensor, dy_SN: torch.Tensor, offs_E: torch.Tensor):
    return x_SK.new_empty(offs_E.shape[0], x_SK.shape[1], dy_SN.shape[1])


def _grouped_mm_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x_SK, w_EKN, offs_E = inputs
    ctx.save_for_backward(x_SK, w_EKN, offs_E)


def _grouped_mm_backward(ctx: Any, dy_SN: torch.Tensor):
    x_SK, w_EKN, offs_E = ctx.saved_tensors
    dy_SN = dy_SN.contiguous()
    dx_SK = dw_EKN = None
    if ctx.needs_input_grad[0]:
        dx_SK = torch.ops.moecc.grouped_mm(dy_SN, w_EKN.transpose(1, 2), offs_E)
    if ctx.needs_input_grad[1]:
        dw_EKN = torch.ops.moecc.grouped_mm_wgrad(x_SK, dy_SN, offs_E)
    return dx_SK, dw_EKN, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)

# ---------------------------------------------------------------------------------------------------------
# unpermute_combine


@torch.library.custom_op("moecc::unpermute_combine", mutates_args=())
def unpermute_combine(
    y_SH: torch.Tensor, src_S: torch.Tensor, offs_E: torch.Tensor, w_TK: torch.Tensor
) -> torch.Tensor:
    return torch_backend.unpermute_combine(y_SH, src_S, offs_E, w_TK)


@unpermute_combine.register_fake
def _(y_SH: torch.Tensor, src_S: torch.Tensor, offs_E: torch.Tensor, w_TK: torch.Tensor):
    return y_SH.new_empty(w_TK.shape[0], y_SH.shape[1])


def _combine_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    y_SH, src_S, offs_E, w_TK = inputs
    ctx.save_for_backward(y_SH, src_S, offs_E, w_TK)


def _combine_backward(ctx: Any, gout_TH: torch.Tensor):
    y_SH, src_S, offs_E, w_TK = ctx.saved_tensors
    K = w_TK.shape[1]
    S = y_SH.shape[0]
    live_S = torch.arange(S, device=y_SH.device) < offs_E[-1]
    g_SH = gout_TH.float().index_select(0, src_S // K)
    gy_SH = gw_TK = None
    if ctx.needs_input_grad[0]:
        gate_S = torch.where(live_S, w_TK.reshape(-1).float().index_select(0, src_S), 0.0)
        gy_SH = (g_SH * gate_S[:, None]).to(y_SH.dtype)
    if ctx.needs_input_grad[3]:
        dot_S = torch.where(live_S, (g_SH * y_SH.float()).sum(-1), 0.0)
        gw_flat = dot_S.new_zeros(S).index_copy(0, src_S, dot_S)
        gw_TK = gw_flat.reshape(w_TK.shape).to(w_TK.dtype)
    return gy_SH, None, None, gw_TK


unpermute_combine.register_autograd(_combine_backward, setup_context=_combine_setup)

# ---------------------------------------------------------------------------------------------------------
# expert parallelism: the routing plan and the row all-to-all (dispatch and combine are built from these)


@torch.library.custom_op("moecc::ep_plan", mutates_args=())
def ep_plan(
    idx_TK: torch.Tensor, num_experts: int, ep: int, group_name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch_backend.ep_plan(idx_TK, num_experts, ep, group_name)


@ep_plan.register_fake
def _(idx_TK: torch.Tensor, num_experts: int, ep: int, group_name: str):
    T, K = idx_TK.shape
    R = ep * T
    return (
        idx_TK.new_empty(R, dtype=torch.int64),
        idx_TK.new_empty(R, K, dtype=torch.int64),
        idx_TK.new_empty(R, K, dtype=torch.bool),
        idx_TK.new_empty(ep, dtype=torch.int64),
        idx_TK.new_empty(ep, dtype=torch.int64),
    )


@torch.library.custom_op("moecc::all_to_all_rows", mutates_args=())
def all_to_all_rows(
    x_R: torch.Tensor, in_counts_P: torch.Tensor, out_counts_P: torch.Tensor, group_name: str
) -> torch.Tensor:
    return torch_backend.all_to_all_rows(x_R, in_counts_P, out_counts_P, group_name)


@all_to_all_rows.register_fake
def _(x_R: torch.Tensor, in_counts_P: torch.Tensor, out_counts_P: torch.Tensor, group_name: str):
    return torch.empty_like(x_R)


def _a2a_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    _, in_counts_P, out_counts_P, group_name = inputs
    ctx.save_for_backward(in_counts_P, out_counts_P)
    ctx.group_name = group_name


def _a2a_backward(ctx: Any, g_R: torch.Tensor):
    in_counts_P, out_counts_P = ctx.saved_tensors
    # the rows travel back the way they came
    return (
        torch.ops.moecc.all_to_all_rows(g_R.contiguous(), out_counts_P, in_counts_P, ctx.group_name),
        None,
        None,
        None,
    )


all_to_all_rows.register_autograd(_a2a_backward, setup_context=_a2a_setup)


# ---------------------------------------------------------------------------------------------------------
# backend kernels the lower pass puts in place of the generic grouped GEMMs (after the autograd split, so no
# autograd formula is needed)


@torch.library.custom_op("moecc::triton_grouped_mm", mutates_args=())
def triton_grouped_mm(x_SK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    from moecc.backends import triton_backend

    return triton_backend.grouped_mm(x_SK, w_EKN, offs_E)


@triton_grouped_mm.register_fake
def _(x_SK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor):
    return x_SK.new_empty(x_SK.shape[0], w_EKN.shape[2])


@torch.library.custom_op("moecc::triton_grouped_mm_wgrad", mutates_args=())
def triton_grouped_mm_wgrad(x_SK: torch.Tensor, dy_SN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    from moecc.backends import triton_backend

    return triton_backend.grouped_mm_wgrad(x_SK, dy_SN, offs_E)


@triton_grouped_mm_wgrad.register_fake
def _(x_SK: torch.Tensor, dy_SN: torch.Tensor, offs_E: torch.Tensor):
    return x_SK.new_empty(offs_E.shape[0], x_SK.shape[1], dy_SN.shape[1])


def expert_capacity(capacity_factor: float | None, T: int, K: int, E: int) -> int:
    """Routed (token, slot) pairs an expert keeps per step: ceil(capacity_factor * T * K / E); -1 = dropless."""
    if capacity_factor is None:
        return -1
    return math.ceil(capacity_factor * T * K / E)


# The ops a lifted MoE region is made of, for passes that look for them.
MOE_OPS = {
    torch.ops.moecc.route_permute.default,
    torch.ops.moecc.grouped_mm.default,
    torch.ops.moecc.grouped_mm_wgrad.default,
    torch.ops.moecc.unpermute_combine.default,
    torch.ops.moecc.ep_plan.default,
    torch.ops.moecc.all_to_all_rows.default,
    torch.ops.moecc.triton_grouped_mm.default,
    torch.ops.moecc.triton_grouped_mm_wgrad.default,
}


def moe_reference(x_TH: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor, expert_fns: list) -> torch.Tensor:
    """out[t] = sum_k w[t, k] * expert_{idx[t, k]}(x[t]) computed token by token: the eager definition."""
    out_TH = torch.zeros_like(x_TH, dtype=torch.float32)
    for e, fn in enumerate(expert_fns):
        tok, slot = torch.where(idx_TK == e)
        if tok.numel():
            out_TH.index_add_(0, tok, fn(x_TH[tok]).float() * w_TK[tok, slot, None].float())
    return out_TH.to(x_TH.dtype)
