"""The host's time for moecc's per-call check that every rank's inputs have the same shapes and dtypes.

`moecc.compile`d modules call `moecc.dist.check_step_inputs` at the start of every call when the world has more
than one rank (`check_inputs=True`, the default): the digest of the call's tensor shapes and dtypes goes
through a 16-byte all-reduce over a gloo group (the default group where it has a CPU backend). This times it
alone, per call (median of --rounds rounds of --iters calls), with inputs on the device, and once more while
the device is busy with a long kernel, which it must not wait for. Run it under torchrun (or it spawns
--world local processes on the CPU); rank 0 writes `input_check_<date><tag>.json` to --out.

    torchrun --nproc-per-node 2 benchmarks/bench_input_check.py --out benchmarks/results --tag _2gpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moecc import dist as moecc_dist
from moecc import testing


def _commit() -> str:
    if os.environ.get("MOECC_COMMIT"):
        return os.environ["MOECC_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _per_call_us(fn, iters: int, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - t0) / iters * 1e6)
    return statistics.median(times)


def run(rank: int, world: int, args: argparse.Namespace) -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    group = moecc_dist.host_group()
    ids = torch.zeros(4, 2048, dtype=torch.long, device=device)
    call = ((ids,), {"labels": ids})
    rec = {
        "check_us": _per_call_us(lambda: moecc_dist.check_step_inputs("bench", *call), args.iters, args.rounds),
        "signature_us": _per_call_us(lambda: moecc_dist.input_signature(*call), args.iters, args.rounds),
        "host_group": "world" if group is dist.group.WORLD else "gloo subgroup",
    }
    if cuda:
        torch.cuda._sleep(200_000_000)  # about 0.1 s of device work queued ahead of the check
        dist.barrier(group=group)
        t0 = time.perf_counter()
        moecc_dist.check_step_inputs("bench", *call)
        rec["check_with_busy_device_us"] = (time.perf_counter() - t0) * 1e6
        torch.cuda.synchronize()
    if rank == 0:
        out = {
            "date": datetime.date.today().isoformat(),
            "hardware": f"{torch.cuda.get_device_name() if cuda else 'CPU'} x {world}",
            "commit": _commit(),
            "torch": torch.__version__,
            "iters": args.iters,
            "rounds": args.rounds,
            "records": [rec],
        }
        path = Path(args.out) / f"input_check_{out['date']}{args.tag}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(json.dumps(rec), f"\nwrote {path}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--world", type=int, default=2, help="local CPU processes when not under torchrun")
    args = parser.parse_args()
    if "RANK" in os.environ:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo")
        try:
            run(dist.get_rank(), dist.get_world_size(), args)
        finally:
            dist.destroy_process_group()
    else:
        testing.spawn(run, args.world, args)


if __name__ == "__main__":
    main()
