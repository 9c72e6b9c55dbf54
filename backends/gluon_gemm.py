"""The fused expert-parallel scattering GEMM as a warp-specialised Gluon kernel for Hopper (sm_90): result rows
a[r] @ w[e(r)] of the (source, expert) segments go to comb[slot of r] on their source rank, the contract of
`triton_ep._gemm_scatter_kernel` (forward GEMM 2 with the combine's send, and the dX of GEMM 1).

As in `gluon_wgrad`: one loader warp walks the tile list and keeps a ring of shared-memory stages full through
TMA loads (a's rows and the expert's weight tile), across tile boundaries, while the compute warps run the
wgmma chain and scatter the finished tile's rows in 16-byte stores; the Triton kernel's next tile started its
loads only after the last tile's stores. A tile's rows past its segment read the next segment's rows (or the
receive room, which may hold anything): an output row depends on its own input row only, and those rows are
masked off in the scatter. When every program is done, the last one signals every rank (release), as the
Triton kernel does.

Hopper only, bf16/fp16, operands a TMA descriptor can address (`supported`); the caller picks the kernel and
counts it. Not run by the CPU interpreter; tests/test_gpu.py and tests/test_gpu_ep.py check it on GPUs."""

from __future__ import annotations

import functools

import torch

from . import gluon_wgrad, triton_backend

if gluon_wgrad._IMPORT_ERROR is None:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .gluon_wgrad import _cta_barrier, _segment, _tma_load

# (BM, BN, BK, stages): BM is the fused plan's m-tile (`triton_ep._gemm_config`). Shared memory: stages *
# (BM + BN) * BK * 2 bytes, and BM * BN * 2 for the accumulator's way to the 16-byte store layout (208 KB).
CONFIG = (128, 256, 64, 3)
NUM_WARPS = 8
# Taken up to this reduction length. Against the Triton kernel, profiler device time on 1 x H200
# (results/fused_ops_2026-11-30_1gpu_gluon{1,0}.json): K 768 0.72 against 0.79 ms (Qwen3-like GEMM 2), K 1 536
# 1.26 against 1.29 (its dX of GEMM 1), K 2 048 3.90 against 3.91 (DeepSeek-like GEMM 2); from K 4 096 on as
# fast or slower (DeepSeek dX of GEMM 1 6.79 against 6.74, Mixtral-like GEMM 2 2.45 against 2.45 and its dX
# 5.32 against 5.11): where the main loop is long, overlapping the epilogue does not pay for the accumulator's
# trip through shared memory to the 16-byte store layout.
MAX_K = 2048


def supported(a_SK: torch.Tensor, w_EKN: torch.Tensor, bm: int) -> str | None:
    """None where the Gluon scattering GEMM can take these operands, else why not."""
    if (why := gluon_wgrad._common_refusal(a_SK)) is not None:
        return why
    if a_SK.shape[1] > MAX_K:
        return f"K={a_SK.shape[1]} above {MAX_K}, where the Triton kernel is as fast"
    if bm != CONFIG[0]:
        return f"the plan's m-tiles are {bm} rows, this kernel's {CONFIG[0]}"
    if w_EKN.dtype != a_SK.dtype:
        return f"dtype {a_SK.dtype}/{w_EKN.dtype}"
    if not triton_backend._descriptor_ok(a_SK):
        return f"a's strides {tuple(a_SK.stride())} a TMA descriptor cannot address"
    if triton_backend.weight_2d(w_EKN) is None:
        return f"weight strides {tuple(w_EKN.stride())} a TMA descriptor cannot address"
    return None


