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

With `grouped_gemm="auto"` each plain grouped GEMM (forward / dX, and dW) then runs the faster of moecc's
Triton kernel and `torch._grouped_mm` at its shape (the default keeps Triton): on a GPU both are timed on
random operands of the node's shapes, strides and expected rows per expert, and native is kept where it is
at least 3 % faster (`moecc.native_grouped_mm(_wgrad)`: the same contract, with the rows past the end and the
experts without rows zeroed by a small kernel). The timings are cached per shape for the process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from moecc import cost, ir
from moecc.backends import torch_backend, triton_backend
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


_GEMMS = (  # (x, w, offs)
    torch.ops.moecc.grouped_mm.default,
    torch.ops.moecc.triton_grouped_mm.default,
    torch.ops.moecc.native_grouped_mm.default,
)
_SAVED_ALIASES = (torch.ops.aten.detach.default, torch.ops.aten.alias.default)
_WGRADS = (
    torch.ops.moecc.grouped_mm_wgrad.default,
    torch.ops.moecc.triton_grouped_mm_wgrad.default,
    torch.ops.moecc.native_grouped_mm_wgrad.default,
)
_ROW_BOUNDED = (*_GEMMS, *_WGRADS)


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


_NATIVE = {
    torch.ops.moecc.triton_grouped_mm.default: torch.ops.moecc.native_grouped_mm.default,
    torch.ops.moecc.triton_grouped_mm_wgrad.default: torch.ops.moecc.native_grouped_mm_wgrad.default,
}
NATIVE_MARGIN = 0.97  # native is kept where it takes at most this fraction of the Triton kernel's time
_TIMINGS: dict[tuple, tuple[float, float]] = {}  # (shape key) -> (triton us, native us), for the process


