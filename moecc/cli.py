"""The `moecc` command line.

    moecc demo                                   compile a tiny MoE model, train it next to eager, print a table
    moecc compile FACTORY --out DIR [--world-size W]   compile ahead of time: dumps, generated programs, manifest
    moecc run DIR [--nproc W]                    train from an artifact on W local processes
    moecc explain DIR                            print what each pass did (an artifact or a dump folder)

FACTORY is `package.module:function` or `path/to/file.py:function`; the function returns
`(model, example_inputs)` (a tuple of tensors), like `build()` in `moecc.examples`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

import moecc
from moecc.options import MoeccError


def load_factory(spec: str) -> Any:
    """`pkg.mod:fn` or `file.py:fn` -> the function."""
    target, sep, fn_name = spec.rpartition(":")
    if not sep or not target or not fn_name:
        raise MoeccError(f"factory {spec!r}: expected MODULE:FUNCTION or FILE.py:FUNCTION")
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.exists():
            raise MoeccError(f"factory {spec!r}: no file {path}")
        name = f"moecc_factory_{path.stem}"
        mod_spec = importlib.util.spec_from_file_location(name, path)
        assert mod_spec is not None and mod_spec.loader is not None
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            mod_spec.loader.exec_module(module)
        finally:
            sys.path.pop(0)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise MoeccError(f"factory {spec!r}: {target} has no attribute {fn_name!r}")
    return fn


def build_from(spec: str, **kwargs: Any) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    out = load_factory(spec)(**kwargs)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.nn.Module)):
        raise MoeccError(f"factory {spec!r} must return (model, example_inputs); got {type(out).__name__}")
    model, inputs = out
    return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


# ---------------------------------------------------------------------------------------------------------


def cmd_compile(args: argparse.Namespace) -> int:
    from moecc import artifact

    out = Path(args.out)
    if out.exists():
        if not (out / artifact.MANIFEST).exists() and any(out.iterdir()):
            raise MoeccError(f"--out {out}: exists and is not a moecc artifact; pick an empty folder")
        shutil.rmtree(out)
    t0 = time.perf_counter()
    try:
        manifest = artifact.compile_artifact(
            args.factory,
            out,
            args.world_size,
            args.ep,
            backend=args.backend,
            verify=args.verify,
            disable_passes=args.disable_passes or (),
        )
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no half-written artifact
        raise
    print(
        f"compiled {args.factory} for {args.world_size} rank(s), ep={manifest['ep']}, in "
        f"{time.perf_counter() - t0:.1f}s: {len(manifest['regions'])} MoE region(s) -> {out}"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from moecc import artifact, demo

    manifest = artifact._check_files(Path(args.dir))
    nproc = args.nproc or manifest["world_size"]
    try:
        demo.run_artifact(args.dir, manifest["factory"], nproc, args.steps, args.lr, artifact.artifact_device(manifest))
    except Exception as e:  # a rank's failure (already printed by that rank) ends the run
        print(f"moecc run failed: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if (root / "manifest.json").exists():
        m = json.loads((root / "manifest.json").read_text())
        print(
            f"artifact {root}: {m['factory']} for {m['world_size']} rank(s), ep={m['ep']} "
            f"(torch {m['torch']}, moecc {m['moecc']}), inputs {m['input_signature']}"
        )
        root = root / "dumps"
    sessions = sorted({p.parent for p in root.rglob("summary.md")})
    if not sessions:
        raise MoeccError(f"{args.dir}: no moecc dumps here (expected summary.md below it)")
    for s in sessions:
        print(f"\n=== {s}\n")
        print((s / "summary.md").read_text())
        for graph_dir in sorted(s.glob("graph_*")):
            index = graph_dir / "index.md"
            if index.exists():
                print(index.read_text())
            print("files: " + " ".join(p.name for p in sorted(graph_dir.iterdir())) + "\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from moecc import demo

    try:
        demo.run(args.model, args.world, args.ep, args.steps, args.tokens, args.lr, args.dump_dir)
    except Exception as e:  # a rank's failure (already printed by that rank) ends the demo
        print(f"moecc demo failed: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """One process: compile the factory's model with node profiling, train a few steps, profile the last."""
    from moecc import cost, profile

    model, inputs = build_from(args.factory)
    out = Path(args.out)

    def compile(profile_nodes: bool) -> Any:
        dumps = out / "dumps" if profile_nodes else None
        return moecc.compile(model, backend=args.backend, dump_dir=dumps, profile_nodes=profile_nodes)

    def stepper(m: Any) -> Any:
        params = [p for p in m.parameters() if p.requires_grad]

        def step() -> None:
            result = m(*inputs)
            loss = getattr(result, "logits", result)
            loss = loss.float().square().mean() if loss.dim() else loss
            loss.backward()
            for p in params:
                p.grad = None

        return step

    # with --host-costs-into: the host's time for the step without node ranges, which cost time of their own
    cm, res = profile.profile_compiled_step(
        compile, stepper, max(args.steps - 1, 1), out, reference=bool(args.host_costs_into)
    )
    print(profile.timeline_table(res))
    print(f"wrote {out / 'timeline.md'} and {out / 'measured.json'}; predicted timelines in {cm.dump_root}")
    if args.host_costs_into:
        path = Path(args.host_costs_into)
        data = json.loads(path.read_text())
        data.update(res["host_costs"])
        data.setdefault("measured", {})["host_costs_from"] = f"moecc profile of {args.factory}"
        cost.HardwareProfile.from_json(data, source=str(path))  # still a valid profile
        path.write_text(json.dumps(data, indent=1))
        print(f"wrote the host's time per node of this step into {path}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from moecc import calibrate, cost

    path = calibrate.calibrate(args.out, world_size=args.world_size, device=args.device, quick=args.quick)
    p = cost.load_profile(path)
    print(f"wrote {path} ({p.name})")
    print(f"  dense GEMM {p.gemm_flops / 1e12:.3g} TFLOP/s, grouped GEMM {p.grouped_gemm_flops / 1e12:.3g} TFLOP/s")
    print(f"  memory {p.mem_bw / 1e9:.3g} GB/s")
    for kind, pts in p.rate_curves:
        unit = "GFLOP" if kind == "dense" else "rows/expert"
        size = (lambda x: f"{x / 1e9:.3g}") if kind == "dense" else (lambda x: f"{x:.0f}")
        row = ", ".join(f"{size(x)} {r / 1e12:.3g}" for x, r in pts)
        print(f"  {kind} GEMM TFLOP/s by {unit}: {row}")
    for kind, pts in p.curves:
        row = ", ".join(f"{b / 1024:.0f} KiB {t * 1e6:.0f} us" for b, t in pts)
        print(f"  {kind}: {row}")
    if p.host_op:
        src = json.loads(path.read_text()).get("measured", {}).get("host_costs_from", "?")
        ops = ", ".join(f"{k.removeprefix('moecc.')} {v * 1e6:.0f}" for k, v in p.host_ops)
        print(f"  host us per node ({src}): op {p.host_op * 1e6:.1f}, view {p.host_view * 1e6:.1f}; {ops}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moecc", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train a tiny MoE model with expert parallelism next to eager")
    p.add_argument("--model", choices=["deepseek", "mixtral", "switch"], default="deepseek")
    p.add_argument("--world", type=int, default=4, help="local processes (gloo on CPU, NCCL on GPUs)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel degree (default: the largest that fits)")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--tokens", type=int, default=64, help="tokens per rank and step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--dump-dir", default="moecc_dumps")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("compile", help="compile ahead of time into an artifact folder")
    p.add_argument("factory", help="MODULE:FUNCTION or FILE.py:FUNCTION returning (model, example_inputs)")
    p.add_argument("--out", required=True, help="artifact folder (created; replaced if it holds an artifact)")
    p.add_argument("--world-size", type=int, default=1, help="ranks to compile for (traced here, in one process)")
    p.add_argument("--ep", type=int, default=None)
    p.add_argument("--backend", default="auto", choices=list(moecc.options.BACKENDS))
    p.add_argument("--verify", action="store_true", help="check lifted regions against the model's code")
    p.add_argument("--disable-passes", nargs="*", default=[])
    p.set_defaults(fn=cmd_compile)

    p = sub.add_parser("run", help="train from an artifact on local processes, next to eager")
    p.add_argument("dir", help="an artifact folder (moecc compile --out)")
    p.add_argument("--nproc", type=int, default=None, help="processes (default: the artifact's world size)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("calibrate", help="measure this machine's rates into a profile the cost model uses")
    p.add_argument("--out", default=None, help="profile file (default: where compile looks for this device)")
    p.add_argument("--world-size", type=int, default=2, help="local processes for the collective curves")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--quick", action="store_true", help="fewer sizes and iterations (seconds, not minutes)")
    p.set_defaults(fn=cmd_calibrate)

    p = sub.add_parser("profile", help="measure a compiled training step node by node against the prediction")
    p.add_argument("factory", help="MODULE:FUNCTION or FILE.py:FUNCTION returning (model, example_inputs)")
    p.add_argument("--out", required=True, help="folder for timeline.md, measured.json and the dumps")
    p.add_argument("--steps", type=int, default=3, help="steps to run (the last one is profiled)")
    p.add_argument("--host-costs-into", default=None, metavar="PROFILE",
                   help="a profile file (from calibrate) whose host costs to replace with this step's")  # fmt: skip
    p.add_argument("--backend", default="auto", choices=list(moecc.options.BACKENDS))
    p.set_defaults(fn=cmd_profile)

    p = sub.add_parser("explain", help="print what each pass did")
    p.add_argument("dir", help="an artifact folder or a dump folder")
    p.set_defaults(fn=cmd_explain)

    args = parser.parse_args(argv)
    try:
        return int(args.fn(args))
    except MoeccError as e:
        print(f"moecc: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
