"""The `moecc` command line.

    moecc demo                                   compile a tiny MoE model, train it next to eager, print a table
    moecc compile FACTORY --out DIR              compile ahead of time: dumps, generated program, manifest
    moecc explain DIR                            print what each pass did (an artifact or a dump folder)

FACTORY is `package.module:function` or `path/to/file.py:function`; the function returns
`(model, example_inputs)` (a tuple of tensors), like `build()` in `moecc.examples`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import moecc
from moecc import dist
from moecc.options import MoeccError

MANIFEST = "manifest.json"


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


def lm_loss(logits: Any, ids: torch.Tensor) -> torch.Tensor:
    logits = getattr(logits, "logits", logits)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def input_signature(inputs: tuple[Any, ...]) -> list[str]:
    return [f"{t.dtype}{list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs]


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


# ---------------------------------------------------------------------------------------------------------


def cmd_compile(args: argparse.Namespace) -> int:
    model, inputs = build_from(args.factory)
    out = Path(args.out)
    if out.exists():
        if not (out / MANIFEST).exists() and any(out.iterdir()):
            raise MoeccError(f"--out {out}: exists and is not a moecc artifact; pick an empty folder")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cm = moecc.compile(
        model,
        ep=args.ep,
        backend=args.backend,
        dump_dir=out / "dumps",
        verify=args.verify,
        disable_passes=args.disable_passes or (),
    )
    t0 = time.perf_counter()
    result = cm(*inputs)
    if not args.inference and isinstance(inputs[0], torch.Tensor) and not inputs[0].is_floating_point():
        lm_loss(result, inputs[0]).backward()
    took = time.perf_counter() - t0
    root = cm.dump_root
    program = out / "program"
    program.mkdir()
    for graph_dir in sorted(root.glob("graph_*")):
        for final in sorted(graph_dir.glob("*_lower*.py")):
            shutil.copy(final, program / f"{graph_dir.name}{final.suffixes[0] if len(final.suffixes) > 1 else ''}.py")
        if (graph_dir / "plan.md").exists():
            shutil.copy(graph_dir / "plan.md", out / f"plan.{graph_dir.name}.md")
    manifest = {
        "moecc": moecc.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "factory": args.factory,
        "model": type(model).__qualname__,
        "model_fingerprint": dist.model_fingerprint(model),
        "input_signature": input_signature(inputs),
        "mesh": {"world": 1, "dp": 1, "ep": 1},
        "options": cm.options.__dict__,
        "regions": [r.__dict__ for r in cm.regions],
        "graphs": cm.session.graphs,
        "compile_seconds": round(took, 3),
        "files": file_hashes(out),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    print(
        f"compiled {args.factory} in {took:.1f}s: {len(cm.regions)} MoE region(s), "
        f"{len(cm.session.graphs)} graph(s) -> {out}"
    )
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if (root / MANIFEST).exists():
        m = json.loads((root / MANIFEST).read_text())
        print(
            f"artifact {root}: {m['model']} from {m['factory']} (torch {m['torch']}, moecc {m['moecc']}), "
            f"inputs {m['input_signature']}, mesh {m['mesh']}"
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
    p.add_argument("--ep", type=int, default=None)
    p.add_argument("--backend", default="auto", choices=list(moecc.options.BACKENDS))
    p.add_argument("--verify", action="store_true", help="check lifted regions against the model's code")
    p.add_argument("--inference", action="store_true", help="forward only (no backward graph)")
    p.add_argument("--disable-passes", nargs="*", default=[])
    p.set_defaults(fn=cmd_compile)

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
