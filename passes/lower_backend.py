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


_GEMMS = (torch.ops.moecc.grouped_mm.default, torch.ops.moecc.triton_grouped_mm.default)
_ROW_BOUNDED = (*_GEMMS, torch.ops.moecc.grouped_mm_wgrad.default, torch.ops.moecc.triton_grouped_mm_wgrad.default)


def _offsets_bounding(n: fx.Node, rows: fx.Node) -> fx.Node | None:
    """The expert offsets that bound a GLU node's rows: `rows` (its h forward, its da backward) comes out of a
    grouped GEMM, and every user of the GLU's result is a grouped GEMM (or dW) over the same offsets, or the
    graph's output (saved for the backward, whose user there is the dW GEMM). Then the rows past the last
    expert's end are never read, and the GLU need not compute them. None where that does not hold."""
    if not (isinstance(rows, fx.Node) and rows.target in _GEMMS):
        return None
    offs = rows.args[2]
    for u in n.users:
        if u.op == "output":
            continue
        if u.target not in _ROW_BOUNDED or u.args[2] is not offs:
            return None
    return offs if isinstance(offs, fx.Node) else None


def bound_glu_rows(gm: fx.GraphModule) -> int:
    """GLU nodes between grouped GEMMs over the same offsets compute the rows before the offsets' end only
    (the unfused expert-parallel path's receive buffer has room for ep times the rows a rank gets on
    average): triton_glu(h) -> triton_glu_rows(h, offs). Returns how many were bounded."""
    bounded = 0
    for n in gm.graph.nodes:
        if n.target is torch.ops.moecc.triton_glu.default:
            offs = _offsets_bounding(n, n.args[0])
            if offs is not None:
                n.target, n.args = torch.ops.moecc.triton_glu_rows.default, (n.args[0], offs, n.args[1])
                bounded += 1
        elif n.target is torch.ops.moecc.triton_glu_backward.default:
            offs = _offsets_bounding(n, n.args[0])
            if offs is not None:
                n.target = torch.ops.moecc.triton_glu_rows_backward.default
                n.args = (n.args[0], n.args[1], offs, n.args[2])
                bounded += 1
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
    bounded = bound_glu_rows(gm) if backend == "triton" else 0
    ctx.counters[f"lower.{backend}"] += count
    ctx.counters["lower.glu_rows"] += bounded
    ctx.note(
        f"backend {backend}: {count} moecc op(s)"
        + (f", {swapped} grouped GEMM / GLU op(s) on Triton kernels" if backend == "triton" else "")
        + (f", {bounded} GLU(s) computing the rows before their experts' end only" if bounded else "")
    )
    gm.recompile()
    return gm
