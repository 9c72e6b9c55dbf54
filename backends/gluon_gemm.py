"""The fused expert-parallel GEMMs as warp-specialised Gluon kernels for Hopper (sm_90).

The scattering GEMM (`_scatter_ws_kernel`): result rows a[r] @ w[e(r)] of the (source, expert) segments go to
comb[slot of r] on their source rank, the contract of `triton_ep._gemm_scatter_kernel` (forward GEMM 2 with the
combine's send, and the dX of GEMM 1). As in `gluon_wgrad`: one loader warp walks the tile list and keeps a
ring of shared-memory stages full through TMA loads (a's rows and the expert's weight tile), across tile
boundaries, while the compute warps run the wgmma chain and scatter the finished tile's rows in 16-byte stores;
the Triton kernel's next tile started its loads only after the last tile's stores. A tile's rows past its
segment read the next segment's rows (or the receive room, which may hold anything): an output row depends on
its own input row only, and those rows are masked off in the scatter. When every program is done, the last one
signals every rank (release), as the Triton kernel does.

The gathering GEMM (`_dispatch_ws_kernel`): the contract of `triton_ep._dispatch_gemm_kernel` (forward GEMM 1
with the dispatch's send, and the gated dX of GEMM 2). Its A rows are gathered through the rowmap, which TMA
cannot do on Hopper, so its loader partition is four warps of cp.async copies (16 bytes a copy, rows past the
segment zero-filled) beside the weight tile's TMA load, each loader thread arriving on the stage's barrier when
its copies land. The loader also claims the tiles from the per-call counter, in order (local sources first),
hands each to the compute warps through a two-slot ring in shared memory, and waits for a peer source's signal
before gathering its rows; the senders (the first NSEND programs) push this rank's rows with all their warps
before they join. The rows kept for the weight gradient are written by the loader, from the stages it filled.

Hopper only, bf16/fp16, operands a TMA descriptor can address (`supported`, `dispatch_supported`); the caller
picks the kernel and counts it. Not run by the CPU interpreter; tests/test_gpu.py and tests/test_gpu_ep.py check
them on GPUs."""

from __future__ import annotations

import functools

import torch

from . import gluon_wgrad, triton_backend

if gluon_wgrad._IMPORT_ERROR is None:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .gluon_wgrad import _cta_barrier, _drain, _mma_stage, _ring_barriers, _segment, _tma_load

    # Triton 3.6's name for the cp.async copy; later versions renamed it
    _cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    _cp_async_arrive = async_copy.mbarrier_arrive

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


