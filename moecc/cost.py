"""Cost model: hardware profiles and per-node time estimates.

Costs are formulas over symbolic shapes (sympy): a routed GEMM's row count is the symbol `S_e` (rows an
expert receives), evaluated at its expected value under uniform routing (T*K/E). Passes read the
evaluated estimate from `node.meta["moecc"]["cost_us"]`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import os
from pathlib import Path
from typing import Any

import sympy
import torch
import torch.fx as fx

from moecc import ir
from moecc.options import MoeccError


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
    name: str
    gemm_flops: float  # dense GEMM rate, FLOP/s
    grouped_gemm_flops: float  # grouped GEMM rate, FLOP/s
    mem_bw: float  # device memory bandwidth, B/s
    a2a_bw: float  # all-to-all bandwidth per rank at large messages, B/s
    a2a_latency: float  # per-collective latency, s
    # measured (bytes per rank, seconds) points per collective ("all_to_all", "all_reduce"), from calibrate;
    # where present they replace latency + bytes / bandwidth
    curves: tuple[tuple[str, tuple[tuple[float, float], ...]], ...] = ()
    op_overhead: float = 5e-6  # fixed cost of issuing one operation (dispatch, launch), s
    # rate of moecc's fused expert-parallel ops (gathering / scattering GEMMs, with their routing), FLOP/s;
    # None: the grouped GEMM rate
    fused_gemm_flops: float | None = None
    # the fused ops' rate across ep ranks of one node, by ep (calibrate measures it at its world size): with
    # the rows' transfers, the waits for them and the remote stores. An ep without an entry: the one-rank rate,
    # and no less than the op's transfer time at the all-to-all bandwidth
    fused_ep_gemm_flops: tuple[tuple[int, float], ...] = ()
    # fused attention's rate, forward and backward, in the FLOPs `attention_flops` counts, FLOP/s (calibrate
    # times the default SDPA kernel): on an H200 its backward ran at about half the dense GEMM rate. None: the
    # dense GEMM rate
    attention_flops: float | None = None
    attention_bwd_flops: float | None = None
    # the host's time to issue one node of a graph (Python, the dispatcher, kernel launches), s: an op's
    # kernels start no earlier than the host has issued it, so where the host is slower than the device the
    # host sets the pace. host_op: any op without an entry in host_ops (which holds the multi-kernel ops,
    # by name, e.g. "moecc.grouped_mm"); host_view: a view op (no kernel). 0: the host is not modelled
    host_op: float = 0.0
    host_view: float = 0.0
    host_ops: tuple[tuple[str, float], ...] = ()
    # what one host synchronisation in a step costs beyond the host waiting for the device (which the timeline
    # models), s: the counted exchange copies each MoE layer's row counts to the host, after which the device
    # idles until the host has issued the layer's next ops and NCCL's split-size all-to-alls. Measured as the
    # step time a counted layer costs over a padded one, less the padding's extra rows (`moecc calibrate`
    # keeps the built-in figure: its small model's steps leave the device too little to drain). 0: none
    host_sync: float = 0.0
    # GEMM rates by problem size, measured (`moecc calibrate`): (size, FLOP/s) points per kind, "dense" by a
    # GEMM's FLOPs, "grouped" (the grouped GEMM) and "fused" (the fused ops in one rank) by the rows an expert
    # receives. A kind with points replaces its single rate (gemm_flops, grouped_gemm_flops,
    # fused_gemm_flops), which stands for large sizes only: on an H200 the fused ops ran at about half their
    # 8192-token rate with a quarter of the rows per expert
    rate_curves: tuple[tuple[str, tuple[tuple[float, float], ...]], ...] = ()
    # the rows per expert at which each fused_ep_gemm_flops entry was measured, by ep: that rate is scaled by
    # the "fused" curve from there
    fused_ep_rows: tuple[tuple[int, float], ...] = ()
    source: str = "built-in"  # where the figures come from (built-in, or the calibrated profile's path)

    def comm_s(self, kind: str, nbytes: float) -> float:
        """Predicted time of one collective moving `nbytes` per rank."""
        points = dict(self.curves).get(kind)
        if not points:
            return self.a2a_latency + nbytes / self.a2a_bw
        return _interpolate(points, nbytes)

    def rate(self, kind: str, size: float) -> float:
        """FLOP/s of a GEMM of `kind` ("dense", "grouped", "fused") at `size` (FLOPs for dense, rows per
        expert otherwise): the measured curve where the profile has one, else the kind's single rate."""
        curves = dict(self.rate_curves)
        if kind in curves:
            return _rate_at(curves[kind], size, fixed_time=kind != "dense")
        if kind == "dense":
            return self.gemm_flops
        if kind == "fused" and self.fused_gemm_flops:
            return self.fused_gemm_flops
        if "grouped" in curves:  # the fused ops without a rate of their own: the grouped GEMM's
            return _rate_at(curves["grouped"], size)
        return self.grouped_gemm_flops

    def fused_rate(self, rows: float, ep: int) -> float:
        """FLOP/s of the fused expert-parallel ops at `rows` rows per expert across `ep` ranks: the rate measured
        at that ep (with the transfers, waits and remote stores in it), moved along the one-rank curve from the
        rows it was measured at; an ep without a measurement: the one-rank rate."""
        across = dict(self.fused_ep_gemm_flops).get(ep) if ep > 1 else None
        if across is None:
            return self.rate("fused", rows)
        at = dict(self.fused_ep_rows).get(ep)
        if at is None or "fused" not in dict(self.rate_curves):
            return across
        return across * self.rate("fused", rows) / self.rate("fused", at)

    def bucket_bytes(self) -> float:
        """Gradient bucket size: where an all-reduce's fixed latency is a tenth of its time (9 x latency x
        bandwidth, from the measured curve where there is one), within [1 MiB, 64 MiB]."""
        lat = self.comm_s("all_reduce", 0.0)
        big = float(64 << 20)
        bw = big / max(self.comm_s("all_reduce", big) - lat, 1e-12)
        return min(max(9.0 * lat * bw, float(1 << 20)), big)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["curves"] = {k: [list(p) for p in pts] for k, pts in self.curves}
        d["host_ops"] = dict(self.host_ops)
        d["fused_ep_gemm_flops"] = {str(ep): rate for ep, rate in self.fused_ep_gemm_flops}
        d["fused_ep_rows"] = {str(ep): rows for ep, rows in self.fused_ep_rows}
        d["rate_curves"] = {k: [list(p) for p in pts] for k, pts in self.rate_curves}
        return d

    @staticmethod
    def from_json(d: dict[str, Any], source: str) -> HardwareProfile:
        d = {k: v for k, v in d.items() if k != "measured"}  # how it was measured: for people, not the model
        fields = {f.name for f in dataclasses.fields(HardwareProfile)}
        unknown = set(d) - fields
        missing = {"name", "gemm_flops", "grouped_gemm_flops", "mem_bw", "a2a_bw", "a2a_latency"} - set(d)
        if unknown or missing:
            raise ValueError(f"not a moecc profile: unknown fields {sorted(unknown)}, missing {sorted(missing)}")
        curves = tuple((k, _monotone(pts)) for k, pts in sorted(d.get("curves", {}).items()))
        host_ops = tuple(sorted((str(k), float(v)) for k, v in d.get("host_ops", {}).items()))
        fused_ep = tuple(sorted((int(k), float(v)) for k, v in d.get("fused_ep_gemm_flops", {}).items()))
        ep_rows = tuple(sorted((int(k), float(v)) for k, v in d.get("fused_ep_rows", {}).items()))
        rates = d.get("rate_curves", {})
        bad = [k for k, pts in rates.items() if k not in RATE_KINDS or not pts or any(r <= 0 or x <= 0 for x, r in pts)]
        if bad:
            raise ValueError(
                f"rate_curves {sorted(bad)}: kinds are {RATE_KINDS}, each with positive (size, FLOP/s) points"
            )
        rate_curves = tuple(
            (k, tuple(sorted((float(x), float(r)) for x, r in pts))) for k, pts in sorted(rates.items())
        )
        return HardwareProfile(
            **{
                **d,
                "curves": curves,
                "host_ops": host_ops,
                "fused_ep_gemm_flops": fused_ep,
                "fused_ep_rows": ep_rows,
                "rate_curves": rate_curves,
                "source": source,
            }
        )


