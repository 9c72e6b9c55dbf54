"""lower: hand the graph to a backend, which returns what runs.

- `torch`: the moecc ops run with stock PyTorch (`moecc.backends.torch_backend`);
- `triton`: the expert grouped GEMMs (forward, dX, dW) and the GLU activation between them (forward and
  backward) become the Triton kernels of `moecc.backends.triton_backend` (node targets are swapped; the
  rest stays on stock ops);
- `auto`: triton where the graph runs on a CUDA device, torch elsewhere.

Every choice is recorded on the nodes (`backend=`) and counted (`lower.<backend>`); a requested backend
that cannot run on the device is an error, never a silent switch.

    before                                          after (triton)
    y = torch.ops.moecc.grouped_mm(x, w, offs)      y = torch.ops.moecc.triton_grouped_mm(x, w, offs)
    a = torch.ops.moecc.glu(h, "silu")              a = torch.ops.moecc.triton_glu_rows(h, offs, "silu")

A GLU between grouped GEMMs over the same offsets computes the rows before the last expert's end only (the
unfused path's receive buffer has room for ep times a rank's average rows; nothing reads the rows past it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from moecc import cost, ir
from moecc.backends import triton_backend
from moecc.options import MoeccError
from moecc.pass_manager import CompileContext

TRITON_KERNELS = {
    torch.ops.moecc.grouped_mm.default: torch.ops.moecc.triton_grouped_mm.default,
    torch.ops.moecc.grouped_mm_wgrad.default: torch.ops.moecc.triton_grouped_mm_wgrad.default,
    torch.ops.moecc.glu.default: torch.ops.moecc.triton_glu.default,
    torch.ops.moecc.glu_backward.default: torch.ops.moecc.triton_glu_backward.default,
    torch.ops.moecc.unpermute_combine.default: torch.ops.moecc.triton_unpermute_combine.default,
    torch.ops.moecc.route_permute_backward.default: torch.ops.moecc.triton_route_permute_backward.default,
    torch.ops.moecc.unpermute_combine_backward.default: torch.ops.moecc.triton_unpermute_combine_backward.default,
}


_GEMMS = (torch.ops.moecc.grouped_mm.default, torch.ops.moecc.triton_grouped_mm.default)  # (x, w, offs)
_SAVED_ALIASES = (torch.ops.aten.detach.default, torch.ops.aten.alias.default)
_ROW_BOUNDED = (*_GEMMS, torch.ops.moecc.grouped_mm_wgrad.default, torch.ops.moecc.triton_grouped_mm_wgrad.default)


def _offsets_bounding(n: fx.Node, rows: Any) -> fx.Node | None:
    """The expert offsets that bound an activation node's rows: `rows` (its h forward, its da backward) comes
    out of a grouped GEMM, and every user of the result is a grouped GEMM (or dW) over the same offsets, or the
    graph's output (saved for the backward, whose users there are the dW GEMM and the activation's backward,
    which maps rows to rows), directly or through a detach. Then the rows past the last expert's end are never
    read, and the activation need not compute them. None where that does not hold."""
    if not (isinstance(rows, fx.Node) and rows.target in _GEMMS):
        return None
    offs = rows.args[2]

    def bounded(v: fx.Node) -> bool:
        for u in v.users:
            if u.op == "output":
                continue
            if u.target in _SAVED_ALIASES:  # a copy of the result saved for the backward (relu's)
                if not bounded(u):
                    return False
            elif u.target not in _ROW_BOUNDED or u.args[2] is not offs:
                return False
        return True

    return offs if isinstance(offs, fx.Node) and bounded(n) else None


def _act_kind(n: fx.Node) -> str | None:
    """The activation an aten node applies forward (gelu, relu, silu), as moecc names it; None otherwise."""
    if n.target is torch.ops.aten.relu.default:
        return "relu"
    if n.target is torch.ops.aten.silu.default:
        return "silu"
    if n.target is torch.ops.aten.gelu.default:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(cost.schema_args(n)["approximate"])
    return None


def _act_backward_kind(n: fx.Node) -> str | None:
    """The activation an aten node differentiates (its (grad, input) first), as moecc names it: relu's
    backward is threshold_backward at 0 of relu's result, whose sign is its input's."""
    if n.target is torch.ops.aten.silu_backward.default:
        return "silu"
    if n.target is torch.ops.aten.threshold_backward.default and cost.schema_args(n)["threshold"] == 0:
        return "relu"
    if n.target is torch.ops.aten.gelu_backward.default:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(cost.schema_args(n)["approximate"])
    return None


def _bounded_form(n: fx.Node) -> tuple[Any, str, tuple[Any, ...], Any] | None:
    """For an activation node (forward or backward) the lower bound can apply to: (the op that stops at the
    offsets' end, "glu" or "act", its tensor inputs, its activation); None for other nodes."""
    if n.target is torch.ops.moecc.triton_glu.default:
        return torch.ops.moecc.triton_glu_rows.default, "glu", n.args[:1], n.args[1]
    if n.target is torch.ops.moecc.triton_glu_backward.default:
        return torch.ops.moecc.triton_glu_rows_backward.default, "glu", n.args[:2], n.args[2]
    if (kind := _act_kind(n)) is not None:
        return torch.ops.moecc.triton_act_rows.default, "act", n.args[:1], kind
    if (kind := _act_backward_kind(n)) is not None:
        return torch.ops.moecc.triton_act_rows_backward.default, "act", n.args[:2], kind
    return None


def bound_activation_rows(gm: fx.GraphModule) -> dict[str, int]:
    """GLU and plain activation nodes between grouped GEMMs over the same offsets compute the rows before the
    offsets' end only (the unfused expert-parallel path's receive buffer has room for ep times the rows a rank
    gets on average): triton_glu(h) -> triton_glu_rows(h, offs), aten.gelu(h) -> triton_act_rows(h, offs,
    "gelu"), and their backwards. Returns how many of each ("glu", "act") were bounded."""
    bounded = {"glu": 0, "act": 0}
    for n in gm.graph.nodes:
        form = _bounded_form(n)
        if form is None:
            continue
        target, family, inputs, kind = form
        offs = _offsets_bounding(n, inputs[0])  # h forward, da backward
        if offs is not None:
            n.target, n.args, n.kwargs = target, (*inputs, offs, kind), {}
            bounded[family] += 1
    return bounded


def graph_device(gm: fx.GraphModule) -> torch.device:
    for n in gm.graph.nodes:
        v = cost._val(n)  # AOT graphs (val) and Dynamo graphs (example_value)
        if isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cpu")


def resolve_backend(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if requested == "triton" and not triton_backend.available(device):
        raise MoeccError(
            f"backend='triton' runs on a CUDA device (or the CPU under TRITON_INTERPRET=1); this graph "
            f"runs on {device}. Use backend='torch' or 'auto'."
        )
    return requested


def lower_backend(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    backend = resolve_backend(ctx.options.backend, graph_device(gm))
    count = swapped = 0
    for n in gm.graph.nodes:
        if not ir.is_moe_op(n):
            continue
        if backend == "triton" and n.target in TRITON_KERNELS:
            n.target = TRITON_KERNELS[n.target]
            swapped += 1
        ir.set_facts(n, backend=backend)
        count += 1
    bounded = bound_activation_rows(gm) if backend == "triton" else {"glu": 0, "act": 0}
    ctx.counters[f"lower.{backend}"] += count
    ctx.counters["lower.glu_rows"] += bounded["glu"]
    ctx.counters["lower.act_rows"] += bounded["act"]
    rows = bounded["glu"] + bounded["act"]
    ctx.note(
        f"backend {backend}: {count} moecc op(s)"
        + (f", {swapped} grouped GEMM / GLU op(s) on Triton kernels" if backend == "triton" else "")
        + (f", {rows} activation(s) computing the rows before their experts' end only" if rows else "")
    )
    gm.recompile()
    return gm