def supported(a_SK: torch.Tensor, w_EKN: torch.Tensor, bm: int, device: torch.device | None = None) -> str | None:
    """None where the Gluon scattering GEMM can take these operands, else why not (`device`: theirs, where
    they are meta tensors standing for a call's)."""
    if (why := gluon_wgrad._common_refusal(a_SK, device)) is not None:
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
                acc, prev = _mma_stage(acc, a_bufs, b_bufs, ready, empty, it, prev, STAGES, W_KMAJOR, False)
                it += 1
            acc = _drain(acc, empty, prev)
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
        ready, empty = _ring_barriers(STAGES, 1)
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
        # every rank
        _signal_all(done_ptr, sig_tab, epoch_ptr, SLOT, me, EP, gl.num_programs(0))

    # ------------------------------------------------------------------------------------------------------
    # the gathering (dispatch) GEMM

    @gluon.jit
    def _wait_signal(sig_ptr, target):
        while gl.atomic_add(sig_ptr, 0, sem="acquire", scope="sys") < target:
            pass

    @gluon.jit
    def _push_rows(src_ptr, pos_ptr, recv_tab, dest_ptr, q_ptr, slot_ptr, gsrc_ptr, gates_tab, me, T, H, TK,
                   EP: gl.constexpr, NSEND, HAS_GATES: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        """`triton_ep._push_rows` (the send programs' part): token t's row to every other rank d with
        pos[d, t] >= 0, into d's recv[me, pos]; with HAS_GATES the gates of the slots to their destinations."""
        pid = gl.program_id(0)
        BT: gl.constexpr = 32
        BH: gl.constexpr = 256
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0])
        n_tb = gl.cdiv(T, BT)
        for w in range(n_tb + pid, EP * n_tb, NSEND):  # w // n_tb == 0 is this rank
            d = (me + w // n_tb) % EP
            ts = (w % n_tb) * BT + gl.arange(0, BT, layout=gl.SliceLayout(1, layout))
            pos = gl.load(pos_ptr + d * T + ts, mask=ts < T, other=-1)
            ok = pos >= 0
            dst = gl.multiple_of(gl.load(recv_tab + d).to(gl.pointer_type(src_ptr.dtype.element_ty)), 16)
            rows = (me * T + pos).to(gl.int64)
            for h0 in range(0, H, BH):
                hs = h0 + gl.arange(0, BH, layout=gl.SliceLayout(0, layout))
                m = ok[:, None] & (hs < H)[None, :]
                v = gl.load(src_ptr + ts[:, None].to(gl.int64) * H + hs[None, :], mask=m)
                gl.store(dst + rows[:, None] * H + hs[None, :], v, mask=m)
        if HAS_GATES:
            one: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
            for j0 in range(pid * 256, TK, NSEND * 256):
                js = j0 + gl.arange(0, 256, layout=one)
                d = gl.load(dest_ptr + js, mask=js < TK, other=-1)
                ok = (d >= 0) & (d != me)
                q = gl.load(q_ptr + js, mask=ok, other=0)
                sl = gl.load(slot_ptr + js, mask=ok, other=0)
                g = gl.load(gsrc_ptr + sl, mask=ok, other=0.0).to(gl.float32)
                base = gl.load(gates_tab + gl.maximum(d, 0), mask=ok, other=0).to(gl.pointer_type(gl.float32))
                gl.store(base + me * TK + q, g, mask=ok)

    @gluon.jit
    def _signal_all(done_ptr, sig_tab, epoch_ptr, slot, me, EP: gl.constexpr, NP):
        """`triton_ep._arrive_and_signal`, after a barrier of the program: count it as done with `slot`; the
        last of NP resets the count and signals every rank (release at system scope)."""
        _cta_barrier()
        target = gl.load(epoch_ptr + slot) + 1
        old = gl.atomic_add(done_ptr + slot, 1, sem="acq_rel", scope="sys")
        if old == NP - 1:
            gl.atomic_xchg(done_ptr + slot, 0, sem="relaxed", scope="gpu")
            for d in gl.static_range(EP):
                peer = gl.load(sig_tab + d).to(gl.pointer_type(gl.int64))
                gl.atomic_xchg(peer + slot * EP + me, target, sem="release", scope="sys")

    @gluon.jit
    def _put_tile(tiles, tile_ready, tile_empty, j, t, num_warps: gl.constexpr):
        """Hand tile id t (the j-th this program claimed) to the compute warps through a 2-slot ring."""
        one: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        ts = j % 2
        mbarrier.wait(tile_empty.index(ts), ((j // 2) & 1) ^ 1)
        tiles.index(ts).store(gl.full([1], t, gl.int32, layout=one))
        mbarrier.arrive(tile_ready.index(ts), count=1)

    @gluon.jit
    def _take_tile(tiles, tile_ready, tile_empty, j, num_warps: gl.constexpr):
        one: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        ts = j % 2
        mbarrier.wait(tile_ready.index(ts), (j // 2) & 1)
        t = gl.max(tiles.index(ts).load(one), axis=0)
        mbarrier.arrive(tile_empty.index(ts), count=1)
        return t

    @gluon.jit
    def _row_gates(rowmap_ptr, gsrc_ptr, gates_ptr, mi, ok, local):
        """The gates of a tile's rows (rowmap positions mi) in float32: a local slot's from the gates themselves
        (by its slot id), a peer's as it sent them (read after its signal)."""
        if local:
            sl = gl.load(rowmap_ptr + mi * 2 + 1, mask=ok, other=0)
            g = gl.load(gsrc_ptr + sl, mask=ok, other=0.0).to(gl.float32)
        else:
            g = gl.load(gates_ptr + mi, mask=ok, other=0.0)
        return g

    @gluon.jit
    def _tile_source(seg_src_ptr, seg_q0_ptr, seg):
        return gl.load(seg_src_ptr + seg), gl.load(seg_q0_ptr + seg)

    @gluon.jit
    def _gather_loader(src_ptr, recv_ptr, rowmap_ptr, gsrc_ptr, gates_ptr, save_ptr, w_desc, cum_ptr, mtseg_ptr,
                       offs_ptr, seg_src_ptr, seg_exp_ptr, seg_q0_ptr, sig_ptr, epoch_ptr, claim_ptr, tiles,
                       tile_ready, tile_empty, a_bufs, b_bufs, ready, empty, me, TK, H, N, NSEG, SLOT,
                       EP: gl.constexpr, GROUP_M: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                       BK: gl.constexpr, STAGES: gl.constexpr, W_KMAJOR: gl.constexpr, HAS_GATES: gl.constexpr,
                       SAVE_A: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        """Claims tiles in order (local sources first) from the per-call counter, hands each to the compute
        warps, waits for a peer source's signal, and fills the ring: the tile's A rows gathered through the
        rowmap by cp.async (rows past the segment zero-filled), the expert's weight tile by TMA. With SAVE_A,
        an m-tile's first n-tile also writes its gathered (and scaled) rows out for the weight gradient: each
        thread reads back the pieces it copied once they landed, LAG stages behind its copies. (Written by the
        compute warps instead, they measured the same: the HBM writes are what costs, 10-17 % of the kernel on
        the fine-grained shapes; results/dispatch_sweep_2026-11-30_1gpu_*.json.)"""
        n_tiles_n = gl.cdiv(N, BN)
        total = gl.load(cum_ptr + NSEG - 2) * n_tiles_n  # not the tail segment: no rows there
        target = gl.load(epoch_ptr + SLOT) + 1
        # the saved stage trails the copies by LAG stages (the stage LAG back is rewritten STAGES - LAG later)
        LAG: gl.constexpr = STAGES - 2
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // BK, BK // 8], [num_warps, 1], [1, 0])
        r = gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
        c = gl.arange(0, BK, layout=gl.SliceLayout(0, layout))
        it = 0
        j = 0
        t = gl.atomic_add(claim_ptr + SLOT, 1)
        _put_tile(tiles, tile_ready, tile_empty, j, t, num_warps)
        while t < total:
            seg, lo, row0, nt, e = _tile(cum_ptr, mtseg_ptr, offs_ptr, seg_exp_ptr, t, n_tiles_n, GROUP_M, BM)
            _, hi = _segment(offs_ptr, seg)
            s, q0 = _tile_source(seg_src_ptr, seg_q0_ptr, seg)
            # this rank's own rows are read in place (their rowmap rows are token rows of src): no wait
            if s != me:
                _wait_signal(sig_ptr + SLOT * EP + s, target)
            rows = row0 + r
            row_ok = rows < hi
            mi = (s * TK + q0 + (rows - lo)).to(gl.int64)
            rr = gl.load(rowmap_ptr + mi * 2, mask=row_ok, other=0).to(gl.int64)
            if s == me:
                a_rows = src_ptr + rr * H
            else:
                a_rows = recv_ptr + rr * H
            if HAS_GATES:
                g = _row_gates(rowmap_ptr, gsrc_ptr, gates_ptr, mi, row_ok, s == me)
            else:
                g = gl.zeros([BM], gl.float32, layout=gl.SliceLayout(1, layout))
            for k0 in range(0, H, BK):
                slot = it % STAGES
                mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(slot), BK * BN * 2)
                if W_KMAJOR:
                    _tma_load(w_desc, [e * N + nt * BN, k0], ready.index(slot), b_bufs.index(slot))
                else:
                    _tma_load(w_desc, [e * H + k0, nt * BN], ready.index(slot), b_bufs.index(slot))
                _cp_async(a_bufs.index(slot), a_rows[:, None] + (k0 + c)[None, :], row_ok[:, None])
                _cp_async_arrive(ready.index(slot), increment_count=False)  # each thread, its copies landed
                if SAVE_A:
                    if nt == 0:
                        async_copy.commit_group()
                        if k0 >= LAG * BK:
                            async_copy.wait_group(LAG)  # this thread's copies of the stage LAG back landed
                            _save_rows(a_bufs.index((it - LAG) % STAGES), save_ptr, rows, c + (k0 - LAG * BK),
                                       row_ok[:, None], g, H, layout, HAS_GATES)  # fmt: skip
                it += 1
            if SAVE_A:
                if nt == 0:
                    async_copy.wait_group(0)
                    for d in gl.static_range(LAG):  # the last LAG stages (those there are)
                        if H >= (LAG - d) * BK:
                            _save_rows(a_bufs.index((it - LAG + d) % STAGES), save_ptr, rows, c + (H - (LAG - d) * BK),
                                       row_ok[:, None], g, H, layout, HAS_GATES)  # fmt: skip
            j += 1
            t = gl.atomic_add(claim_ptr + SLOT, 1)
            _put_tile(tiles, tile_ready, tile_empty, j, t, num_warps)

    @gluon.jit
    def _gather_compute(y_ptr, rowmap_ptr, gsrc_ptr, gates_ptr, cum_ptr, mtseg_ptr, offs_ptr,
                        seg_src_ptr, seg_exp_ptr, seg_q0_ptr, sig_ptr, epoch_ptr, tiles, tile_ready, tile_empty,
                        a_bufs, b_bufs, ready, empty, me, TK, H, N, NSEG, SLOT,
                        EP: gl.constexpr, GROUP_M: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                        BK: gl.constexpr, STAGES: gl.constexpr, W_KMAJOR: gl.constexpr, HAS_GATES: gl.constexpr,
                        num_warps: gl.constexpr):  # fmt: skip
        """The wgmma chain over the ring, a tile at a time as the loader hands them over; the result rows (scaled by
        their gates in float32 where HAS_GATES) leave in 16-byte stores."""
        n_tiles_n = gl.cdiv(N, BN)
        total = gl.load(cum_ptr + NSEG - 2) * n_tiles_n
        target = gl.load(epoch_ptr + SLOT) + 1
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN, 16]
        )
        out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0])
        it = 0
        j = 0
        t = _take_tile(tiles, tile_ready, tile_empty, j, num_warps)
        while t < total:
            seg, lo, row0, nt, _ = _tile(cum_ptr, mtseg_ptr, offs_ptr, seg_exp_ptr, t, n_tiles_n, GROUP_M, BM)
            _, hi = _segment(offs_ptr, seg)
            s, q0 = _tile_source(seg_src_ptr, seg_q0_ptr, seg)
            if HAS_GATES:  # (a peer's after its signal, which the loader waited for too)
                rows_g = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, acc_layout))
                ok_g = rows_g < hi
                if s != me:
                    _wait_signal(sig_ptr + SLOT * EP + s, target)
                mi_g = (s * TK + q0 + (rows_g - lo)).to(gl.int64)
                g = _row_gates(rowmap_ptr, gsrc_ptr, gates_ptr, mi_g, ok_g, s == me)
            acc = gl.zeros((BM, BN), dtype=gl.float32, layout=acc_layout)
            prev = -1
            for _k0 in range(0, H, BK):  # (the rows came by cp.async: fenced before the wgmma reads them)
                acc, prev = _mma_stage(acc, a_bufs, b_bufs, ready, empty, it, prev, STAGES, W_KMAJOR, True)
                it += 1
            acc = _drain(acc, empty, prev)
            if HAS_GATES:  # (g a) w = g (a w), in float32
                acc = acc * g[:, None]
            out = gl.convert_layout(acc.to(y_ptr.dtype.element_ty), out_layout)
            rows = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, out_layout))
            cols = nt * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, out_layout))
            gl.store(y_ptr + rows.to(gl.int64)[:, None] * N + cols[None, :], out,
                     mask=(rows < hi)[:, None] & (cols < N)[None, :])  # fmt: skip
            j += 1
            t = _take_tile(tiles, tile_ready, tile_empty, j, num_warps)

    @gluon.jit
    def _save_rows(a_smem, save_ptr, rows, cols, ok, g, H, layout: gl.constexpr, HAS_GATES: gl.constexpr):
        a = a_smem.load(layout)
        if HAS_GATES:
            a = (a.to(gl.float32) * g[:, None]).to(a.dtype)
        gl.store(save_ptr + rows.to(gl.int64)[:, None] * H + cols[None, :], a, mask=ok)

    @gluon.jit
    def _dispatch_ws_kernel(
        src_ptr, pos_ptr, recv_tab, dest_ptr, q_ptr, slot_ptr, gsrc_ptr, gates_tab, sig_tab, done_ptr,
        recv_ptr, rowmap_ptr, gates_ptr, w_desc, y_ptr, save_ptr,
        offs_ptr, cum_ptr, mtseg_ptr, seg_src_ptr, seg_exp_ptr, seg_q0_ptr, sig_ptr, epoch_ptr, claim_ptr,
        me, T, H, TK, N, NSEG, SLOT,
        EP: gl.constexpr, NSEND, HAS_GATES: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr,
        GROUP_M: gl.constexpr, STAGES: gl.constexpr, SAVE_A: gl.constexpr, W_KMAJOR: gl.constexpr,
        ROLE: gl.constexpr, LOADER_WARPS: gl.constexpr, LOADER_REGS: gl.constexpr, num_warps: gl.constexpr,
    ):  # fmt: skip
        # The first NSEND programs push this rank's rows with all their warps first (ROLE & 1), then every
        # program takes GEMM tiles from the claim counter (ROLE & 2; the senders join once their rows are out),
        # as `triton_ep._dispatch_gemm_kernel` does; a simulated world launches the two roles one by one
        BN: gl.constexpr = w_desc.block_type.shape[0] if W_KMAJOR else w_desc.block_type.shape[1]
        if ROLE & 1:
            if gl.program_id(0) < NSEND:
                _push_rows(src_ptr, pos_ptr, recv_tab, dest_ptr, q_ptr, slot_ptr, gsrc_ptr, gates_tab, me, T, H, TK,
                           EP, NSEND, HAS_GATES, num_warps)  # fmt: skip
                _signal_all(done_ptr, sig_tab, epoch_ptr, SLOT, me, EP, NSEND)
        if ROLE & 2:
            _dispatch_gemm_part(src_ptr, recv_ptr, rowmap_ptr, gsrc_ptr, gates_ptr, w_desc, y_ptr, save_ptr, offs_ptr,
                                cum_ptr, mtseg_ptr, seg_src_ptr, seg_exp_ptr, seg_q0_ptr, sig_ptr, epoch_ptr, claim_ptr,
                                me, TK, H, N, NSEG, SLOT, EP, HAS_GATES, BM, BN, BK, GROUP_M, STAGES, SAVE_A, W_KMAJOR,
                                LOADER_WARPS, LOADER_REGS, num_warps)  # fmt: skip

    @gluon.jit
    def _dispatch_gemm_part(src_ptr, recv_ptr, rowmap_ptr, gsrc_ptr, gates_ptr, w_desc, y_ptr, save_ptr, offs_ptr,
                            cum_ptr, mtseg_ptr, seg_src_ptr, seg_exp_ptr, seg_q0_ptr, sig_ptr, epoch_ptr, claim_ptr,
                            me, TK, H, N, NSEG, SLOT, EP: gl.constexpr, HAS_GATES: gl.constexpr, BM: gl.constexpr,
                            BN: gl.constexpr, BK: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                            SAVE_A: gl.constexpr, W_KMAJOR: gl.constexpr, LOADER_WARPS: gl.constexpr,
                            LOADER_REGS: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        dtype: gl.constexpr = w_desc.dtype
        a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BK], dtype)
        a_bufs = gl.allocate_shared_memory(dtype, [STAGES, BM, BK], a_layout)
        b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        # a stage is ready after the weight tile's expect-arrive and every loader thread's cp.async arrive
        ready, empty = _ring_barriers(STAGES, 1 + LOADER_WARPS * 32)
        tiles = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        tile_ready, tile_empty = _ring_barriers(2, 1)  # the tile ids' ring
        gl.warp_specialize(
            [
                (_gather_compute, (y_ptr, rowmap_ptr, gsrc_ptr, gates_ptr, cum_ptr, mtseg_ptr, offs_ptr,
                                   seg_src_ptr, seg_exp_ptr, seg_q0_ptr, sig_ptr, epoch_ptr, tiles, tile_ready,
                                   tile_empty, a_bufs, b_bufs, ready, empty, me, TK, H, N, NSEG, SLOT, EP, GROUP_M,
                                   BM, BN, BK, STAGES, W_KMAJOR, HAS_GATES, num_warps)),
                (_gather_loader, (src_ptr, recv_ptr, rowmap_ptr, gsrc_ptr, gates_ptr, save_ptr, w_desc, cum_ptr,
                                  mtseg_ptr, offs_ptr, seg_src_ptr, seg_exp_ptr, seg_q0_ptr, sig_ptr, epoch_ptr,
                                  claim_ptr, tiles, tile_ready, tile_empty, a_bufs, b_bufs, ready, empty, me, TK, H, N,
                                  NSEG, SLOT, EP, GROUP_M, BM, BN, BK, STAGES, W_KMAJOR, HAS_GATES, SAVE_A,
                                  LOADER_WARPS)),
            ],
            [LOADER_WARPS],
            [LOADER_REGS],
        )  # fmt: skip


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


