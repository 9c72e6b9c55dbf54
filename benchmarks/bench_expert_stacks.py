"""Memory and time of a training step for a model whose experts are an `nn.ModuleList` (the Mixtral-style
example at a chosen size), with the stacked expert weights recomputed in the backward (moecc's default)
against saved from the forward (the recomputation switched off), in one run, one process.

A ModuleList's per-expert weights are stacked into [E, ...] tensors in every forward for the grouped GEMMs.
Saved for the backward, each layer's stacks are a second copy of its expert weights held from the forward to
the backward; recomputed, only the layer being differentiated holds one. Reports, per variant: the step's
median time, the peak memory of the step above the memory held before it (CUDA) and the bytes the compiled
forward saves for the backward that are not parameters. Writes `expert_stacks_<date><tag>.json` to --out.

    python benchmarks/bench_expert_stacks.py --out benchmarks/results
    python benchmarks/bench_expert_stacks.py --tiny --out /tmp        # a smoke test, also on the CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import bench_moe_layer as bench  # noqa: E402
import mixtral_style  # noqa: E402

import moecc  # noqa: E402
from moecc import capture  # noqa: E402


def step_stats(cfg: mixtral_style.Config, device: torch.device, dtype: torch.dtype, tokens: int, iters: int,
               recompute: bool) -> dict[str, Any]:  # fmt: skip
    torch.manual_seed(0)
    model = mixtral_style.MixtralStyleLM(cfg).to(device, dtype)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), device=device)
    saved_stacks = capture.weight_stacks
    if not recompute:
        capture.weight_stacks = lambda joint, params: []
    try:
        torch._dynamo.reset()
        cm = moecc.compile(model)
        params = {p.data_ptr() for p in model.parameters()}
        saved_bytes = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved_bytes
            if t.data_ptr() not in params:
                saved_bytes += t.numel() * t.element_size()
            return t

        def step(hooked: bool = False) -> None:
            for p in cm.parameters():
                p.grad = None
            if hooked:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    out = cm(ids)
            else:
                out = cm(ids)
            out.float().square().mean().backward()

        step()
        step(hooked=True)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        if device.type == "cuda":
            for p in cm.parameters():
                p.grad = None
            sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = []
        for _ in range(iters):
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
        counters = cm.session.counters()
    finally:
        capture.weight_stacks = saved_stacks
    return {
        "variant": "recompute" if recompute else "save",
        "step_ms": sorted(times)[len(times) // 2] * 1e3,
        "peak_above_rest_bytes": peak,
        "saved_non_param_bytes": saved_bytes,
        "weight_bytes": weights,
        "recomputed_copies": counters.get("partition.weight_stacks_recomputed", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="")
    parser.add_argument("--tiny", action="store_true", help="the example's own tiny sizes")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        cfg, tokens = mixtral_style.Config(), 32
    else:
        cfg = mixtral_style.Config(vocab_size=32000, hidden_size=args.hidden, num_layers=args.layers,
                                   num_heads=max(1, args.hidden // 128), ffn_size=args.ffn,
                                   num_experts=args.experts)  # fmt: skip
        tokens = args.tokens
    records = []
    for recompute in (True, False, True):  # A/B/A
        r = step_stats(cfg, device, dtype, tokens, args.iters, recompute)
        records.append(r)
        peak = r["peak_above_rest_bytes"]
        print(
            f"{r['variant']:9s} step {r['step_ms']:8.2f} ms  saved (not parameters) "
            f"{r['saved_non_param_bytes'] / 2**20:9.1f} MiB  peak above rest "
            f"{'-' if peak is None else f'{peak / 2**20:9.1f} MiB'}  weights {r['weight_bytes'] / 2**20:.1f} MiB",
            flush=True,
        )
    result = {**bench.run_header(device, 1), "config": {**vars(cfg), "tokens": tokens, "dtype": str(dtype)},
              "records": records}  # fmt: skip
    print(f"wrote {bench.write_results(args.out, 'expert_stacks', args.tag, result)}", flush=True)


if __name__ == "__main__":
    main()