def _operands(n: fx.Node, ep: int) -> tuple[tuple, Callable[[], list[Any]]]:
    """(a cache key, a maker of operands) for timing a plain grouped GEMM node: its tensors with their traced
    shapes, strides and dtype, random, and offsets that spread the rows a rank gets on average (1/ep of the
    buffer on the unfused path) evenly over the experts."""
    args = cost.schema_args(n)
    names = ("x_SK", "w_EKN", "offs_E") if n.target is torch.ops.moecc.triton_grouped_mm.default else (
        "x_SK", "dy_SN", "offs_E")  # fmt: skip
    vals = [cost._val(args[k]) for k in names]
    scale = float(args.get("scale", 1.0) or 1.0)
    acc = cost._val(args.get("acc")) if isinstance(args.get("acc"), fx.Node) else None
    S, E = vals[0].shape[0], vals[2].shape[0]
    live = S // max(ep, 1)
    key = (str(n.target), *((tuple(v.shape), tuple(v.stride()), v.dtype) for v in vals[:2]), E, live, scale,
           acc is not None, str(vals[0].device))  # fmt: skip

    def make() -> list[Any]:
        dev = vals[0].device
        ts = [torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=dev).normal_() for v in vals[:2]]
        offs = (torch.arange(1, E + 1, device=dev, dtype=torch.int64) * live // max(E, 1)).to(vals[2].dtype)
        rest: list[Any] = [] if n.target is torch.ops.moecc.triton_grouped_mm.default else [scale]
        if acc is not None:
            rest.append(torch.zeros(acc.shape, dtype=acc.dtype, device=dev))
        return [*ts, offs, *rest]

    return key, make


def time_grouped_gemm(n: fx.Node, ep: int) -> tuple[float, float] | None:
    """(Triton us, native us) of a plain grouped GEMM node's op at its shapes, cached per shape; None off a GPU
    (the CPU runs the Triton kernels under the interpreter: no timing to compare)."""
    if cost._val(n.args[0]).device.type != "cuda":
        return None
    key, make = _operands(n, ep)
    if key not in _TIMINGS:
        # AOTAutograd lowers the forward graph with its fake mode active: the operands must be real tensors
        with unset_fake_temporarily(), torch.no_grad():
            _TIMINGS[key] = _time_pair(n, make)
    return _TIMINGS[key]


def _time_pair(n: fx.Node, make: Callable[[], list[Any]]) -> tuple[float, float]:
    ops = make()
    if any(isinstance(t, FakeTensor) for t in ops):
        raise AssertionError(f"moecc: lower would time {n.name} on fake tensors")
    triton_op = n.target
    assert isinstance(triton_op, torch._ops.OpOverload), n.target
    native = _NATIVE[triton_op]
    from moecc.calibrate import _time_s

    dev = ops[0].device
    return 1e6 * _time_s(lambda: triton_op(*ops), dev, 5, 2), 1e6 * _time_s(lambda: native(*ops), dev, 5, 2)


def _native_ok(n: fx.Node) -> str | None:
    """Why torch._grouped_mm cannot take a plain grouped GEMM node's operands (traced dtype, device and
    strides); None where it can."""
    x, b = cost._val(n.args[0]), cost._val(n.args[1])
    groups = cost._size(cost._val(n.args[2]).shape[0])  # the offsets: one per expert
    if n.target is torch.ops.moecc.triton_grouped_mm_wgrad.default:
        x = x.t()
    return torch_backend.native_grouped_mm_refusal(x, b, groups, base=False)


def choose_grouped_gemms(gm: fx.GraphModule, ctx: CompileContext) -> dict[str, dict[str, Any]]:
    """Each triton_grouped_mm(_wgrad) node becomes native_grouped_mm(_wgrad) where `grouped_gemm` says so:
    "native" always (an error where torch._grouped_mm cannot take the operands), "auto" where, timed on a GPU
    at the node's shape, native takes at most NATIVE_MARGIN of the Triton kernel's time. Returns the choice
    per node: {"kernel", "why", "triton_us", "native_us"}."""
    mode = ctx.options.grouped_gemm
    choices: dict[str, dict[str, Any]] = {}
    for n in gm.graph.nodes:
        if n.target not in _NATIVE:
            continue
        why_not = _native_ok(n)
        rec: dict[str, Any] = {"kernel": "triton"}
        if mode == "triton":
            rec["why"] = "grouped_gemm='triton'"
        elif why_not is not None:
            if mode == "native":
                raise MoeccError(
                    f"moecc.compile(grouped_gemm='native'): node {n.name} ({ir.op_name(n)}): {why_not}. Use "
                    f"grouped_gemm='auto' or 'triton'."
                )
            rec["why"] = why_not
        elif mode == "native":
            rec.update(kernel="native", why="grouped_gemm='native'")
        elif not all(isinstance(d, int) for a in n.args[:3] for d in cost._val(a).shape):
            rec["why"] = "auto: symbolic shapes (dynamic=True) are not timed"
        elif (timed := time_grouped_gemm(n, ctx.mesh.ep)) is None:
            rec["why"] = "auto: timed on a GPU only"
        else:
            t_triton, t_native = timed
            faster = t_native <= NATIVE_MARGIN * t_triton
            rec.update(kernel="native" if faster else "triton", triton_us=round(t_triton, 1),
                       native_us=round(t_native, 1),
                       why=f"auto: Triton {t_triton:.0f} us, torch._grouped_mm {t_native:.0f} us")  # fmt: skip
        if rec["kernel"] == "native":
            n.target = _NATIVE[n.target]
        ir.set_facts(n, grouped_gemm=rec["kernel"])
        choices[n.name] = rec
    return choices


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
    choices = choose_grouped_gemms(gm, ctx) if backend == "triton" else {}
    if choices:
        ctx.plan.setdefault("grouped_gemm", {}).update(choices)
    native = sum(c["kernel"] == "native" for c in choices.values())
    timed = {k: c for k, c in choices.items() if "triton_us" in c}
    if timed:
        ctx.note(
            "grouped GEMMs timed: "
            + "; ".join(f"{k} {c['kernel']} ({c['why'].removeprefix('auto: ')})" for k, c in timed.items())
        )
    ctx.counters["lower.native_grouped_mm"] += native
    ctx.counters[f"lower.{backend}"] += count
    ctx.counters["lower.glu_rows"] += bounded["glu"]
    ctx.counters["lower.act_rows"] += bounded["act"]
    rows = bounded["glu"] + bounded["act"]
    ctx.note(
        f"backend {backend}: {count} moecc op(s)"
        + (f", {swapped} grouped GEMM / GLU op(s) on Triton kernels" if backend == "triton" else "")
        + (f", {rows} activation(s) computing the rows before their experts' end only" if rows else "")
        + (f", {native} of {len(choices)} plain grouped GEMM(s) on torch._grouped_mm" if choices else "")
    )
    gm.recompile()
    return gm
