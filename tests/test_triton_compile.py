"""Every Triton kernel of the backends compiles for a Hopper GPU (sm_90), in each constexpr branch the host
code takes there, with the GPU tile configurations. The interpreter, which runs the kernels everywhere else
in this suite, does not type-check them as the compiler does: a helper whose two branches return tiles of
different shapes ran under the interpreter and failed to compile on the GPU.

The compiler runs in a subprocess without TRITON_INTERPRET (the kernels of this process are interpreted
ones); it needs no GPU, only Triton's bundled CUDA toolchain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch

BF16 = "bf16"
# the signal words and call counters of the fused kernels (`triton_ep.EPBuffers`)
COUNTERS_I64 = ("sig_ptr", "epoch_ptr", "done_ptr", "chain_ptr")
# kernel -> pointer arguments whose element type is not int32 (index tables are int32, peer tables int64)
POINTERS: dict[str, dict[str, str]] = {
    "triton_backend._grouped_mm_kernel": dict.fromkeys(("x_ptr", "w_ptr", "y_ptr"), BF16),
    "triton_backend._grouped_wgrad_kernel": dict.fromkeys(("x_ptr", "dy_ptr", "dw_ptr"), BF16),
    "triton_ep._dispatch_gemm_kernel": {
        **dict.fromkeys(("src_ptr", "gsrc_ptr", "recv_ptr", "gates_ptr", "w_ptr", "y_ptr", "save_ptr"), BF16),
    },
    "triton_ep._gemm_scatter_kernel": dict.fromkeys(("a_ptr", "w_ptr"), BF16),
    "triton_backend._glu_kernel": dict.fromkeys(("h_ptr", "da_ptr", "out_ptr"), BF16),
    "triton_backend._act_rows_kernel": dict.fromkeys(("h_ptr", "da_ptr", "out_ptr"), BF16),
    "triton_ep._combine_kernel": {"src_ptr": BF16, "w_ptr": "fp32", "out_ptr": BF16, "copy_ptr": BF16},
    "triton_ep._gate_grad_kernel": {"dout_ptr": BF16, "y_ptr": BF16, "dw_ptr": "fp32"},
    "triton_ep._push_meta_kernel": {},
    "triton_ep._wait_all_kernel": {},
    "triton_backend._tile_plan_kernel": {},
    "triton_ep._route_scan_kernel": {"idx_ptr": "i64"},
    "triton_ep._route_slots_kernel": {"order_ptr": "i64"},
    "triton_ep._receiver_plan_kernel": {},
}


def _variants() -> dict[str, tuple[str, dict[str, Any], dict[str, list[int]]]]:
    """name -> (kernel, constexprs, descriptor arguments' block shapes), with the configurations the host
    code uses on a CUDA device."""
    from moecc.backends import triton_backend

    cuda, bf = torch.device("cuda"), torch.bfloat16
    BM, BN, BK, _, _, GM = triton_backend._config("grouped_mm", cuda, bf)
    common = {"PRECISION": "tf32", "UPCAST": False}
    # weights [E, K, N] through a descriptor: K-major (nn.Linear's layout) as [E*N, K], else [E*K, N]
    w_block = {True: [BN, BK], False: [BK, BN]}
    out: dict[str, tuple[str, dict[str, Any], dict[str, list[int]]]] = {}
    for desc in ("none", "kmajor", "nmajor"):
        km = desc == "kmajor"
        on = desc != "none"
        out[f"grouped_mm-{desc}"] = (
            "triton_backend._grouped_mm_kernel",
            {**common, "BM": BM, "BN": BN, "BK": BK, "NUM_PROGRAMS": 132, "GROUP_M": GM,
             "DESC": on, "W_KMAJOR": km},
            {"x_desc": [BM, BK], "w_desc": w_block[km]} if on else {},
        )  # fmt: skip
        for gates, save in ((True, True), (False, False)):
            out[f"dispatch_gemm-{desc}-gates{int(gates)}-save{int(save)}"] = (
                "triton_ep._dispatch_gemm_kernel",
                {**common, "EP": 4, "BT": 32, "BH": 256, "HAS_GATES": gates, "BM": BM, "BN": BN, "BK": BK,
                 "GROUP_M": GM, "ROLE": 3, "SAVE_A": save, "WIDE": False, "DESC_W": on,
                 "W_KMAJOR": km},
                {"w_desc": w_block[km]} if on else {},
            )  # fmt: skip
        out[f"gemm_scatter-{desc}"] = (
            "triton_ep._gemm_scatter_kernel",
            {**common, "EP": 4, "BM": BM, "BN": BN, "BK": BK, "GROUP_M": GM, "WIDE": False,
             "DESC": on, "W_KMAJOR": km},
            {"a_desc": [BM, BK], "w_desc": w_block[km]} if on else {},
        )  # fmt: skip
    out["dispatch_gemm-wide"] = (
        "triton_ep._dispatch_gemm_kernel",
        {**out["dispatch_gemm-none-gates1-save1"][1], "WIDE": True},
        {},
    )
    for kernel, desc in (
        ("grouped_mm_wgrad", True),
        ("grouped_mm_wgrad_long", True),
        ("grouped_mm_wgrad_pointer", False),
    ):
        WK, WN, WS, _, _, _ = triton_backend._config(kernel, cuda, bf)
        out[f"wgrad-{kernel}"] = (
            "triton_backend._grouped_wgrad_kernel",
            {**common, "BK": WK, "BN": WN, "BS": WS, "NUM_PROGRAMS": 132, "DESC": desc},
            {"x_desc": [WS, WK], "dy_desc": [WS, WN]} if desc else {},
        )
    for has_w, copy in ((True, True), (False, False)):
        out[f"combine-w{int(has_w)}-copy{int(copy)}"] = (
            "triton_ep._combine_kernel",
            {"K": 8, "BH": 1024, "HAS_W": has_w, "COPY": copy},
            {},
        )
    for act, code in triton_backend.GLU_ACT_CODES.items():
        for backward in (False, True):
            way = "bwd" if backward else "fwd"
            for rows in (False, True):  # over every row, or up to a count on the device (glu_rows, ep_glu)
                out[f"glu-{act}-{way}{'-rows' if rows else ''}"] = (
                    "triton_backend._glu_kernel",
                    {"ACT": code, "BF": 2048, "BACKWARD": backward, "HAS_ROWS": rows},
                    {},
                )
            out[f"act-{act}-{way}"] = (
                "triton_backend._act_rows_kernel",
                {"ACT": code, "BF": 2048, "BACKWARD": backward},
                {},
            )
    out["tile_plan"] = ("triton_backend._tile_plan_kernel", {"BM": BM, "BSEG": 512, "BLOCK": 16}, {})
    out["route_scan"] = ("triton_ep._route_scan_kernel", {"EP": 4, "BT": 1024, "BK": 8}, {})
    out["route_slots"] = ("triton_ep._route_slots_kernel", {"LOG": 18, "BJ": 1024, "BE": 256}, {})
    out["receiver_plan"] = (
        "triton_ep._receiver_plan_kernel",
        {"EP": 4, "EP2": 4, "BE": 64, "BM": BM, "BLOCK": 16, "BCOPY": 1024},
        {},
    )
    out["gate_grad"] = ("triton_ep._gate_grad_kernel", {"K": 8, "BH": 1024}, {})
    out["push_meta"] = ("triton_ep._push_meta_kernel", {"EP": 4, "BJ": 128, "BE": 64}, {})
    out["wait_all"] = ("triton_ep._wait_all_kernel", {"EP": 4}, {})
    return out


def _gluon_variants() -> list[str]:
    """The Gluon kernels (`gluon_wgrad`, `gluon_gemm`), one per tile configuration or weight layout: compiled
    where this Triton has Gluon."""
    from moecc.backends import gluon_wgrad

    if gluon_wgrad._IMPORT_ERROR is not None:
        return []
    return (
        [f"gluon_wgrad-{key}" for key in gluon_wgrad.CONFIGS]
        + ["gluon_scatter-kmajor", "gluon_scatter-nmajor"]
        + ["gluon_dispatch-kmajor-gated", "gluon_dispatch-nmajor-plain"]
    )


def _compile_gluon(name: str) -> dict[str, Any]:
    """Compile a warp-specialised Gluon kernel for sm_90: its PTX must hold wgmma, TMA copies and the register
    hand-over between the loader warp and the compute warps (and the scattering GEMM's rows leave in 16-byte
    stores)."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from moecc.backends import gluon_gemm, gluon_wgrad

    def ptx_of(fn, sig: dict[str, str], consts: dict[str, Any], num_warps: int) -> str:
        """The PTX of fn; arguments neither in sig nor in consts are typed by name (tables and counters int64,
        other pointers int32, the rest i32)."""

        def by_name(a: str) -> str:
            return "*i64" if a.endswith("_tab") or a in COUNTERS_I64 else "*i32" if a.endswith("_ptr") else "i32"

        sig = {a: sig.get(a, "constexpr" if a in consts else by_name(a)) for a in fn.arg_names}
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, a in enumerate(fn.arg_names)
            if sig[a].startswith("*") or (sig[a] == "i32" and a in DIVISIBLE)
        }
        src = GluonASTSource(fn, sig, constexprs=consts, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]

    kind, key = name.split("-", 1)
    if kind == "gluon_scatter":
        BM, BN, BK, stages = gluon_gemm.CONFIG
        km = key == "kmajor"
        la, lw = gluon_gemm._layouts(torch.bfloat16, BM, BN, BK, km)
        wb = [BN, BK] if km else [BK, BN]
        fn = gluon_gemm._scatter_ws_kernel
        consts = {"EP": 4, "GROUP_M": 8, "STAGES": stages, "W_KMAJOR": km, "LOADER_REGS": gluon_wgrad.LOADER_REGS,
                  "num_warps": gluon_gemm.NUM_WARPS}  # fmt: skip
        sig = {"a_desc": f"tensordesc<bf16[{BM}, {BK}],{la!r}>", "w_desc": f"tensordesc<bf16[{wb[0]}, {wb[1]}],{lw!r}>"}
        ptx = ptx_of(fn, sig, consts, gluon_gemm.NUM_WARPS)
    elif kind == "gluon_dispatch":
        BM, BN, BK, stages = gluon_gemm.DISPATCH_CONFIG
        km = key.startswith("kmajor")
        _, lw = gluon_gemm._layouts(torch.bfloat16, BM, BN, BK, km)
        wb = [BN, BK] if km else [BK, BN]
        fn = gluon_gemm._dispatch_ws_kernel
        consts = {"EP": 4, "HAS_GATES": key.endswith("gated"), "BM": BM, "BK": BK, "GROUP_M": 8, "STAGES": stages,
                  "SAVE_A": True, "W_KMAJOR": km, "ROLE": 3, "LOADER_WARPS": gluon_gemm.DISPATCH_LOADER_WARPS,
                  "LOADER_REGS": gluon_gemm.DISPATCH_LOADER_REGS, "num_warps": gluon_gemm.NUM_WARPS}  # fmt: skip
        sig = {"w_desc": f"tensordesc<bf16[{wb[0]}, {wb[1]}],{lw!r}>", "gates_ptr": "*fp32"}
        for a in ("src_ptr", "recv_ptr", "y_ptr", "save_ptr", "gsrc_ptr"):
            sig[a] = "*bf16"
        ptx = ptx_of(fn, sig, consts, gluon_gemm.NUM_WARPS)
        # the gathered rows in 16-byte cp.async copies, each loader thread's arrival on the stage's barrier
        missing = [i for i in ("cp.async.cg.shared.global", "cp.async.mbarrier.arrive.noinc") if i not in ptx]
        if missing:
            return {"error": f"no {missing} in the PTX", "scalar_stores": 0}
    else:
        BK, BN, BS, stages = gluon_wgrad.CONFIGS[key]
        la, lb, lc = gluon_wgrad._layouts(torch.bfloat16, BK, BN, BS)
        descs = {"x_desc": ([BS, BK], la), "dy_desc": ([BS, BN], lb), "dw_desc": ([BK, BN], lc)}
        sig = {a: f"tensordesc<bf16[{b[0]}, {b[1]}],{lay!r}>" for a, (b, lay) in descs.items()}
        sig.update({"offs_ptr": "*i32", **dict.fromkeys(("K", "N", "E", "NSRC", "GROUP_N"), "i32"), "scale": "fp32"})
        consts = {"STAGES": stages, "LOADER_REGS": gluon_wgrad.LOADER_REGS, "num_warps": gluon_wgrad.NUM_WARPS}
        ptx = ptx_of(gluon_wgrad._wgrad_ws_kernel, sig, consts, gluon_wgrad.NUM_WARPS)
    missing = [i for i in ("wgmma.mma_async", "cp.async.bulk.tensor", "setmaxnreg") if i not in ptx]
    return {"error": f"no {missing} in the PTX" if missing else "",
            "scalar_stores": len(re.findall(r"\bst\.global\.b16\b", ptx))}  # fmt: skip


