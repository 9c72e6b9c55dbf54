"""The command line: compile an artifact, explain it, and the demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moecc import cli

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_commands() -> None:
    r = subprocess.run([sys.executable, "-m", "moecc.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for cmd in ("demo", "compile", "explain"):
        assert cmd in r.stdout


def test_compile_writes_artifact_and_explain_reads_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "art"
    assert cli.main(["compile", str(ROOT / "examples" / "switch_style.py") + ":build", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and manifest["input_signature"] == ["torch.int64[2, 16]"]
    assert [r["status"] for r in manifest["regions"]] == ["lifted", "lifted"]
    for rel, digest in manifest["files"].items():
        assert (out / rel).is_file() and len(digest) == 64
    assert "torch.ops.moecc.grouped_mm" in (out / "program" / "rank0.fwd.py").read_text()
    capsys.readouterr()
    assert cli.main(["explain", str(out)]) == 0
    text = capsys.readouterr().out
    assert "switch_style.py:build for 1 rank(s)" in text and "lift_moe" in text and "layers.0.moe.experts" in text


def test_compile_for_two_ranks_and_run(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    out = tmp_path / "a"
    assert cli.main(["compile", "moecc.examples.mixtral_style:build", "--world-size", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "program").glob("*.py")) == [
        "rank0.bwd.py",
        "rank0.fwd.py",
        "rank1.bwd.py",
        "rank1.fwd.py",
    ]
    capfd.readouterr()
    assert cli.main(["run", str(out), "--steps", "2"]) == 0
    printed = capfd.readouterr().out
    assert "mesh dp=1 x ep=2" in printed and "moecc loss" in printed


def test_bad_factory_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["compile", "moecc.examples.mixtral_style:nope", "--out", str(tmp_path / "x")]) == 2
    assert "has no attribute 'nope'" in capsys.readouterr().err
    assert cli.main(["compile", "no_such_file.py", "--out", str(tmp_path / "x")]) == 2
    assert "expected MODULE:FUNCTION" in capsys.readouterr().err


def test_out_dir_that_is_not_an_artifact_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    assert cli.main(["compile", "moecc.examples.switch_style:build", "--out", str(tmp_path)]) == 2
    assert "is not a moecc artifact" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").exists()


def test_demo_runs_on_two_ranks_and_matches_eager(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    assert cli.main(["demo", "--world", "2", "--steps", "3", "--tokens", "16", "--dump-dir", str(tmp_path)]) == 0
    out = capfd.readouterr().out  # printed by rank 0's process
    assert "mesh dp=1 x ep=2" in out and "eager loss" in out and "moecc loss" in out
    assert "expert parameters per rank: 96.0 KiB of 192.0 KiB (1/2)" in out
    assert out.count("| lifted") == 2
    assert sorted(p.parent.parent.name for p in tmp_path.glob("rank*/*/summary.md")) == ["rank0", "rank1"]


def test_profile_writes_the_steps_host_costs_into_a_profile(tmp_path: Path) -> None:
    """`moecc profile --host-costs-into`: the host's time per node of the profiled step replaces a profile's
    host fields, and the file is still a profile compile can load."""
    from moecc import cost

    prof = tmp_path / "p.json"
    prof.write_text(json.dumps(cost.PROFILES["cpu"].to_json()))
    out = tmp_path / "prof"
    args = ["profile", "moecc.examples.mixtral_style:build", "--out", str(out), "--steps", "2"]
    assert cli.main([*args, "--host-costs-into", str(prof)]) == 0
    assert (out / "timeline.md").exists()
    p = cost.load_profile(prof)
    # less what a node range costs (a view's own time may be no more than that)
    assert p.host_op > 0 and p.host_view >= 0 and dict(p.host_ops)["moecc.grouped_mm"] > 0
    assert p.gemm_flops == cost.PROFILES["cpu"].gemm_flops  # the rest of the profile as it was
