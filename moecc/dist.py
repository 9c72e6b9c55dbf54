"""Process groups, the mesh and start-up checks for expert parallelism.

The mesh is dp x ep = world with ep-groups of consecutive ranks (rank = d * ep + i): rank i of an ep-group
holds experts [i * E/ep, (i+1) * E/ep) of every MoE region; the ranks with the same i across ep-groups
hold the same experts (their "expert data-parallel" group).
"""

from __future__ import annotations

import hashlib
import re
import socket
from typing import Any

import torch
import torch.distributed as dist

from moecc.options import MoeccError
from moecc.pass_manager import Mesh

_GROUPS: dict[tuple[int, int], tuple[str, str, int, bool]] = {}
# what gloo and NCCL say when a peer went away or stopped answering
_PEER_FAILURE = re.compile(
    r"connection (reset|closed) by peer|broken pipe|timed out|timeout|communicator was aborted", re.I
)


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_fake() -> bool:
    """Inside an ahead-of-time compile: a fake process group, whose collectives move nothing."""
    return world()[1] > 1 and dist.get_backend() == "fake"


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_ep(world_size: int, expert_counts: list[int], requested: int | None, where: str) -> int:
    """The user's ep, checked; else the largest divisor of the world size that divides every region's experts."""
    if requested is not None:
        if world_size % requested:
            raise MoeccError(
                f"{where}: ep={requested} does not divide the world size {world_size}; "
                f"pick ep in {divisors(world_size)}"
            )
        return requested
    ok = [d for d in divisors(world_size) if all(e % d == 0 for e in expert_counts)]
    return max(ok)


