"""`moecc demo`: compile a tiny DeepSeek-style MoE model for expert parallelism on a local world of
processes (gloo on CPU; NCCL with one GPU per rank where there are enough), train it next to eager
PyTorch on the same global batches, and print how they compare.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from tabulate import tabulate

import moecc
from moecc import testing
from moecc.backends import torch_backend

MODELS = {
    "deepseek": "moecc.examples.deepseek_style:build",
    "mixtral": "moecc.examples.mixtral_style:build",
    "switch": "moecc.examples.switch_style:build",
}


def _expert_bytes(named: Any) -> int:
    return sum(p.numel() * p.element_size() for n, p in named if ".experts." in n)


def worker(
    rank: int,
    world: int,
    factory: str,
    ep: int | None,
    steps: int,
    tokens: int | None,
    lr: float,
    dump_dir: str | None,
    artifact: str | None = None,
) -> None:
    """One rank: build the model from `factory`, compile it (or load `artifact`), train next to eager."""
    from moecc.cli import build_from

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    model, (ids,) = build_from(factory, **({"tokens": tokens} if tokens else {}))
    model = model.to(device)
    full_expert_bytes = _expert_bytes(model.named_parameters())
    eager = copy.deepcopy(model) if rank == 0 else None  # the single-process reference, on the global batch
    compiled: Any = moecc.load(artifact, model) if artifact else moecc.compile(model, ep=ep, dump_dir=dump_dir)
    opt = torch.optim.AdamW(compiled.parameters(), lr=lr)
    eager_opt = torch.optim.AdamW(eager.parameters(), lr=lr) if eager is not None else None
    rows: list[list[Any]] = []
    t_moecc: list[float] = []
    t_eager: list[float] = []
    diffs: list[float] = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(10_000 + step)
        batches = [torch.randint(0, 64, ids.shape, generator=gen).to(device) for _ in range(world)]
        a2a_before = torch_backend.COUNTERS["a2a.bytes_remote"]
        dist.barrier()
        t0 = time.perf_counter()
        loss = testing.lm_loss(compiled(batches[rank]), batches[rank])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t_moecc.append(time.perf_counter() - t0)
        a2a_bytes = torch_backend.COUNTERS["a2a.bytes_remote"] - a2a_before
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world
        if eager is not None and eager_opt is not None:
            t0 = time.perf_counter()
            eager_loss = torch.stack([testing.lm_loss(eager(b), b) for b in batches]).mean()
            eager_opt.zero_grad(set_to_none=True)
            eager_loss.backward()
            eager_opt.step()
            t_eager.append(time.perf_counter() - t0)
            diffs.append(abs(eager_loss.item() - mean_loss.item()))
            rows.append(
                [
                    step,
                    f"{eager_loss.item():.5f}",
                    f"{mean_loss.item():.5f}",
                    f"{abs(eager_loss.item() - mean_loss.item()):.1e}",
                    f"{t_eager[-1] * 1e3:.0f}",
                    f"{t_moecc[-1] * 1e3:.0f}",
                    f"{a2a_bytes / 1024:.1f}",
                ]
            )
            print(f"\r  step {step + 1}/{steps}", end="", file=sys.stderr, flush=True)
    if rank != 0:
        return
    print("\r" + " " * 30 + "\r", end="", file=sys.stderr, flush=True)
    mesh = compiled.mesh if artifact else compiled.session.mesh
    local_expert_bytes = _expert_bytes(compiled.named_parameters())
    assert eager is not None
    n_params = sum(p.numel() for p in eager.parameters())
    what = f"run {artifact}" if artifact else "demo"
    print(
        f"moecc {what}: {factory}, {n_params:,} parameters, "
        f"{world} processes ({dist.get_backend()}), mesh dp={mesh.dp} x ep={mesh.ep}, "
        f"{steps} AdamW steps, {tuple(ids.shape)} tokens per rank"
    )
    print(
        tabulate(
            rows,
            headers=[
                "step",
                "eager loss",
                "moecc loss",
                "|diff|",
                "eager ms (1 proc, global batch)",
                "moecc ms (per rank)",
                "a2a KiB sent (rank 0)",
            ],
            tablefmt="github",
        )
    )
    steady = slice(1, None) if steps > 1 else slice(None)
    print(
        f"\nmedian step after the first (which compiles or loads): "
        f"eager {statistics.median(t_eager[steady]) * 1e3:.0f} ms "
        f"on the global batch in one process, moecc {statistics.median(t_moecc[steady]) * 1e3:.0f} ms per rank"
    )
    print(
        f"expert parameters per rank: {local_expert_bytes / 1024:.1f} KiB of {full_expert_bytes / 1024:.1f} KiB "
        f"(1/{full_expert_bytes // max(local_expert_bytes, 1)})"
    )
    if not artifact:
        print(
            tabulate([r.row() for r in compiled.regions], headers=type(compiled.regions[0]).HEADERS, tablefmt="github")
            if compiled.regions
            else "no MoE region"
        )
    if not artifact and compiled.dump_root is not None:
        print(f"dumps: {compiled.dump_root} (moecc explain {dump_dir})")
    worst = max(diffs)
    if worst > 1e-3:
        raise SystemExit(f"MISMATCH: compiled and eager losses differ by {worst:.2e}")


def run(
    model: str = "deepseek",
    world: int = 4,
    ep: int | None = None,
    steps: int = 24,
    tokens: int = 64,
    lr: float = 1e-3,
    dump_dir: str | None = "moecc_dumps",
) -> None:
    testing.spawn(worker, world, MODELS[model], ep, steps, tokens, lr, dump_dir, timeout_s=300)


def run_artifact(artifact: str, factory: str, world: int, steps: int, lr: float, device: str = "cpu") -> None:
    """Train `artifact` next to eager on `world` local processes, on the device type it was compiled for."""
    backend = "gloo" if device == "cpu" else None
    testing.spawn(worker, world, factory, None, steps, None, lr, None, artifact, timeout_s=300, backend=backend)
