"""Predicted against measured, per operation, for one training step of bench_train_step's model: compiles it
with `profile_nodes=True` (expert parallelism over the ranks under torchrun), runs a step to compile, and
writes `moecc.profile_step`'s table (`timeline.md`) and the profiler's trace (`measured.json`) to --out
(rank r > 0: --out/rank<r>).

    python benchmarks/profile_train_step.py --out /tmp/prof [--layers 2] [--tiny]
    torchrun --nproc-per-node 2 benchmarks/profile_train_step.py --out /tmp/prof
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_moe_layer as layer_bench  # noqa: E402
import bench_train_step as ts  # noqa: E402

import moecc  # noqa: E402
import moecc.cost  # noqa: E402
import moecc.profile  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--profile", default=None, help="a hardware profile file for the cost model")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="process-group timeout")
    parser.add_argument("--host-costs-into", default=None, metavar="PROFILE",
                        help="write the host's measured time per node (rank 0's) into a copy of --profile here "
                             "(as `moecc profile --host-costs-into`)")  # fmt: skip
    args = parser.parse_args()
    c = ts.CONFIGS["deepseek_small_tiny" if args.tiny else "deepseek_small"]
    if args.layers:
        c = dataclasses.replace(c, layers=args.layers)
    if args.host_costs_into and not args.profile:
        parser.error("--host-costs-into writes into a copy of --profile: name the profile")
    rank, world, device = layer_bench.init_distributed("auto", args.timeout_s)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ids, targets = ts.batch(c, rank, device)

    def stepper(cm: torch.nn.Module):
        def step() -> None:
            for p in cm.parameters():
                p.grad = None
            cm(ids, targets).backward()

        return step

    reference = None
    if args.host_costs_into:  # the host's time for the step without node ranges, which cost time of their own
        plain = stepper(moecc.compile(ts.build_model(c, device, dtype), ep=world, profile=args.profile))
        plain()
        plain()
        reference = moecc.profile.host_issue_us(plain)
        del plain
    cm = moecc.compile(ts.build_model(c, device, dtype), ep=world, profile_nodes=True, profile=args.profile)
    out = Path(args.out) if rank == 0 else Path(args.out) / f"rank{rank}"
    step = stepper(cm)
    step()
    step()
    res = moecc.profile_step(cm, step, out, host_reference_us=reference)
    if rank == 0:
        print((out / "timeline.md").read_text())
        print(f"predicted {res['predicted_us'] / 1e3:.1f} ms, measured {res['wall_us'] / 1e3:.1f} ms (ep={world})")
        if args.host_costs_into:
            data = json.loads(Path(args.profile).read_text())
            data.update(res["host_costs"])
            data.setdefault("measured", {})["host_costs_from"] = f"profile_train_step.py, ep={world}, rank 0"
            moecc.cost.HardwareProfile.from_json(data, source=args.host_costs_into)  # still a valid profile
            Path(args.host_costs_into).write_text(json.dumps(data, indent=1))
            print(f"wrote the host's time per node into {args.host_costs_into}: {res['host_costs']}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
