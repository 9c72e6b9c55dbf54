"""The dW grouped GEMM as a warp-specialised Gluon kernel for Hopper (sm_90): dw[e] = scale * sum over sources
s of x[rows of segment s*E + e]^T @ dy[same rows], the contract of `triton_backend.grouped_mm_wgrad_segments`.

Why a second kernel for the same product: the stock Triton dW kernel runs one 8-warp program per SM whose
loads for a tile start only after the previous tile's result is stored, so each tile's epilogue (a 64 KB store)
and its pipeline's fill are exposed. With few rows an expert (256 at the DeepSeek-like shape in one rank: 4 row
blocks a tile) that is most of the time; it ran at 0.72-0.89 of `torch._grouped_mm`, this kernel at 0.97-1.07
with one segment an expert and 0.93-1.02 with two (results/wgrad_gluon_2026-11-30_1gpu_c.json).
Here one loader warp walks the same tile list as the compute warps and keeps a ring of shared-memory stages
full through TMA loads, across tile boundaries, while the compute warps run the wgmma chain, store the finished
tile through shared memory with an asynchronous TMA store and go on to the next tile without waiting for it.

Rows past a segment's end inside its last row block are other experts' rows (or, in the fused path's
buffers, anything, NaN included): the compute warps zero them, in both operands' shared-memory tiles, within
the 16-row slice the segment ends in, and multiply only the slices up to there.

Hopper only, bf16/fp16, and shapes a TMA store can write without crossing into the next expert (K a multiple of
the tile's BK, N*2 bytes a multiple of 16): `supported` says which; the caller picks the kernel and counts it.
Not run by the CPU interpreter; tests/test_gpu.py checks it against a float32 reference."""

from __future__ import annotations

import functools
import os

import torch
import triton

# (triton_backend imports this module; each uses the other's names at call time only)
from . import triton_backend

try:  # Gluon: Triton 3.5 and later
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # Triton 3.6's names for the TMA copies; later versions renamed them (and keep the old names as errors)
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # (renamed after 3.6)
    _IMPORT_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - depends on the installed Triton
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"

# (BK, BN, BS, stages): the output tile [BK, BN] (the accumulator of 8 warps, two warpgroups), BS rows a stage.
# Shared memory: stages * BS * (BK + BN) * 2 bytes + BK * BN * 2 for the output tile (208 KB). "long": experts
# of triton_backend.WGRAD_LONG_ROWS rows or more on average. On 1 x H200 against torch._grouped_mm
# (results/wgrad_gluon_2026-11-30_1gpu_a.json): 128 x 256 was faster with 1 024-2 048 rows an expert (Qwen3
# 0.92-1.02 of native against 0.87-0.97, Mixtral 0.93-0.99 against 0.88-0.94), 256 x 128 with 256 (DeepSeek
# 1.00-1.01 against 0.97-1.00); 128 x 128 with 4 stages was slower everywhere.
CONFIGS = {"short": (256, 128, 64, 3), "long": (128, 256, 64, 3)}
NUM_WARPS = 8  # the compute partition: two warpgroups of the [BK, BN] accumulator
LOADER_REGS = 40  # registers a thread of the loader warp keeps (the rest go to the compute warps)


@functools.cache
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


def _common_refusal(t: torch.Tensor, device: torch.device | None = None) -> str | None:
    """Why no Gluon kernel can run on t's device (or `device`, where t is a meta tensor standing for a call's
    operand) and dtype (None: they can)."""
    value = os.environ.get("MOECC_GLUON", "1").strip()
    if value not in ("0", "1"):
        raise ValueError(
            f"MOECC_GLUON={value!r}: expected 1 (the warp-specialised Gluon kernels where they run, the default) or "
            f"0 (the Triton kernels)"
        )
    if value == "0":
        return "MOECC_GLUON=0"
    if _IMPORT_ERROR is not None:
        return f"this Triton has no Gluon ({_IMPORT_ERROR})"
    device = t.device if device is None else device
    if device.type != "cuda" or not _hopper(torch.cuda._get_device_index(device, optional=True)):
        return "not a Hopper GPU"
    if t.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {t.dtype}"
    return None