RATE_KINDS = ("dense", "fused", "grouped")


def _rate_at(points: tuple[tuple[float, float], ...], size: float, fixed_time: bool = True) -> float:
    """A GEMM's rate at `size` from measured (size, FLOP/s) points: linear in log(size) between them; beyond the
    largest, the largest one's rate. Below the smallest, with `fixed_time` (sizes in rows per expert) the time
    stays the smallest one's: an expert's GEMM with fewer rows still reads its whole weight and fills its
    tiles; without it (sizes in FLOPs, where a fixed time would charge a tiny matmul as much as the smallest
    probe) the smallest one's rate, the memory term of the estimate taking over for small, skinny ones."""
    (x0, r0), (xn, rn) = points[0], points[-1]
    if size <= x0:
        return r0 * max(size, 1e-9) / x0 if fixed_time else r0
    if size >= xn:
        return rn
    for (a, ra), (b, rb) in zip(points, points[1:], strict=False):
        if size <= b:
            f = math.log(size / a) / math.log(b / a)
            return ra + (rb - ra) * f
    return rn


def _monotone(points: Any) -> tuple[tuple[float, float], ...]:
    """Measured (bytes, seconds) points sorted by size, each time capped by the next one's: a smaller message is
    never slower than a larger one, whatever noise a probe picked up."""
    pts = sorted((float(b), float(t)) for b, t in points)
    for i in range(len(pts) - 2, -1, -1):
        pts[i] = (pts[i][0], min(pts[i][1], pts[i + 1][1]))
    return tuple(pts)


