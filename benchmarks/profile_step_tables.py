"""Where one training step of bench_train_step's model spends its time: the step's median wall time and the
profiler's tables for one step (by device time, and by the host's own time), for a chosen number of token
chunks per MoE layer (the `chunks` option; 0: the cost model's choice). Rank 0 prints; under torchrun the
model is expert-parallel over the ranks (set MOECC_FUSED_EP=0 for the row all-to-all path, where chunks apply).

    MOECC_FUSED_EP=0 torchrun --nproc-per-node 2 benchmarks/profile_step_tables.py --chunks 2 --layers 2
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_moe_layer as layer_bench  # noqa: E402
import bench_train_step as ts  # noqa: E402

import moecc  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=0, help="token chunks per MoE layer (0: the cost model's)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the config's)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="process-group timeout")
    args = parser.parse_args()
    c = ts.CONFIGS["deepseek_small_tiny" if args.tiny else "deepseek_small"]
    if args.layers:
        c = dataclasses.replace(c, layers=args.layers)
    rank, world, device = layer_bench.init_distributed("auto", args.timeout_s)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ids, targets = ts.batch(c, rank, device)
    cm = moecc.compile(ts.build_model(c, device, dtype), ep=world, chunks=args.chunks or None)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step() -> None:
        for p in cm.parameters():
            p.grad = None
        cm(ids, targets).backward()

    for _ in range(3):
        step()
    times = []
    for _ in range(args.steps):
        if world > 1:
            torch.distributed.barrier()
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        sync()
    if rank == 0:
        median_ms = sorted(times)[len(times) // 2] * 1e3
        print(f"== chunks {args.chunks or 'auto'} layers {c.layers}: step median {median_ms:.1f} ms")
        ka = prof.key_averages()
        if device.type == "cuda":
            print(ka.table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=45))
        print(ka.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=45))
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