def supported(
    x_SK: torch.Tensor, dy_SN: torch.Tensor, E: int, long: bool, device: torch.device | None = None
) -> str | None:
    """None where the Gluon dW kernel can take these operands, else why not (for the dumps and counters).
    `device`: the operands' device where they are meta tensors standing for a call's."""
    if (why := _common_refusal(x_SK, device)) is not None:
        return why
    if dy_SN.dtype != x_SK.dtype:
        return f"dtype {x_SK.dtype}/{dy_SN.dtype}"
    BK = CONFIGS["long" if long else "short"][0]
    K, N = x_SK.shape[1], dy_SN.shape[1]
    if K % BK:
        return f"K={K} not a multiple of {BK} (a tile's store would reach the next expert)"
    for t in (x_SK, dy_SN):
        if not triton_backend._descriptor_ok(t):
            return f"strides {tuple(t.stride())} a TMA descriptor cannot address"
    if (N * x_SK.element_size()) % 16:
        return f"N={N}: rows of dw not 16-byte aligned"
    if E == 0 or x_SK.shape[0] == 0:
        return "no rows or no experts"
    return None


if _IMPORT_ERROR is None:

    @gluon.jit
    def _tile(t, K, N, BK: gl.constexpr, BN: gl.constexpr, GROUP_N):
        """Tile t -> (expert, first k, first n): `triton_backend._wgrad_tile`'s order (expert-major; within an
        expert, bands of GROUP_N n-tiles swept over all k-tiles)."""
        n_tiles_k = gl.cdiv(K, BK)
        n_tiles_n = gl.cdiv(N, BN)
        local = t % (n_tiles_k * n_tiles_n)
        in_band = GROUP_N * n_tiles_k
        band_first = (local // in_band) * GROUP_N
        band_size = gl.minimum(n_tiles_n - band_first, GROUP_N)
        r = local % in_band
        return t // (n_tiles_k * n_tiles_n), (r // band_size) * BK, (band_first + r % band_size) * BN

    @gluon.jit
    def _segment(offs_ptr, seg):
        lo = gl.load(offs_ptr + seg - 1, mask=seg > 0, other=0)
        return gl.where(seg > 0, lo, 0), gl.load(offs_ptr + seg)

    @gluon.jit
    def _loader(x_desc, dy_desc, offs_ptr, a_bufs, b_bufs, ready, empty, K, N, E, NSRC, GROUP_N,
                BK: gl.constexpr, BN: gl.constexpr, BS: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        total = E * gl.cdiv(K, BK) * gl.cdiv(N, BN)
        nbytes: gl.constexpr = BS * (BK + BN) * 2
        it = 0
        for t in range(pid, total, nprog):
            e, k0, n0 = _tile(t, K, N, BK, BN, GROUP_N)
            for src in range(NSRC):
                lo, hi = _segment(offs_ptr, src * E + e)
                for s0 in range(lo, hi, BS):
                    slot = it % STAGES
                    # a stage is free once the compute warps' MMA on it retired (the first round: at once)
                    mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
                    mbarrier.expect(ready.index(slot), nbytes)
                    _tma_load(x_desc, [s0, k0], ready.index(slot), a_bufs.index(slot))
                    _tma_load(dy_desc, [s0, n0], ready.index(slot), b_bufs.index(slot))
                    it += 1

    @gluon.jit
    def _ring_barriers(STAGES: gl.constexpr, READY_COUNT: gl.constexpr):
        """(ready, empty): a barrier pair for each of a ring's STAGES slots; a slot is ready after READY_COUNT
        arrivals (1: the expect-arrive of its TMA loads), empty after the consumer's one."""
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=READY_COUNT)
            mbarrier.init(empty.index(i), count=1)
        return ready, empty

    @gluon.jit
    def _give_back(empty, prev):
        """The stage before (prev, -1 for none) goes back to the loader: its MMA retired."""
        if prev >= 0:
            mbarrier.arrive(empty.index(prev), count=1)

    @gluon.jit
    def _drain(acc, empty, prev):
        """The tile's last MMA retired: its accumulator is final and its stage goes back to the loader."""
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        _give_back(empty, prev)
        return acc

    @gluon.jit
    def _mma_stage(acc, a_bufs, b_bufs, ready, empty, it, prev, STAGES: gl.constexpr, B_KMAJOR: gl.constexpr,
                   FENCE: gl.constexpr):  # fmt: skip
        """Stage `it` of the ring, [BM, BK] x [BK, BN] (B stored [BN, BK] where B_KMAJOR): wait until the loader
        filled it, multiply with one MMA in flight, and give the stage before (prev) back once the MMAs before
        this one retired. FENCE: the stage holds rows generic-proxy copies wrote (cp.async), which the wgmma
        (async proxy) may read only after a proxy fence. Returns (acc, this stage's slot)."""
        slot = it % STAGES
        mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
        if FENCE:
            fence_async_shared()
        if B_KMAJOR:
            acc = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot).permute((1, 0)), acc, is_async=True)
        else:
            acc = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        _give_back(empty, prev)
        return acc, slot

    @gluon.jit
    def _zero_rows_past(buf, valid, ROWS: gl.constexpr, COLS: gl.constexpr, CHUNK: gl.constexpr,
                        num_warps: gl.constexpr):  # fmt: skip
        """Zero rows >= valid of the CHUNK-row slice of a [ROWS, COLS] shared-memory tile that `valid` falls in
        (rows of the next segment, or of the receive room past the last one, that a TMA load read); the MMA
        skips the slices past it."""
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        r = gl.arange(0, CHUNK, layout=gl.SliceLayout(1, layout))
        for c in gl.static_range(ROWS // CHUNK):
            if (c * CHUNK < valid) and ((c + 1) * CHUNK > valid):
                part = buf.slice(c * CHUNK, CHUNK, dim=0)
                v = part.load(layout)
                part.store(gl.where((r + c * CHUNK < valid)[:, None], v, gl.zeros_like(v)))

    @gluon.jit
    def _compute(dw_desc, offs_ptr, a_bufs, b_bufs, c_smem, ready, empty, K, N, E, NSRC, GROUP_N, scale,
                 BK: gl.constexpr, BN: gl.constexpr, BS: gl.constexpr, STAGES: gl.constexpr,
                 num_warps: gl.constexpr):  # fmt: skip
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        total = E * gl.cdiv(K, BK) * gl.cdiv(N, BN)
        CHUNK: gl.constexpr = 16  # rows of one wgmma's reduction (bf16)
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN, 16]
        )
        it = 0
        for t in range(pid, total, nprog):
            e, k0, n0 = _tile(t, K, N, BK, BN, GROUP_N)
            acc = gl.zeros((BK, BN), dtype=gl.float32, layout=acc_layout)
            prev = -1
            for src in range(NSRC):
                lo, hi = _segment(offs_ptr, src * E + e)
                for s0 in range(lo, hi, BS):
                    slot = it % STAGES
                    mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
                    a = a_bufs.index(slot)  # [BS, BK] rows of x
                    b = b_bufs.index(slot)  # [BS, BN] rows of dy
                    if s0 + BS > hi:
                        # a segment's last, partial row block: MMAs over the CHUNK-row slices that hold its
                        # rows only (a whole block's MMA cost a two-source DeepSeek-like dW 15 %), with the
                        # rows past the end zeroed in the last one
                        _zero_rows_past(a, hi - s0, BS, BK, CHUNK, num_warps)
                        _zero_rows_past(b, hi - s0, BS, BN, CHUNK, num_warps)
                        fence_async_shared()
                        for c in gl.static_range(BS // CHUNK):
                            if c * CHUNK < hi - s0:
                                a_c = a.slice(c * CHUNK, CHUNK, dim=0).permute((1, 0))
                                acc = warpgroup_mma(a_c, b.slice(c * CHUNK, CHUNK, dim=0), acc, is_async=True)
                                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                    else:
                        acc = warpgroup_mma(a.permute((1, 0)), b, acc, is_async=True)
                        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                    # the MMAs before this block's (first) one have retired: the previous stage goes back to the
                    # loader
                    _give_back(empty, prev)
                    prev = slot
                    it += 1
            acc = _drain(acc, empty, prev)
            out = (acc * scale).to(dw_desc.dtype)
            tma.store_wait(pendings=0)  # the previous tile's store has read c_smem
            c_smem.store(out)
            fence_async_shared()
            _tma_store(dw_desc, [e * K + k0, n0], c_smem)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _wgrad_ws_kernel(x_desc, dy_desc, dw_desc, offs_ptr, K, N, E, NSRC, GROUP_N, scale,
                         STAGES: gl.constexpr, LOADER_REGS: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        BS: gl.constexpr = x_desc.block_type.shape[0]
        BK: gl.constexpr = x_desc.block_type.shape[1]
        BN: gl.constexpr = dy_desc.block_type.shape[1]
        dtype: gl.constexpr = x_desc.dtype
        a_bufs = gl.allocate_shared_memory(dtype, [STAGES, BS, BK], x_desc.layout)
        b_bufs = gl.allocate_shared_memory(dtype, [STAGES, BS, BN], dy_desc.layout)
        c_smem = gl.allocate_shared_memory(dtype, [BK, BN], dw_desc.layout)
        ready, empty = _ring_barriers(STAGES, 1)
        gl.warp_specialize(
            [
                (_compute, (dw_desc, offs_ptr, a_bufs, b_bufs, c_smem, ready, empty, K, N, E, NSRC, GROUP_N, scale,
                            BK, BN, BS, STAGES, num_warps)),
                (_loader, (x_desc, dy_desc, offs_ptr, a_bufs, b_bufs, ready, empty, K, N, E, NSRC, GROUP_N,
                           BK, BN, BS, STAGES)),
            ],
            [1],
            [LOADER_REGS],
        )  # fmt: skip


def launch(kernel: str, run) -> None:
    """Run a Gluon kernel's launch; an error of Triton's while compiling or fitting it (this Triton's Gluon may
    differ from the versions moecc was measured with) becomes moecc's, which names the kernel, the Triton
    version and the way back to the Triton kernels."""
    try:
        run()
    except Exception as e:
        if not type(e).__module__.startswith("triton"):
            raise
        from moecc.options import MoeccError  # (not at import: moecc imports the backends)

        raise MoeccError(
            f"moecc: the Gluon kernel {kernel} failed with Triton {triton.__version__} ({type(e).__name__}: "
            f"{str(e)[:400]}). Set MOECC_GLUON=0 to run the Triton kernels instead, and report the error."
        ) from e


@functools.cache
def _layouts(dtype: torch.dtype, BK: int, BN: int, BS: int):
    gdt = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return (
        gl.NVMMASharedLayout.get_default_for([BS, BK], gdt),
        gl.NVMMASharedLayout.get_default_for([BS, BN], gdt),
        gl.NVMMASharedLayout.get_default_for([BK, BN], gdt),
    )


def wgrad_segments(
    x_SK: torch.Tensor, dy_SN: torch.Tensor, offs: torch.Tensor, nsrc: int, E: int, scale: float, long: bool,
    banded: bool, programs: int,
) -> torch.Tensor:  # fmt: skip
    """dw [E, K, N] (see the module docstring); the caller checked `supported`. long: the tile for experts of
    many rows; banded: sweep one n-tile's band over all k-tiles (`triton_backend._wgrad_banded`), else all
    n-tiles k-tile by k-tile; programs: persistent programs (one an SM)."""
    BK, BN, BS, stages = CONFIGS["long" if long else "short"]
    group_n = 1 if banded else triton.cdiv(dy_SN.shape[1], BN)
    K, N = x_SK.shape[1], dy_SN.shape[1]
    dw_EKN = torch.empty(E, K, N, device=x_SK.device, dtype=x_SK.dtype)
    la, lb, lc = _layouts(x_SK.dtype, BK, BN, BS)
    x_desc = TensorDescriptor.from_tensor(x_SK, [BS, BK], la)
    dy_desc = TensorDescriptor.from_tensor(dy_SN, [BS, BN], lb)
    dw_desc = TensorDescriptor.from_tensor(dw_EKN.view(E * K, N), [BK, BN], lc)
    total = E * triton.cdiv(K, BK) * triton.cdiv(N, BN)
    launch("gluon_wgrad._wgrad_ws_kernel", lambda: _wgrad_ws_kernel[(min(programs, total),)](
        x_desc, dy_desc, dw_desc, offs, K, N, E, nsrc, group_n, float(scale),
        STAGES=stages, LOADER_REGS=LOADER_REGS, num_warps=NUM_WARPS,
    ))  # fmt: skip
    return dw_EKN
