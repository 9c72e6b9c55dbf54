"""Where the time of one compiled MoE layer goes on one GPU: torch.profiler's top CUDA kernels of a
forward+backward step for moecc's torch and triton backends (the shapes of bench_moe_layer.py).

    python benchmarks/profile_moe_layer.py --shapes deepseek mixtral --out $OUT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_moe_layer as bench  # noqa: E402

import moecc  # noqa: E402


def profile(shape: str, backend: str, rows: int, out: Path) -> None:
    s = bench.SHAPES[shape]
    layer = bench.build_layer(s, torch.device("cuda"), torch.bfloat16)
    cm = moecc.compile(layer, backend=backend)
    x = torch.randn(s.tokens, s.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)

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
    text = f"## {shape} {backend} (3 steps of forward+backward)\n\n{table}\n"
    print(text, flush=True)
    (out / f"profile_{shape}_{backend}.txt").write_text(text)
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
    for shape in args.shapes:
        for backend in args.backends:
            profile(shape, backend, args.rows, out)


if __name__ == "__main__":
    main()
