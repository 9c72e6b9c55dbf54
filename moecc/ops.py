"""The moecc custom ops: the MoE-level operations of the IR (namespace `moecc`).

Each op has a fake (meta) implementation, so that Dynamo and AOTAutograd trace it without running it,
and an autograd formula whose backward is again made of moecc ops and stock ATen ops, so that the
backward graph AOTAutograd produces carries the same MoE structure as the forward.

A lifted MoE region reads

    x_SH, src_S, eid_S, offs_E = moecc.route_permute(x_TH, idx_TK, E)   # dispatch: sort rows by expert
    h_SF = moecc.grouped_mm(x_SH, w1_EHF, offs_E)                        # expert GEMM 1
    h_SF = moecc.glu(h_SF, "silu")   # a GLU expert's activation; others stay ordinary graph ops
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
    ctx.T = x_TH.shape[0]


def _route_permute_backward(ctx: Any, gx_SH, _gsrc, _geid, _goffs):
    (src_S,) = ctx.saved_tensors
    return torch.ops.moecc.route_permute_backward(gx_SH, src_S, ctx.T), None, None, None


# its backward as one op, so that lower can hand it to a backend's kernel
@torch.library.custom_op("moecc::route_permute_backward", mutates_args=())
def route_permute_backward(gx_SH: torch.Tensor, src_S: torch.Tensor, T: int) -> torch.Tensor:
    return torch_backend.route_permute_backward(gx_SH, src_S, T)


def _route_permute_backward_fake(gx_SH: torch.Tensor, src_S: torch.Tensor, T: int):
    """route_permute_backward's result (also triton_route_permute_backward's): a row a token."""
    return gx_SH.new_empty(T, gx_SH.shape[1])


route_permute_backward.register_fake(_route_permute_backward_fake)


@torch.library.custom_op("moecc::triton_route_permute_backward", mutates_args=())
def triton_route_permute_backward(gx_SH: torch.Tensor, src_S: torch.Tensor, T: int) -> torch.Tensor:
    from moecc.backends import triton_backend

    return triton_backend.route_permute_backward(gx_SH, src_S, T)


triton_route_permute_backward.register_fake(_route_permute_backward_fake)


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


# `scale` (1.0 as the autograd formula emits them) multiplies a weight gradient inside its kernel: sync_grads
# sets it to 1/W instead of a multiplication over the whole gradient (WGRAD_SCALE below).
# `acc`, where given, is added to the result (acc + scale * x^T dy) in the result's own memory: a sum of token
# chunks' weight gradients (the schedule pass) then holds one partial sum at a time, not two and a chunk's.
@torch.library.custom_op("moecc::grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad(
    x_SK: torch.Tensor, dy_SN: torch.Tensor, offs_E: torch.Tensor, scale: float = 1.0, acc: torch.Tensor | None = None
) -> torch.Tensor:
    return torch_backend.grouped_mm_wgrad(x_SK, dy_SN, offs_E, scale, acc)


def _wgrad_fake(
    x_SK: torch.Tensor, dy_SN: torch.Tensor, offs_E: torch.Tensor, scale: float = 1.0, acc: torch.Tensor | None = None
):
    shape = (offs_E.shape[0], x_SK.shape[1], dy_SN.shape[1])
    if acc is not None:
        torch._check(
            tuple(acc.shape) == shape,
            lambda: f"moecc.grouped_mm_wgrad: acc is {list(acc.shape)}, the gradient {list(shape)}",
        )
    return x_SK.new_empty(shape)


grouped_mm_wgrad.register_fake(_wgrad_fake)


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
        dw_EKN = weight_grad(x_SK, dy_SN, offs_E, w_EKN)
    return dx_SK, dw_EKN, None


def weight_grad(x_SK: torch.Tensor, dy_SN: torch.Tensor, offs_E: torch.Tensor, w_EKN: torch.Tensor) -> torch.Tensor:
    """dw[e] = x[rows of e]^T @ dy[rows of e], laid out like w: where w is the transposed view of an [E, N, K]
    parameter (nn.Linear layout), dw^T = dy^T x is computed instead, so that the gradient reaches the
    parameter without a strided copy of the whole weight."""
    if torch_backend.transposed_weight(w_EKN):
        return torch.ops.moecc.grouped_mm_wgrad(dy_SN, x_SK, offs_E).transpose(1, 2)
    return torch.ops.moecc.grouped_mm_wgrad(x_SK, dy_SN, offs_E)


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)

# ---------------------------------------------------------------------------------------------------------
# glu: a GLU expert's activation, act(gate) * up over h = [gate | up] (the halves of the last dimension)


def _act_check(kind: str, op: str) -> None:
    if kind not in torch_backend.GLU_ACTS:
        raise ValueError(f"{op}: activation {kind!r} is not one of {', '.join(torch_backend.GLU_ACTS)}")


def _glu_check(h_SF2: torch.Tensor, kind: str) -> None:
    _act_check(kind, "moecc.glu")
    torch._check(
        h_SF2.shape[-1] % 2 == 0,
        lambda: f"moecc.glu: odd last dimension {h_SF2.shape[-1]}; h must be [gate | up], two equal halves",
    )


@torch.library.custom_op("moecc::glu", mutates_args=())
def glu(h_SF2: torch.Tensor, kind: str) -> torch.Tensor:
    _glu_check(h_SF2, kind)
    return torch_backend.glu(h_SF2, kind)


def _glu_fake(h_SF2: torch.Tensor, kind: str):
    """glu's result: h's rows, half its last dimension (also triton_glu's)."""
    _glu_check(h_SF2, kind)
    return h_SF2.new_empty(*h_SF2.shape[:-1], h_SF2.shape[-1] // 2)


glu.register_fake(_glu_fake)


@torch.library.custom_op("moecc::glu_backward", mutates_args=())
def glu_backward(da_SF: torch.Tensor, h_SF2: torch.Tensor, kind: str) -> torch.Tensor:
    _glu_check(h_SF2, kind)
    return torch_backend.glu_backward(da_SF, h_SF2, kind)


def _glu_backward_fake(da_SF: torch.Tensor, h_SF2: torch.Tensor, kind: str):
    """glu_backward's result: [d gate | d up], shaped like h (also triton_glu_backward's)."""
    return torch.empty_like(h_SF2)


glu_backward.register_fake(_glu_backward_fake)


def _glu_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    h_SF2, kind = inputs
    ctx.save_for_backward(h_SF2)
    ctx.kind = kind


def _glu_backward(ctx: Any, da_SF: torch.Tensor):
    (h_SF2,) = ctx.saved_tensors
    return torch.ops.moecc.glu_backward(da_SF, h_SF2, ctx.kind), None


glu.register_autograd(_glu_backward, setup_context=_glu_setup)

# ---------------------------------------------------------------------------------------------------------
# unpermute_combine


@torch.library.custom_op("moecc::unpermute_combine", mutates_args=())
def unpermute_combine(
    y_SH: torch.Tensor, src_S: torch.Tensor, offs_E: torch.Tensor, w_TK: torch.Tensor
) -> torch.Tensor:
    return torch_backend.unpermute_combine(y_SH, src_S, offs_E, w_TK)


def _combine_fake(y_SH: torch.Tensor, src_S: torch.Tensor, offs_E: torch.Tensor, w_TK: torch.Tensor):
    """unpermute_combine's result (also triton_unpermute_combine's): a row a token."""
    return y_SH.new_empty(w_TK.shape[0], y_SH.shape[1])


unpermute_combine.register_fake(_combine_fake)


def _combine_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    y_SH, src_S, offs_E, w_TK = inputs
    ctx.save_for_backward(y_SH, src_S, offs_E, w_TK)


# the combine's backward as one op (its gradients for y and for w; an unneeded one is returned empty, [0, H] or
# [0, K]), so that lower can hand it to a backend's kernel
@torch.library.custom_op("moecc::unpermute_combine_backward", mutates_args=())
def unpermute_combine_backward(
    gout_TH: torch.Tensor,
    y_SH: torch.Tensor,
    src_S: torch.Tensor,
    offs_E: torch.Tensor,
    w_TK: torch.Tensor,
    need_y: bool,
    need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    gy, gw = torch_backend.unpermute_combine_backward(gout_TH, y_SH, src_S, offs_E, w_TK, need_y, need_w)
    return _filled(gy, y_SH, need_y), _filled(gw, w_TK, need_w)


def _filled(g: torch.Tensor | None, like: torch.Tensor, needed: bool) -> torch.Tensor:
    return g if g is not None and needed else like.new_empty(0, like.shape[1])


def _combine_backward_fake(gout_TH, y_SH, src_S, offs_E, w_TK, need_y: bool, need_w: bool):
    return (
        y_SH.new_empty(y_SH.shape[0] if need_y else 0, y_SH.shape[1]),
        w_TK.new_empty(w_TK.shape[0] if need_w else 0, w_TK.shape[1]),
    )


unpermute_combine_backward.register_fake(_combine_backward_fake)


@torch.library.custom_op("moecc::triton_unpermute_combine", mutates_args=())
def triton_unpermute_combine(
    y_SH: torch.Tensor, src_S: torch.Tensor, offs_E: torch.Tensor, w_TK: torch.Tensor
) -> torch.Tensor:
    from moecc.backends import triton_backend

    return triton_backend.unpermute_combine(y_SH, src_S, offs_E, w_TK)


triton_unpermute_combine.register_fake(_combine_fake)


@torch.library.custom_op("moecc::triton_unpermute_combine_backward", mutates_args=())
def triton_unpermute_combine_backward(
    gout_TH: torch.Tensor,
    y_SH: torch.Tensor,
    src_S: torch.Tensor,
    offs_E: torch.Tensor,
    w_TK: torch.Tensor,
    need_y: bool,
    need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from moecc.backends import triton_backend

    gy, gw = triton_backend.unpermute_combine_backward(gout_TH, y_SH, src_S, offs_E, w_TK, need_y, need_w)
    return _filled(gy, y_SH, need_y), _filled(gw, w_TK, need_w)


triton_unpermute_combine_backward.register_fake(_combine_backward_fake)


def _combine_backward(ctx: Any, gout_TH: torch.Tensor):
    y_SH, src_S, offs_E, w_TK = ctx.saved_tensors
    need_y, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    gy_SH, gw_TK = torch.ops.moecc.unpermute_combine_backward(gout_TH, y_SH, src_S, offs_E, w_TK, need_y, need_w)
    return (gy_SH if need_y else None), None, None, (gw_TK if need_w else None)


unpermute_combine.register_autograd(_combine_backward, setup_context=_combine_setup)

# ---------------------------------------------------------------------------------------------------------
# expert parallelism: the routing plan and the row all-to-all (dispatch and combine are built from these)


@torch.library.custom_op("moecc::ep_plan", mutates_args=())
def ep_plan(
    idx_TK: torch.Tensor, num_experts: int, ep: int, group_name: str, padded: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch_backend.ep_plan(idx_TK, num_experts, ep, group_name, padded)


@ep_plan.register_fake
def _(idx_TK: torch.Tensor, num_experts: int, ep: int, group_name: str, padded: bool = False):
    T, K = idx_TK.shape
    R = ep * T
    return (
        idx_TK.new_empty(R, dtype=torch.int64),
        idx_TK.new_empty(R, K, dtype=torch.int64),
        idx_TK.new_empty(R, K, dtype=torch.bool),
        torch.empty(ep, dtype=torch.int64, device="cpu"),  # the counts are on the host (split sizes)
        torch.empty(ep, dtype=torch.int64, device="cpu"),
    )


@torch.library.custom_op("moecc::all_to_all_rows", mutates_args=())
def all_to_all_rows(
    x_R: torch.Tensor, in_counts_P: torch.Tensor, out_counts_P: torch.Tensor, group_name: str
) -> torch.Tensor:
    return torch_backend.all_to_all_rows(x_R, in_counts_P, out_counts_P, group_name)


def _rows_fake(x_R: torch.Tensor, in_counts_P: torch.Tensor, out_counts_P: torch.Tensor, group_name: str):
    """The received rows of a row all-to-all (blocking or started): a buffer shaped like the sent one."""
    return torch.empty_like(x_R)


all_to_all_rows.register_fake(_rows_fake)


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


# what the schedule pass splits all_to_all_rows into, after the autograd split: the start, then
# torch.ops._c10d_functional.wait_tensor on its result where the rows are first needed
@torch.library.custom_op("moecc::all_to_all_rows_start", mutates_args=())
def all_to_all_rows_start(
    x_R: torch.Tensor, in_counts_P: torch.Tensor, out_counts_P: torch.Tensor, group_name: str
) -> torch.Tensor:
    return torch_backend.all_to_all_rows_start(x_R, in_counts_P, out_counts_P, group_name)


all_to_all_rows_start.register_fake(_rows_fake)


# ---------------------------------------------------------------------------------------------------------
# backend kernels the lower pass puts in place of the generic grouped GEMMs (after the autograd split, so no
# autograd formula is needed)


@torch.library.custom_op("moecc::triton_grouped_mm", mutates_args=())
def triton_grouped_mm(x_SK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    from moecc.backends import triton_backend

    return triton_backend.grouped_mm(x_SK, w_EKN, offs_E)


def _grouped_mm_fake(x_SK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return x_SK.new_empty(x_SK.shape[0], w_EKN.shape[2])


triton_grouped_mm.register_fake(_grouped_mm_fake)


@torch.library.custom_op("moecc::triton_grouped_mm_wgrad", mutates_args=())
def triton_grouped_mm_wgrad(
    x_SK: torch.Tensor, dy_SN: torch.Tensor, offs_E: torch.Tensor, scale: float = 1.0, acc: torch.Tensor | None = None
) -> torch.Tensor:
    from moecc.backends import triton_backend

    return triton_backend.grouped_mm_wgrad(x_SK, dy_SN, offs_E, scale, acc)


triton_grouped_mm_wgrad.register_fake(_wgrad_fake)


@torch.library.custom_op("moecc::native_grouped_mm", mutates_args=())
def native_grouped_mm(x_SK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """triton_grouped_mm's contract through torch._grouped_mm (lower picks it where it times faster)."""
    from moecc.backends import triton_backend

    return triton_backend.native_grouped_mm(x_SK, w_EKN, offs_E)


native_grouped_mm.register_fake(_grouped_mm_fake)


@torch.library.custom_op("moecc::native_grouped_mm_wgrad", mutates_args=())
def native_grouped_mm_wgrad(
    x_SK: torch.Tensor, dy_SN: torch.Tensor, offs_E: torch.Tensor, scale: float = 1.0, acc: torch.Tensor | None = None
) -> torch.Tensor:
    """triton_grouped_mm_wgrad's contract through torch._grouped_mm."""
    from moecc.backends import triton_backend

    return triton_backend.native_grouped_mm_wgrad(x_SK, dy_SN, offs_E, scale, acc)


native_grouped_mm_wgrad.register_fake(_wgrad_fake)


@torch.library.custom_op("moecc::triton_glu", mutates_args=())
def triton_glu(h_SF2: torch.Tensor, kind: str) -> torch.Tensor:
    from moecc.backends import triton_backend

    return triton_backend.glu(h_SF2, kind)


triton_glu.register_fake(_glu_fake)


@torch.library.custom_op("moecc::triton_glu_backward", mutates_args=())
def triton_glu_backward(da_SF: torch.Tensor, h_SF2: torch.Tensor, kind: str) -> torch.Tensor:
    from moecc.backends import triton_backend

    return triton_backend.glu_backward(da_SF, h_SF2, kind)


triton_glu_backward.register_fake(_glu_backward_fake)


# The GLU between two grouped GEMMs over the same expert offsets (what `lower` gives the triton backend): only
# the rows before offs[-1], the last expert's end, are computed; the later rows (the room a receive buffer
# keeps for the worst case, or dropped slots) are left unwritten, and nothing reads them: the grouped GEMMs
# and their dX and dW stop at the offsets too.


@torch.library.custom_op("moecc::triton_glu_rows", mutates_args=())
def triton_glu_rows(h_SF2: torch.Tensor, offs_E: torch.Tensor, kind: str) -> torch.Tensor:
    from moecc.backends import triton_backend

    return triton_backend.glu_rows(h_SF2, offs_E[-1:], kind)


@triton_glu_rows.register_fake
def _(h_SF2: torch.Tensor, offs_E: torch.Tensor, kind: str):
    return _glu_fake(h_SF2, kind)


@torch.library.custom_op("moecc::triton_glu_rows_backward", mutates_args=())
def triton_glu_rows_backward(da_SF: torch.Tensor, h_SF2: torch.Tensor, offs_E: torch.Tensor, kind: str) -> torch.Tensor:
    from moecc.backends import triton_backend

    return triton_backend.glu_rows_backward(da_SF, h_SF2, offs_E[-1:], kind)


@triton_glu_rows_backward.register_fake
def _(da_SF: torch.Tensor, h_SF2: torch.Tensor, offs_E: torch.Tensor, kind: str):
    return _glu_backward_fake(da_SF, h_SF2, kind)


@torch.library.custom_op("moecc::triton_act_rows", mutates_args=())
def triton_act_rows(h_SF: torch.Tensor, offs_E: torch.Tensor, kind: str) -> torch.Tensor:
    """A plain expert activation between grouped GEMMs over the same offsets, over the rows before offs[-1]
    only (as triton_glu_rows)."""
    from moecc.backends import triton_backend

    return triton_backend.act_rows(h_SF, offs_E[-1:], kind)


@triton_act_rows.register_fake
def _(h_SF: torch.Tensor, offs_E: torch.Tensor, kind: str):
    return torch.empty_like(h_SF)


@torch.library.custom_op("moecc::triton_act_rows_backward", mutates_args=())
def triton_act_rows_backward(da_SF: torch.Tensor, h_SF: torch.Tensor, offs_E: torch.Tensor, kind: str) -> torch.Tensor:
    from moecc.backends import triton_backend

    return triton_backend.act_rows_backward(da_SF, h_SF, offs_E[-1:], kind)


@triton_act_rows_backward.register_fake
def _(da_SF: torch.Tensor, h_SF: torch.Tensor, offs_E: torch.Tensor, kind: str):
    return torch.empty_like(h_SF)


# ---------------------------------------------------------------------------------------------------------
# fused expert parallelism (the fuse pass puts these in place of a region's dispatch, expert GEMMs and
# combine; `moecc.backends.triton_ep`): one op for dispatch + expert GEMM 1, one for expert GEMM 2 + combine.
# `plan` is an int32 tensor that carries the routing from the first op to the second and to the backward.
#
#     h_SF, x_SH, plan = ep_dispatch_gemm(x_TH, idx_TK, w1_EHF, ep, group)     # S = ep * T * K rows
#     a_SF = <the expert's activation>(h_SF)
#     out_TH, y_TKH = ep_gemm_combine(a_SF, w2_EFH, w_TK, plan, ep, group)


def _ep_buffers(like: torch.Tensor, T: int, K: int, H: int, E_l: int, group_name: str):
    """The group's buffers for a layer of this shape, in the dtype and on the device of `like`."""
    from moecc.backends import triton_ep

    return triton_ep.group_buffers(group_name, T, K, H, E_l, like.dtype, like.device)


@torch.library.custom_op("moecc::ep_dispatch_gemm", mutates_args=())
def ep_dispatch_gemm(
    x_TH: torch.Tensor, idx_TK: torch.Tensor, w1_EKN: torch.Tensor, ep: int, group_name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from moecc.backends import triton_ep

    T, K = idx_TK.shape
    buf = _ep_buffers(x_TH, T, K, x_TH.shape[1], w1_EKN.shape[0], group_name)
    h_SF, x_SH, plan = triton_ep.run_flow(triton_ep.dispatch_gemm_forward(buf, x_TH, idx_TK, w1_EKN))
    return h_SF, x_SH, plan.pack()


@ep_dispatch_gemm.register_fake
def _(x_TH: torch.Tensor, idx_TK: torch.Tensor, w1_EKN: torch.Tensor, ep: int, group_name: str):
    from moecc.backends import triton_ep

    T, K = idx_TK.shape
    S = ep * T * K
    return (
        x_TH.new_empty(S, w1_EKN.shape[2]),
        x_TH.new_empty(S, x_TH.shape[1]),
        x_TH.new_empty(triton_ep.plan_numel(ep, T, K, w1_EKN.shape[0], x_TH.device, x_TH.dtype), dtype=torch.int32),
    )


@torch.library.custom_op("moecc::ep_dispatch_gemm_backward", mutates_args=())
def ep_dispatch_gemm_backward(
    dh_SF: torch.Tensor,
    x_SH: torch.Tensor,
    w1_EKN: torch.Tensor,
    plan: torch.Tensor,
    T: int,
    K: int,
    group_name: str,
    wgrad_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    from moecc.backends import triton_ep

    buf = _ep_buffers(x_SH, T, K, x_SH.shape[1], w1_EKN.shape[0], group_name)
    p = triton_ep.unpack_plan(buf, plan, x_SH.dtype)
    return triton_ep.run_flow(triton_ep.dispatch_gemm_backward(buf, dh_SF, x_SH, w1_EKN, p, wgrad_scale))


def _grad_like(w_EKN: torch.Tensor) -> torch.Tensor:
    """An empty weight gradient laid out as the fused backward produces it (see torch_backend.transposed_weight)."""
    if torch_backend.transposed_weight(w_EKN):
        return w_EKN.new_empty(w_EKN.shape[0], w_EKN.shape[2], w_EKN.shape[1]).transpose(1, 2)
    return w_EKN.new_empty(w_EKN.shape)


@ep_dispatch_gemm_backward.register_fake
def _(dh_SF, x_SH, w1_EKN, plan, T: int, K: int, group_name: str, wgrad_scale: float = 1.0):
    return x_SH.new_empty(T, x_SH.shape[1]), _grad_like(w1_EKN)


def _ep_dispatch_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x_TH, idx_TK, w1_EKN, ep, group_name = inputs
    ctx.save_for_backward(output[1], w1_EKN, output[2])
    ctx.T, ctx.K = idx_TK.shape
    ctx.group_name = group_name
    ctx.mark_non_differentiable(output[1], output[2])


def _ep_dispatch_backward(ctx: Any, dh_SF: torch.Tensor, _dx_SH: Any, _dplan: Any):
    x_SH, w1_EKN, plan = ctx.saved_tensors
    # every rank runs this (it exchanges rows), whichever inputs need gradients
    dx_TH, dw1 = torch.ops.moecc.ep_dispatch_gemm_backward(
        dh_SF.contiguous(), x_SH, w1_EKN, plan, ctx.T, ctx.K, ctx.group_name
    )
    return dx_TH, None, dw1, None, None


ep_dispatch_gemm.register_autograd(_ep_dispatch_backward, setup_context=_ep_dispatch_setup)


@torch.library.custom_op("moecc::ep_gemm_combine", mutates_args=())
def ep_gemm_combine(
    a_SF: torch.Tensor, w2_EKN: torch.Tensor, w_TK: torch.Tensor, plan: torch.Tensor, ep: int, group_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    from moecc.backends import triton_ep

    T, K = w_TK.shape
    buf = _ep_buffers(a_SF, T, K, w2_EKN.shape[2], w2_EKN.shape[0], group_name)
    out, y_TKH = triton_ep.run_flow(
        triton_ep.gemm_combine_forward(buf, a_SF, w2_EKN, w_TK, triton_ep.unpack_plan(buf, plan, a_SF.dtype))
    )
    return out, y_TKH


@ep_gemm_combine.register_fake
def _(a_SF: torch.Tensor, w2_EKN: torch.Tensor, w_TK: torch.Tensor, plan: torch.Tensor, ep: int, group_name: str):
    T, K = w_TK.shape
    H = w2_EKN.shape[2]
    return a_SF.new_empty(T, H), a_SF.new_empty(T, K, H)


@torch.library.custom_op("moecc::ep_gemm_combine_backward", mutates_args=())
def ep_gemm_combine_backward(
    dout_TH: torch.Tensor,
    a_SF: torch.Tensor,
    w2_EKN: torch.Tensor,
    w_TK: torch.Tensor,
    y_TKH: torch.Tensor,
    plan: torch.Tensor,
    group_name: str,
    wgrad_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from moecc.backends import triton_ep

    T, K = w_TK.shape
    buf = _ep_buffers(y_TKH, T, K, y_TKH.shape[2], w2_EKN.shape[0], group_name)
    p = triton_ep.unpack_plan(buf, plan, a_SF.dtype)
    return triton_ep.run_flow(triton_ep.gemm_combine_backward(buf, dout_TH, a_SF, w2_EKN, w_TK, y_TKH, p, wgrad_scale))


@ep_gemm_combine_backward.register_fake
def _(dout_TH, a_SF, w2_EKN, w_TK, y_TKH, plan, group_name: str, wgrad_scale: float = 1.0):
    return torch.empty_like(a_SF), _grad_like(w2_EKN), torch.empty_like(w_TK)


def _ep_combine_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    a_SF, w2_EKN, w_TK, plan, ep, group_name = inputs
    ctx.save_for_backward(a_SF, w2_EKN, w_TK, output[1], plan)
    ctx.group_name = group_name
    ctx.mark_non_differentiable(output[1])


def _ep_combine_backward(ctx: Any, dout_TH: torch.Tensor, _dy: Any):
    a_SF, w2_EKN, w_TK, y_TKH, plan = ctx.saved_tensors
    da, dw2, dw = torch.ops.moecc.ep_gemm_combine_backward(
        dout_TH.contiguous(), a_SF, w2_EKN, w_TK, y_TKH, plan, ctx.group_name
    )
    return da, dw2, dw, None, None, None


ep_gemm_combine.register_autograd(_ep_combine_backward, setup_context=_ep_combine_setup)


# The GLU between the fused ops: h has room for the worst case (every token of every rank routed here, ep
# times the rows a rank computes on average); only the plan's row count (its first element) is computed, the
# later rows are left unwritten, which nothing reads (the fused GEMMs and dW stop at the plan's segments).


@torch.library.custom_op("moecc::ep_glu", mutates_args=())
def ep_glu(h_SF2: torch.Tensor, plan: torch.Tensor, kind: str) -> torch.Tensor:
    from moecc.backends import triton_backend

    _glu_check(h_SF2, kind)
    return triton_backend.glu_rows(h_SF2, plan[:1], kind)


@ep_glu.register_fake
def _(h_SF2: torch.Tensor, plan: torch.Tensor, kind: str):
    return _glu_fake(h_SF2, kind)


@torch.library.custom_op("moecc::ep_glu_backward", mutates_args=())
def ep_glu_backward(da_SF: torch.Tensor, h_SF2: torch.Tensor, plan: torch.Tensor, kind: str) -> torch.Tensor:
    from moecc.backends import triton_backend

    return triton_backend.glu_rows_backward(da_SF, h_SF2, plan[:1], kind)


@ep_glu_backward.register_fake
def _(da_SF: torch.Tensor, h_SF2: torch.Tensor, plan: torch.Tensor, kind: str):
    return _glu_backward_fake(da_SF, h_SF2, kind)


def _ep_glu_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    h_SF2, plan, kind = inputs
    ctx.save_for_backward(h_SF2, plan)
    ctx.kind = kind


def _ep_glu_backward(ctx: Any, da_SF: torch.Tensor):
    h_SF2, plan = ctx.saved_tensors
    return torch.ops.moecc.ep_glu_backward(da_SF, h_SF2, plan, ctx.kind), None, None


ep_glu.register_autograd(_ep_glu_backward, setup_context=_ep_glu_setup)


# A plain (non-GLU) expert activation between the fused ops, over the plan's row count only, like ep_glu.


@torch.library.custom_op("moecc::ep_act", mutates_args=())
def ep_act(h_SF: torch.Tensor, plan: torch.Tensor, kind: str) -> torch.Tensor:
    from moecc.backends import triton_backend

    _act_check(kind, "moecc.ep_act")
    return triton_backend.act_rows(h_SF, plan[:1], kind)


@ep_act.register_fake
def _(h_SF: torch.Tensor, plan: torch.Tensor, kind: str):
    _act_check(kind, "moecc.ep_act")
    return torch.empty_like(h_SF)


@torch.library.custom_op("moecc::ep_act_backward", mutates_args=())
def ep_act_backward(da_SF: torch.Tensor, h_SF: torch.Tensor, plan: torch.Tensor, kind: str) -> torch.Tensor:
    from moecc.backends import triton_backend

    return triton_backend.act_rows_backward(da_SF, h_SF, plan[:1], kind)


@ep_act_backward.register_fake
def _(da_SF: torch.Tensor, h_SF: torch.Tensor, plan: torch.Tensor, kind: str):
    return torch.empty_like(h_SF)


def _ep_act_backward(ctx: Any, da_SF: torch.Tensor):
    h_SF, plan = ctx.saved_tensors
    return torch.ops.moecc.ep_act_backward(da_SF, h_SF, plan, ctx.kind), None, None


ep_act.register_autograd(_ep_act_backward, setup_context=_ep_glu_setup)


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
    torch.ops.moecc.unpermute_combine_backward.default,
    torch.ops.moecc.route_permute_backward.default,
    torch.ops.moecc.triton_route_permute_backward.default,
    torch.ops.moecc.triton_unpermute_combine.default,
    torch.ops.moecc.triton_unpermute_combine_backward.default,
    torch.ops.moecc.ep_plan.default,
    torch.ops.moecc.all_to_all_rows.default,
    torch.ops.moecc.all_to_all_rows_start.default,
    torch.ops.moecc.triton_grouped_mm.default,
    torch.ops.moecc.triton_grouped_mm_wgrad.default,
    torch.ops.moecc.native_grouped_mm.default,
    torch.ops.moecc.native_grouped_mm_wgrad.default,
    torch.ops.moecc.ep_dispatch_gemm.default,
    torch.ops.moecc.ep_dispatch_gemm_backward.default,
    torch.ops.moecc.ep_gemm_combine.default,
    torch.ops.moecc.ep_gemm_combine_backward.default,
}


# The ops that produce expert weight gradients and can scale them in their kernels: op -> (the scale's argument,
# the outputs that are weight gradients). sync_grads folds a gradient's 1/W into these instead of multiplying.
WGRAD_SCALE = {
    torch.ops.moecc.grouped_mm_wgrad.default: ("scale", (None,)),
    torch.ops.moecc.triton_grouped_mm_wgrad.default: ("scale", (None,)),
    torch.ops.moecc.ep_dispatch_gemm_backward.default: ("wgrad_scale", (1,)),
    torch.ops.moecc.ep_gemm_combine_backward.default: ("wgrad_scale", (1,)),
}


# Under torch.autocast the expert GEMMs run in the autocast dtype, as the nn.Linear layers they replace would:
# their floating-point inputs are cast to it (read at each call, so bfloat16 and float16 regions both work),
# and the casts are what AOTAutograd traces into the graph. Routing, permutation and the combine keep their
# inputs' dtypes, as the index_add and the gate products of a model's own loop do.
_AUTOCAST_LIB = torch.library.Library("moecc", "IMPL")
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def _autocast_kernel(op: torch._ops.OpOverload, device_type: str):
    key = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, _AUTOCAST_KEYS[device_type]))

    def kernel(_keyset: Any, *args: Any) -> Any:
        dt = torch.get_autocast_dtype(device_type)
        cast = [
            a.to(dt) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.device.type == device_type else a
            for a in args
        ]
        with torch._C._ExcludeDispatchKeyGuard(key):
            return op(*cast)

    return kernel


for _name in ("grouped_mm", "triton_grouped_mm", "ep_dispatch_gemm", "ep_gemm_combine"):
    for _device_type, _key in _AUTOCAST_KEYS.items():
        _AUTOCAST_LIB.impl(
            _name, _autocast_kernel(getattr(torch.ops.moecc, _name).default, _device_type), _key, with_keyset=True
        )


def moe_reference(x_TH: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor, expert_fns: list) -> torch.Tensor:
    """out[t] = sum_k w[t, k] * expert_{idx[t, k]}(x[t]) computed token by token: the eager definition."""
    out_TH = torch.zeros_like(x_TH, dtype=torch.float32)
    for e, fn in enumerate(expert_fns):
        tok, slot = torch.where(idx_TK == e)
        if tok.numel():
            out_TH.index_add_(0, tok, fn(x_TH[tok]).float() * w_TK[tok, slot, None].float())
    return out_TH.to(x_TH.dtype)
