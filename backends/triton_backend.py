"""The `triton` backend: grouped GEMMs for the expert FFN in stock Triton (bf16/fp32 in, fp32 accumulation).

Rows are grouped by expert (`offs_E`: int32 end offset of each expert's rows, as `route_permute` makes
them). Tiles are aligned to expert segments and scheduled persistently: a fixed grid of programs walks the
tile list, which is derived on the device from `offs_E` (no host synchronisation), so an expert that
receives no rows has no tiles and costs nothing.

- `grouped_mm(x_SK, w_EKN, offs_E)`: y[rows of e] = x[rows of e] @ w[e] (forward, and dX with w transposed);
- `grouped_mm_wgrad(x_SK, dy_SN, offs_E, scale=1.0)`: dw[e] = scale * x[rows of e]^T @ dy[rows of e] (dW;
  `scale` is sync_grads' 1/W, applied before the store). x and dy are read through tensor descriptors (TMA
  loads on Hopper) where their strides allow, else through pointers; which kernel ran is counted
  (`grouped_mm_wgrad.descriptor` / `.pointer`);
- `glu(h, kind)` / `glu_backward(da, h, kind)`: the GLU activation between the expert GEMMs, one pass over h;
  `glu_rows` / `glu_rows_backward` compute only the rows before a count held on the device (the GLU between
  the fused expert-parallel ops, whose buffers have room for the worst case).

Rows past offs[-1] (dropped) are zero in the output, as in the torch backend: the forward kernel treats
them as one more segment whose tiles store zeros (no separate memset of the output). On the CPU the kernels run
under TRITON_INTERPRET=1 (how CI tests them).
"""

from __future__ import annotations

import collections
import functools
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor  # host-side descriptors: TMA loads on Hopper

from . import gluon_wgrad

NAME = "triton"
COUNTERS: collections.Counter[str] = collections.Counter()


