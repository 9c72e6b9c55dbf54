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
    ctx.counters[f"lower.{backend}"] += count
    ctx.note(
        f"backend {backend}: {count} moecc op(s)"
        + (f", {swapped} grouped GEMM / GLU op(s) on Triton kernels" if backend == "triton" else "")
    )
    gm.recompile()
    return gm
