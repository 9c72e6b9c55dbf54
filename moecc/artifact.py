"""Ahead-of-time artifacts: compile for W ranks in one process, run later without re-running the passes.

    moecc compile FACTORY --world-size W [--ep E] --out DIR    # here: trace each rank with a fake process group
    moecc run DIR --nproc W                                    # later: W processes train from DIR
    model = moecc.load(DIR, model)                             # or in your own (torchrun) script

DIR holds `manifest.json` (model fingerprint, input signature, mesh, versions, sha256 of every file),
`program/rank<r>.{fwd,bwd}.py` (the generated programs, readable), `program/rank<r>.{fwd,bwd}.pt` (the same
graphs, loadable), the plan and the dumps. Loading checks the manifest against the live world, model,
inputs and files and refuses any mismatch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import platform
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn

import moecc
from moecc import api, capture, cost, ir
from moecc import dist as mdist
from moecc.options import CompileOptions, MoeccError

MANIFEST = "manifest.json"
# 2: the fused expert-parallel plan starts with the count of rows a rank computes (programs of format 1 pass plans
# one element shorter); the dW ops take the scale sync_grads folds into them
FORMAT = 2
_GROUP_ROLES = ("ep_group", "dp_group", "world_group")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def input_signature(inputs: tuple[Any, ...]) -> list[str]:
    return [f"{t.dtype}{list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs]


@contextlib.contextmanager
def fake_world(rank: int, world_size: int) -> Iterator[None]:
    """A fake process group (collectives move nothing), to trace rank `rank` of `world_size` in one process."""
    if world_size == 1:
        yield
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise MoeccError("moecc compile --world-size: run it outside a distributed job (it makes a fake world)")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        mdist._GROUPS.clear()


def _role_names(graph: fx.Graph, names: dict[str, str]) -> None:
    """Replace process-group names in collective arguments (e.g. live "3" -> "moecc:ep_group")."""
    for n in graph.nodes:
        n.args = tuple(names.get(a, a) if isinstance(a, str) else a for a in n.args)


def artifact_device(manifest: dict[str, Any]) -> str:
    """The device type an artifact was compiled for (artifacts written before the field existed: the CPU)."""
    return str(manifest.get("device", "cpu"))


def compile_artifact(factory: str, out: Path, world_size: int, ep: int | None, **options: Any) -> dict[str, Any]:
    """Compile `factory`'s model for `world_size` ranks into `out`; returns the manifest."""
    from moecc.cli import build_from

    if not hasattr(torch._functorch.config, "force_non_lazy_backward_lowering"):
        raise MoeccError(f"ahead-of-time compiles need a torch with eager backward lowering (have {torch.__version__})")
    (out / "program").mkdir(parents=True)
    ranks, fingerprint, signature, regions = [], "", [], []
    for rank in range(world_size):
        with fake_world(rank, world_size):
            model, inputs = build_from(factory)
            fingerprint, signature = mdist.model_fingerprint(model), input_signature(inputs)
            device = mdist.device_type(model)
            opts = CompileOptions.make(ep=ep, dump_dir=out / "dumps", **options)
            cm = api.CompiledModule(model, opts)
            cm.session.compile_only = True
            try:
                with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
                    cm(*inputs)
                raise MoeccError(f"{factory}: nothing was compiled (is the model's forward traced by Dynamo?)")
            except torch._dynamo.exc.BackendCompilerFailed as e:
                if not isinstance(e.inner_exception, capture.CompileOnly):
                    raise
                ctx = e.inner_exception.ctx
            cm.write_summary()
            torch._dynamo.reset()
        if len(cm.session.contexts) != 1 or ctx.plan["num_outputs"] != 1:
            raise MoeccError(
                f"{factory}: an artifact needs one graph returning one tensor (got "
                f"{len(cm.session.contexts)} graph(s), {ctx.plan['num_outputs']} output(s)); "
                "remove graph breaks or use moecc.compile at run time"
            )
        if "backward" not in ctx.final_graphs:
            raise MoeccError(f"{factory}: no backward graph was built (no parameter requires grad?)")
        others = [s for s in ctx.plan["graph_inputs"] if s[0] == "other"]
        if others:
            raise MoeccError(f"{factory}: graph inputs {others} are neither model state nor call arguments")
        mesh = cm.session.mesh
        roles = {getattr(mesh, r): f"moecc:{r}" for r in _GROUP_ROLES if getattr(mesh, r)}
        for kind in ("forward", "backward"):
            gm = ctx.final_graphs[kind]
            _role_names(gm.graph, roles)
            gm.recompile()
            stem = f"rank{rank}.{'fwd' if kind == 'forward' else 'bwd'}"
            (out / "program" / f"{stem}.py").write_text(ir.readable(gm, f"# moecc program: rank {rank}, {kind}"))
            torch.save(gm, out / "program" / f"{stem}.pt")
        regions = [dataclasses.asdict(r) for r in cm.regions]
        ranks.append(
            {
                "inputs": ctx.plan["graph_inputs"],
                "num_outputs": ctx.plan["num_outputs"],
                "mesh": {"dp": mesh.dp, "ep": mesh.ep, "rank": mesh.rank},
            }
        )
        for plan_file in (cm.dump_root / "graph_0").glob("plan.md"):
            shutil.copy(plan_file, out / f"plan.rank{rank}.md")
    manifest = {
        "format": FORMAT,
        "moecc": moecc.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "factory": factory,
        "model_fingerprint": fingerprint,
        "input_signature": signature,
        "world_size": world_size,
        "device": device,
        "ep": ranks[0]["mesh"]["ep"],
        "regions": regions,
        "ranks": ranks,
        "files": file_hashes(out),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    return manifest


# ---------------------------------------------------------------------------------------------------------


class _Program(torch.autograd.Function):
    """Runs a compiled forward graph and, on backward, its backward graph (AOTAutograd's calling convention:
    the forward returns the outputs then the tensors saved for backward; the backward takes the saved
    tensors then the outputs' gradients and returns one gradient per forward input)."""

    @staticmethod
    def forward(ctx: Any, program: ArtifactModule, *primals: torch.Tensor) -> Any:
        outs = program.fwd(*primals)
        n = program.num_outputs
        ctx.program = program
        ctx.save_for_backward(*outs[n:])
        return tuple(outs[:n]) if n > 1 else outs[0]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        program = ctx.program
        grads_in = program.bwd(*ctx.saved_tensors, *(g.contiguous() for g in grads))
        return (None, *grads_in)


class ArtifactModule(nn.Module):
    """A model running a moecc artifact: this rank's shard of the model's parameters, the compiled program."""

    def __init__(self, root: Path, model: nn.Module):
        super().__init__()
        manifest = _check_files(root)
        rank, world_size = mdist.world()
        if world_size != manifest["world_size"]:
            raise MoeccError(
                f"{root}: compiled for world size {manifest['world_size']}, this run has {world_size}; "
                f"recompile with `moecc compile ... --world-size {world_size}`"
            )
        compiled_for, here = artifact_device(manifest), mdist.device_type(model)
        if here != compiled_for:
            raise MoeccError(
                f"{root}: compiled for the {compiled_for} (its programs hold {compiled_for} tensors and the kernels "
                f"lowered for it); this {type(model).__name__} is on the {here}: move it to the {compiled_for}, or "
                "compile it where it runs with moecc.compile"
            )
        fp = mdist.model_fingerprint(model)
        if fp != manifest["model_fingerprint"]:
            raise MoeccError(
                f"{root}: compiled for another model ({manifest['factory']}, fingerprint "
                f"{manifest['model_fingerprint']}); this {type(model).__name__} has fingerprint {fp}"
            )
        self.manifest = manifest
        self.signature: list[str] = manifest["input_signature"]
        self.module = capture.clone_tree(model)
        interface = {
            p: capture.interface_region(p, m).num_experts
            for p, m in self.module.named_modules()
            if capture.interface_experts(m)
        }
        self.mesh, self.released, _ = api.place_experts(
            self.module, interface, api.expert_lists_of(self.module), manifest["ep"], type(model).__name__
        )
        spec = manifest["ranks"][rank]
        roles = {f"moecc:{r}": getattr(self.mesh, r) for r in _GROUP_ROLES}
        self.fwd, self.bwd = (self._load(root / "program" / f"rank{rank}.{k}.pt", roles) for k in ("fwd", "bwd"))
        check_fused_reach(root, [self.fwd.graph, self.bwd.graph], self.mesh.ep_hosts, self.mesh.ep_peer_access)
        self.inputs: list[list[Any]] = spec["inputs"]
        self.num_outputs: int = spec["num_outputs"]

    @staticmethod
    def _load(path: Path, roles: dict[str, str]) -> fx.GraphModule:
        gm = torch.load(path, weights_only=False)  # the file's hash was checked against the manifest
        _role_names(gm.graph, roles)
        gm.recompile()
        return gm

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.module.named_parameters(prefix, recurse, remove_duplicate):
            if name[len(prefix) + 1 if prefix else 0 :] not in self.released:
                yield name, p

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        got = input_signature(args)
        if got != self.signature:
            raise MoeccError(
                f"inputs {got} differ from the artifact's input signature {self.signature}; "
                "recompile the artifact for these shapes"
            )
        state: dict[str, dict[str, Any]] = {
            "param": dict(self.module.named_parameters(remove_duplicate=False)),
            "buffer": dict(self.module.named_buffers(remove_duplicate=False)),
        }
        primals = []
        for kind, key in self.inputs:
            primals.append(
                state[kind][key] if kind in ("param", "buffer") else args[key] if kind == "arg" else kwargs[key]
            )
        return _Program.apply(self, *primals)


def _check_files(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.exists():
        raise MoeccError(f"{root}: no {MANIFEST}; not a moecc artifact")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise MoeccError(f"{root}: artifact format {manifest.get('format')}, this moecc reads {FORMAT}; recompile")
    if manifest["torch"] != torch.__version__:
        raise MoeccError(f"{root}: compiled with torch {manifest['torch']}, this is {torch.__version__}; recompile")
    for rel, digest in manifest["files"].items():
        f = root / rel
        if not f.is_file():
            raise MoeccError(f"{root}: {rel} is missing")
        if _sha256(f) != digest:
            raise MoeccError(
                f"{root}: {rel} changed after it was compiled (sha256 differs from the manifest); "
                "refusing to load it — recompile"
            )
    return manifest


FUSED_ACROSS_RANKS = ("moecc.ep_dispatch_gemm", "moecc.ep_gemm_combine")  # the fused ops that take an ep


def check_fused_reach(root: Path, graphs: list[fx.Graph], ep_hosts: int, peer_access: bool = True) -> None:
    """An artifact whose program fuses dispatch and combine across ranks (compiled in a fake world, which
    `moecc compile` takes to be one node of GPUs with peer access) cannot run where an ep-group spans hosts,
    or where its GPUs cannot access each other's memory: its kernels reach their peers through symmetric
    memory, directly."""
    if ep_hosts <= 1 and peer_access:
        return
    where = f"span {ep_hosts} hosts" if ep_hosts > 1 else "have GPUs without peer-to-peer access between them"
    for graph in graphs:
        for n in graph.nodes:
            name = str(n.target).removesuffix(".default")
            ep = cost.schema_args(n)["ep"] if n.op == "call_function" and name in FUSED_ACROSS_RANKS else 1
            if int(ep) > 1:
                raise MoeccError(
                    f"{root}: node {n.name} ({name}, ep={ep}) exchanges rows over symmetric memory, "
                    f"which reaches the GPUs of one node that have peer access; this job's ep-groups {where}. "
                    f"Run it with each ep-group on such GPUs, or recompile with MOECC_FUSED_EP=0"
                )


def load(root: str | Path, model: nn.Module) -> ArtifactModule:
    """Run `model` from a moecc artifact (compiled by `moecc compile`) on this rank, without re-running the
    passes. Every rank of a `world_size` job calls it with the same model; `parameters()` is this rank's
    shard, for an ordinary optimizer. The model is sharded in place as by `moecc.compile`."""
    return ArtifactModule(Path(root), model)
