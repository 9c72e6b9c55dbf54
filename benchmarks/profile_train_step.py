"""Predicted against measured, per operation, for one training step of bench_train_step's model (one
process): compiles it with `profile_nodes=True`, runs a step to compile, and writes `moecc.profile_step`'s
table (`timeline.md`) and the profiler's trace (`measured.json`) to --out.

    python benchmarks/profile_train_step.py --out /tmp/prof [--layers 2] [--tiny]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_step as ts  # noqa: E402

import moecc  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--profile", default=None, help="a hardware profile file for the cost model")
    args = parser.parse_args()
    c = ts.CONFIGS["deepseek_small_tiny" if args.tiny else "deepseek_small"]
    if args.layers:
        c = dataclasses.replace(c, layers=args.layers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cm = moecc.compile(ts.build_model(c, device, dtype), profile_nodes=True, profile=args.profile)
    ids, targets = ts.batch(c, 0, device)

    def step() -> None:
        for p in cm.parameters():
            p.grad = None
        cm(ids, targets).backward()

    step()
    step()
    res = moecc.profile_step(cm, step, args.out)
    print((Path(args.out) / "timeline.md").read_text())
    print(f"predicted {res['predicted_us'] / 1e3:.1f} ms, measured {res['wall_us'] / 1e3:.1f} ms")


if __name__ == "__main__":
    main()
