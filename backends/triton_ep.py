"""Expert parallelism fused with the expert GEMMs over symmetric memory (the `triton` backend's fused path).

Every rank of an expert-parallel group holds one symmetric buffer (`torch.distributed._symmetric_memory`; in a
simulated world, one ordinary tensor per rank in one process) and a table of every rank's buffer address, so
a kernel can load from and store to any peer's buffer. One MoE layer, seen from rank `me` (E_l local experts,
T tokens, K slots, ep ranks):

  forward, first op (dispatch fused into expert GEMM 1):
    1. meta push: for each destination rank d, the slots routed to d (sorted by expert) are announced in
       d's `rowmap` block of this rank (the receive row of the token, the slot id t*K+k) with d's per-expert
       counts; then signal META.
    2. wait for META from every rank; build the tile plan: segments (source s, local expert e), ordered by
       s' = (s - me) mod ep so that local rows come first (they need no transfer).
    3. one persistent kernel: `P_SEND` programs push each token's row once to every other rank that holds
       one of its experts and signal DATA; the other programs walk the GEMM tiles, each waiting (acquire)
       for the DATA signal of its segment's source rank, gathering its A rows from the receive buffer
       through the rowmap. This rank's own rows are not sent: the rowmap points its own slots at their
       tokens, the local tiles (first in the order) read them in place and start without waiting. The rows
       past the last segment (the worst case's room, ep - 1 of every ep rows on average) are not written;
       nothing reads them: the GLU between the ops (`ep_glu`) stops at the plan's row count.
  forward, second op (expert GEMM 2 fused with combine):
    4. each tile's result rows are stored straight into the source rank's `comb` buffer at the slot they
       belong to; the last program signals COMB to every rank.
    5. wait for COMB from every rank; out[t] = sum_k gate[t, k] * comb[t*K + k] (float32 accumulation).
  backward: the mirror image. dout rows travel like x (once per destination rank, with the gates of the
  slots), the dX GEMM of expert GEMM 2 gathers and scales them (signal GDATA); the dX GEMM of expert GEMM 1
  scatters its rows back into the source's `comb` (signal GCOMB), where they are summed per token. Weight
  gradients are grouped GEMMs over the local segments.

Buffers are sized for the worst case (every token at every rank) and reused by every call and every layer of
the same shape without being reset: a signal carries the number of times its phase has run on the sender
(a per-phase call counter kept on the device), and a waiter waits until the counter of its own call is
reached. Reuse is safe because every rank's last read of a buffer in a call precedes a signal that the next
writer of that buffer waits on before writing it. Nothing here synchronises with the host, so a whole layer
can be captured in a CUDA graph.

The per-rank algorithm is written as generators that `yield` where a rank waits for its peers: on a real
group each rank runs its generator to the end (the waits happen inside the kernels); in a simulated world
(`SimWorld`) every rank's generator is advanced to the next `yield` in turn, and the merged send+GEMM kernel is
launched as two launches (send programs, then GEMM programs), so that the interpreter, which runs programs one
after another, never waits on a peer that has not run yet.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from moecc.backends import gluon_gemm, torch_backend, triton_backend

COUNTERS: collections.Counter[str] = collections.Counter()
# one count per layer call of each fused flow
PHASE_COUNTERS = ("dispatch_gemm.forward", "gemm_combine.forward", "dispatch_gemm.backward", "gemm_combine.backward")

# signal slots (and per-slot call counters)
META, DATA, COMB, GDATA, GCOMB = range(5)
NSIG = 5
CHAIN_PROGRAMS = 1024  # the most programs of the routing scan's chain
ROLE_SEND, ROLE_GEMM, ROLE_BOTH = 1, 2, 3

Flow = Generator[None, None, Any]


# ---------------------------------------------------------------------------------------------------------
# buffers


def _layout(ep: int, T: int, K: int, H: int, E_l: int, dtype: torch.dtype) -> dict[str, tuple[int, torch.dtype, int]]:
    """name -> (byte offset, dtype, numel) inside a rank's symmetric buffer (each part 256-byte aligned)."""
    parts = [
        ("sig", torch.int64, NSIG * ep),  # sig[slot * ep + s]: how many times rank s signalled `slot` to us
        ("counts", torch.int32, ep * E_l),  # counts[s, e]: rows of source s for local expert e
        ("rowmap", torch.int32, ep * T * K * 2),  # [s, q] -> (receive row, slot id at s)
        ("gates", torch.float32, ep * T * K),  # [s, q] -> gate of the slot (backward)
        ("recv", dtype, ep * T * H),  # [s, t] token rows from source s (x forward, dout backward)
        ("comb", dtype, T * K * H),  # [t*K + k] result rows of this rank's slots
    ]
    out, off = {}, 0
    for name, dt, n in parts:
        out[name] = (off, dt, n)
        off += -(-(n * torch.empty((), dtype=dt).element_size()) // 256) * 256
    out["_total"] = (off, torch.uint8, off)
    return out


@dataclass
class EPBuffers:
    """One rank's view of the group's symmetric buffers: local tensors and per-peer address tables."""

    ep: int
    me: int
    T: int
    K: int
    H: int
    E_l: int
    dtype: torch.dtype
    device: torch.device
    local: dict[str, torch.Tensor]
    tables: dict[str, torch.Tensor]  # name -> int64 [ep] addresses of that part on every rank
    epoch: torch.Tensor  # int64 [NSIG]: calls of each phase completed on this rank
    done: torch.Tensor  # int64 [NSIG]: programs of this call that finished each phase (last-program detection)
    claim: torch.Tensor  # int32 [NSIG]: the next GEMM tile of a call (zeroed before each launch that claims)
    chain: torch.Tensor  # int64 [ep * CHAIN_PROGRAMS]: the routing scan's running counts (`_route_scan_kernel`)
    simulated: bool
    # what owns the memory: {"raw": the allocation, "bases": every rank's address of it, "handle": the symmetric
    # memory handle}, or for a view of a larger allocation, that allocation's buffers (`group_buffers`)
    keep: Any = None

    @staticmethod
    def from_bases(raw: torch.Tensor, bases: list[int], me: int, shape: tuple, simulated: bool, keep: Any = None):
        ep, T, K, H, E_l, dtype = shape
        lay = _layout(ep, T, K, H, E_l, dtype)
        local, tables = {}, {}
        for name, (off, dt, n) in lay.items():
            if name == "_total":
                continue
            size = torch.empty((), dtype=dt).element_size()
            local[name] = raw[off : off + n * size].view(dt)
            tables[name] = torch.tensor([b + off for b in bases], dtype=torch.int64, device=raw.device)
        z = torch.zeros(NSIG, dtype=torch.int64, device=raw.device)
        claim = torch.zeros(NSIG, dtype=torch.int32, device=raw.device)
        chain = torch.zeros(ep * CHAIN_PROGRAMS, dtype=torch.int64, device=raw.device)
        return EPBuffers(
            ep, me, T, K, H, E_l, dtype, raw.device, local, tables, z, z.clone(), claim, chain, simulated, keep
        )

    def tick(self, slot: int) -> None:
        """This rank finished `slot` for the current call (a device-side increment)."""
        self.epoch[slot : slot + 1].add_(1)


def buffer_bytes(ep: int, T: int, K: int, H: int, E_l: int, dtype: torch.dtype) -> int:
    return _layout(ep, T, K, H, E_l, dtype)["_total"][0]


class SimWorld:
    """`ep` ranks in one process: each rank's buffer is an ordinary tensor (CPU under TRITON_INTERPRET=1, or one
    GPU); the address tables hold the `data_ptr()`s of all of them."""

    def __init__(self, ep: int, T: int, K: int, H: int, E_l: int, dtype: torch.dtype, device: torch.device) -> None:
        n = buffer_bytes(ep, T, K, H, E_l, dtype)
        # garbage everywhere but the signals, as a real allocation would be
        self.raw = [torch.randint(0, 255, (n,), dtype=torch.uint8, device=device) for _ in range(ep)]
        bases = [r.data_ptr() for r in self.raw]
        shape = (ep, T, K, H, E_l, dtype)
        self.ranks = [EPBuffers.from_bases(self.raw[r], bases, r, shape, simulated=True) for r in range(ep)]
        for b in self.ranks:
            b.local["sig"].zero_()

    def run(self, flows: list[Flow]) -> list[Any]:
        """Advance every rank's flow to its next wait point in turn until all have finished."""
        results: list[Any] = [None] * len(flows)
        live = list(range(len(flows)))
        while live:
            still = []
            for r in live:
                try:
                    next(flows[r])
                    still.append(r)
                except StopIteration as stop:
                    results[r] = stop.value
            live = still
        return results


def run_flow(flow: Flow) -> Any:
    """Run one rank's flow on a real group: the waits happen on the device."""
    try:
        while True:
            next(flow)
    except StopIteration as stop:
        return stop.value


_SYMMETRIC: dict[tuple, EPBuffers] = {}  # (group, T, K, H, E_l, dtype, device) -> the buffers' view for T tokens
# (group, K, H, E_l, dtype, device) -> the largest allocation so far: the view it was made for (T tokens) holds
# the memory and the device-side call counters that every view of it shares
_ALLOCATED: dict[tuple, EPBuffers] = {}


def group_buffers(group_name: str, T: int, K: int, H: int, E_l: int, dtype: torch.dtype, device: torch.device):
    """The symmetric buffers of a process group for one layer shape (shared by every layer of that shape).

    One allocation serves every token count up to the largest seen (`_layout` puts the signals first, so they
    stay in place whatever T is, and the views share the device's call counters that the signals are compared
    with). A larger T than any before allocates anew, twice the old room at least, so that token counts that
    grow step by step (dynamic shapes) allocate a few times, not once each; the old allocation is kept, since
    a captured CUDA graph may still use it. An allocation is a collective over the group (an address
    exchange); the ranks make it at the same call because every call's inputs have the same shapes on every
    rank (compile's check_inputs). It must happen outside a CUDA graph capture (the first, eager step of
    training does it)."""
    key = (group_name, T, K, H, E_l, dtype, str(device))
    if key in _SYMMETRIC:
        return _SYMMETRIC[key]
    akey = (group_name, K, H, E_l, dtype, str(device))
    room = _ALLOCATED.get(akey)
    if room is None or room.T < T:
        room = _allocate(group_name, T if room is None else max(T, 2 * room.T), K, H, E_l, dtype, device)
        _ALLOCATED[akey] = room
    if room.T == T:
        bufs = room
    else:
        raw, bases = room.keep["raw"], room.keep["bases"]
        assert buffer_bytes(room.ep, T, K, H, E_l, dtype) <= raw.numel()
        view = EPBuffers.from_bases(raw, bases, room.me, (room.ep, T, K, H, E_l, dtype), simulated=False, keep=room)
        bufs = dataclasses.replace(view, epoch=room.epoch, done=room.done, claim=room.claim, chain=room.chain)
    _SYMMETRIC[key] = bufs
    return bufs


def _allocate(group_name: str, T: int, K: int, H: int, E_l: int, dtype: torch.dtype, device: torch.device):
    """A new allocation of the group's buffers with room for T tokens, its view for T (see `group_buffers`)."""
    import torch.distributed as dist

    from moecc.backends.torch_backend import _group

    group = _group(group_name) if group_name else None  # "": no process group, one rank
    ep = dist.get_world_size(group) if group is not None else 1
    n = buffer_bytes(ep, T, K, H, E_l, dtype)
    if ep == 1:
        raw = torch.zeros(n, dtype=torch.uint8, device=device)
        bases = [raw.data_ptr()]
        keep: dict[str, Any] = {"raw": raw, "bases": bases}
        bufs = EPBuffers.from_bases(raw, bases, 0, (1, T, K, H, E_l, dtype), simulated=False, keep=keep)
    else:
        if device.type != "cuda":
            raise RuntimeError(
                f"moecc: the fused expert-parallel kernels need symmetric memory, which exists on CUDA devices "
                f"only; this group runs on {device} with {ep} ranks. Use backend='torch'."
            )
        import torch.distributed._symmetric_memory as symm_mem

        if hasattr(symm_mem, "enable_symm_mem_for_group"):
            symm_mem.enable_symm_mem_for_group(group_name)  # type: ignore[arg-type]
        raw = symm_mem.empty(n, dtype=torch.uint8, device=device)
        hdl = symm_mem.rendezvous(raw, group)  # type: ignore[arg-type]  # a real group here (ep > 1)
        bases = list(hdl.buffer_ptrs)
        keep = {"raw": raw, "bases": bases, "handle": hdl}
        bufs = EPBuffers.from_bases(raw, bases, hdl.rank, (ep, T, K, H, E_l, dtype), simulated=False, keep=keep)
    bufs.local["sig"].zero_()
    if ep > 1:
        torch.cuda.synchronize(device)
        dist.barrier(group=group)  # no peer may signal us before our signals are zeroed
    COUNTERS["symmetric.allocations"] += 1
    COUNTERS["symmetric.bytes"] += n
    return bufs


# ---------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _index(x, WIDE: tl.constexpr):
    """Row indices for address arithmetic: 64-bit only where an operand reaches 2^31 elements (WIDE); 32-bit
    offsets keep the gathered / scattered tiles' address tensors at half the registers."""
    if WIDE:  # one return: Triton types every return statement, even one a constexpr rules out
        y = x.to(tl.int64)
    else:
        y = x.to(tl.int32)
    return y


@triton.jit
def _ptr(table, r, like):
    """The address of rank r's part (from an int64 table) as a pointer of `like`'s element type. Every part
    is 256-byte aligned (`_layout`); saying so lets the compiler vectorise the row accesses through it (16-byte
    stores where it emitted one 2-byte store per element, about half the scattering GEMM's time)."""
    return tl.multiple_of(tl.load(table + r).to(tl.pointer_type(like.dtype.element_ty)), 16)


@triton.jit
def _arrive_and_signal(done_ptr, sig_tab, epoch_ptr, slot, me, EP: tl.constexpr, NP):
    """Count this program as done with `slot`; the last of the NP programs resets the count for the next call
    (which launches after this kernel ends, so NP may differ between calls) and signals every rank (release)."""
    target = tl.load(epoch_ptr + slot) + 1
    old = tl.atomic_add(done_ptr + slot, 1, sem="acq_rel", scope="sys")
    if old == NP - 1:
        tl.atomic_xchg(done_ptr + slot, 0, sem="relaxed", scope="gpu")
        for d in range(EP):
            peer = tl.load(sig_tab + d).to(tl.pointer_type(tl.int64))
            tl.atomic_xchg(peer + slot * EP + me, target, sem="release", scope="sys")


@triton.jit
def _wait_signal(sig_ptr, target):
    while tl.atomic_add(sig_ptr, 0, sem="acquire", scope="sys") < target:
        pass


@triton.jit
def _wait_all_kernel(sig_ptr, epoch_ptr, slot, EP: tl.constexpr):
    """Wait until every rank has signalled `slot` for this call, then count the call as done here (the tick of
    `EPBuffers.tick`, without a launch of its own)."""
    target = tl.load(epoch_ptr + slot) + 1
    for s in range(EP):
        _wait_signal(sig_ptr + slot * EP + s, target)
    tl.store(epoch_ptr + slot, target)


@triton.jit
def _push_meta_kernel(
    dest_ptr, q_ptr, row_ptr, slot_ptr, counts_ptr,
    rowmap_tab, counts_tab, sig_tab, done_ptr, epoch_ptr,
    me, TK, E_l, NP,
    EP: tl.constexpr, BJ: tl.constexpr, BE: tl.constexpr,
):  # fmt: skip
    """Announce this rank's slots to their destinations: rowmap entries (receive row, slot id) at
    [me, q] and the per-expert counts; then META."""
    pid = tl.program_id(0)
    for j0 in range(pid * BJ, TK, NP * BJ):
        js = j0 + tl.arange(0, BJ)
        d = tl.load(dest_ptr + js, mask=js < TK, other=-1)
        ok = d >= 0
        q = tl.load(q_ptr + js, mask=ok, other=0)
        row = tl.load(row_ptr + js, mask=ok, other=0)
        sl = tl.load(slot_ptr + js, mask=ok, other=0)
        base = tl.load(rowmap_tab + tl.maximum(d, 0), mask=ok, other=0).to(tl.pointer_type(tl.int32))
        at = (me * TK + q).to(tl.int64) * 2
        tl.store(base + at, row.to(tl.int32), mask=ok)
        tl.store(base + at + 1, sl.to(tl.int32), mask=ok)
    if pid == 0:
        for d in range(EP):
            cbase = tl.load(counts_tab + d).to(tl.pointer_type(tl.int32))
            for e0 in range(0, E_l, BE):
                es = e0 + tl.arange(0, BE)
                c = tl.load(counts_ptr + d * E_l + es, mask=es < E_l, other=0)
                tl.store(cbase + me * E_l + es, c.to(tl.int32), mask=es < E_l)
    _arrive_and_signal(done_ptr, sig_tab, epoch_ptr, 0, me, EP, NP)  # slot META = 0


@triton.jit
def _push_rows(
    pid, src_ptr, pos_ptr, recv_tab, dest_ptr, q_ptr, slot_ptr, gsrc_ptr, gates_tab,
    me, T, H, TK,
    EP: tl.constexpr, NSEND, BT: tl.constexpr, BH: tl.constexpr, HAS_GATES: tl.constexpr,
):  # fmt: skip
    """Send programs: token t's row to every other rank d with pos[d, t] >= 0, into d's recv[me, pos]; with
    HAS_GATES also the gate of every slot to its destination's gates[me, q]. Rows and gates this rank computes
    itself stay where they are (the GEMM reads them in place)."""
    n_tb = tl.cdiv(T, BT)
    for w in range(n_tb + pid, EP * n_tb, NSEND):  # w // n_tb == 0 is this rank
        d = (me + w // n_tb) % EP
        ts = (w % n_tb) * BT + tl.arange(0, BT)
        pos = tl.load(pos_ptr + d * T + ts, mask=ts < T, other=-1)
        ok = pos >= 0
        dst = _ptr(recv_tab, d, src_ptr)
        rows = (me * T + pos).to(tl.int64)
        for h0 in range(0, H, BH):
            hs = h0 + tl.arange(0, BH)
            m = ok[:, None] & (hs < H)[None, :]
            v = tl.load(src_ptr + ts[:, None].to(tl.int64) * H + hs[None, :], mask=m)
            tl.store(dst + rows[:, None] * H + hs[None, :], v, mask=m)
    if HAS_GATES:
        for j0 in range(pid * BT, TK, NSEND * BT):
            js = j0 + tl.arange(0, BT)
            d = tl.load(dest_ptr + js, mask=js < TK, other=-1)
            ok = (d >= 0) & (d != me)
            q = tl.load(q_ptr + js, mask=ok, other=0)
            sl = tl.load(slot_ptr + js, mask=ok, other=0)
            g = tl.load(gsrc_ptr + sl, mask=ok, other=0.0).to(tl.float32)
            base = tl.load(gates_tab + tl.maximum(d, 0), mask=ok, other=0).to(tl.pointer_type(tl.float32))
            tl.store(base + me * TK + q, g, mask=ok)


@triton.jit
def _segment_tile(cum_ptr, mtseg_ptr, offs_ptr, seg_src_ptr, seg_exp_ptr, seg_q0_ptr, t, n_tiles_n, N,
                  BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    """Tile t of the (source, expert) segment tiles -> its segment, n-tile, the segment's first and end row, the
    tile's first row, its rows and columns (with their masks), source rank, local expert and the rows'
    positions q in the source's rowmap block."""
    seg, first_mt, mt, nt = triton_backend._grouped_tile(cum_ptr, mtseg_ptr, t, n_tiles_n, GROUP_M)
    lo, hi = triton_backend._segment_rows(offs_ptr, seg)
    row0 = lo + (mt - first_mt) * BM
    rows = row0 + tl.arange(0, BM)
    cols = nt * BN + tl.arange(0, BN)
    s = tl.load(seg_src_ptr + seg)
    e = tl.load(seg_exp_ptr + seg)
    q = tl.load(seg_q0_ptr + seg) + (rows - lo)
    return seg, nt, lo, hi, row0, rows, rows < hi, cols, cols < N, s, e, q


@triton.jit
def _dispatch_gemm_kernel(
    # send side
    src_ptr, pos_ptr, recv_tab, dest_ptr, q_ptr, slot_ptr, gsrc_ptr, gates_tab, sig_tab, done_ptr,
    # gemm side
    recv_ptr, rowmap_ptr, gates_ptr, w_ptr, w_desc, y_ptr, save_ptr,
    offs_ptr, cum_ptr, mtseg_ptr, seg_src_ptr, seg_exp_ptr, seg_q0_ptr, sig_ptr, epoch_ptr, claim_ptr,
    me, T, H, TK, N, NSEG, SLOT,
    swe, swk, swn,
    EP: tl.constexpr, NSEND, NP, BT: tl.constexpr, BH: tl.constexpr, HAS_GATES: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    ROLE: tl.constexpr, SAVE_A: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, WIDE: tl.constexpr,
    DESC_W: tl.constexpr, W_KMAJOR: tl.constexpr,
):  # fmt: skip
    # The first NSEND programs push this rank's rows, then all NP programs take GEMM tiles in order (local
    # sources first) from the claim counter: the senders join the GEMM once their rows are out, where a
    # static split left their SMs idle for the whole GEMM (NSEND of NP: 12% of an H200's SMs).
    pid = tl.program_id(0)
    if ROLE & 1:
        if pid < NSEND:
            _push_rows(pid, src_ptr, pos_ptr, recv_tab, dest_ptr, q_ptr, slot_ptr, gsrc_ptr, gates_tab, me, T, H, TK,
                       EP, NSEND, BT, BH, HAS_GATES)  # fmt: skip
            _arrive_and_signal(done_ptr, sig_tab, epoch_ptr, SLOT, me, EP, NSEND)
    if ROLE & 2:
        target = tl.load(epoch_ptr + SLOT) + 1
        n_tiles_n = tl.cdiv(N, BN)
        # not the tail segment (NSEG - 1): the rows past the received ones are left as they are; nothing reads
        # them (the GEMMs, dW and the GLU between the fused ops stop at the plan's segments and row count)
        total = tl.load(cum_ptr + NSEG - 2) * n_tiles_n
        t = tl.atomic_add(claim_ptr + SLOT, 1)
        while t < total:
            seg, nt, lo, hi, _, rows, row_ok, cols, col_ok, s, e, q = _segment_tile(
                cum_ptr, mtseg_ptr, offs_ptr, seg_src_ptr, seg_exp_ptr, seg_q0_ptr, t, n_tiles_n, N, BM, BN, GROUP_M
            )
            # this rank's own rows are read in place (their rowmap rows are token rows of src) and need no
            # wait: the local tiles, which come first, start at once while the senders push the rest
            local = s == me
            if not local:
                _wait_signal(sig_ptr + SLOT * EP + s, target)
            a_src = tl.where(local, src_ptr, recv_ptr)
            mi = (s * TK + q).to(tl.int64)
            rr = _index(tl.load(rowmap_ptr + mi * 2, mask=row_ok, other=0), WIDE)
            if HAS_GATES:  # a local slot's gate from the gates themselves (by its slot id), a peer's as sent
                mine = row_ok & ((rows * 0 + s) == me)
                sl = tl.load(rowmap_ptr + mi * 2 + 1, mask=mine, other=0)
                g = tl.where(
                    mine,
                    tl.load(gsrc_ptr + sl, mask=mine, other=0.0).to(tl.float32),
                    tl.load(gates_ptr + mi, mask=row_ok & ((rows * 0 + s) != me), other=0.0),
                )
            if SAVE_A:  # the gathered (and scaled) rows, once per m-tile, for the weight gradient
                if nt == 0:
                    for k0 in range(0, H, BK):
                        ks = k0 + tl.arange(0, BK)
                        am = row_ok[:, None] & (ks < H)[None, :]
                        a = tl.load(a_src + rr[:, None] * H + ks[None, :], mask=am, other=0.0)
                        if HAS_GATES:
                            a = (a.to(tl.float32) * g[:, None]).to(recv_ptr.dtype.element_ty)
                        tl.store(save_ptr + _index(rows, WIDE)[:, None] * H + ks[None, :], a, mask=am)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, H, BK):
                ks = k0 + tl.arange(0, BK)
                k_ok = ks < H
                a = tl.load(a_src + rr[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                            other=0.0)  # fmt: skip
                if DESC_W:  # the gathered rows through pointers, the weights through a descriptor
                    b = triton_backend._weight_tile(w_desc, e, k0, nt, H, N, BN, W_KMAJOR)
                else:
                    b = tl.load(w_ptr + e.to(tl.int64) * swe + ks[:, None] * swk + cols[None, :] * swn,
                                mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
                acc = triton_backend._dot(a, b, acc, PRECISION, UPCAST)
            if HAS_GATES:  # (g * a) @ w = g * (a @ w), in float32: scaled inside the k-loop, every A tile went
                acc = acc * g[:, None].to(tl.float32)  # through registers on its way to the tensor cores
            tl.store(y_ptr + _index(rows, WIDE)[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip
            t = tl.atomic_add(claim_ptr + SLOT, 1)


@triton.jit
def _gemm_scatter_kernel(
    a_ptr, w_ptr, a_desc, w_desc, rowmap_ptr, comb_tab, sig_tab, done_ptr, epoch_ptr,
    offs_ptr, cum_ptr, mtseg_ptr, seg_src_ptr, seg_exp_ptr, seg_q0_ptr,
    me, TK, Kd, N, NSEG, SLOT,
    sam, sak, swe, swk, swn,
    EP: tl.constexpr, NP, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, WIDE: tl.constexpr,
    DESC: tl.constexpr, W_KMAJOR: tl.constexpr,
):  # fmt: skip
    """Tiles over the (source, expert) segments; each result row goes to its source rank's comb[slot]. DESC:
    a and the weights are read through tensor descriptors (a tile's rows past its segment read the next
    segment's rows, or the room past the received rows, which may hold anything, or zeros past the buffer:
    an output row depends on its own input row only, and those rows are masked off in the scatter)."""
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(N, BN)
    total = tl.load(cum_ptr + NSEG - 2) * n_tiles_n  # not the tail segment (NSEG - 1): no rows there
    for t in range(pid, total, NP):
        _, nt, _, _, row0, rows, row_ok, cols, col_ok, s, e, q = _segment_tile(
            cum_ptr, mtseg_ptr, offs_ptr, seg_src_ptr, seg_exp_ptr, seg_q0_ptr, t, n_tiles_n, N, BM, BN, GROUP_M
        )
        slot = _index(tl.load(rowmap_ptr + (s * TK + q).to(tl.int64) * 2 + 1, mask=row_ok, other=0), WIDE)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, Kd, BK):
            if DESC:
                a = a_desc.load([row0, k0])
                b = triton_backend._weight_tile(w_desc, e, k0, nt, Kd, N, BN, W_KMAJOR)
            else:
                ks = k0 + tl.arange(0, BK)
                k_ok = ks < Kd
                a = tl.load(a_ptr + _index(rows, WIDE)[:, None] * sam + ks[None, :] * sak,
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
                b = tl.load(w_ptr + e.to(tl.int64) * swe + ks[:, None] * swk + cols[None, :] * swn,
                            mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
            acc = triton_backend._dot(a, b, acc, PRECISION, UPCAST)
        dst = _ptr(comb_tab, s, a_ptr)
        tl.store(dst + slot[:, None] * N + cols[None, :], acc.to(a_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip
    _arrive_and_signal(done_ptr, sig_tab, epoch_ptr, SLOT, me, EP, NP)


@triton.jit
def _combine_kernel(
    src_ptr, w_ptr, valid_ptr, out_ptr, copy_ptr, H,
    K: tl.constexpr, BH: tl.constexpr, HAS_W: tl.constexpr, COPY: tl.constexpr,
):  # fmt: skip
    """out[t] = sum over valid slots k of (w[t, k] *) src[t*K + k], in float32. Slots routed nowhere are
    skipped, not multiplied by zero: their rows hold whatever an earlier call left (possibly NaN). COPY: the
    valid rows also go to copy[t*K + k], as they are read."""
    t = tl.program_id(0)
    hs = tl.program_id(1) * BH + tl.arange(0, BH)
    m = hs < H
    acc = tl.zeros((BH,), dtype=tl.float32)
    for k in range(K):
        if tl.load(valid_ptr + t * K + k) != 0:
            row = tl.load(src_ptr + (t * K + k).to(tl.int64) * H + hs, mask=m, other=0.0)
            if COPY:
                tl.store(copy_ptr + (t * K + k).to(tl.int64) * H + hs, row, mask=m)
            row = row.to(tl.float32)
            if HAS_W:
                row = row * tl.load(w_ptr + t * K + k).to(tl.float32)
            acc += row
    tl.store(out_ptr + t.to(tl.int64) * H + hs, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gate_grad_kernel(dout_ptr, y_ptr, valid_ptr, dw_ptr, H, K: tl.constexpr, BH: tl.constexpr):
    """dw[t, k] = <dout[t], y[t*K + k]> for valid slots (float32 accumulation), 0 elsewhere."""
    t = tl.program_id(0)
    for k in range(K):
        acc = tl.zeros((BH,), dtype=tl.float32)
        if tl.load(valid_ptr + t * K + k) != 0:
            for h0 in range(0, H, BH):
                hs = h0 + tl.arange(0, BH)
                m = hs < H
                d = tl.load(dout_ptr + t.to(tl.int64) * H + hs, mask=m, other=0.0).to(tl.float32)
                y = tl.load(y_ptr + (t * K + k).to(tl.int64) * H + hs, mask=m, other=0.0).to(tl.float32)
                acc += d * y
        tl.store(dw_ptr + t * K + k, tl.sum(acc, 0).to(dw_ptr.dtype.element_ty))


def _block_h(device: torch.device) -> int:
    return 1024 if device.type == "cuda" else 16


def combine_slots(
    src_TKH: torch.Tensor, valid_TK: torch.Tensor, w_TK: torch.Tensor | None, copy_TKH: torch.Tensor | None = None
) -> torch.Tensor:
    """out[t] = sum over valid k of (w[t, k] *) src[t, k] (float32 accumulation), in src's dtype; with copy_TKH,
    the valid slots' rows are copied there on the way (the other rows are left as they are)."""
    T, K, H = src_TKH.shape
    out = torch.empty(T, H, device=src_TKH.device, dtype=src_TKH.dtype)
    if T == 0:
        return out
    BH = _block_h(src_TKH.device)
    valid = valid_TK.contiguous()
    w = w_TK.contiguous() if w_TK is not None else valid
    _combine_kernel[(T, triton.cdiv(H, BH))](
        src_TKH, w, valid, out, copy_TKH if copy_TKH is not None else out, H,
        K=K, BH=BH, HAS_W=w_TK is not None, COPY=copy_TKH is not None,
    )  # fmt: skip
    return out


def gate_grad(dout_TH: torch.Tensor, y_TKH: torch.Tensor, valid_TK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    T, K, H = y_TKH.shape
    dw = torch.empty(T, K, device=y_TKH.device, dtype=dtype)
    if T == 0:
        return dw
    _gate_grad_kernel[(T,)](dout_TH.contiguous(), y_TKH, valid_TK.contiguous(), dw, H, K=K, BH=_block_h(y_TKH.device))
    return dw


# ---------------------------------------------------------------------------------------------------------
# plans


@dataclass
class Plan:
    """What a layer's forward learns about routing, kept for the second op and the backward: views of one int32
    tensor (`packed`, what flows through the graph between the ops), which the routing kernels fill in place,
    so that handing the plan on costs neither a copy nor a cast."""

    packed: torch.Tensor
    rows: torch.Tensor  # [1]: the rows this rank computes (received and its own), the first of `packed`
    # source side (this rank's tokens)
    valid_TK: torch.Tensor  # [T, K]: 1 where the slot is routed to some expert, else 0
    pos_PT: torch.Tensor  # [ep, T]: receive row of token t in rank d's block of this rank, -1 if none
    dest_J: torch.Tensor  # [T*K]: destination rank of sorted slot j (-1: dropped)
    q_J: torch.Tensor  # position of sorted slot j among this rank's slots to its destination
    slot_J: torch.Tensor  # slot id t*K+k of sorted slot j
    # receiver side (rows this rank computes)
    rowmap: torch.Tensor  # [ep*T*K*2]: copy of the rowmap of this call
    offs: torch.Tensor  # [NSEG]: segment end rows (last: S, the tail of the worst case's room, never computed)
    cum: torch.Tensor  # [NSEG]: cumulative m-tiles per segment (for the tile size BM)
    mt_seg: torch.Tensor  # [ceil(S / BM) + NSEG]: the segment of every m-tile (as `triton_backend.tile_plan`)
    seg_src: torch.Tensor  # [NSEG]
    seg_exp: torch.Tensor  # [NSEG]
    seg_q0: torch.Tensor  # [NSEG]
    bm: int

    FIELDS = (
        "rows", "valid_TK", "pos_PT", "dest_J", "q_J", "slot_J", "rowmap", "offs", "cum", "mt_seg", "seg_src",
        "seg_exp", "seg_q0",
    )  # fmt: skip

    def pack(self) -> torch.Tensor:
        return self.packed

    def segment_tables(self) -> tuple[torch.Tensor, ...]:
        """(offs, cum, mt_seg, seg_src, seg_exp, seg_q0): what the Gluon fused GEMMs take of the plan."""
        return self.offs, self.cum, self.mt_seg, self.seg_src, self.seg_exp, self.seg_q0

    @staticmethod
    def sizes(ep: int, T: int, K: int, E_l: int, bm: int) -> list[int]:
        nseg = ep * E_l + 1
        nmt = triton.cdiv(ep * T * K, bm) + nseg
        return [1, T * K, ep * T, T * K, T * K, T * K, ep * T * K * 2, nseg, nseg, nmt, nseg, nseg, nseg]

    @staticmethod
    def view(packed: torch.Tensor, ep: int, T: int, K: int, E_l: int, bm: int) -> Plan:
        sizes = Plan.sizes(ep, T, K, E_l, bm)
        if packed.dtype != torch.int32 or packed.shape != (sum(sizes),):
            raise ValueError(
                f"moecc: a fused expert-parallel plan is int32 [{sum(sizes)}] for ep={ep}, T={T}, K={K}, "
                f"E_l={E_l}, BM={bm}; got {packed.dtype} {list(packed.shape)}: pass the plan ep_dispatch_gemm "
                f"returned for this layer"
            )
        f = dict(zip(Plan.FIELDS, torch.split(packed, sizes), strict=True))
        f["valid_TK"] = f["valid_TK"].view(T, K)
        f["pos_PT"] = f["pos_PT"].view(ep, T)
        return Plan(packed=packed, bm=bm, **f)

    @staticmethod
    def empty(ep: int, T: int, K: int, E_l: int, bm: int, device: torch.device) -> Plan:
        packed = torch.empty(sum(Plan.sizes(ep, T, K, E_l, bm)), dtype=torch.int32, device=device)
        return Plan.view(packed, ep, T, K, E_l, bm)


def unpack_plan(buf: EPBuffers, packed: torch.Tensor, dtype: torch.dtype) -> Plan:
    """The plan a forward call packed, for tiles of the height this device and dtype use."""
    return Plan.view(packed, buf.ep, buf.T, buf.K, buf.E_l, _gemm_config(buf.device, dtype)[0])


def plan_numel(ep: int, T: int, K: int, E_l: int, device: torch.device, dtype: torch.dtype) -> int:
    """The packed plan's length, for tiles of the height this device and dtype use."""
    return sum(Plan.sizes(ep, T, K, E_l, _gemm_config(device, dtype)[0]))


@triton.jit
def _route_hits(idx_ptr, key_ptr, valid_ptr, t0, t_end, K, E, E_l, d, STORE: tl.constexpr, BT: tl.constexpr,
                BK: tl.constexpr):  # fmt: skip
    """For tokens [t0, t0 + BT) below t_end: whether each sends a slot to rank d; STORE: also each slot's sort
    key (its expert, E where it is routed nowhere) and whether it is routed."""
    ts = t0 + tl.arange(0, BT)
    ks = tl.arange(0, BK)
    m = (ts < t_end)[:, None] & (ks < K)[None, :]
    at = ts[:, None].to(tl.int64) * K + ks[None, :]
    e = tl.load(idx_ptr + at, mask=m, other=-1).to(tl.int64)
    ok = (e >= 0) & (e < E)
    if STORE:
        tl.store(key_ptr + at, tl.where(ok, e, E).to(tl.int32), mask=m)
        tl.store(valid_ptr + at, ok.to(tl.int32), mask=m)
    return ts, tl.max(tl.where(ok & (e // E_l == d), 1, 0), axis=1).to(tl.int32)


@triton.jit
def _route_scan_kernel(
    idx_ptr, key_ptr, valid_ptr, pos_ptr, chain_ptr, epoch_ptr, T, K, E, E_l, SPAN,
    EP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """Each slot's sort key and whether it is routed; and pos[d, t], token t's place among the tokens this
    rank sends to rank d (-1: none of its slots goes there). A chained scan over programs that each take SPAN
    consecutive tokens: a program counts its tokens per destination, waits for the count of all tokens before
    its span (published by the program before it), publishes its own, then writes pos. A published word is
    (call << 32) + count, the call numbered by the META counter, so the words are never reset: an older call's
    words are smaller. (One program over all tokens took 0.3 ms for 16384 tokens on an H200.)"""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    t_lo = pid * SPAN
    t_hi = tl.minimum(t_lo + SPAN, T)
    stamp = (tl.load(epoch_ptr + 0) + 1) * 4294967296  # slot META = 0
    for d in tl.static_range(EP):
        n = tl.sum(tl.zeros([BT], dtype=tl.int32), 0)
        for t0 in range(t_lo, t_hi, BT):
            _, hit = _route_hits(idx_ptr, key_ptr, valid_ptr, t0, t_hi, K, E, E_l, d, d == 0, BT, BK)
            n += tl.sum(hit, 0)
        before = stamp * 0
        if pid > 0:
            w = tl.atomic_add(chain_ptr + d * nprog + pid - 1, 0, sem="acquire", scope="gpu")
            while w < stamp:
                w = tl.atomic_add(chain_ptr + d * nprog + pid - 1, 0, sem="acquire", scope="gpu")
            before = w - stamp
        tl.atomic_xchg(chain_ptr + d * nprog + pid, stamp + before + n, sem="release", scope="gpu")
        carry = before.to(tl.int32)
        for t0 in range(t_lo, t_hi, BT):
            ts, hit = _route_hits(idx_ptr, key_ptr, valid_ptr, t0, t_hi, K, E, E_l, d, False, BT, BK)
            c = tl.cumsum(hit, 0) + carry
            tl.store(pos_ptr + d * T + ts, tl.where(hit > 0, c - 1, -1), mask=ts < t_hi)
            carry += tl.sum(hit, 0)


@triton.jit
def _lower_bound(a_ptr, n, target, LOG: tl.constexpr):
    """Per lane, the first i in [0, n) with a[i] >= target (n if none); a sorted."""
    lo = tl.zeros_like(target)
    hi = lo + n
    for _ in tl.static_range(LOG):
        mid = (lo + hi) // 2
        inside = mid < hi
        go = inside & (tl.load(a_ptr + mid, mask=inside, other=0) < target)
        lo = tl.where(go, mid + 1, lo)
        hi = tl.where(go, hi, mid)
    return lo


@triton.jit
def _route_slots_kernel(
    key_ptr, order_ptr, pos_ptr, dest_ptr, q_ptr, row_ptr, slot_ptr, counts_ptr, TK, T, K, E, E_l, me,
    LOG: tl.constexpr, BJ: tl.constexpr, BE: tl.constexpr,
):  # fmt: skip
    """Per slot j in expert order (key sorted, `order` its slot ids, copied to `slot`): its destination rank
    (-1: routed nowhere), its place q among this rank's slots to that rank, its token's receive row there;
    program 0 also the slots per expert. Where a rank's, or an expert's, slots begin among the sorted keys is
    a binary search."""
    pid = tl.program_id(0)
    js = pid * BJ + tl.arange(0, BJ)
    ok = js < TK
    key = tl.load(key_ptr + js, mask=ok, other=E)
    dest = tl.where(key < E, key // E_l, -1)
    dc = tl.maximum(dest, 0)
    start = _lower_bound(key_ptr, TK, dc * E_l, LOG)
    slot = tl.load(order_ptr + js, mask=ok, other=0)
    tok = slot // K
    # a slot this rank computes itself is read in place: its row is its token's (no copy, no wait)
    row = tl.where(dest == me, tok, me * T + tl.load(pos_ptr + dc.to(tl.int64) * T + tok, mask=ok, other=0))
    tl.store(dest_ptr + js, dest.to(tl.int32), mask=ok)
    tl.store(q_ptr + js, (js - start).to(tl.int32), mask=ok)
    tl.store(row_ptr + js, row.to(tl.int32), mask=ok)
    tl.store(slot_ptr + js, slot.to(tl.int32), mask=ok)
    if pid == 0:
        for e0 in range(0, E, BE):
            es = e0 + tl.arange(0, BE)
            c = _lower_bound(key_ptr, TK, es + 1, LOG) - _lower_bound(key_ptr, TK, es, LOG)
            tl.store(counts_ptr + es, c.to(tl.int32), mask=es < E)


def _source_plan(buf: EPBuffers, idx_TK: torch.Tensor, plan: Plan) -> dict[str, torch.Tensor]:
    """This rank's slots, sorted by expert (stable), and where each goes, into the plan's source fields: two
    kernels around one sort (the same plan in torch ops took about forty launches, each with its host time).
    Returns what only the meta push needs: each sorted slot's receive row at its destination, slots per
    expert."""
    ep, me, T, K, E_l = buf.ep, buf.me, buf.T, buf.K, buf.E_l
    E, TK, dev = ep * E_l, T * K, idx_TK.device
    row_J = torch.empty(TK, device=dev, dtype=torch.int32)
    if TK == 0:
        return {"row_J": row_J, "counts_E": torch.zeros(E, device=dev, dtype=torch.int32)}
    counts_E = torch.empty(E, device=dev, dtype=torch.int32)  # program 0 of the second kernel writes all
    key = torch.empty(TK, device=dev, dtype=torch.int32)
    gpu = dev.type == "cuda"
    BT = min(1024 if gpu else 16, triton.next_power_of_2(T))
    # every program of the chain resident at once (each waits for the one before it): at most one per SM
    nprog = min(triton.cdiv(T, BT), _programs(dev)[0], CHAIN_PROGRAMS)
    span = triton.cdiv(triton.cdiv(T, BT), nprog) * BT
    _route_scan_kernel[(triton.cdiv(T, span),)](
        idx_TK.contiguous(), key, plan.valid_TK, plan.pos_PT, buf.chain, buf.epoch, T, K, E, E_l, span, EP=ep,
        BT=BT, BK=triton.next_power_of_2(K),
    )  # fmt: skip
    key_sorted, order = torch.sort(key, stable=True)
    BJ = 1024 if gpu else 64
    _route_slots_kernel[(triton.cdiv(TK, BJ),)](
        key_sorted, order, plan.pos_PT, plan.dest_J, plan.q_J, row_J, plan.slot_J, counts_E, TK, T, K, E, E_l, me,
        LOG=max(1, TK.bit_length()) + 1, BJ=BJ, BE=min(1024, triton.next_power_of_2(E)),
    )  # fmt: skip
    return {"row_J": row_J, "counts_E": counts_E}


@triton.jit
def _receiver_plan_kernel(
    counts_ptr, rowmap_in_ptr, rowmap_ptr, rows_ptr, offs_ptr, cum_ptr, mtseg_ptr, seg_src_ptr, seg_exp_ptr,
    seg_q0_ptr, me, E_l, S, NRM, NMT,
    EP: tl.constexpr, EP2: tl.constexpr, BE: tl.constexpr, BM: tl.constexpr, BLOCK: tl.constexpr,
    BCOPY: tl.constexpr,
):  # fmt: skip
    """The receiver side of the plan from the counts the sources announced (counts[s, e]: rows of source s
    for local expert e). Segments (s', e) in that order, s = (me + s') mod EP, so local rows come first, then
    the tail up to S (the room no rows took); each program recomputes them (EP x E_l counts) and writes the
    segment of its BLOCK m-tiles; program 0 the row count and the segment tables; all programs together a copy
    of the rowmap."""
    pid = tl.program_id(0)
    sp = tl.arange(0, EP2)
    es = tl.arange(0, BE)
    ok = (sp < EP)[:, None] & (es < E_l)[None, :]
    src = (me + sp) % EP
    c = tl.load(counts_ptr + src[:, None] * E_l + es[None, :], mask=ok, other=0)
    q0 = tl.cumsum(c, 1) - c  # the segment's first row among its source's rows (the source's rowmap block)
    per_src = tl.sum(c, 1)
    end = (tl.cumsum(per_src, 0) - per_src)[:, None] + q0 + c
    tiles = (c + BM - 1) // BM
    tiles_src = tl.sum(tiles, 1)
    cum = (tl.cumsum(tiles_src, 0) - tiles_src)[:, None] + tl.cumsum(tiles, 1)
    rows = tl.sum(per_src, 0)
    tail_cum = tl.sum(tiles_src, 0) + (S - rows + BM - 1) // BM
    if pid == 0:
        tl.store(rows_ptr, rows)
        at = sp[:, None] * E_l + es[None, :]
        tl.store(offs_ptr + at, end, mask=ok)
        tl.store(cum_ptr + at, cum, mask=ok)
        tl.store(seg_src_ptr + at, src[:, None] + es[None, :] * 0, mask=ok)
        tl.store(seg_exp_ptr + at, es[None, :] + sp[:, None] * 0, mask=ok)
        tl.store(seg_q0_ptr + at, q0, mask=ok)
        tail = EP * E_l
        tl.store(offs_ptr + tail, S)
        tl.store(cum_ptr + tail, tail_cum)
        tl.store(seg_src_ptr + tail, 0)
        tl.store(seg_exp_ptr + tail, 0)
        tl.store(seg_q0_ptr + tail, 0)
    mts = pid * BLOCK + tl.arange(0, BLOCK)
    before = (cum[None, :, :] <= mts[:, None, None]) & ok[None, :, :]
    seg = tl.sum(tl.sum(before.to(tl.int32), 2), 1) + (tail_cum <= mts).to(tl.int32)
    tl.store(mtseg_ptr + mts, seg, mask=mts < NMT)
    for r0 in range(pid * BCOPY, NRM, tl.num_programs(0) * BCOPY):
        rs = r0 + tl.arange(0, BCOPY)
        tl.store(rowmap_ptr + rs, tl.load(rowmap_in_ptr + rs, mask=rs < NRM), mask=rs < NRM)


def _receiver_plan(buf: EPBuffers, plan: Plan) -> None:
    """The plan's receiver fields, in one launch, from the counts in this rank's buffer."""
    ep, E_l = buf.ep, buf.E_l
    nmt, block = plan.mt_seg.shape[0], 16
    _receiver_plan_kernel[(triton.cdiv(nmt, block),)](
        buf.local["counts"], buf.local["rowmap"], plan.rowmap, plan.rows, plan.offs, plan.cum, plan.mt_seg,
        plan.seg_src, plan.seg_exp, plan.seg_q0, buf.me, E_l, ep * buf.T * buf.K, plan.rowmap.shape[0], nmt,
        EP=ep, EP2=max(2, triton.next_power_of_2(ep)), BE=max(16, triton.next_power_of_2(E_l)), BM=plan.bm, BLOCK=block,
        BCOPY=1024 if buf.device.type == "cuda" else 64,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# launch parameters


def _programs(device: torch.device, kernel: str = "ep_dispatch_gemm") -> tuple[int, int]:
    """(all programs, send programs) of a fused GEMM kernel (`triton_backend.PROGRAMS_PER_SM` per SM)."""
    if device.type == "cuda":
        sms = triton_backend.cuda_sms(device)
        return sms * triton_backend.PROGRAMS_PER_SM.get(kernel, 1), max(8, sms // 8)
    return 4, 2


def _gemm_config(device: torch.device, dtype: torch.dtype, kernel: str = "ep_dispatch_gemm") -> tuple[int, ...]:
    """(BM, BN, BK, warps, stages, m-tiles per L2 group) of a fused GEMM kernel: `ep_dispatch_gemm` (the
    gathering GEMM, forward GEMM 1 and the gated dX of GEMM 2) or `ep_gemm_scatter` (forward GEMM 2 and the
    dX of GEMM 1). The plan's m-tiles are BM rows high for both, so both must use the same BM."""
    cfg = triton_backend._config(kernel, device, dtype)
    if kernel != "ep_dispatch_gemm":
        bm = triton_backend._config("ep_dispatch_gemm", device, dtype)[0]
        if cfg[0] != bm:
            raise ValueError(
                f"moecc: triton_backend.CONFIGS[{kernel!r}] has BM {cfg[0]} and CONFIGS['ep_dispatch_gemm'] BM "
                f"{bm}; the fused plan's m-tiles serve both kernels: give them the same BM"
            )
    return cfg


def _group_m(w_EKN: torch.Tensor, kernel: str) -> int:
    """m-tiles per L2 group in the fused GEMMs: the kernel's configured grouping where one expert's weight
    matrix does not fit in half the L2 cache, else 1. Without it, a wave of programs sweeps all n-tiles of one
    m-tile and so reads the whole matrix from DRAM once per m-tile: 16 times per expert, 30 GB per call, for
    the Mixtral-like GEMM 1 (4096 x 28672, 2048 rows an expert at one rank)."""
    group_m = _gemm_config(w_EKN.device, w_EKN.dtype, kernel)[5]
    big = triton_backend.past_half_l2(w_EKN.shape[1] * w_EKN.shape[2] * w_EKN.element_size(), w_EKN.device)
    return group_m if big else 1


def _wide(*operands: torch.Tensor) -> bool:
    """Whether offsets into these operands need 64 bits (every buffer of one rank; peers' are alike)."""
    return any(t.numel() >= 2**31 for t in operands)


# On Hopper the gathering and the scattering GEMM run as the warp-specialised Gluon kernels (`gluon_gemm`)
# where they take the operands (each counted as fused_gemm.gluon), else as `_dispatch_gemm_kernel` and
# `_gemm_scatter_kernel`; MOECC_GLUON=0 keeps the Triton ones.
GLUON_DISPATCH = True
GLUON_SCATTER = True


def _dispatch_refusal(
    src_TH: torch.Tensor, w_EKN: torch.Tensor, bm: int, device: torch.device | None = None
) -> str | None:
    """Why the gathering GEMM would not run as the Gluon kernel (None: it would)."""
    if not GLUON_DISPATCH:
        return "switched off (triton_ep.GLUON_DISPATCH)"
    return gluon_gemm.dispatch_supported(src_TH, w_EKN, bm, device)


def _scatter_refusal(
    a_SK: torch.Tensor, w_EKN: torch.Tensor, bm: int, device: torch.device | None = None
) -> str | None:
    """Why the scattering GEMM would not run as the Gluon kernel (None: it would)."""
    if not GLUON_SCATTER:
        return "switched off (triton_ep.GLUON_SCATTER)"
    return gluon_gemm.supported(a_SK, w_EKN, bm, device)


def kernel_choices(
    device: torch.device, dtype: torch.dtype, T: int, K: int, ep: int, H: int, w1_EKN: torch.Tensor,
    w2_EKN: torch.Tensor,
) -> dict[str, str]:  # fmt: skip
    """Which kernel each GEMM of a fused layer will run on `device` ("gluon", or "triton: why not"), for the
    dumps. The choice is made per call from the operands themselves; this makes it from meta tensors of their
    shapes, strides and dtype (T tokens a rank, top-K, `ep` ranks, hidden H; w1/w2: the local experts'
    weights, real, fake or meta). What ran is counted: fused_gemm.gluon, grouped_mm_wgrad.gluon."""

    def meta(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")

    def rows(n: int, width: int) -> torch.Tensor:
        return torch.empty(n, width, dtype=dtype, device="meta")

    w1, w2 = meta(w1_EKN), meta(w2_EKN)
    E_l, N1, F = w1.shape[0], w1.shape[2], w2.shape[1]
    S = ep * T * K  # the receive room's rows
    bm = _gemm_config(device, dtype)[0]

    def wgrad(a_SK: torch.Tensor, dy_SN: torch.Tensor, w: torch.Tensor) -> str | None:  # as `_wgrad` orders them
        if torch_backend.transposed_weight(w):
            a_SK, dy_SN = dy_SN, a_SK
        return triton_backend.wgrad_refusal(a_SK, dy_SN, E_l, ep, device)

    why = {
        "dispatch + GEMM 1": _dispatch_refusal(rows(T, H), w1, bm, device),
        "GEMM 2 + combine": _scatter_refusal(rows(S, F), w2, bm, device),
        "dX of GEMM 2 (gated dispatch)": _dispatch_refusal(rows(T, H), w2.transpose(1, 2), bm, device),
        "dX of GEMM 1 + combine": _scatter_refusal(rows(S, N1), w1.transpose(1, 2), bm, device),
        "dW of GEMM 1": wgrad(rows(S, H), rows(S, N1), w1),
        "dW of GEMM 2": wgrad(rows(S, F), rows(S, H), w2),
    }
    return {k: "gluon" if v is None else f"triton: {v}" for k, v in why.items()}


def _dispatch_gemm(
    buf: EPBuffers,
    src_TH: torch.Tensor,
    plan: Plan,
    w_EKN: torch.Tensor,
    slot: int,
    gates_TK: torch.Tensor | None,
    save_a: bool,
) -> Flow:
    """Push src rows (and the gates of the slots) to their destinations and run the gathering GEMM over the
    rows this rank receives: y[r] = gate[r] * recv[row of r] @ w[e(r)]. Returns (y_SN, saved A rows or None)."""
    ep, me, T, K, H = buf.ep, buf.me, buf.T, buf.K, buf.H
    S, N, TK = ep * T * K, w_EKN.shape[2], T * K
    BM, BN, BK, warps, stages, _ = _gemm_config(buf.device, src_TH.dtype, "ep_dispatch_gemm")
    assert BM == plan.bm, (BM, plan.bm)
    NP, NSEND = _programs(buf.device)
    y_SN = torch.empty(S, N, device=buf.device, dtype=src_TH.dtype)
    save = torch.empty(S, H, device=buf.device, dtype=src_TH.dtype) if save_a else y_SN
    nseg = plan.offs.shape[0]
    gsrc = gates_TK.contiguous() if gates_TK is not None else plan.q_J  # unused without gates
    src_TH = src_TH.contiguous()
    gluon = _dispatch_refusal(src_TH, w_EKN, plan.bm) is None
    # else the weights through a descriptor where the plain grouped GEMM reads them so (the gathered rows
    # cannot be)
    wd = None if gluon else triton_backend.weight_descriptor(w_EKN, BN, BK)
    COUNTERS["fused_gemm.gluon" if gluon else "fused_gemm.descriptor" if wd else "fused_gemm.pointer"] += 1
    group_m = _group_m(w_EKN, "ep_dispatch_gemm")

    def launch(role: int) -> None:
        if role & ROLE_GEMM:
            buf.claim[slot : slot + 1].zero_()
        if gluon:
            gluon_gemm.dispatch_gemm(
                role,
                (src_TH, plan.pos_PT, buf.tables["recv"], plan.dest_J, plan.q_J, plan.slot_J, gsrc,
                 buf.tables["gates"], buf.tables["sig"], buf.done),
                (buf.local["recv"], plan.rowmap, buf.local["gates"], y_SN, save, buf.local["sig"], buf.epoch,
                 buf.claim),
                w_EKN, plan.segment_tables(), me, T, TK, nseg, slot, ep, NSEND, gates_TK is not None, save_a,
                group_m, NP,
            )  # fmt: skip
            return
        _dispatch_gemm_kernel[(NP,)](
            src_TH, plan.pos_PT, buf.tables["recv"], plan.dest_J, plan.q_J, plan.slot_J, gsrc, buf.tables["gates"],
            buf.tables["sig"], buf.done,
            buf.local["recv"], plan.rowmap, buf.local["gates"], w_EKN, wd[0] if wd else None, y_SN, save,
            *plan.segment_tables(), buf.local["sig"], buf.epoch,
            buf.claim,
            me, T, H, TK, N, nseg, slot,
            w_EKN.stride(0), w_EKN.stride(1), w_EKN.stride(2),
            EP=ep, NSEND=NSEND, NP=NP, BT=16 if buf.device.type != "cuda" else 32,
            BH=16 if buf.device.type != "cuda" else 256, HAS_GATES=gates_TK is not None,
            BM=BM, BN=BN, BK=BK, GROUP_M=group_m, ROLE=role, SAVE_A=save_a,
            WIDE=_wide(buf.local["recv"], y_SN, save), PRECISION=triton_backend._precision(src_TH.dtype),
            UPCAST=triton_backend._upcast(buf.device, src_TH.dtype), DESC_W=wd is not None,
            W_KMAJOR=bool(wd and wd[1]), num_warps=warps, num_stages=stages,
        )  # fmt: skip

    if buf.simulated:
        launch(ROLE_SEND)
        yield
        launch(ROLE_GEMM)
    elif buf.device.type != "cuda":
        # the interpreter runs programs one after another: a sender that went on to claim a GEMM tile would
        # wait for the signal of senders that have not run yet
        launch(ROLE_SEND)
        launch(ROLE_GEMM)
    else:
        launch(ROLE_BOTH)
    buf.tick(slot)
    return y_SN, (save if save_a else None)


def _gemm_scatter(buf: EPBuffers, a_SK: torch.Tensor, w_EKN: torch.Tensor, plan: Plan, slot: int) -> Flow:
    """Result rows a[r] @ w[e(r)] go to comb[slot of r] on their source rank; returns this rank's comb rows
    [T, K, N] once every rank has delivered (not a copy: valid until the next call reuses the buffer)."""
    ep, me, T, K = buf.ep, buf.me, buf.T, buf.K
    N = w_EKN.shape[2]
    BM, BN, BK, warps, stages, _ = _gemm_config(buf.device, a_SK.dtype, "ep_gemm_scatter")
    assert BM == plan.bm, (BM, plan.bm)
    NP, _ = _programs(buf.device, "ep_gemm_scatter")
    nseg = plan.offs.shape[0]
    group_m = _group_m(w_EKN, "ep_gemm_scatter")
    if _scatter_refusal(a_SK, w_EKN, plan.bm) is None:
        gluon_gemm.gemm_scatter(
            a_SK, w_EKN, plan.rowmap, buf.tables["comb"], buf.tables["sig"], buf.done, buf.epoch,
            plan.segment_tables(), me, T * K, nseg, slot, ep, group_m, NP,
        )  # fmt: skip
        COUNTERS["fused_gemm.gluon"] += 1
    else:
        descs = triton_backend._grouped_mm_descriptors(a_SK, w_EKN, BM, BN, BK)
        COUNTERS["fused_gemm.descriptor" if descs else "fused_gemm.pointer"] += 1
        _gemm_scatter_kernel[(NP,)](
            a_SK, w_EKN, *(descs[:2] if descs else (None, None)), plan.rowmap, buf.tables["comb"], buf.tables["sig"],
            buf.done, buf.epoch,
            *plan.segment_tables(),
            me, T * K, a_SK.shape[1], N, nseg, slot,
            a_SK.stride(0), a_SK.stride(1), w_EKN.stride(0), w_EKN.stride(1), w_EKN.stride(2),
            EP=ep, NP=NP, BM=BM, BN=BN, BK=BK, GROUP_M=group_m,
            WIDE=_wide(a_SK, buf.local["comb"]),
            PRECISION=triton_backend._precision(a_SK.dtype), UPCAST=triton_backend._upcast(buf.device, a_SK.dtype),
            DESC=descs is not None, W_KMAJOR=bool(descs and descs[2]), num_warps=warps, num_stages=stages,
        )  # fmt: skip
    yield
    _wait_all_kernel[(1,)](buf.local["sig"], buf.epoch, slot, EP=ep)  # and the tick
    return buf.local["comb"].view(-1)[: T * K * N].view(T, K, N)


def _wgrad(a_SK: torch.Tensor, dy_SN: torch.Tensor, plan: Plan, ep: int, E_l: int, w_EKN: torch.Tensor, scale: float):
    """dw[e] = scale * sum over sources s of a[rows of (s, e)]^T @ dy[rows of (s, e)], laid out like w's
    parameter (dw^T = dy^T a where w is a transposed view), so that no strided copy of the weight gradient
    follows."""
    offs = plan.offs[: ep * E_l]
    if torch_backend.transposed_weight(w_EKN):
        return triton_backend.grouped_mm_wgrad_segments(dy_SN, a_SK, offs, ep, E_l, scale).transpose(1, 2)
    return triton_backend.grouped_mm_wgrad_segments(a_SK, dy_SN, offs, ep, E_l, scale)


# ---------------------------------------------------------------------------------------------------------
# the four flows of a layer (each a generator; see the module docstring)


def dispatch_gemm_forward(buf: EPBuffers, x_TH: torch.Tensor, idx_TK: torch.Tensor, w1_EKN: torch.Tensor) -> Flow:
    """-> (h_SF, x_SH: the gathered rows of x, plan)."""
    plan = Plan.empty(buf.ep, buf.T, buf.K, buf.E_l, _gemm_config(buf.device, x_TH.dtype)[0], buf.device)
    src = _source_plan(buf, idx_TK, plan)
    NP, _ = _programs(buf.device, "ep_push_meta")
    _push_meta_kernel[(NP,)](
        plan.dest_J, plan.q_J, src["row_J"], plan.slot_J, src["counts_E"],
        buf.tables["rowmap"], buf.tables["counts"], buf.tables["sig"], buf.done, buf.epoch,
        buf.me, buf.T * buf.K, buf.E_l, NP, EP=buf.ep, BJ=128 if buf.device.type == "cuda" else 16,
        BE=max(16, triton.next_power_of_2(min(buf.E_l, 1024))),
    )  # fmt: skip
    yield
    _wait_all_kernel[(1,)](buf.local["sig"], buf.epoch, META, EP=buf.ep)  # and the tick
    _receiver_plan(buf, plan)
    h_SF, x_SH = yield from _dispatch_gemm(buf, x_TH, plan, w1_EKN, DATA, None, save_a=True)
    COUNTERS["dispatch_gemm.forward"] += 1
    return h_SF, x_SH, plan


def gemm_combine_forward(buf: EPBuffers, a_SF: torch.Tensor, w2_EKN: torch.Tensor, w_TK: torch.Tensor, plan: Plan):
    """-> (out_TH, y_TKH: the routed slots' expert outputs, kept for the gate gradient; other rows undefined)."""
    comb = yield from _gemm_scatter(buf, a_SF, w2_EKN, plan, COMB)
    # copied out of the buffer (which the next call reuses) by the combine, as it reads the rows
    y_TKH = torch.empty_like(comb)
    out = combine_slots(comb, plan.valid_TK, w_TK, y_TKH)
    COUNTERS["gemm_combine.forward"] += 1
    return out, y_TKH


def gemm_combine_backward(
    buf: EPBuffers, dout_TH: torch.Tensor, a_SF: torch.Tensor, w2_EKN: torch.Tensor, w_TK: torch.Tensor,
    y_TKH: torch.Tensor, plan: Plan, wgrad_scale: float = 1.0,
) -> Flow:  # fmt: skip
    """-> (da_SF, dw2_EKN, dw_TK). dout travels like x did (gates alongside); dX GEMM gathers and scales.
    dw2 is multiplied by `wgrad_scale` in its kernel."""
    dw_TK = gate_grad(dout_TH, y_TKH, plan.valid_TK, w_TK.dtype)
    da_SF, dy_SH = yield from _dispatch_gemm(buf, dout_TH, plan, w2_EKN.transpose(1, 2), GDATA, w_TK, save_a=True)
    dw2 = _wgrad(a_SF, dy_SH, plan, buf.ep, buf.E_l, w2_EKN, wgrad_scale)
    COUNTERS["gemm_combine.backward"] += 1
    return da_SF, dw2, dw_TK


def dispatch_gemm_backward(
    buf: EPBuffers, dh_SF: torch.Tensor, x_SH: torch.Tensor, w1_EKN: torch.Tensor, plan: Plan,
    wgrad_scale: float = 1.0,
) -> Flow:  # fmt: skip
    """-> (dx_TH, dw1_EKN). dX GEMM scatters back to the sources like the combine did; dw1 is multiplied by
    `wgrad_scale` in its kernel."""
    dh_SF = dh_SF.contiguous()
    comb = yield from _gemm_scatter(buf, dh_SF, w1_EKN.transpose(1, 2), plan, GCOMB)
    dw1 = _wgrad(x_SH, dh_SF, plan, buf.ep, buf.E_l, w1_EKN, wgrad_scale)
    dx = combine_slots(comb, plan.valid_TK, None)
    COUNTERS["dispatch_gemm.backward"] += 1
    return dx, dw1