# The gathering GEMM: (BM, BN, BK, stages), BM the plan's m-tile as in CONFIG. Its loader partition:
# DISPATCH_LOADER_WARPS warps gather a stage's BM x BK rows by cp.async (8 16-byte copies a thread with 4
# warps), with DISPATCH_LOADER_REGS registers a thread (the compute warps get the rest).
DISPATCH_CONFIG = (128, 256, 64, 4)
DISPATCH_LOADER_WARPS = 4
DISPATCH_LOADER_REGS = 96


def dispatch_supported(
    src_TH: torch.Tensor, w_EKN: torch.Tensor, bm: int, device: torch.device | None = None
) -> str | None:
    """None where the Gluon gathering GEMM can take these operands, else why not (`device` as in
    `supported`)."""
    if (why := gluon_wgrad._common_refusal(src_TH, device)) is not None:
        return why
    BM, _, BK, _ = DISPATCH_CONFIG
    if bm != BM:
        return f"the plan's m-tiles are {bm} rows, this kernel's {BM}"
    if w_EKN.dtype != src_TH.dtype:
        return f"dtype {src_TH.dtype}/{w_EKN.dtype}"
    if src_TH.shape[1] % BK:
        return f"K={src_TH.shape[1]} not a multiple of {BK} (the gathered rows go in {BK}-column pieces)"
    if triton_backend.weight_2d(w_EKN) is None:
        return f"weight strides {tuple(w_EKN.stride())} a TMA descriptor cannot address"
    return None