def _interpolate(points: tuple[tuple[float, float], ...], nbytes: float) -> float:
    """Piecewise linear in (bytes, seconds) between measured points; below the first, its time (latency);
    beyond the last, the last segment's bandwidth."""
    if nbytes <= points[0][0]:
        return points[0][1]
    for (b0, t0), (b1, t1) in zip(points, points[1:], strict=False):
        if nbytes <= b1:
            return t0 + (t1 - t0) * (nbytes - b0) / (b1 - b0)
    if len(points) == 1:
        return points[0][1]
    (b0, t0), (b1, t1) = points[-2], points[-1]
    return t1 + (nbytes - b1) * max(t1 - t0, 0.0) / (b1 - b0)


PROFILES = {
    # measured on 4 x H200 (NVLink full mesh), torch 2.11: see shared/DESIGN.md
    # the fused ops' rate and the device's gap between back-to-back ops: `moecc calibrate` on one H200
    # (benchmarks/results/profile_h200_1gpu_2026-11-29c.json)
    "h200": HardwareProfile(
        "h200",
        772e12,
        716e12,
        4.0e12,
        258e9,
        25e-6,
        op_overhead=1.7e-6,
        fused_gemm_flops=450e12,
        # causal fused attention through SDPA, forward / backward: `moecc calibrate` on an H200 of a 2-GPU node
        # (benchmarks/results/profile_h200_2gpu_2026-11-29x_hosted.json)
        attention_flops=351e12,
        attention_bwd_flops=329e12,
        # the host's time per node: `moecc calibrate` on 2 x H200, from profiled training steps with and without
        # the fused expert ops (benchmarks/results/profile_h200_2gpu_2026-11-30_stephost2.json)
        host_op=21.9e-6,
        host_view=1.0e-6,
        # the 8-layer DeepSeek-style step unfused on 2 x H200, T = 8192, counted against padded at top-1, 2 and
        # 6, with the padding's extra rows added back: 0.7-2.4 ms a layer (an A/B/A/B at top-2 on another node,
        # about 0.4); the spread is wide, and at ep = 2 over NVLink the choice is the same anywhere in it
        # (benchmarks/README.md, "Counted or padded by cost")
        host_sync=0.7e-3,
        # GEMM rates by size and the fused ops' rate across 2 ranks: `moecc calibrate` on 2 x H200
        # (benchmarks/results/profile_h200_2gpu_2026-11-30_curves.json); dense by FLOPs (m x 4096 x 4096), the
        # grouped GEMM (64 experts, 4096 x 3072) and the fused ops by rows per expert
        rate_curves=(
            (
                "dense",
                (
                    (8.59e9, 223e12),
                    (17.2e9, 336e12),
                    (34.4e9, 447e12),
                    (68.7e9, 610e12),
                    (137e9, 686e12),
                    (275e9, 714e12),
                    (550e9, 731e12),
                ),
            ),
            ("fused", ((96, 165e12), (192, 297e12), (384, 415e12), (768, 482e12), (1536, 527e12))),
            (
                "grouped",
                (
                    (32, 81e12),
                    (64, 161e12),
                    (128, 332e12),
                    (256, 515e12),
                    (512, 558e12),
                    (1024, 562e12),
                    (2048, 569e12),
                ),
            ),
        ),  # fmt: skip
        fused_ep_gemm_flops=((2, 462e12),),
        fused_ep_rows=((2, 1536.0),),
        host_ops=(
            ("moecc.all_to_all_rows_start", 362e-6),
            ("moecc.ep_dispatch_gemm", 1560e-6),
            ("moecc.ep_dispatch_gemm_backward", 721e-6),
            ("moecc.ep_gemm_combine", 742e-6),
            ("moecc.ep_gemm_combine_backward", 699e-6),
            ("moecc.ep_glu", 219e-6),
            ("moecc.ep_glu_backward", 156e-6),
            ("moecc.ep_plan", 997e-6),
            ("moecc.glu", 47e-6),
            ("moecc.glu_backward", 78e-6),
            ("moecc.glu_rows", 205e-6),
            ("moecc.glu_rows_backward", 125e-6),
            ("moecc.grouped_mm", 377e-6),
            ("moecc.grouped_mm_wgrad", 236e-6),
            ("moecc.route_permute", 768e-6),
            ("moecc.route_permute_backward", 168e-6),
            ("moecc.unpermute_combine", 305e-6),
            ("moecc.unpermute_combine_backward", 268e-6),
        ),
    ),
    # a 2-core CPU machine: rough figures good enough to rank choices
    "cpu": HardwareProfile("cpu", 50e9, 40e9, 10e9, 2e9, 50e-6, op_overhead=10e-6),
}