if gluon_wgrad._IMPORT_ERROR is None:

    @gluon.jit
    def _tile(cum_ptr, mtseg_ptr, offs_ptr, seg_exp_ptr, t, n_tiles_n, GROUP_M: gl.constexpr, BM: gl.constexpr):
        """Tile t -> (segment, its first row, the tile's first row, n-tile, expert): `triton_backend._grouped_tile`'s
        order (a segment's tiles contiguous; within it GROUP_M m-tiles sweep the n-tiles together)."""
        seg = gl.load(mtseg_ptr + t // n_tiles_n)
        first_mt, end_mt = _segment(cum_ptr, seg)
        local = t - first_mt * n_tiles_n
        in_group = GROUP_M * n_tiles_n
        group_first = (local // in_group) * GROUP_M
        group_size = gl.minimum(end_mt - first_mt - group_first, GROUP_M)
        mt = group_first + (local % in_group) % group_size
        lo, _ = _segment(offs_ptr, seg)
        return seg, lo, lo + mt * BM, (local % in_group) // group_size, gl.load(seg_exp_ptr + seg)

    @gluon.jit
    def _loader(a_desc, w_desc, cum_ptr, mtseg_ptr, offs_ptr, seg_exp_ptr, a_bufs, b_bufs, ready, empty,
                Kd, N, NSEG, GROUP_M: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                STAGES: gl.constexpr, W_KMAJOR: gl.constexpr):  # fmt: skip
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        n_tiles_n = gl.cdiv(N, BN)
        total = gl.load(cum_ptr + NSEG - 2) * n_tiles_n  # not the tail segment: no rows there
        nbytes: gl.constexpr = (BM * BK + BK * BN) * 2
        it = 0
        for t in range(pid, total, nprog):
            _, _, row0, nt, e = _tile(cum_ptr, mtseg_ptr, offs_ptr, seg_exp_ptr, t, n_tiles_n, GROUP_M, BM)
            for k0 in range(0, Kd, BK):
                slot = it % STAGES
                mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(slot), nbytes)
                _tma_load(a_desc, [row0, k0], ready.index(slot), a_bufs.index(slot))
                if W_KMAJOR:
                    _tma_load(w_desc, [e * N + nt * BN, k0], ready.index(slot), b_bufs.index(slot))
                else:
                    _tma_load(w_desc, [e * Kd + k0, nt * BN], ready.index(slot), b_bufs.index(slot))
                it += 1

    @gluon.jit
    def _compute(out_dtype: gl.constexpr, rowmap_ptr, comb_tab, cum_ptr, mtseg_ptr, offs_ptr, seg_src_ptr,
                 seg_exp_ptr, seg_q0_ptr, a_bufs, b_bufs, ready, empty, TK, Kd, N, NSEG,
                 GROUP_M: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                 STAGES: gl.constexpr, W_KMAJOR: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        n_tiles_n = gl.cdiv(N, BN)
        total = gl.load(cum_ptr + NSEG - 2) * n_tiles_n
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN, 16]
        )
        # the result tile leaves in 16-byte row pieces: 8 elements a thread, 32 threads across 256 columns
        out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0])
        it = 0
        for t in range(pid, total, nprog):
            seg, lo, row0, nt, _ = _tile(cum_ptr, mtseg_ptr, offs_ptr, seg_exp_ptr, t, n_tiles_n, GROUP_M, BM)
            acc = gl.zeros((BM, BN), dtype=gl.float32, layout=acc_layout)
            prev = -1
            for _k0 in range(0, Kd, BK):
                slot = it % STAGES
                mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
                if W_KMAJOR:
                    acc = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot).permute((1, 0)), acc, is_async=True)
                else:
                    acc = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                if prev >= 0:
                    mbarrier.arrive(empty.index(prev), count=1)
                prev = slot
                it += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            if prev >= 0:
                mbarrier.arrive(empty.index(prev), count=1)
            out = gl.convert_layout(acc.to(out_dtype), out_layout)
            _, hi = _segment(offs_ptr, seg)
            rows = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, out_layout))
            cols = nt * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, out_layout))
            row_ok = rows < hi
            s = gl.load(seg_src_ptr + seg)
            q = gl.load(seg_q0_ptr + seg) + (rows - lo)
            slot_r = gl.load(rowmap_ptr + (s * TK + q).to(gl.int64) * 2 + 1, mask=row_ok, other=0).to(gl.int64)
            dst = gl.multiple_of(gl.load(comb_tab + s).to(gl.pointer_type(out_dtype)), 16)
            ptrs = dst + slot_r[:, None] * N + cols[None, :]
            gl.store(ptrs, out, mask=row_ok[:, None] & (cols < N)[None, :])

    @gluon.jit
    def _scatter_ws_kernel(a_desc, w_desc, rowmap_ptr, comb_tab, sig_tab, done_ptr, epoch_ptr,
                           cum_ptr, mtseg_ptr, offs_ptr, seg_src_ptr, seg_exp_ptr, seg_q0_ptr,
                           me, TK, Kd, N, NSEG, SLOT,
                           EP: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                           W_KMAJOR: gl.constexpr, LOADER_REGS: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = w_desc.block_type.shape[0] if W_KMAJOR else w_desc.block_type.shape[1]
        dtype: gl.constexpr = a_desc.dtype
        a_bufs = gl.allocate_shared_memory(dtype, [STAGES, BM, BK], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        gl.warp_specialize(
            [
                (_compute, (dtype, rowmap_ptr, comb_tab, cum_ptr, mtseg_ptr, offs_ptr, seg_src_ptr, seg_exp_ptr,
                            seg_q0_ptr, a_bufs, b_bufs, ready, empty, TK, Kd, N, NSEG, GROUP_M, BM, BN, BK, STAGES,
                            W_KMAJOR, num_warps)),
                (_loader, (a_desc, w_desc, cum_ptr, mtseg_ptr, offs_ptr, seg_exp_ptr, a_bufs, b_bufs, ready, empty,
                           Kd, N, NSEG, GROUP_M, BM, BN, BK, STAGES, W_KMAJOR)),
            ],
            [1],
            [LOADER_REGS],
        )  # fmt: skip
        # every warp's stores are issued (the partitions joined); count this program, and the last one signals
        # every rank (release at system scope, after a barrier of the whole program)
        _cta_barrier()
        target = gl.load(epoch_ptr + SLOT) + 1
        old = gl.atomic_add(done_ptr + SLOT, 1, sem="acq_rel", scope="sys")
        if old == gl.num_programs(0) - 1:
            gl.atomic_xchg(done_ptr + SLOT, 0, sem="relaxed", scope="gpu")
            for d in gl.static_range(EP):
                peer = gl.load(sig_tab + d).to(gl.pointer_type(gl.int64))
                gl.atomic_xchg(peer + SLOT * EP + me, target, sem="release", scope="sys")


@functools.cache
def _layouts(dtype: torch.dtype, BM: int, BN: int, BK: int, k_major: bool):
    gdt = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    w_block = [BN, BK] if k_major else [BK, BN]
    return gl.NVMMASharedLayout.get_default_for([BM, BK], gdt), gl.NVMMASharedLayout.get_default_for(w_block, gdt)


def gemm_scatter(
    a_SK: torch.Tensor, w_EKN: torch.Tensor, rowmap: torch.Tensor, comb_tab: torch.Tensor, sig_tab: torch.Tensor,
    done: torch.Tensor, epoch: torch.Tensor, plan_tables: tuple[torch.Tensor, ...], me: int, TK: int, nseg: int,
    slot: int, ep: int, group_m: int, programs: int,
) -> None:  # fmt: skip
    """Launch the scattering GEMM (see the module docstring); the caller checked `supported`. plan_tables:
    (offs, cum, mt_seg, seg_src, seg_exp, seg_q0) of the fused plan; programs: the persistent programs, which
    the signal counts (`done`)."""
    BM, BN, BK, stages = CONFIG
    w2, k_major = triton_backend.weight_2d(w_EKN)  # type: ignore[misc]
    la, lw = _layouts(a_SK.dtype, BM, BN, BK, k_major)
    a_desc = TensorDescriptor.from_tensor(a_SK, [BM, BK], la)
    w_desc = TensorDescriptor.from_tensor(w2, [BN, BK] if k_major else [BK, BN], lw)
    offs, cum, mt_seg, seg_src, seg_exp, seg_q0 = plan_tables
    gluon_wgrad.launch("gluon_gemm._scatter_ws_kernel", lambda: _scatter_ws_kernel[(programs,)](
        a_desc, w_desc, rowmap, comb_tab, sig_tab, done, epoch,
        cum, mt_seg, offs, seg_src, seg_exp, seg_q0,
        me, TK, a_SK.shape[1], w_EKN.shape[2], nseg, slot,
        EP=ep, GROUP_M=group_m, STAGES=stages, W_KMAJOR=k_major, LOADER_REGS=gluon_wgrad.LOADER_REGS,
        num_warps=NUM_WARPS,
    ))  # fmt: skip