def dispatch_gemm(
    role: int, send: tuple[torch.Tensor, ...], gemm: tuple[torch.Tensor, ...], w_EKN: torch.Tensor,
    plan_tables: tuple[torch.Tensor, ...], me: int, T: int, TK: int, nseg: int, slot: int, ep: int, nsend: int,
    has_gates: bool, save_a: bool, group_m: int, programs: int,
) -> None:  # fmt: skip
    """Launch the gathering GEMM (`triton_ep._dispatch_gemm`'s contract); the caller checked
    `dispatch_supported`, zeroed the claim counter and ticks the slot. send: (src, pos, recv_tab, dest, q,
    slot ids, gate source, gates_tab, sig_tab, done); gemm: (recv, rowmap, gates, y, save, sig, epoch, claim);
    plan_tables: (offs, cum, mt_seg, seg_src, seg_exp, seg_q0); role: `triton_ep.ROLE_*`."""
    BM, BN, BK, stages = DISPATCH_CONFIG
    w2, k_major = triton_backend.weight_2d(w_EKN)  # type: ignore[misc]
    _, lw = _layouts(w_EKN.dtype, BM, BN, BK, k_major)
    w_desc = TensorDescriptor.from_tensor(w2, [BN, BK] if k_major else [BK, BN], lw)
    src, pos, recv_tab, dest, q, slot_ids, gsrc, gates_tab, sig_tab, done = send
    recv, rowmap, gates, y, save, sig, epoch, claim = gemm
    offs, cum, mt_seg, seg_src, seg_exp, seg_q0 = plan_tables
    gluon_wgrad.launch("gluon_gemm._dispatch_ws_kernel", lambda: _dispatch_ws_kernel[(programs,)](
        src, pos, recv_tab, dest, q, slot_ids, gsrc, gates_tab, sig_tab, done,
        recv, rowmap, gates, w_desc, y, save,
        offs, cum, mt_seg, seg_src, seg_exp, seg_q0, sig, epoch, claim,
        me, T, src.shape[1], TK, w_EKN.shape[2], nseg, slot,
        EP=ep, NSEND=nsend, HAS_GATES=has_gates, BM=BM, BK=BK, GROUP_M=group_m, STAGES=stages, SAVE_A=save_a,
        W_KMAJOR=k_major, ROLE=role, LOADER_WARPS=DISPATCH_LOADER_WARPS, LOADER_REGS=DISPATCH_LOADER_REGS,
        num_warps=NUM_WARPS,
    ))  # fmt: skip
