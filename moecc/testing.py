"""Helpers for multi-process tests and demos: spawn a local gloo world, compare against eager.

`spawn(fn, world, *args)` runs `fn(rank, world, *args)` in `world` processes with an initialised gloo (CPU)
or NCCL (one GPU per rank) process group and a bounded timeout, and re-raises the first failure.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int, fn: Callable[..., Any], world: int, port: int, timeout_s: float, args: tuple, backend: str | None
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 120.0, backend: str | None = None) -> None:
    """Run fn(rank, world, *args) on `world` local processes; a failure in any of them raises here. backend:
    the process group's ("gloo" for models on the CPU, whatever the machine); None: NCCL, one GPU a rank,
    where there are `world` GPUs, else gloo."""
    mp.spawn(_entry, args=(fn, world, free_port(), timeout_s, args, backend), nprocs=world, join=True)


def lm_loss(logits: Any, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy (float32) of a causal LM's logits (or an output with `.logits`)."""
    logits = getattr(logits, "logits", logits)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
    )


def local_slice(full: torch.Tensor, local: torch.Tensor, ep_index: int) -> torch.Tensor:
    """The part of an eager tensor that a rank's (possibly expert-sharded) tensor corresponds to."""
    if full.shape == local.shape:
        return full
    n = local.shape[0]
    assert full.shape[1:] == local.shape[1:] and full.shape[0] % n == 0, (full.shape, local.shape)
    return full[ep_index * n : (ep_index + 1) * n]


def assert_grads_match(compiled: Any, ref: torch.nn.Module, ep_index: int, what: str) -> int:
    """Every gradient of a compiled (possibly expert-sharded) module equals the eager reference's (its
    slice for sharded experts); returns how many were compared."""
    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, p in compiled.named_parameters():
        r = ref_params[name]
        if r.grad is None:
            assert p.grad is None or not p.grad.any(), f"{what}: {name} has a gradient eager does not"
            continue
        assert p.grad is not None, f"{what}: {name} got no gradient"

        def msg(m: str, n: str = name) -> str:
            return f"{what}: grad of {n}: {m}"

        torch.testing.assert_close(p.grad, local_slice(r.grad, p, ep_index), rtol=1e-4, atol=1e-6, msg=msg)
        checked += 1
    return checked


def step_against_eager(
    compiled: Any,
    ref: torch.nn.Module,
    opts: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    batches: list[torch.Tensor],
    rank: int,
    ep_index: int,
    what: str,
) -> torch.Tensor:
    """One training step of this rank next to the eager reference on the concatenated batch (the DDP
    contract): the rank's loss equals eager's on its batch, every gradient equals eager's for the mean of
    the per-rank losses, then both optimizers step. Returns the rank's loss."""
    loss = lm_loss(compiled(batches[rank]), batches[rank])
    ref_losses = [lm_loss(ref(b), b) for b in batches]
    torch.testing.assert_close(loss, ref_losses[rank], rtol=1e-5, atol=1e-5)
    for opt in opts:
        opt.zero_grad()
    loss.backward()
    torch.stack(ref_losses).mean().backward()
    assert assert_grads_match(compiled, ref, ep_index, what) > 0
    for opt in opts:
        opt.step()
    return loss


def replay_in_cuda_graph(module: Any, x: torch.Tensor, g: torch.Tensor, new_x: torch.Tensor) -> torch.Tensor:
    """`module(x).backward(g)` warmed up on a side stream (where it compiles), captured in a CUDA graph, then
    replayed after copying new_x into x: returns the replayed output, and x.grad holds its input gradient. A
    device-to-host synchronisation anywhere in the call makes the capture fail."""
    for _ in range(3):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            module(x).backward(g)
        torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        out = module(x)
        out.backward(g)
    x.data.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    return out