def available(device: torch.device) -> bool:
    """Whether these kernels can run on `device`: a CUDA GPU, or the CPU under TRITON_INTERPRET=1."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _cuda_properties(index: int) -> tuple[int, int]:
    """(SMs, L2 bytes) of a CUDA device: asked once (torch's query costs host time on every call)."""
    p = torch.cuda.get_device_properties(index)
    return p.multi_processor_count, p.L2_cache_size


def cuda_sms(device: torch.device) -> int:
    return _cuda_properties(torch.cuda._get_device_index(device, optional=True))[0]


def cuda_l2_bytes(device: torch.device) -> int:
    return _cuda_properties(torch.cuda._get_device_index(device, optional=True))[1]


def past_half_l2(nbytes: int, device: torch.device) -> bool:
    """Whether nbytes of one operand overflow half the device's L2 cache, so that the tile order must keep it
    from being read again and again. Under the interpreter (no cache), yes: the tests run that order."""
    return device.type != "cuda" or nbytes > cuda_l2_bytes(device) // 2


def _num_programs(device: torch.device, kernel: str | None = None) -> int:
    """Programs of a persistent kernel: PROGRAMS_PER_SM[kernel] (default 1) per SM on a GPU."""
    if device.type == "cuda":
        return cuda_sms(device) * PROGRAMS_PER_SM.get(kernel or "", 1)
    return 4  # the interpreter runs programs one after another: a few keep tests fast


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST (the CPU interpreter with 16-bit inputs, whose 16-bit dot is wrong) multiplies in
    float32, which is exact for bf16/fp16 products as the GPU's tensor cores are."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _wgrad_tile(t, K, N, BK: tl.constexpr, BN: tl.constexpr, GROUP_N):
    """Tile t of a dW tile list -> (expert, first k, first n). Expert-major; within an expert, bands of GROUP_N
    n-tiles, each swept over all k-tiles with its n-tiles side by side, so that the programs running at
    once share dy's column blocks (each read from memory once per band, not once per k-tile) while x's rows
    stay in L2 (GROUP_N >= the n-tiles: k-tile-major over the whole of N)."""
    n_tiles_k = tl.cdiv(K, BK)
    n_tiles_n = tl.cdiv(N, BN)
    local = t % (n_tiles_k * n_tiles_n)
    in_band = GROUP_N * n_tiles_k
    band_first = (local // in_band) * GROUP_N
    band_size = tl.minimum(n_tiles_n - band_first, GROUP_N)
    r = local % in_band
    return t // (n_tiles_k * n_tiles_n), (r // band_size) * BK, (band_first + r % band_size) * BN


@triton.jit
def _segment_rows(offs_ptr, seg):
    """[lo, hi) of segment `seg` from the segments' end offsets (rows, or m-tiles from their cumulative
    counts)."""
    lo = tl.where(seg > 0, tl.load(offs_ptr + seg - 1, mask=seg > 0, other=0), 0)
    return lo, tl.load(offs_ptr + seg)


@triton.jit
def _grouped_tile(cum_ptr, seg_ptr, t, n_tiles_n, GROUP_M: tl.constexpr):
    """Tile t of a segment-aligned tile list -> (segment, its first m-tile, m-tile, n-tile). A segment's tiles
    are a contiguous run of t; within it, GROUP_M m-tiles sweep the n-tiles together, so that the weight tiles
    they share stay in L2 while the next group's are read (GROUP_M = 1: one m-tile's n-tiles after another).
    The segment of an m-tile is one load from the table `tile_plan` made: a binary search over the cumulative
    m-tiles, nine dependent loads a tile, cost 5-12 % of a short-K GEMM (results/tile_table_2026-11-29.json)."""
    seg = tl.load(seg_ptr + t // n_tiles_n)
    first_mt, end_mt = _segment_rows(cum_ptr, seg)
    local = t - first_mt * n_tiles_n
    in_group = GROUP_M * n_tiles_n
    group_first = (local // in_group) * GROUP_M
    group_size = tl.minimum(end_mt - first_mt - group_first, GROUP_M)
    mt = first_mt + group_first + (local % in_group) % group_size
    return seg, first_mt, mt, (local % in_group) // group_size


@triton.jit
def _tile_plan_kernel(
    offs_ptr, offs_ext_ptr, cum_ptr, seg_ptr, NIN, S, NMT,
    BM: tl.constexpr, BSEG: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The tile plan of NIN segments given by their end rows, plus the tail [offs[NIN-1], S): the segments' end
    rows (offs_ext), their cumulative m-tiles of BM rows (cum), and the segment of every m-tile (seg: the
    number of segments whose m-tiles end at or before it). Every program holds all segments; program 0
    writes offs_ext and cum, each program BLOCK entries of seg."""
    i = tl.arange(0, BSEG)
    ok = i <= NIN
    inner = i < NIN
    end = tl.where(inner, tl.load(offs_ptr + i, mask=inner, other=0), S)
    after = (i > 0) & ok
    start = tl.load(offs_ptr + i - 1, mask=after, other=0)
    cum = tl.cumsum(tl.where(ok, (end - start + BM - 1) // BM, 0), 0)
    if tl.program_id(0) == 0:
        tl.store(offs_ext_ptr + i, end.to(tl.int32), mask=ok)
        tl.store(cum_ptr + i, cum.to(tl.int32), mask=ok)
    mts = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    seg = tl.sum(((cum[None, :] <= mts[:, None]) & ok[None, :]).to(tl.int32), 1)
    tl.store(seg_ptr + mts, seg, mask=mts < NMT)


def tile_plan(offs: torch.Tensor, S: int, bm: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offs_ext, cum, seg) of `_tile_plan_kernel` for segments ending at `offs` and the tail up to S, in one
    launch and without host synchronisation: int32 [NIN + 1], [NIN + 1], [ceil(S / bm) + NIN + 1] (at least
    as many m-tiles as the segments have)."""
    nin = offs.shape[0]
    nmt = triton.cdiv(S, bm) + nin + 1
    offs_ext = torch.empty(nin + 1, device=offs.device, dtype=torch.int32)
    cum = torch.empty_like(offs_ext)
    seg = torch.empty(nmt, device=offs.device, dtype=torch.int32)
    block = 16
    _tile_plan_kernel[(triton.cdiv(nmt, block),)](
        offs, offs_ext, cum, seg, nin, S, nmt, BM=bm, BSEG=max(16, triton.next_power_of_2(nin + 1)), BLOCK=block
    )
    return offs_ext, cum, seg


@triton.jit
def _weight_tile(w_desc, e, k0, nt, K, N, BN: tl.constexpr, W_KMAJOR: tl.constexpr):
    """Expert e's [BK, BN] weight tile at (k0, n-tile nt) through a descriptor over the experts' weights as one
    2-d tensor (`weight_descriptor`): [E*N, K] when K is contiguous (W_KMAJOR), else [E*K, N]. A tile past
    the expert's N (or K) reads the next expert's finite weights, which reach only output columns the store
    masks off (or meet the A operand's zero columns past K)."""
    # one return after a static if/else: Triton type-checks every return of a function, those of a
    # branch its constexpr condition drops included, and the two layouts' tiles differ in shape
    if W_KMAJOR:
        b = tl.trans(w_desc.load([e * N + nt * BN, k0]))
    else:
        b = w_desc.load([e * K + k0, nt * BN])
    return b


@triton.jit
def _grouped_mm_kernel(
    x_ptr, w_ptr, y_ptr, offs_ptr, cum_ptr, seg_ptr, x_desc, w_desc,
    N, K, E,
    sxm, sxk, swe, swk, swn, sym, syn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
    PRECISION: tl.constexpr, GROUP_M: tl.constexpr, UPCAST: tl.constexpr, DESC: tl.constexpr,
    W_KMAJOR: tl.constexpr,
):  # fmt: skip
    # DESC: x and w are read through tensor descriptors (TMA on Hopper), x_desc over x [S, K] and w_desc over
    # the experts' weights as one 2-d tensor: [E*N, K] when K is contiguous (W_KMAJOR, nn.Linear's layout),
    # else [E*K, N]. A tile that runs past its segment's rows, or past its expert's N (or K) into the next
    # expert's, reads finite numbers that only reach output rows / columns the store masks off (or meet
    # x's zero-filled columns past K).
    # segment E (one past the experts) is the tail of dropped rows [offs[E-1], S): its tiles store zeros
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(N, BN)
    total = tl.load(cum_ptr + E) * n_tiles_n  # m-tiles of all segments x n-tiles, known on the device only
    for t in range(pid, total, NUM_PROGRAMS):
        e, first_mt, mt, nt = _grouped_tile(cum_ptr, seg_ptr, t, n_tiles_n, GROUP_M)
        seg_lo, seg_hi = _segment_rows(offs_ptr, e)
        rows = (seg_lo + (mt - first_mt) * BM + tl.arange(0, BM)).to(tl.int64)  # 64-bit addresses
        cols = nt * BN + tl.arange(0, BN)
        row_ok = rows < seg_hi
        col_ok = cols < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, tl.where(e < E, K, 0), BK):
            if DESC:
                a = x_desc.load([seg_lo + (mt - first_mt) * BM, k0])
                b = _weight_tile(w_desc, e, k0, nt, K, N, BN, W_KMAJOR)
            else:
                ks = k0 + tl.arange(0, BK)
                k_ok = ks < K
                a = tl.load(x_ptr + rows[:, None] * sxm + ks[None, :] * sxk, mask=row_ok[:, None] & k_ok[None, :],
                            other=0.0)  # fmt: skip
                w_tile = w_ptr + e.to(tl.int64) * swe + ks[:, None] * swk + cols[None, :] * swn
                b = tl.load(w_tile, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, PRECISION, UPCAST)
        tl.store(y_ptr + rows[:, None] * sym + cols[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip


@triton.jit
def _grouped_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr, offs_ptr, x_desc, dy_desc,
    K, N, E, NSRC, GROUP_N, scale,
    sxm, sxk, sym, syn, swe, swk, swn,
    BK: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, NUM_PROGRAMS: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, DESC: tl.constexpr,
):  # fmt: skip
    # expert e's rows are the segments s * E + e for s < NSRC (one per source rank in the fused path; NSRC = 1
    # for plain grouped rows). DESC: a segment's whole row tiles are read through tensor descriptors (TMA on
    # Hopper), unmasked, and only its last, partial tile through masked pointers (the rows past a segment may
    # hold anything, NaN included, in the fused path's buffers); else every tile through masked pointers.
    pid = tl.program_id(0)
    total = E * tl.cdiv(K, BK) * tl.cdiv(N, BN)
    for t in range(pid, total, NUM_PROGRAMS):
        e, k0, n0 = _wgrad_tile(t, K, N, BK, BN, GROUP_N)
        ks = k0 + tl.arange(0, BK)
        cols = n0 + tl.arange(0, BN)
        k_ok = ks < K
        col_ok = cols < N
        acc = tl.zeros((BK, BN), dtype=tl.float32)
        for src in range(NSRC):
            seg_lo, seg_hi = _segment_rows(offs_ptr, src * E + e)
            if DESC:
                tail = seg_lo + ((seg_hi - seg_lo) // BS) * BS
                for s0 in range(seg_lo, tail, BS):
                    a = x_desc.load([s0, k0])  # [BS, BK]
                    b = dy_desc.load([s0, n0])  # [BS, BN]
                    acc = _dot(tl.trans(a), b, acc, PRECISION, UPCAST)
                if tail < seg_hi:  # read row-major like the descriptor tiles: reading it as [BK, BS] cost 3-5%
                    rows = (tail + tl.arange(0, BS)).to(tl.int64)
                    r_ok = rows < seg_hi
                    a = tl.load(x_ptr + rows[:, None] * sxm + ks[None, :] * sxk, mask=r_ok[:, None] & k_ok[None, :],
                                other=0.0)  # fmt: skip
                    b = tl.load(dy_ptr + rows[:, None] * sym + cols[None, :] * syn,
                                mask=r_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
                    acc = _dot(tl.trans(a), b, acc, PRECISION, UPCAST)
            else:
                for s0 in range(seg_lo, seg_hi, BS):  # an expert with no rows: no iteration, a zero gradient
                    rows = (s0 + tl.arange(0, BS)).to(tl.int64)
                    r_ok = rows < seg_hi
                    a = tl.load(x_ptr + rows[None, :] * sxm + ks[:, None] * sxk, mask=k_ok[:, None] & r_ok[None, :],
                                other=0.0)  # fmt: skip
                    b = tl.load(dy_ptr + rows[:, None] * sym + cols[None, :] * syn,
                                mask=r_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
                    acc = _dot(a, b, acc, PRECISION, UPCAST)
        dw_tile = dw_ptr + e.to(tl.int64) * swe + ks[:, None] * swk + cols[None, :] * swn
        tl.store(dw_tile, (acc * scale).to(dw_ptr.dtype.element_ty),
                 mask=k_ok[:, None] & col_ok[None, :])  # fmt: skip


# (block rows, block cols, block inner, warps, pipeline stages, m-tiles per L2 group) per kernel; benchmarks/
# sweeps them. The dW kernels: (BK, BN, BS, warps, stages, n-tiles per band: `_wgrad_tile`)
CONFIGS: dict[str, tuple[int, int, int, int, int, int]] = {
    "grouped_mm": (128, 256, 64, 8, 3, 8),
    "grouped_mm_wgrad": (256, 128, 64, 8, 3, 1),  # descriptor loads (TMA)
    "grouped_mm_wgrad_long": (128, 256, 64, 8, 3, 1),  # descriptor loads, experts of WGRAD_LONG_ROWS rows or more
    "grouped_mm_wgrad_pointer": (128, 128, 64, 8, 3, 1),
    # the fused expert-parallel GEMMs (backends/triton_ep.py): the gathering one and the scattering one; they
    # share BM (the plan's m-tiles). A fourth stage helps the gathering one (its A rows come through pointers):
    # 2-4 % on the Qwen3-like kernels, 2-6 % on the Mixtral-like forward, within the spread on DeepSeek's
    # (fused_ops_2026-11-29_sweep.json, and an A/B/A in fused_ops_2026-11-29_stages.json); not the scattering
    # one (1-2 % slower with it)
    "ep_dispatch_gemm": (128, 256, 64, 8, 4, 8),
    "ep_gemm_scatter": (128, 256, 64, 8, 3, 8),
}

# Programs per SM of the persistent GEMM kernels above (absent: one). Two programs of a smaller tile on one SM
# can overlap one's epilogue with the other's main loop; the fused scattering GEMM counts its programs' arrivals
# per call, so a value here must not change between calls of one process.
PROGRAMS_PER_SM: dict[str, int] = {}


def set_config(kernel: str, cfg: tuple[int, ...]) -> None:
    """Override `kernel`'s CONFIGS entry (benchmark sweeps): its six integers, then optionally its programs per SM
    (absent: one)."""
    CONFIGS[kernel] = cfg[:6]  # type: ignore[assignment]
    if len(cfg) > 6:
        PROGRAMS_PER_SM[kernel] = cfg[6]
    else:
        PROGRAMS_PER_SM.pop(kernel, None)


# Descriptor loads in the forward / dX grouped GEMM, from this inner dimension K on. On 1 x H200, as a fraction
# of torch._grouped_mm in the same run: K = 4096..28672 (Mixtral, DeepSeek gemm1 / dx1) went from 0.88-1.02
# with pointer loads (grouped_gemm_2026-11-28c) to 0.95-1.09 with descriptors (2026-11-29e, f). Short K
# (Qwen3, DeepSeek gemm2) was 3-7 % slower with descriptors while every tile searched for its segment (29e,
# 29f); with the tile table, descriptors were as fast or faster there too (tile_table_2026-11-29: Qwen3
# gemm1 0.78 -> 0.83, dx1 0.79 -> 0.85, DeepSeek gemm2 1.01 -> 1.05). Tests lower it to force either path.
DESCRIPTOR_MIN_K = 0


def _descriptor_ok(t: torch.Tensor) -> bool:
    """Whether a tensor descriptor can address this 2-d tensor: unit last stride, 16-byte aligned base and
    row stride."""
    return t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


def _upcast(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type != "cuda" and dtype in (torch.bfloat16, torch.float16)


def _precision(dtype: torch.dtype) -> str:
    """float32 inputs multiply in full precision (as the torch backend does), not TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _config(kernel: str, device: torch.device, dtype: torch.dtype) -> tuple[int, int, int, int, int, int]:
    if device.type != "cuda":
        return 16, 16, 16, 4, 1, 2
    if dtype not in (torch.bfloat16, torch.float16):
        return 64, 64, 32, 4, 2, 8
    return CONFIGS[kernel]


def grouped_mm(x_SK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    S, K = x_SK.shape
    E, _, N = w_EKN.shape
    if S == 0 or E == 0:
        return torch.zeros(S, N, device=x_SK.device, dtype=x_SK.dtype)
    y_SN = torch.empty(S, N, device=x_SK.device, dtype=x_SK.dtype)  # the kernel writes every row
    BM, BN, BK, warps, stages, group_m = _config("grouped_mm", x_SK.device, x_SK.dtype)
    # segments: the E experts, then the tail of dropped rows, which the kernel zeroes
    offs_ext, cum_ext, seg = tile_plan(offs_E, S, BM)
    P = _num_programs(x_SK.device, "grouped_mm")
    descs = _grouped_mm_descriptors(x_SK, w_EKN, BM, BN, BK)
    _grouped_mm_kernel[(P,)](
        x_SK, w_EKN, y_SN, offs_ext, cum_ext, seg, *(descs[:2] if descs else (None, None)), N, K, E,
        x_SK.stride(0), x_SK.stride(1), w_EKN.stride(0), w_EKN.stride(1), w_EKN.stride(2),
        y_SN.stride(0), y_SN.stride(1),
        BM=BM, BN=BN, BK=BK, NUM_PROGRAMS=P,
        PRECISION=_precision(x_SK.dtype), GROUP_M=group_m, UPCAST=_upcast(x_SK.device, x_SK.dtype),
        DESC=descs is not None, W_KMAJOR=bool(descs and descs[2]), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    COUNTERS["grouped_mm"] += 1
    COUNTERS["grouped_mm.descriptor" if descs else "grouped_mm.pointer"] += 1
    return y_SN


def _grouped_mm_descriptors(
    x_SK: torch.Tensor, w_EKN: torch.Tensor, BM: int, BN: int, BK: int
) -> tuple[TensorDescriptor, TensorDescriptor, bool] | None:
    """Tensor descriptors for x and for the weights (`weight_descriptor`), and whether w is K-major; None below
    DESCRIPTOR_MIN_K or where the strides do not allow them."""
    if not _descriptor_ok(x_SK):
        return None
    wd = weight_descriptor(w_EKN, BN, BK)
    return None if wd is None else (TensorDescriptor.from_tensor(x_SK, [BM, BK]), *wd)


def weight_descriptor(w_EKN: torch.Tensor, BN: int, BK: int) -> tuple[TensorDescriptor, bool] | None:
    """A tensor descriptor over the experts' weights [E, K, N] as one 2-d tensor, [E*N, K] if K is contiguous
    (nn.Linear's layout, transposed) else [E*K, N], and whether it is the K-major one; None below
    DESCRIPTOR_MIN_K or where the strides do not allow it. `_weight_tile` reads it."""
    if w_EKN.shape[1] < DESCRIPTOR_MIN_K or (w2k := weight_2d(w_EKN)) is None:
        return None
    w2, k_major = w2k
    return TensorDescriptor.from_tensor(w2, [BN, BK] if k_major else [BK, BN]), k_major


def weight_2d(w_EKN: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """The experts' weights [E, K, N] as one 2-d tensor, [E*N, K] where K is contiguous (nn.Linear's layout,
    transposed: K-major) else [E*K, N], and whether it is K-major; None where neither is a view a tensor
    descriptor can address (`weight_descriptor`, and the Gluon kernels' TMA descriptors)."""
    E, K, N = w_EKN.shape
    if w_EKN.transpose(1, 2).is_contiguous():
        w2, k_major = w_EKN.transpose(1, 2).reshape(E * N, K), True
    elif w_EKN.is_contiguous():
        w2, k_major = w_EKN.reshape(E * K, N), False
    else:
        return None
    return (w2, k_major) if _descriptor_ok(w2) else None


# dW tiles 128 x 256 rather than 256 x 128 where an expert has this many rows on average. On 1 x H200, as a
# fraction of torch._grouped_mm in the same runs (results/wgrad_tiles_2026-11-29.json): Mixtral (2048 rows an
# expert) 0.91 -> 0.95 (dW1), 0.93 -> 0.99 (dW2); Qwen3 (1024) 0.79-0.83 -> 0.86-0.88, 0.78-0.81 -> 0.82-0.85;
# DeepSeek (256) the other way, 0.82 -> 0.78 and 0.81 -> 0.80.
WGRAD_LONG_ROWS = 512


def _wgrad_rows(x_SK: torch.Tensor, E: int, nsrc: int) -> int:
    """An expert's rows in a dW call, on average (nsrc: buffers of nsrc x the rows, as the fused path's)."""
    return x_SK.shape[0] // max(E * nsrc, 1)


def _wgrad_long(x_SK: torch.Tensor, E: int, nsrc: int) -> bool:
    """Whether a dW call takes the tile for experts of many rows (WGRAD_LONG_ROWS)."""
    return _wgrad_rows(x_SK, E, nsrc) >= WGRAD_LONG_ROWS


def _wgrad_banded(x_SK: torch.Tensor, dy_SN: torch.Tensor, E: int, nsrc: int = 1) -> bool:
    """Whether the dW kernel sweeps bands of n-tiles over all k-tiles (`_wgrad_tile`) rather than all n-tiles
    k-tile by k-tile: where dy is the wider operand and an expert's rows of it do not fit in half the L2 cache.
    Then k-tile-major order reads dy from memory once per k-tile: for the Mixtral-like dW of GEMM 1 (2048 rows
    x 28672 of dy an expert, 117 MB), 16 times; in bands, once (7.19 -> 6.15 ms on 1 x H200, 0.79 -> 0.92 of
    torch._grouped_mm, results/wgrad_band_2026-11-29.json). Where both fit, k-tile-major order was as fast or
    faster (DeepSeek-like: 0.83 against 0.75)."""
    K, N = x_SK.shape[1], dy_SN.shape[1]
    return N > K and past_half_l2(_wgrad_rows(x_SK, E, nsrc) * N * dy_SN.element_size(), x_SK.device)


def grouped_mm_wgrad(
    x_SK: torch.Tensor, dy_SN: torch.Tensor, offs_E: torch.Tensor, scale: float = 1.0, acc: torch.Tensor | None = None
) -> torch.Tensor:
    dw = grouped_mm_wgrad_segments(x_SK, dy_SN, offs_E, 1, offs_E.shape[0], scale)
    return dw if acc is None else dw.add_(acc)


# On Hopper, the dW products run in the warp-specialised Gluon kernel (`gluon_wgrad`) where it takes the operands
# (counted as grouped_mm_wgrad.gluon), else in the Triton kernel below; MOECC_GLUON=0 keeps the Triton one.
GLUON_WGRAD = True


def wgrad_refusal(
    x_SK: torch.Tensor, dy_SN: torch.Tensor, E: int, nsrc: int, device: torch.device | None = None
) -> str | None:
    """Why `grouped_mm_wgrad_segments` would not run these operands in the Gluon dW kernel (None: it would).
    `device`: theirs, where they are meta tensors standing for a call's (`triton_ep.kernel_choices`)."""
    if not GLUON_WGRAD:
        return "switched off (triton_backend.GLUON_WGRAD)"
    return gluon_wgrad.supported(x_SK, dy_SN, E, _wgrad_long(x_SK, E, nsrc), device)


def grouped_mm_wgrad_segments(
    x_SK: torch.Tensor, dy_SN: torch.Tensor, offs: torch.Tensor, nsrc: int, E: int, scale: float = 1.0
) -> torch.Tensor:
    """dw[e] = scale * sum over s < nsrc of x[rows of segment s*E + e]^T @ dy[same rows] (offs: nsrc*E segment
    ends). `scale` is applied to the float32 sums before the store: a gradient's 1/W (sync_grads) costs no pass
    over the weight gradient of its own."""
    K = x_SK.shape[1]
    N = dy_SN.shape[1]
    long = _wgrad_long(x_SK, E, nsrc)
    if wgrad_refusal(x_SK, dy_SN, E, nsrc) is None:
        banded = _wgrad_banded(x_SK, dy_SN, E, nsrc)
        dw = gluon_wgrad.wgrad_segments(x_SK, dy_SN, offs, nsrc, E, scale, long, banded, _num_programs(x_SK.device))
        COUNTERS["grouped_mm_wgrad.gluon"] += 1
        COUNTERS["grouped_mm_wgrad"] += 1
        return dw
    dw_EKN = torch.empty(E, K, N, device=x_SK.device, dtype=x_SK.dtype)
    if E == 0:
        return dw_EKN
    desc = _descriptor_ok(x_SK) and _descriptor_ok(dy_SN)  # else strides a descriptor cannot express
    kernel = ("grouped_mm_wgrad_long" if long else "grouped_mm_wgrad") if desc else "grouped_mm_wgrad_pointer"
    P = _num_programs(x_SK.device, kernel)
    BK, BN, BS, warps, stages, group_n = _config(kernel, x_SK.device, x_SK.dtype)
    group_n = group_n if _wgrad_banded(x_SK, dy_SN, E, nsrc) else triton.cdiv(N, BN)
    descs = (
        (TensorDescriptor.from_tensor(x_SK, [BS, BK]), TensorDescriptor.from_tensor(dy_SN, [BS, BN]))
        if desc
        else (None, None)
    )
    _grouped_wgrad_kernel[(P,)](
        x_SK, dy_SN, dw_EKN, offs, *descs, K, N, E, nsrc, group_n, float(scale),
        x_SK.stride(0), x_SK.stride(1), dy_SN.stride(0), dy_SN.stride(1),
        dw_EKN.stride(0), dw_EKN.stride(1), dw_EKN.stride(2),
        BK=BK, BN=BN, BS=BS, NUM_PROGRAMS=P, PRECISION=_precision(x_SK.dtype),
        UPCAST=_upcast(x_SK.device, x_SK.dtype), DESC=desc, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    COUNTERS["grouped_mm_wgrad.descriptor" if desc else "grouped_mm_wgrad.pointer"] += 1
    COUNTERS["grouped_mm_wgrad.long_tiles"] += int(desc and long)
    COUNTERS["grouped_mm_wgrad"] += 1
    return dw_EKN


# ---------------------------------------------------------------------------------------------------------
# torch._grouped_mm under the contracts of the Triton grouped GEMMs, for the shapes where lower's timing finds it
# faster: rows past offs[-1] zeroed (forward), experts without rows zeroed and the scale applied (dW), in one
# small kernel each (the native kernel leaves both unwritten)


@triton.jit
def _zero_rows_past_kernel(y_ptr, offs_ptr, E, S, N, stride_s, BN: tl.constexpr):
    """y[r] = 0 for the rows r from offs[E - 1] (read on the device) to S; programs take every
    num_programs(0)-th row."""
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    m = cols < N
    row = tl.load(offs_ptr + E - 1).to(tl.int64) + tl.program_id(0)
    while row < S:
        tl.store(y_ptr + row * stride_s + cols, tl.zeros([BN], dtype=y_ptr.dtype.element_ty), mask=m)
        row += tl.num_programs(0)


@triton.jit
def _wgrad_fixup_kernel(dw_ptr, offs_ptr, KN, scale, BLOCK: tl.constexpr):
    """dw[e] = 0 where expert e has no rows, else scale * dw[e] where scale != 1 (dw contiguous [E, K*N])."""
    e = tl.program_id(0)
    lo = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    hi = tl.load(offs_ptr + e)
    empty = hi == lo
    if empty | (scale != 1.0):
        i = tl.program_id(1).to(tl.int64) * BLOCK
        base = dw_ptr + e.to(tl.int64) * KN
        while i < KN:
            idx = i + tl.arange(0, BLOCK)
            m = idx < KN
            v = tl.load(base + idx, mask=m, other=0.0).to(tl.float32) * scale
            tl.store(base + idx, tl.where(empty, 0.0, v).to(dw_ptr.dtype.element_ty), mask=m)
            i += tl.num_programs(1) * BLOCK


_NATIVE_WARNED: set[str] = set()


def _native_refused(op: str, why: str) -> None:
    """A native grouped GEMM whose operands torch._grouped_mm cannot take at run time (lower checked the traced
    strides; a base pointer off 16 bytes shows only here): the Triton kernel of the same contract runs instead,
    counted and warned about once per op."""
    COUNTERS[f"{op}.refused"] += 1
    if op not in _NATIVE_WARNED:
        _NATIVE_WARNED.add(op)
        import warnings

        warnings.warn(
            f"moecc: {op}: torch._grouped_mm cannot take these operands ({why}); the Triton kernel runs", stacklevel=3
        )


def native_grouped_mm(x_SK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """grouped_mm's contract (y[rows of e] = x[rows of e] @ w[e], rows past offs[-1] zero) through
    torch._grouped_mm and a kernel that zeroes the rows past the end."""
    from moecc.backends import torch_backend

    S, N, E = x_SK.shape[0], w_EKN.shape[2], w_EKN.shape[0]
    if S == 0 or E == 0:
        return torch.zeros(S, N, device=x_SK.device, dtype=x_SK.dtype)
    if (why := torch_backend.native_grouped_mm_refusal(x_SK, w_EKN, E)) is not None:
        _native_refused("native_grouped_mm", why)
        return grouped_mm(x_SK, w_EKN, offs_E)
    y_SN = torch._grouped_mm(x_SK, w_EKN, offs=offs_E)
    BN = min(1024, triton.next_power_of_2(N)) if x_SK.device.type == "cuda" else 16
    P = max(1, min(S, 4 * _num_programs(x_SK.device)))
    _zero_rows_past_kernel[(P, triton.cdiv(N, BN))](y_SN, offs_E, E, S, N, y_SN.stride(0), BN=BN)
    COUNTERS["native_grouped_mm"] += 1
    return y_SN.contiguous()  # the native kernel pads rows to 16 bytes: a copy where N * element size is not


def native_grouped_mm_wgrad(
    x_SK: torch.Tensor, dy_SN: torch.Tensor, offs_E: torch.Tensor, scale: float = 1.0, acc: torch.Tensor | None = None
) -> torch.Tensor:
    """grouped_mm_wgrad's contract (dw[e] = scale * x[rows of e]^T @ dy[rows of e] (+ acc[e]); zero for an
    expert without rows) through torch._grouped_mm, then one pass that zeroes the experts without rows and,
    where scale != 1, scales the rest (the native kernel has no scale: its bf16 results are scaled, not its
    float32 sums)."""
    from moecc.backends import torch_backend

    E, K, N = offs_E.shape[0], x_SK.shape[1], dy_SN.shape[1]
    if x_SK.shape[0] == 0 or E == 0:
        dw = torch.zeros(E, K, N, device=x_SK.device, dtype=x_SK.dtype)
        return dw if acc is None else dw.add_(acc)
    if (why := torch_backend.native_grouped_mm_refusal(x_SK.t(), dy_SN, E)) is not None:
        _native_refused("native_grouped_mm_wgrad", why)
        return grouped_mm_wgrad(x_SK, dy_SN, offs_E, scale, acc)
    dw_EKN = torch._grouped_mm(x_SK.t(), dy_SN, offs=offs_E).contiguous()
    BLOCK = 4096 if x_SK.device.type == "cuda" else 64
    per = max(1, min(triton.cdiv(K * N, BLOCK), triton.cdiv(4 * _num_programs(x_SK.device), E)))
    _wgrad_fixup_kernel[(E, per)](dw_EKN, offs_E, K * N, float(scale), BLOCK=BLOCK)
    COUNTERS["native_grouped_mm_wgrad"] += 1
    return dw_EKN if acc is None else dw_EKN.add_(acc)


# ---------------------------------------------------------------------------------------------------------
# the GLU activation between the two expert GEMMs: one pass over h instead of the model's chunk, act and
# multiply (and, backward, their four to five passes and a concatenation)

GLU_ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}


@triton.jit
def _glu_act(g, ACT: tl.constexpr):
    """act(g) and d act / d g, in float32 (g float32)."""
    if ACT == 0:
        s = tl.sigmoid(g)
        y = g * s
        dy = s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        y = g * cdf
        dy = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
    elif ACT == 2:
        k = 0.7978845608028654
        t = 2.0 * tl.sigmoid(2.0 * k * (g + 0.044715 * g * g * g)) - 1.0  # tanh
        y = 0.5 * g * (1.0 + t)
        dy = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        y = tl.maximum(g, 0.0)
        dy = tl.where(g > 0.0, 1.0, 0.0)
    return y, dy


@triton.jit
def _glu_kernel(
    h_ptr, da_ptr, out_ptr, rows_ptr, F,
    ACT: tl.constexpr, BF: tl.constexpr, BACKWARD: tl.constexpr, HAS_ROWS: tl.constexpr,
):  # fmt: skip
    """Forward: out[r] = act(h[r, :F]) * h[r, F:]. BACKWARD: out[r] = [da * up * act'(gate) | da * act(gate)].
    One row's block of columns per program; HAS_ROWS: only the rows before rows_ptr[0] (the rest is left as it
    is), each program taking every num_programs(0)-th row, so that a launch sized for the worst case's rows
    costs no idle programs."""
    cols = tl.program_id(1) * BF + tl.arange(0, BF)
    m = cols < F
    row = tl.program_id(0).to(tl.int64)
    end = row + 1
    if HAS_ROWS:
        end = tl.load(rows_ptr).to(tl.int64)
    while row < end:
        g = tl.load(h_ptr + row * 2 * F + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + row * 2 * F + F + cols, mask=m, other=0.0).to(tl.float32)
        y, dy = _glu_act(g, ACT)
        if BACKWARD:
            da = tl.load(da_ptr + row * F + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(out_ptr + row * 2 * F + cols, (da * u * dy).to(out_ptr.dtype.element_ty), mask=m)
            tl.store(out_ptr + row * 2 * F + F + cols, (da * y).to(out_ptr.dtype.element_ty), mask=m)
        else:
            tl.store(out_ptr + row * F + cols, (y * u).to(out_ptr.dtype.element_ty), mask=m)
        row += tl.num_programs(0) if HAS_ROWS else 1


def _row_grid(S: int, F: int, device: torch.device, counted: bool) -> tuple[tuple[int, int], int]:
    """(grid, BF) of the row kernels (GLU, activation): one row's block of BF columns per program, up to 2048
    (results/glu_kernel_2026-11-29.json: 2048-wide blocks were the fastest, or within 7 % of the fastest, at
    F = 768..14336, forward and backward; 4 warps). With a row count on the device (`counted`): programs for
    the rows of a rank's average share (S // GLU_ROWS_SHARE), each looping over its rows up to the count."""
    BF = min(2048, triton.next_power_of_2(F)) if device.type == "cuda" else 16
    P = max(1, min(S, triton.cdiv(S, GLU_ROWS_SHARE))) if counted else S
    return (P, triton.cdiv(F, BF)), BF


def _glu_launch(
    h_SF2: torch.Tensor, da_SF: torch.Tensor | None, kind: str, rows: torch.Tensor | None = None
) -> torch.Tensor:
    S, F2 = h_SF2.shape
    F = F2 // 2
    h_SF2 = h_SF2.contiguous()
    out = torch.empty(S, F if da_SF is None else F2, device=h_SF2.device, dtype=h_SF2.dtype)
    if S == 0 or F == 0:
        return out
    da = da_SF.contiguous() if da_SF is not None else h_SF2
    grid, BF = _row_grid(S, F, h_SF2.device, rows is not None)
    _glu_kernel[grid](
        h_SF2, da, out, rows if rows is not None else h_SF2, F, ACT=GLU_ACT_CODES[kind], BF=BF,
        BACKWARD=da_SF is not None, HAS_ROWS=rows is not None,
    )  # fmt: skip
    return out


@triton.jit
def _act_rows_kernel(
    h_ptr, da_ptr, out_ptr, rows_ptr, F,
    ACT: tl.constexpr, BF: tl.constexpr, BACKWARD: tl.constexpr,
):  # fmt: skip
    """A plain (non-GLU) expert activation over the rows before rows_ptr[0] only: out[r] = act(h[r]), or
    BACKWARD: out[r] = da[r] * act'(h[r]). Programs take every num_programs(0)-th row, as _glu_kernel's."""
    cols = tl.program_id(1) * BF + tl.arange(0, BF)
    m = cols < F
    row = tl.program_id(0).to(tl.int64)
    end = tl.load(rows_ptr).to(tl.int64)
    while row < end:
        g = tl.load(h_ptr + row * F + cols, mask=m, other=0.0).to(tl.float32)
        y, dy = _glu_act(g, ACT)
        if BACKWARD:
            da = tl.load(da_ptr + row * F + cols, mask=m, other=0.0).to(tl.float32)
            y = da * dy
        tl.store(out_ptr + row * F + cols, y.to(out_ptr.dtype.element_ty), mask=m)
        row += tl.num_programs(0)


def _act_rows_launch(h_SF: torch.Tensor, da_SF: torch.Tensor | None, rows: torch.Tensor, kind: str) -> torch.Tensor:
    S, F = h_SF.shape
    h_SF = h_SF.contiguous()
    out = torch.empty_like(h_SF)
    if S == 0 or F == 0:
        return out
    da = da_SF.contiguous() if da_SF is not None else h_SF
    grid, BF = _row_grid(S, F, h_SF.device, counted=True)
    _act_rows_kernel[grid](
        h_SF, da, out, rows, F, ACT=GLU_ACT_CODES[kind], BF=BF, BACKWARD=da_SF is not None
    )  # fmt: skip
    return out


def act_rows(h_SF: torch.Tensor, rows: torch.Tensor, kind: str) -> torch.Tensor:
    """act(h) over the first rows[0] rows of h only (an int tensor of one element on h's device, read by the
    kernel); the later rows are left unwritten. For a plain expert activation between the fused ops."""
    COUNTERS["act_rows"] += 1
    return _act_rows_launch(h_SF, None, rows, kind)


def act_rows_backward(da_SF: torch.Tensor, h_SF: torch.Tensor, rows: torch.Tensor, kind: str) -> torch.Tensor:
    COUNTERS["act_rows_backward"] += 1
    return _act_rows_launch(h_SF, da_SF, rows, kind)


# glu_rows launches programs for 1/GLU_ROWS_SHARE of the rows it has room for (their rows past the count exit at
# once); the fused path's room is ep times a rank's average rows
GLU_ROWS_SHARE = 2


def glu(h_SF2: torch.Tensor, kind: str) -> torch.Tensor:
    COUNTERS["glu"] += 1
    return _glu_launch(h_SF2, None, kind)


def glu_backward(da_SF: torch.Tensor, h_SF2: torch.Tensor, kind: str) -> torch.Tensor:
    COUNTERS["glu_backward"] += 1
    return _glu_launch(h_SF2, da_SF, kind)


def glu_rows(h_SF2: torch.Tensor, rows: torch.Tensor, kind: str) -> torch.Tensor:
    """glu over the first rows[0] rows of h only (rows: an int32 tensor of one element on h's device, read by
    the kernel, not the host); the result's later rows are left unwritten. For the rows between the fused
    expert-parallel ops: h has room for the worst case, ep times the rows a rank computes on average."""
    COUNTERS["glu_rows"] += 1
    return _glu_launch(h_SF2, None, kind, rows)


def glu_rows_backward(da_SF: torch.Tensor, h_SF2: torch.Tensor, rows: torch.Tensor, kind: str) -> torch.Tensor:
    COUNTERS["glu_rows_backward"] += 1
    return _glu_launch(h_SF2, da_SF, kind, rows)


# ---------------------------------------------------------------------------------------------------------
# the combine of the unfused path: each token's K rows gathered from y (where the permutation put them) and
# summed with their gates in float32, in one pass; rows past offs[-1] (dropped, or the room of a receive buffer
# that no token took) are skipped, not multiplied by zero


@triton.jit
def _combine_rows_kernel(
    y_ptr, row_ptr, w_ptr, offs_ptr, E, out_ptr, H, K: tl.constexpr, BH: tl.constexpr, HAS_W: tl.constexpr,
    LIMIT: tl.constexpr,
):  # fmt: skip
    """out[t] = sum over k of w[t, k] * y[row[t, k]] (w = 1 without HAS_W), in float32, stored in out's dtype;
    with LIMIT only the rows below offs[E - 1] (the others are dropped slots or room no token took)."""
    t = tl.program_id(0).to(tl.int64)
    hs = tl.program_id(1) * BH + tl.arange(0, BH)
    m = hs < H
    acc = tl.zeros((BH,), dtype=tl.float32)
    for k in range(K):
        r = tl.load(row_ptr + t * K + k).to(tl.int64)
        live = True
        if LIMIT:
            live = r < tl.load(offs_ptr + E - 1).to(tl.int64)
        if live:
            y = tl.load(y_ptr + r * H + hs, mask=m, other=0.0).to(tl.float32)
            if HAS_W:
                y *= tl.load(w_ptr + t * K + k).to(tl.float32)
            acc += y
    tl.store(out_ptr + t * H + hs, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _combine_rows_backward_kernel(
    gout_ptr, y_ptr, row_ptr, w_ptr, offs_ptr, E, gy_ptr, gw_ptr, H,
    K: tl.constexpr, BH: tl.constexpr, NEED_Y: tl.constexpr, NEED_W: tl.constexpr,
):  # fmt: skip
    """gy[row[t, k]] = w[t, k] * gout[t] (0 for a row past offs[E - 1]); gw[t, k] = <gout[t], y[row[t, k]]>
    (float32 accumulation; 0 for a row past offs[E - 1])."""
    t = tl.program_id(0).to(tl.int64)
    end = tl.load(offs_ptr + E - 1).to(tl.int64)
    for k in range(K):
        r = tl.load(row_ptr + t * K + k).to(tl.int64)
        live = r < end
        g = tl.where(live, tl.load(w_ptr + t * K + k).to(tl.float32), 0.0)
        acc = tl.zeros((BH,), dtype=tl.float32)
        for h0 in range(0, H, BH):
            hs = h0 + tl.arange(0, BH)
            m = hs < H
            go = tl.load(gout_ptr + t * H + hs, mask=m, other=0.0).to(tl.float32)
            if NEED_Y:
                tl.store(gy_ptr + r * H + hs, (g * go).to(gy_ptr.dtype.element_ty), mask=m)
            if NEED_W:
                if live:
                    acc += go * tl.load(y_ptr + r * H + hs, mask=m, other=0.0).to(tl.float32)
        if NEED_W:
            tl.store(gw_ptr + t * K + k, tl.sum(acc, 0).to(gw_ptr.dtype.element_ty))


def _check_slots(y_SH: torch.Tensor, w_TK: torch.Tensor) -> None:
    if y_SH.shape[0] != w_TK.numel():
        raise ValueError(
            f"moecc.triton_unpermute_combine: y has {y_SH.shape[0]} rows for {w_TK.shape[0]} tokens of "
            f"{w_TK.shape[1]} slots; the combine takes one row per slot (route_permute's rows)"
        )


def _slot_rows(src_S: torch.Tensor) -> torch.Tensor:
    """The row that holds each (token, slot), flat t*K + k: the inverse of the permutation src_S."""
    return torch.empty_like(src_S).scatter_(0, src_S, torch.arange(src_S.shape[0], device=src_S.device))


def unpermute_combine(
    y_SH: torch.Tensor, src_S: torch.Tensor, offs_E: torch.Tensor, w_TK: torch.Tensor
) -> torch.Tensor:
    """out[t] = sum_k w[t, k] * y[row of (t, k)], accumulated in float32, returned in y's dtype (as the torch
    backend's), in one pass over the rows the tokens' slots hold."""
    T, K = w_TK.shape
    H = y_SH.shape[1]
    _check_slots(y_SH, w_TK)
    out = torch.empty(T, H, device=y_SH.device, dtype=y_SH.dtype)
    if T == 0 or K == 0 or offs_E.shape[0] == 0:
        return out.zero_()
    BH = 1024 if y_SH.device.type == "cuda" else 16
    _combine_rows_kernel[(T, triton.cdiv(H, BH))](
        y_SH.contiguous(), _slot_rows(src_S), w_TK.contiguous(), offs_E, offs_E.shape[0], out, H, K=K, BH=BH,
        HAS_W=True, LIMIT=True,
    )  # fmt: skip
    COUNTERS["unpermute_combine"] += 1
    return out


def unpermute_combine_backward(
    gout_TH: torch.Tensor, y_SH: torch.Tensor, src_S: torch.Tensor, offs_E: torch.Tensor, w_TK: torch.Tensor,
    need_y: bool, need_w: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """Gradients of `unpermute_combine` for y (every row written: rows of dropped slots get zeros) and for w,
    where asked for."""
    T, K = w_TK.shape
    S, H = y_SH.shape
    _check_slots(y_SH, w_TK)
    gy = torch.empty(S, H, device=y_SH.device, dtype=y_SH.dtype) if need_y else None
    gw = torch.empty(T, K, device=w_TK.device, dtype=w_TK.dtype) if need_w else None
    if T == 0 or K == 0 or offs_E.shape[0] == 0 or not (need_y or need_w):
        return (gy.zero_() if gy is not None else None), (gw.zero_() if gw is not None else None)
    BH = 1024 if y_SH.device.type == "cuda" else 16
    _combine_rows_backward_kernel[(T,)](
        gout_TH.contiguous(), y_SH.contiguous(), _slot_rows(src_S), w_TK.contiguous(), offs_E,
        offs_E.shape[0], gy if gy is not None else y_SH, gw if gw is not None else w_TK, H,
        K=K, BH=BH, NEED_Y=need_y, NEED_W=need_w,
    )  # fmt: skip
    COUNTERS["unpermute_combine_backward"] += 1
    return gy, gw


def route_permute_backward(gx_SH: torch.Tensor, src_S: torch.Tensor, T: int) -> torch.Tensor:
    """The gradient of route_permute for x: gx[t] = sum over k of gx_SH[row of (t, k)], every row (a dropped
    slot's too, as the permutation's adjoint), accumulated in float32, in one pass a token (no atomics)."""
    S, H = gx_SH.shape
    out = torch.empty(T, H, device=gx_SH.device, dtype=gx_SH.dtype)
    if T == 0 or S == 0:
        return out.zero_()
    if S % T:
        raise ValueError(
            f"moecc.triton_route_permute_backward: {S} rows for {T} tokens; route_permute makes K rows a token"
        )
    K = S // T
    BH = 1024 if gx_SH.device.type == "cuda" else 16
    rows = _slot_rows(src_S)
    _combine_rows_kernel[(T, triton.cdiv(H, BH))](
        gx_SH.contiguous(), rows, rows, rows, 0, out, H, K=K, BH=BH, HAS_W=False, LIMIT=False
    )  # fmt: skip
    COUNTERS["route_permute_backward"] += 1
    return out
