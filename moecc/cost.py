"""Cost model: hardware profiles and per-node time estimates.

Costs are formulas over symbolic shapes (sympy): a routed GEMM's row count is the symbol `S_e` (rows an
expert receives), evaluated at its expected value under uniform routing (T*K/E). Passes read the
evaluated estimate from `node.meta["moecc"]["cost_us"]`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import sympy
import torch
import torch.fx as fx


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
    name: str
    gemm_flops: float  # dense GEMM rate, FLOP/s
    grouped_gemm_flops: float  # grouped GEMM rate, FLOP/s
    mem_bw: float  # device memory bandwidth, B/s
    a2a_bw: float  # all-to-all bandwidth per rank at large messages, B/s
    a2a_latency: float  # per-collective latency, s


PROFILES = {
    # measured on 4 x H200 (NVLink full mesh), torch 2.11: see shared/DESIGN.md
    "h200": HardwareProfile("h200", 772e12, 716e12, 4.0e12, 258e9, 25e-6),
    # a 2-core CPU machine: rough figures good enough to rank choices
    "cpu": HardwareProfile("cpu", 50e9, 40e9, 10e9, 2e9, 50e-6),
}


def default_profile(device: torch.device | str | None = None) -> HardwareProfile:
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        return PROFILES["h200"]
    return PROFILES["cpu"]


def _val(node: fx.Node) -> Any:
    return node.meta.get("val", node.meta.get("example_value"))


def _size(s: Any) -> int:
    """A concrete size; a data-dependent (unbacked) size counts as 1 row, its hint where it has one."""
    if isinstance(s, torch.SymInt):
        hint = s.node.hint
        return int(hint) if hint is not None else 1
    return int(s)


def _numel(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        return math.prod(_size(s) for s in v.shape)
    if isinstance(v, (tuple, list)):
        return sum(_numel(x) for x in v)
    return 0


def _nbytes(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        return _numel(v) * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(_nbytes(x) for x in v)
    return 0


S_e = sympy.Symbol("S_e", positive=True)  # rows routed to one expert


def flops_formula(node: fx.Node) -> sympy.Expr | None:
    """FLOPs of a GEMM-like node as a sympy expression (None for other nodes)."""
    name = str(node.target)
    args: list[Any] = [_val(a) if isinstance(a, fx.Node) else a for a in node.args]
    if "moecc.grouped_mm_wgrad" in name:
        x, dy, offs = args[:3]
        return 2 * S_e * _size(x.shape[1]) * _size(dy.shape[1]) * _size(offs.shape[0])
    if "moecc.grouped_mm" in name:
        x, w = args[:2]
        return 2 * S_e * _size(w.shape[0]) * _size(w.shape[1]) * _size(w.shape[2])
    if name in ("aten.mm.default", "aten.addmm.default", "aten.bmm.default"):
        out = _val(node)
        a = args[-2]
        if isinstance(out, torch.Tensor) and isinstance(a, torch.Tensor):
            return sympy.Integer(2 * _numel(out) * _size(a.shape[-1]))
    return None


def expected_rows_per_expert(node: fx.Node) -> float:
    """E[S_e] under uniform routing: the routed rows of a grouped GEMM spread evenly over its experts."""
    x, offs = _val(node.args[0]), _val(node.args[2])  # type: ignore[arg-type]
    return _size(x.shape[0]) / max(_size(offs.shape[0]), 1)


def estimate_us(node: fx.Node, profile: HardwareProfile) -> float:
    """Predicted time of one node in microseconds: max(FLOPs / rate, bytes / bandwidth)."""
    if node.op != "call_function":
        return 0.0
    f = flops_formula(node)
    grouped = "moecc.grouped" in str(node.target)
    rate = profile.grouped_gemm_flops if grouped else profile.gemm_flops
    flops = 0.0
    if f is not None:
        flops = float(f.subs(S_e, expected_rows_per_expert(node))) if grouped else float(f)
    touched = _nbytes(_val(node)) + sum(_nbytes(_val(a)) for a in node.all_input_nodes)
    return 1e6 * max(flops / rate, touched / profile.mem_bw)
