"""Ahead-of-time artifacts: compile for W ranks in one process (fake process group), run on W gloo
processes without re-running the passes, and refuse what does not match."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import moecc
from moecc import artifact, testing
from moecc.examples import mixtral_style, switch_style

SWITCH = "moecc.examples.switch_style:build"
MIXTRAL = "moecc.examples.mixtral_style:build"


@pytest.fixture(scope="module")
def switch_w1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art") / "switch_w1"
    artifact.compile_artifact(SWITCH, out, 1, None)
    return out


@pytest.fixture(scope="module")
def mixtral_w2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art") / "mixtral_w2"
    manifest = artifact.compile_artifact(MIXTRAL, out, 2, 2)
    assert manifest["world_size"] == 2 and manifest["ep"] == 2
    return out


def test_artifact_layout(mixtral_w2: Path) -> None:
    manifest = json.loads((mixtral_w2 / "manifest.json").read_text())
    names = sorted(p.name for p in (mixtral_w2 / "program").iterdir())
    assert names == [f"rank{r}.{k}.{e}" for r in (0, 1) for k in ("bwd", "fwd") for e in ("pt", "py")]
    assert manifest["input_signature"] == ["torch.int64[2, 16]"]
    assert [r["path"] for r in manifest["regions"]] == ["layers.0.moe.experts", "layers.1.moe.experts"]
    assert set(manifest["files"]) >= {f"program/{n}" for n in names}
    fwd = (mixtral_w2 / "program" / "rank1.fwd.py").read_text()
    assert "moecc.all_to_all_rows" in fwd and "'moecc:ep_group'" in fwd  # group names are roles, bound at load
    bwd = (mixtral_w2 / "program" / "rank1.bwd.py").read_text()
    assert "_c10d_functional.all_reduce" in bwd and "'moecc:world_group'" in bwd


def test_single_rank_artifact_matches_eager(switch_w1: Path) -> None:
    model, (ids,) = switch_style.build()
    ref = copy.deepcopy(model)
    run = moecc.load(switch_w1, model)
    out = run(ids)
    torch.testing.assert_close(out, ref(ids))
    testing.lm_loss(out, ids).backward()
    testing.lm_loss(ref(ids), ids).backward()
    ref_params = dict(ref.named_parameters())
    for name, p in run.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, msg=lambda m, n=name: f"{n}: {m}")


def _train_from_artifact(rank: int, world: int, root: str) -> None:
    model, (ids,) = mixtral_style.build()
    ref = copy.deepcopy(model)
    run = moecc.load(root, model)
    assert (run.mesh.dp, run.mesh.ep) == (1, 2)
    opt = torch.optim.AdamW(run.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for step in range(2):
        gen = torch.Generator().manual_seed(step)
        batches = [torch.randint(0, 64, ids.shape, generator=gen) for _ in range(world)]
        testing.step_against_eager(run, ref, (opt, ref_opt), batches, rank, run.mesh.ep_index, f"artifact {step}")


def test_two_rank_artifact_trains_like_eager(mixtral_w2: Path) -> None:
    testing.spawn(_train_from_artifact, 2, str(mixtral_w2), backend="gloo")


def test_other_world_size_is_refused(mixtral_w2: Path) -> None:
    model, _ = mixtral_style.build()
    with pytest.raises(moecc.MoeccError, match=r"compiled for world size 2, this run has 1.*--world-size 1"):
        moecc.load(mixtral_w2, model)


def test_other_model_is_refused(switch_w1: Path) -> None:
    model, _ = mixtral_style.build()
    with pytest.raises(moecc.MoeccError, match="compiled for another model"):
        moecc.load(switch_w1, model)


def test_model_on_another_device_is_refused(switch_w1: Path) -> None:
    """An artifact's programs are lowered for the device it was traced on (the manifest says which): a model
    elsewhere (here the meta device; a GPU on a GPU node) is refused before anything runs."""
    assert json.loads((switch_w1 / "manifest.json").read_text())["device"] == "cpu"
    model, _ = switch_style.build()
    with pytest.raises(moecc.MoeccError, match=r"compiled for the cpu .* SwitchStyleLM is on the meta: move it"):
        moecc.load(switch_w1, model.to("meta"))


def test_other_input_signature_is_refused(switch_w1: Path) -> None:
    model, _ = switch_style.build()
    run = moecc.load(switch_w1, model)
    with pytest.raises(moecc.MoeccError, match=r"inputs \['torch.int64\[2, 8\]'\] differ from the artifact"):
        run(torch.randint(0, 64, (2, 8)))


def test_tampered_file_is_refused(tmp_path: Path, switch_w1: Path) -> None:
    import shutil

    copy_dir = tmp_path / "copy"
    shutil.copytree(switch_w1, copy_dir)
    target = copy_dir / "program" / "rank0.fwd.pt"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    model, _ = switch_style.build()
    with pytest.raises(moecc.MoeccError, match=r"program/rank0.fwd.pt changed after it was compiled"):
        moecc.load(copy_dir, model)
    target.unlink()
    with pytest.raises(moecc.MoeccError, match=r"program/rank0.fwd.pt is missing"):
        moecc.load(copy_dir, model)


def test_fused_program_is_refused_where_an_ep_group_spans_hosts() -> None:
    """`moecc compile` takes its fake world to be one node; a program that fuses dispatch and combine across
    ranks is refused at load where the job's ep-groups span hosts (symmetric memory reaches one node)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from moecc import ops

    def layer(x: torch.Tensor, idx: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h, _, plan = ops.ep_dispatch_gemm(x, idx, w1, 2, "moecc:ep_group")
        return ops.ep_gemm_combine(h[:, :24], w2, w, plan, 2, "moecc:ep_group")[0]

    args = (torch.randn(64, 16), torch.randint(0, 8, (64, 2)), torch.randn(4, 16, 48), torch.randn(4, 24, 16))
    graph = make_fx(layer, tracing_mode="fake")(*args, torch.rand(64, 2)).graph
    artifact.check_fused_reach(Path("art"), [graph], 1)  # one node: runs
    with pytest.raises(moecc.MoeccError, match=r"art: node ep_dispatch_gemm .*ep=2.*span 2 hosts.*MOECC_FUSED_EP=0"):
        artifact.check_fused_reach(Path("art"), [graph], 2)
    with pytest.raises(moecc.MoeccError, match=r"without peer-to-peer access"):
        artifact.check_fused_reach(Path("art"), [graph], 1, peer_access=False)
    one_rank = make_fx(lambda x, i, w1: ops.ep_dispatch_gemm(x, i, w1, 1, "")[0], tracing_mode="fake")(*args[:3])
    artifact.check_fused_reach(Path("art"), [one_rank.graph], 2)  # one rank's fused ops exchange nothing
