"""Golden checks: the moecc operations in the generated programs of the example models stay as they are
unless a change means to change them (then regenerate with MOECC_UPDATE_GOLDEN=1 and review the diff)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import moecc
from moecc import ir
from moecc.examples import deepseek_style, mixtral_style, switch_style

GOLDEN = Path(__file__).parent / "golden"
EXAMPLES = {"mixtral_style": mixtral_style, "deepseek_style": deepseek_style, "switch_style": switch_style}


def _moecc_program(name: str) -> dict[str, dict[str, object]]:
    model, (ids,) = EXAMPLES[name].build()
    cm = moecc.compile(model)
    cm(ids).float().sum().backward()
    (ctx,) = cm.session.contexts
    out = {
        kind: {k: v for k, v in sorted(ir.op_counts(gm).items()) if k.startswith("moecc.")}
        for kind, gm in ctx.final_graphs.items()
    }
    out["regions"] = {r.path: r.expert_fn for r in cm.regions}
    return out


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_generated_program_is_stable(name: str) -> None:
    got = _moecc_program(name)
    path = GOLDEN / f"{name}.json"
    if os.environ.get("MOECC_UPDATE_GOLDEN") or not path.exists():
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        if not os.environ.get("MOECC_UPDATE_GOLDEN"):
            pytest.fail(f"{path} did not exist; written now, review and commit it")
    assert got == json.loads(path.read_text())


def test_golden_files_name_real_ops() -> None:
    for path in GOLDEN.glob("*.json"):
        for kind in ("dynamo", "forward", "backward"):
            for op in json.loads(path.read_text())[kind]:
                ns, name = op.split(".")
                assert hasattr(getattr(torch.ops, ns), name), f"{path.name}: {op}"
