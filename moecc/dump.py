"""Pass-level dumps: per compiled graph a folder with the IR after each pass as readable Python
(`NN_<pass>[.fwd|.bwd].py`), the plan as tables, the predicted timeline and an index of what each pass
changed; per compiled module a `summary.md` (graphs, graph breaks, MoE regions).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.fx as fx
from tabulate import tabulate

from moecc import ir

_SUFFIX = {"dynamo": "", "forward": ".fwd", "backward": ".bwd"}


def _pass_number(name: str, graph_kind: str) -> int:
    """The pass's position in the pipeline (a pass name can run in both stages: schedule)."""
    from moecc.passes import PIPELINE

    stage = "dynamo" if graph_kind == "dynamo" else "aot"
    return next(i for i, p in enumerate(PIPELINE) if p.name == name and p.stage == stage) + 1


class Dumper:
    def __init__(self, root: Path, graph_id: int):
        self.dir = root / f"graph_{graph_id}"
        self.dir.mkdir(parents=True, exist_ok=True)

    def write_graph(self, gm: fx.GraphModule, pass_name: str, graph_kind: str, took_ms: float) -> None:
        num = 0 if pass_name == "capture" else _pass_number(pass_name, graph_kind)
        path = self.dir / f"{num:02d}_{pass_name}{_SUFFIX[graph_kind]}.py"
        header = f"# Constructed by {pass_name} (took {took_ms:.1f} ms) -- {graph_kind} graph"
        path.write_text(ir.readable(gm, header))

    def write_text(self, name: str, text: str) -> None:
        (self.dir / name).write_text(text)

    def write_json(self, name: str, obj: Any) -> None:
        (self.dir / name).write_text(json.dumps(obj, indent=1, default=str))

    def write_index(self, ctx: Any) -> None:
        rows = []
        for r in ctx.records:
            if r.disabled:
                rows.append([r.pass_name, r.graph_kind, "disabled", "", "", "", ""])
                continue
            added = ", ".join(f"+{v} {k}" for k, v in sorted(r.added.items()))
            removed = ", ".join(f"-{v} {k}" for k, v in sorted(r.removed.items()))
            pred = f"{r.predicted_us:.1f}" if r.predicted_us is not None else ""
            rows.append(
                [
                    r.pass_name,
                    r.graph_kind,
                    f"{r.took_ms:.1f}",
                    added or "-",
                    removed or "-",
                    pred,
                    "; ".join(r.notes),
                ]
            )
        table = tabulate(
            rows,
            headers=["pass", "graph", "ms", "ops added", "ops removed", "predicted us", "notes"],
            tablefmt="github",
        )
        self.write_text("index.md", f"# graph {ctx.graph_id}: what each pass did\n\n{table}\n")
        self.write_json("index.json", [r.__dict__ for r in ctx.records])


def session_root(dump_dir: str, label: str) -> Path:
    root = Path(dump_dir)
    root.mkdir(parents=True, exist_ok=True)
    n = 0
    while (root / f"{label}_{n}").exists():
        n += 1
    out = root / f"{label}_{n}"
    out.mkdir()
    return out


def write_summary(
    root: Path, graphs: list[dict[str, Any]], regions: list[ir.MoERegion], graph_breaks: dict[str, int]
) -> None:
    lines = ["# moecc compile summary", ""]
    lines.append(
        tabulate(
            [[g["graph_id"], g["inputs"], g["regions"]] for g in graphs],
            headers=["graph", "input signature", "MoE regions"],
            tablefmt="github",
        )
    )
    lines += ["", "## MoE regions", ""]
    lines.append(
        tabulate([r.row() for r in regions], headers=ir.MoERegion.HEADERS, tablefmt="github")
        if regions
        else "none found"
    )
    lines += ["", "## graph breaks", ""]
    lines += [f"- {reason} (x{n})" for reason, n in graph_breaks.items()] or ["none"]
    (root / "summary.md").write_text("\n".join(lines) + "\n")
    (root / "summary.json").write_text(
        json.dumps(
            {"graphs": graphs, "regions": [r.__dict__ for r in regions], "graph_breaks": graph_breaks},
            indent=1,
        )
    )