# arguments the launcher specialises as they are on the GPU: unit strides become the constant 1, and data
# pointers and these sizes are multiples of 16 (the sizes and strides of every shape the benchmarks run)
UNIT_STRIDES = ("sxk", "sak", "syn", "swk")
DIVISIBLE = ("H", "N", "K", "Kd", "TK", "T", "F", "swe", "swn", "sxm", "sym", "sam")
# the GEMM kernels, whose result tiles must leave in 16-byte vector stores (not one store per element)
VECTOR_STORES = (
    "grouped_mm-", "gemm_scatter-", "dispatch_gemm-", "glu-", "act-", "gluon_scatter-", "gluon_dispatch-",
)  # fmt: skip


def _compile_all() -> dict[str, dict[str, Any]]:
    """Runs in the subprocess: name -> {"error": "" (compiled) or the compiler's error, "scalar_stores": the
    2-byte global stores in its PTX}."""
    import importlib
    import re
    import traceback

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for name, (kernel, constexprs, descs) in _variants().items():
        module, attr = kernel.split(".")
        fn = getattr(importlib.import_module(f"moecc.backends.{module}"), attr)
        sig = {}
        for arg in fn.arg_names:
            if arg in constexprs:
                sig[arg] = "constexpr"
            elif arg.endswith("_desc"):
                sig[arg] = f"tensordesc<bf16{descs[arg]}>" if arg in descs else "constexpr"
            elif arg.endswith("_tab") or arg in COUNTERS_I64:
                sig[arg] = "*i64"
            elif arg.endswith("_ptr"):
                sig[arg] = "*" + POINTERS[kernel].get(arg, "i32")
            else:
                sig[arg] = "i32"
        ones = {a: 1 for a in UNIT_STRIDES if a in sig}
        sig.update(dict.fromkeys(ones, "constexpr"))
        consts = {**constexprs, **ones}
        consts.update({a: None for a, t in sig.items() if t == "constexpr" and a not in consts})
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, a in enumerate(fn.arg_names)
            if sig[a].startswith("*") or (sig[a] == "i32" and a in DIVISIBLE)
        }
        try:
            kernel_bin = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32))
            ptx = kernel_bin.asm["ptx"]
            results[name] = {"error": "", "scalar_stores": len(re.findall(r"\bst\.global\.b16\b", ptx))}
        except Exception:  # noqa: BLE001 - reported per variant to the test
            results[name] = {"error": traceback.format_exc(limit=-3), "scalar_stores": -1}
    for name in _gluon_variants():
        try:
            results[name] = _compile_gluon(name)
        except Exception:  # noqa: BLE001 - reported per variant to the test
            results[name] = {"error": traceback.format_exc(limit=-3), "scalar_stores": -1}
    return results


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(_variants()) + _gluon_variants())
def test_kernel_compiles_for_hopper(compiled: dict[str, dict[str, Any]], name: str) -> None:
    assert compiled[name]["error"] == "", f"{name} does not compile for sm_90:\n{compiled[name]['error']}"


@pytest.mark.parametrize("name", [n for n in [*_variants(), *_gluon_variants()] if n.startswith(VECTOR_STORES)])
def test_gemm_kernels_store_16_byte_vectors(compiled: dict[str, dict[str, Any]], name: str) -> None:
    """The result tiles (to this rank's rows, or scattered to peers' through an address table) and the pushed
    rows leave in 16-byte stores. Without the table addresses' alignment, the scattering GEMM stored every
    element on its own and took 1.5-2.3x the plain grouped GEMM's time on the fine-grained shapes."""
    assert compiled[name]["scalar_stores"] == 0, f"{name}: {compiled[name]['scalar_stores']} 2-byte stores"


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