PROFILE_ENV = "MOECC_PROFILE"


def device_key(device: torch.device | str | None) -> str:
    """The name a calibrated profile of this device is saved under ("cpu", "nvidia-h200", ...)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name(dev).lower()).strip("-")
    return dev.type


def profile_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moecc" / "profiles"


def load_profile(path: str | os.PathLike) -> HardwareProfile:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
        return HardwareProfile.from_json(data, source=str(p))
    except (OSError, ValueError, TypeError) as e:
        raise MoeccError(f"cannot use the hardware profile {p}: {e}. Re-run `moecc calibrate`.") from e


def default_profile(device: torch.device | str | None = None, path: str | os.PathLike | None = None) -> HardwareProfile:
    """The profile compile uses: `path`, else $MOECC_PROFILE, else a profile `moecc calibrate` saved for this
    device, else the built-in figures (h200 for a GPU, cpu otherwise)."""
    chosen = path or os.environ.get(PROFILE_ENV)
    if chosen:
        return load_profile(chosen)
    saved = profile_dir() / f"{device_key(device)}.json"
    if saved.exists():
        return load_profile(saved)
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        return PROFILES["h200"]
    return PROFILES["cpu"]


def replayed(profile: HardwareProfile) -> HardwareProfile:
    """`profile` for a step replayed from a CUDA graph (compile's cuda_graph=True): the host issues nothing, so
    it costs nothing; the device's gap between ops (op_overhead) stays."""
    return dataclasses.replace(profile, name=f"{profile.name}, replayed", host_op=0.0, host_view=0.0, host_ops=())


def _val(node: Any) -> Any:
    if not isinstance(node, fx.Node):
        return None
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


def _fused(node: fx.Node) -> tuple[int, int, Any] | None:
    """(T, K, expert weight) of a fused expert-parallel op's node, None for other nodes."""
    name = str(node.target).removesuffix(".default")
    a = node.args
    if name == "moecc.ep_dispatch_gemm":
        T, K = (_size(s) for s in _val(a[1]).shape)
        return T, K, _val(a[2])
    if name == "moecc.ep_gemm_combine":
        T, K = (_size(s) for s in _val(a[2]).shape)
        return T, K, _val(a[1])
    if name == "moecc.ep_gemm_combine_backward":
        T, K = (_size(s) for s in _val(a[3]).shape)
        return T, K, _val(a[2])
    if name == "moecc.ep_dispatch_gemm_backward":
        # T and K are graph values (sym_size nodes) under dynamic shapes
        T, K = (_size(_val(v)) if isinstance(v, fx.Node) else int(v) for v in a[4:6])  # type: ignore[arg-type]
        return T, K, _val(a[2])
    return None


def flops_formula(node: fx.Node) -> sympy.Expr | None:
    """FLOPs of a GEMM-like node as a sympy expression (None for other nodes)."""
    name = str(node.target)
    args: list[Any] = [_val(a) if isinstance(a, fx.Node) else a for a in node.args]
    fused = _fused(node)
    if fused is not None:
        w = fused[2]
        gemms = 2 if "backward" in name else 1  # dX and dW
        return gemms * 2 * S_e * _size(w.shape[0]) * _size(w.shape[1]) * _size(w.shape[2])
    if "moecc.grouped_mm_wgrad" in name:
        x, dy, offs = args[:3]
        return 2 * S_e * _size(x.shape[1]) * _size(dy.shape[1]) * _size(offs.shape[0])
    if "moecc.grouped_mm" in name:
        x, w = args[:2]
        return 2 * S_e * _size(w.shape[0]) * _size(w.shape[1]) * _size(w.shape[2])
    if "aten._scaled_dot_product" in name:
        return attention_flops(node)
    if name in ("aten.mm.default", "aten.addmm.default", "aten.bmm.default"):
        out = _val(node)
        a = args[-2]
        if isinstance(out, torch.Tensor) and isinstance(a, torch.Tensor):
            return sympy.Integer(2 * _numel(out) * _size(a.shape[-1]))
    return None


def schema_args(node: fx.Node) -> dict[str, Any]:
    """An op node's arguments by their schema names (defaults filled in)."""
    out = {}
    for i, arg in enumerate(node.target._schema.arguments):  # type: ignore[union-attr]
        if i < len(node.args):
            out[arg.name] = node.args[i]
        else:
            out[arg.name] = node.kwargs.get(arg.name, arg.default_value if arg.has_default_value() else None)
    return out


def attention_flops(node: fx.Node) -> sympy.Expr | None:
    """FLOPs of a fused attention node (flash / efficient / cuDNN, forward or backward): the forward's two
    matmuls are 4 B H Sq Sk D, halved when causal; the backward recomputes the scores and takes three more
    (2.5x)."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return None
    a = schema_args(node)
    q, k = _val(a.get("query")), _val(a.get("key"))
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)) or q.dim() != 4:
        return None
    B, Hh, Sq, D = (_size(s) for s in q.shape)
    Sk = _size(k.shape[2])
    flops = 4.0 * B * Hh * Sq * Sk * D * (0.5 if a.get("is_causal") else 1.0)
    if "backward" in str(node.target):
        flops *= 2.5
    return sympy.Float(flops)


def expected_rows_per_expert(node: fx.Node, ep: int = 1) -> float:
    """E[S_e] under uniform routing: what a rank receives on average (the T*K rows of a rank's tokens) over its
    local experts. For the fused ops T*K is their routing's; a plain grouped GEMM's rows are a receive buffer
    with room for ep times that (all of it at ep = 1)."""
    fused = _fused(node)
    if fused is not None:
        T, K, w = fused
        return T * K / max(_size(w.shape[0]), 1)
    x, offs = _val(node.args[0]), _val(node.args[2])
    return _size(x.shape[0]) / max(ep, 1) / max(_size(offs.shape[0]), 1)


def expected_destinations(ep: int, top_k: int) -> float:
    """E[distinct ranks among a token's top-k experts] under uniform routing (experts spread evenly)."""
    return ep * (1.0 - (1.0 - 1.0 / ep) ** top_k)


COLLECTIVE_KIND = {
    "moecc.all_to_all_rows.default": "all_to_all",
    "moecc.all_to_all_rows_start.default": "all_to_all",
    "moecc.ep_plan.default": "all_to_all",
    "_c10d_functional.all_reduce.default": "all_reduce",
}


def exchanged_rows(T: float, ep: int, top_k: int, padded: bool) -> float:
    """Rows one rank sends to the other ranks in a row all-to-all of T tokens: each token once per other rank
    holding one of its experts (expected under uniform routing), or, padded, every token to every other rank."""
    return T * (ep - 1) if padded else T * expected_destinations(ep, top_k) * (ep - 1) / ep


# the row all-to-alls of one unfused MoE layer, by row width: four of hidden-wide rows (the tokens out and
# their results back, and both again in the backward), then the routing's K-wide ones: the expert ids (int64),
# the gates and the gates' gradient (float32)
def _layer_exchange_widths(row_bytes: float, top_k: int) -> list[float]:
    return [row_bytes] * 4 + [8.0 * top_k, 4.0 * top_k, 4.0 * top_k]


def exchange_costs_us(profile: HardwareProfile, T: float, row_bytes: float, ep: int, top_k: int) -> tuple[float, float]:
    """(what padding adds, what counting costs) in one unfused MoE layer of T tokens a rank, us: padding sends
    every token to every other rank in each of the layer's row all-to-alls (`exchanged_rows`); counting sends
    only the rows needed but first exchanges the counts (one small all-to-all) and copies them to the host
    (`HardwareProfile.host_sync`). compile's exchange="auto" pads where the first is at most the second."""
    rows_p, rows_c = exchanged_rows(T, ep, top_k, True), exchanged_rows(T, ep, top_k, False)
    adds = sum(
        profile.comm_s("all_to_all", rows_p * w) - profile.comm_s("all_to_all", rows_c * w)
        for w in _layer_exchange_widths(row_bytes, top_k)
    )
    counting = profile.comm_s("all_to_all", 8.0 * ep) + profile.host_sync
    return 1e6 * adds, 1e6 * counting


def padded_traffic_ratio(ep: int, top_k: int) -> float:
    """Rows a padded row all-to-all sends over those a counted one sends (expected under uniform routing)."""
    return exchanged_rows(1.0, ep, top_k, True) / max(exchanged_rows(1.0, ep, top_k, False), 1e-12)


def is_padded_plan(node: fx.Node) -> bool:
    """Whether an `ep_plan` node plans a padded exchange (no count exchange, no host synchronisation)."""
    return bool(node.args[4] if len(node.args) > 4 else node.kwargs.get("padded", False))


def collective_kind(node: fx.Node) -> str | None:
    """The collective a node runs ("all_to_all", "all_reduce"), or None: a padded ep_plan runs none."""
    name = str(node.target)
    if name == "moecc.ep_plan.default" and is_padded_plan(node):
        return None
    return COLLECTIVE_KIND.get(name)


def comm_bytes(node: fx.Node, top_k: int, padded: bool = False) -> float:
    """Bytes one rank sends to other ranks in a collective node, expected under uniform routing (`padded`: the
    row all-to-alls send every token to every rank, compile's exchange="padded")."""
    name = str(node.target)
    if name == "moecc.ep_plan.default":
        return 8.0 * _size(node.args[2]) if isinstance(node.args[2], int) else 64.0  # one count per peer
    if name in ("moecc.all_to_all_rows.default", "moecc.all_to_all_rows_start.default"):
        x = _val(node.args[0])
        ep = _size(_val(node.args[1]).shape[0])
        rows = x.shape[0]  # the buffer holds ep * T rows, the most a rank can send or receive
        T = _size(rows) / ep
        row_bytes = _nbytes(x) / max(_size(rows), 1)
        return exchanged_rows(T, ep, top_k, padded) * row_bytes
    return float(_nbytes(_val(node.args[0])))


def is_view(node: fx.Node) -> bool:
    """A view (transpose, reshape, slice, ...): metadata only, no kernel and no launch."""
    t = node.target
    return isinstance(t, torch._ops.OpOverload) and (t.is_view or t is torch.ops.aten._unsafe_view.default)


def host_us(node: fx.Node, profile: HardwareProfile) -> float:
    """Predicted host time to issue one node in microseconds (see HardwareProfile.host_op)."""
    if node.op != "call_function" or node.target is operator.getitem:
        return 0.0
    if is_view(node):
        return 1e6 * profile.host_view
    return 1e6 * dict(profile.host_ops).get(ir.op_name(node), profile.host_op)


def estimate_us(node: fx.Node, profile: HardwareProfile, top_k: int = 2, ep: int = 1, padded: bool = False) -> float:
    """Predicted time of one node in microseconds: max(FLOPs / rate, bytes / bandwidth) for compute, the
    profile's collective curve for collectives (`padded`: row all-to-alls of every token, see `comm_bytes`);
    the fused expert-parallel ops overlap their transfers with their GEMMs, so they take the longer of the
    two, at the rate measured across `ep` ranks where the profile has one."""
    if node.op != "call_function" or node.target is operator.getitem or is_view(node):
        return 0.0
    name = str(node.target)
    if (kind := collective_kind(node)) is not None:
        sync = profile.host_sync if name == "moecc.ep_plan.default" else 0.0  # the counts' copy to the host
        return 1e6 * (profile.comm_s(kind, comm_bytes(node, top_k, padded)) + sync)
    if name == "_c10d_functional.wait_tensor.default":
        return 0.0
    f = flops_formula(node)
    grouped = "moecc.grouped" in name or "moecc.ep_" in name
    flops = 0.0
    rows = expected_rows_per_expert(node, ep) if grouped and f is not None else 0.0
    if f is not None:
        flops = float(f.subs(S_e, rows)) if grouped else float(f)
    if "aten._scaled_dot_product" in name:
        rate = (profile.attention_bwd_flops if "backward" in name else profile.attention_flops) or profile.gemm_flops
    elif "moecc.ep_" in name:  # the rate measured across ep ranks, else in one rank, else the grouped GEMM's
        rate = profile.fused_rate(rows, ep) if f is not None else profile.grouped_gemm_flops
    elif grouped:
        rate = profile.rate("grouped", rows) if f is not None else profile.grouped_gemm_flops
    else:
        rate = profile.rate("dense", flops) if flops else profile.gemm_flops
    touched: float = _nbytes(_val(node)) + sum(_nbytes(_val(a)) for a in node.all_input_nodes)
    # the activation between the fused ops: the rows received, 1/ep of the worst case's room on average; no plan
    if name.startswith(("moecc.ep_glu", "moecc.ep_act")):
        touched = (touched - _nbytes(_val(schema_args(node)["plan"]))) / max(ep, 1)
    t = max(flops / rate, touched / profile.mem_bw)
    fused = _fused(node)
    if fused is not None and ep > 1:  # rows to and from the other ranks, inside the kernels
        T, K, w = fused
        H = _size(w.shape[1] if "dispatch" in name else w.shape[2])  # w1 is [E, H, F'], w2 [E, F, H]
        moved = T * expected_destinations(ep, K) * (ep - 1) / ep * H * w.element_size()
        t = max(t, profile.comm_s("all_to_all", moved))
    return 1e6 * (t + profile.op_overhead)
