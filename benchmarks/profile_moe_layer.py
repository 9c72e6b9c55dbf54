"""Where the time of one compiled MoE layer goes: torch.profiler's top CUDA kernels of a forward+backward
step for moecc's torch and triton backends (the shapes of bench_moe_layer.py), on one GPU or, under
torchrun, with expert parallelism over the node's GPUs (ep = world size; every rank its own tokens; rank 0's
table is written, with the GPU count in its name).

    python benchmarks/profile_moe_layer.py --shapes deepseek mixtral --out $OUT
    torchrun --nproc-per-node 2 benchmarks/profile_moe_layer.py --shapes qwen3 --backends triton --out $OUT
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_moe_layer as bench  # noqa: E402

import moecc  # noqa: E402


def profile(shape: str, backend: str, rows: int, out: Path, rank: int = 0, world: int = 1) -> None:
    s = bench.SHAPES[shape]
    layer = bench.build_layer(s, torch.device("cuda"), torch.bfloat16)  # the same weights on every rank
    cm = moecc.compile(layer, ep=world, backend=backend)
    gen = torch.Generator(device="cuda").manual_seed(1000 + rank)
    x = torch.randn(s.tokens, s.hidden, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)

    def step() -> None:
        cm(x).float().square().mean().backward()
        for p in cm.parameters():
            p.grad = None

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="cuda_time_total", row_limit=rows, max_name_column_width=50, max_shapes_column_width=90
    )
    if rank == 0:
        where = f", ep = {world}, rank 0's kernels" if world > 1 else ""
        text = f"## {shape} {backend} (3 steps of forward+backward{where})\n\n{table}\n"
        print(text, flush=True)
        (out / f"profile_{shape}_{backend}{f'_{world}gpu' if world > 1 else ''}.txt").write_text(text)
    torch._dynamo.reset()
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="*", default=list(bench.SHAPES))
    parser.add_argument("--backends", nargs="*", default=["torch", "triton"])
    parser.add_argument("--rows", type=int, default=18)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # under torchrun: one GPU per rank
    rank, world, _ = bench.init_distributed("cuda", 300.0) if distributed else (0, 1, None)
    for shape in args.shapes:
        for backend in args.backends:
            profile(shape, backend, args.rows, out, rank, world)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