def group_by_name(group_name: str) -> Any:
    """The process group a mesh names (its ep, dp or world group)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)  # type: ignore[arg-type]  # a GroupName is a str


def make_mesh(ep: int) -> Mesh:
    """The mesh for this process; creates (once per shape, on every rank in the same order) the groups."""
    rank, world_size = world()
    if world_size == 1:
        return Mesh()
    dp = world_size // ep
    key = (world_size, ep)
    if key not in _GROUPS:  # every rank creates every group (a collective), keeps the ones it is in
        mine = {}
        ep_groups = [[d * ep + i for i in range(ep)] for d in range(dp)]
        for kind, groups in (("ep", ep_groups), ("dp", [[d * ep + i for d in range(dp)] for i in range(ep)])):
            for ranks in groups:
                g = dist.new_group(ranks, timeout=_world_timeout())
                if rank in ranks:
                    mine[kind] = g.group_name
        host_group()  # created here, where every rank creates groups in the same order
        places = _places(world_size)
        my_group = next(ranks for ranks in ep_groups if rank in ranks)
        _GROUPS[key] = (
            mine["ep"],
            mine["dp"],
            hosts_per_group([host for host, _ in places], ep_groups),
            _all_ranks(not _unreachable_peers(places, my_group, rank), world_size),
        )
    ep_name, dp_name, ep_hosts, peer_access = _GROUPS[key]
    world_name = dist.group.WORLD.group_name  # type: ignore[union-attr]
    return Mesh(
        dp=dp,
        ep=ep,
        rank=rank,
        ep_group=ep_name,
        dp_group=dp_name,
        world_group=world_name,
        ep_hosts=ep_hosts,
        ep_peer_access=peer_access,
    )


def _gpu_uuid() -> str:
    """The UUID of this process's current GPU ("" off CUDA: a gloo world's ranks have none to compare)."""
    if not torch.cuda.is_available() or "nccl" not in str(dist.get_backend()):  # "nccl", "cuda:nccl,cpu:gloo"
        return ""
    return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)


def _places(world_size: int) -> list[tuple[str, str]]:
    """Every rank's (host name, GPU UUID), by rank (an ahead-of-time compile's fake process group moves
    nothing: its ranks are taken to share this host, GPUs unknown)."""
    if is_fake():
        return [(socket.gethostname(), "")] * world_size
    places: list[Any] = [None] * world_size
    dist.all_gather_object(places, (socket.gethostname(), _gpu_uuid()))
    return [(str(h), str(u)) for h, u in places]


def _all_ranks(ok: bool, world_size: int) -> bool:
    """Whether `ok` holds on every rank (each rank's own answer, gathered: the same result everywhere)."""
    if is_fake():
        return ok
    every: list[Any] = [None] * world_size
    dist.all_gather_object(every, ok)
    return all(every)


def _unreachable_peers(places: list[tuple[str, str]], ranks: list[int], me: int) -> list[int]:
    """The ranks of `ranks` on this host whose GPU this rank's GPU cannot access directly (peer to peer)."""
    if not places[me][1]:
        return []
    visible = {str(torch.cuda.get_device_properties(i).uuid): i for i in range(torch.cuda.device_count())}
    return unreachable(places, ranks, me, visible, torch.cuda.current_device(), torch.cuda.can_device_access_peer)


def unreachable(
    places: list[tuple[str, str]],
    ranks: list[int],
    me: int,
    visible: dict[str, int],
    mine: int,
    can_access: Any,
) -> list[int]:
    """The ranks of `ranks` on rank `me`'s host whose GPU (by UUID, among the GPUs this process sees: `visible`,
    UUID -> index) `can_access(mine, theirs)` denies. GPUs this process cannot see, and a GPU shared with
    `me`, are not judged."""
    host, uuid = places[me]
    return [
        r
        for r in ranks
        if r != me
        and places[r][0] == host
        and places[r][1] not in ("", uuid)
        and places[r][1] in visible
        and not can_access(mine, visible[places[r][1]])
    ]


def hosts_per_group(hosts: list[str], groups: list[list[int]]) -> int:
    """The most distinct hosts among the ranks of any one group: the same answer on every rank, so that
    decisions made from it (fusing across the ep-group or not) agree everywhere."""
    return max((len({hosts[r] for r in ranks}) for ranks in groups), default=1)


def _world_timeout() -> Any:
    """The default group's timeout, so that moecc's groups fail as fast as the user's would (a new group
    otherwise gets the library default of many minutes)."""
    world_pg = dist.group.WORLD
    assert world_pg is not None
    for device in ("cuda", "cpu"):
        try:
            return world_pg._get_backend(torch.device(device)).options._timeout
        except (RuntimeError, AttributeError):
            continue
    return None


def raise_named_peer_failure(e: BaseException, where: str) -> None:
    """Raise moecc's error, chained to `e`, where `e` is a transport's failure that says a peer went away or
    stopped answering; return for any other error, or one moecc already worded (the caller re-raises it). A
    collective the schedule pass issued early fails at its wait, outside the moecc op that issued it (which
    names such failures itself), in the forward or the backward."""
    rank, world_size = world()
    if world_size == 1 or "moecc: rank" in str(e) or not _PEER_FAILURE.search(str(e)):
        return
    raise RuntimeError(
        f"moecc: rank {rank}: {where} failed ({e}); a peer rank may have died or stalled (the process group's "
        "timeout bounds the wait)"
    ) from e


def check_same_on_all_ranks(what: str, value: Any) -> None:
    """All ranks must agree on `value` (options, model fingerprint, plan); say which rank differs."""
    rank, world_size = world()
    if world_size == 1 or is_fake():
        return
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    digest = hashlib.sha256(repr(value).encode()).hexdigest()[:16]
    gathered: list[Any] = [None] * world_size
    with unset_fake_temporarily():  # also called while AOTAutograd holds a fake mode (schedule)
        dist.all_gather_object(gathered, (digest, repr(value)[:300]))
    differ = [r for r, (d, _) in enumerate(gathered) if d != gathered[0][0]]
    if differ:
        detail = "; ".join(f"rank {r}: {gathered[r][1]}" for r in [0, *differ[:3]])
        raise MoeccError(
            f"{what} differs across ranks: rank(s) {differ} differ from rank 0 ({detail}); every rank "
            "must compile the same model with the same options and call it with inputs of the same shapes"
        )


_HOST_GROUP: list[Any] = []


def host_group() -> Any:
    """A group of the whole world whose collectives take CPU tensors and never touch a device: the default
    group where it has a CPU backend (gloo), else a gloo group made once (a collective: every rank calls this
    first at the same point, `make_mesh`)."""
    if not _HOST_GROUP:
        world_pg = dist.group.WORLD
        try:
            world_pg._get_backend(torch.device("cpu"))  # type: ignore[union-attr]
            _HOST_GROUP.append(world_pg)
        except (RuntimeError, AttributeError):
            _HOST_GROUP.append(dist.new_group(backend="gloo", timeout=_world_timeout()))
    return _HOST_GROUP[0]


def input_signature(args: tuple, kwargs: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(where, shape, dtype) of every tensor among a call's arguments, in argument order."""
    from torch.utils._pytree import keystr, tree_flatten_with_path

    leaves, _ = tree_flatten_with_path((args, kwargs))
    return [
        (keystr(path), tuple(int(d) for d in t.shape), str(t.dtype).removeprefix("torch."))
        for path, t in leaves
        if isinstance(t, torch.Tensor)
    ]


def _describe(path: str) -> str:
    """`[0][1]` -> `args[1]`, `[1]['ids']` -> `kwargs['ids']` (a pytree path into (args, kwargs)); a mode's
    name as it is."""
    if not path.startswith("["):
        return path
    return ("args" if path.startswith("[0]") else "kwargs") + path[3:]


def check_step_inputs(where: str, args: tuple, kwargs: dict, modes: dict[str, Any] | None = None) -> None:
    """Every rank of the world calls a compiled step with inputs of the same shapes and dtypes, and in the
    same `modes` (name -> value: grad mode, train / eval), or every rank raises, naming the input or mode
    and the ranks that differ. A rank whose call differs would otherwise recompile alone (and wait in the
    compile-time checks while its peers wait in the step's collectives) or exchange rows its peers did not
    size their buffers for: a hang until the process group's timeout, or worse. Host work only: a 16-byte
    all-reduce (the largest and smallest digest) over `host_group()` per call, cheaper than an all-gather
    on gloo; an all-gather of the signatures only to word the error."""
    rank, world_size = world()
    if world_size == 1 or is_fake():
        return
    sig = input_signature(args, kwargs) + [(name, (), repr(v)) for name, v in (modes or {}).items()]
    digest = int.from_bytes(hashlib.sha256(repr(sig).encode()).digest()[:7], "little")  # < 2^56: negates
    extremes = torch.tensor([digest, -digest], dtype=torch.int64)
    group = host_group()
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    if int(extremes[0]) == -int(extremes[1]):  # largest == smallest: every rank's digest is the same
        return
    sigs: list[Any] = [None] * world_size
    dist.all_gather_object(sigs, sig, group=group)

    def shown(s: list, i: int) -> str:
        if i >= len(s):
            return "absent"
        return s[i][2] if not s[i][0].startswith("[") else f"{s[i][2]}{list(s[i][1])}"  # a mode: its value

    detail = ""
    for i in range(max(len(s) for s in sigs)):
        seen: dict[str, list[int]] = {}
        for r, s in enumerate(sigs):
            seen.setdefault(shown(s, i), []).append(r)
        if len(seen) > 1:
            name = _describe(next(s[i][0] for s in sigs if i < len(s)))
            detail = f"{name} is " + ", ".join(f"{v} on rank(s) {rs}" for v, rs in seen.items())
            break
    if not detail:  # the same shapes in a different argument structure
        detail = "; ".join(f"rank {r}: {[_describe(p) for p, _, _ in s]}" for r, s in enumerate(sigs[:4]))
    raise MoeccError(
        f"{where}: the ranks' calls differ: {detail}. Every rank runs the same collectives each step (the "
        "expert all-to-alls need the same token count on every rank, with dynamic=True too), so every rank "
        "must call the compiled model with inputs of the same shapes and dtypes, in the same grad mode and "
        "train/eval mode: pad each rank's batch to one length (or bucket lengths the same way on every rank). "
        "check_inputs=False skips this check"
    )


def standin(t: torch.Tensor) -> torch.Tensor:
    """A tensor with t's shape, dtype and device that owns one element: what a released expert weight
    becomes, so that tracing still sees the model's full structure."""
    return torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)


def device_type(model: torch.nn.Module, default: str = "cpu") -> str:
    """The device type of a model's parameters (`default` for a model without any): where it runs, which
    need not be where the machine could run it."""
    p = next(iter(model.parameters()), None)
    return p.device.type if p is not None else default


def model_fingerprint(model: torch.nn.Module) -> str:
    """The model's class and its parameters' names, shapes and dtypes, hashed."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
    return h.hexdigest()[:16]
