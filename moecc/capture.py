"""Capture: Dynamo gives the FX graph, AOTAutograd the forward and backward graphs; the pass pipeline
runs on them.

Experts modules with the transformers experts interface are recognised by interface before tracing
(Dynamo would otherwise decompose them, and their eager loop over `expert_hit` breaks the graph): in the
module tree moecc traces, which is a clone of the user's tree sharing its parameters and buffers, their
forward is replaced by the moecc ops. The user's model object is left untouched.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import operator
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_module_simplified
from torch._functorch.partitioners import default_partition
from torch.utils.checkpoint import CheckpointPolicy

from moecc import cost, dump, ir, ops
from moecc import dist as moecc_dist
from moecc.backends import torch_backend
from moecc.options import CompileOptions, MoeccError
from moecc.pass_manager import CompileContext, Mesh, run_stage
from moecc.passes.fuse_experts import refuse_host_sized_exchanges
from moecc.passes.lift_moe import call_activation

# ---------------------------------------------------------------------------------------------------------
# the forward / backward split: stacked expert weights are recomputed, not saved

# ops that copy or view their inputs, which a stack of expert weights goes through before the GEMMs
_WEIGHT_COPIES = {
    torch.ops.aten.stack.default,
    torch.ops.aten.cat.default,
    torch.ops.aten.clone.default,
    torch.ops.aten._to_copy.default,  # autocast's cast of the stacked weights
}


def weight_stacks(joint: fx.GraphModule, param_inputs: set[int]) -> list[fx.Node]:
    """The nodes of the joint graph that build an MoE region's stacked expert weights (a `stack` of a
    ModuleList's per-expert weights, a `cat` of gate and up, and views of them) from parameter inputs alone.
    Saved for the backward, each is a copy of the region's expert weights kept from the forward to the
    backward; recomputed there, only the layer being differentiated holds one."""
    placeholders = [n for n in joint.graph.nodes if n.op == "placeholder"]
    params = {n for i, n in enumerate(placeholders) if i in param_inputs}
    picked: list[fx.Node] = []
    chosen: set[fx.Node] = set()
    for n in joint.graph.nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        if n.target not in _WEIGHT_COPIES and not cost.is_view(n):
            continue
        if n.target in _WEIGHT_COPIES and ir.marked_region(n) is None:
            continue  # only the copies moecc made for an MoE region
        inputs = n.all_input_nodes
        if inputs and all(a in params or a in chosen for a in inputs):
            chosen.add(n)
            picked.append(n)
    return [n for n in picked if n.target in _WEIGHT_COPIES or any(a in chosen for a in n.all_input_nodes)]


def partition(joint: fx.GraphModule, joint_inputs: Any, *, ctx: CompileContext, **kwargs: Any):
    """AOTAutograd's default partition, with the stacked expert weights recomputed in the backward
    (`weight_stacks`) instead of saved; where the partitioner refuses recomputation in this graph, they are
    saved as before and the dumps say why."""
    kinds = ctx.plan.get("input_kinds", [])
    stacks = weight_stacks(joint, {i for i, k in enumerate(kinds) if k in ("expert", "replicated")})
    copies = [n for n in stacks if n.target in _WEIGHT_COPIES]
    if not copies:
        return default_partition(joint, joint_inputs, **kwargs)
    for n in stacks:
        n.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
    try:
        out = default_partition(joint, joint_inputs, **kwargs)
    except AssertionError as e:  # e.g. an impure op in the forward, which recomputation must not repeat
        for n in stacks:
            n.meta.pop("recompute", None)
        ctx.counters["partition.weight_stacks_saved"] += len(copies)
        ctx.note(f"stacked expert weights saved for the backward, not recomputed: the partitioner refused ({e})")
        return default_partition(joint, joint_inputs, **kwargs)
    ctx.counters["partition.weight_stacks_recomputed"] += len(copies)
    ctx.note(
        f"{len(copies)} stacked expert weight copies ({', '.join(sorted({str(n.target) for n in copies}))}) "
        "recomputed in the backward instead of saved"
    )
    return out


# ---------------------------------------------------------------------------------------------------------
# module tree


def clone_tree(module: nn.Module) -> nn.Module:
    """New module objects with the same parameters, buffers and hooks (so instance attributes such as
    `forward` can be replaced without touching the user's model)."""
    new = copy.copy(module)
    new.__dict__["_modules"] = {k: clone_tree(v) if v is not None else None for k, v in module._modules.items()}
    return new


_ACT_NAMES = {
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "GELU": "gelu",
    "GELUActivation": "gelu",
    "PytorchGELUTanh": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "ReLU": "relu",
}


def interface_experts(module: nn.Module) -> bool:
    """A transformers experts module: 3-D expert weights behind `forward(hidden_states, top_k_index,
    top_k_weights)`, with the layout flags its `use_experts_implementation` decorator sets."""
    if not all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed")):
        return False
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj" if module.has_gate else "up_proj", None)
    return isinstance(down, torch.Tensor) and isinstance(up, torch.Tensor) and down.ndim == 3 and up.ndim == 3


def _act_name(fn: Any) -> str | None:
    """The moecc name of an activation module (None: not one moecc computes itself)."""
    if isinstance(fn, nn.GELU):
        return "gelu_tanh" if fn.approximate == "tanh" else "gelu"
    return _ACT_NAMES.get(type(fn).__name__)


def gate_is_glu(module: nn.Module, act: str) -> bool:
    """Whether the module's `_apply_gate(h)` computes act(gate) * up over the two halves of h's last dimension,
    by its traced code (chunk into 2 along the last dim, the module's activation on the first half, times the
    second), whatever class defines it: then `moecc.glu` computes the same. Anything else in the code (a clamp,
    a bias, a scale, another split) and it is not."""

    class _Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = module  # its submodules (the activation) are traced as module calls
            self.apply_gate: Any = module._apply_gate

        def forward(self, h: torch.Tensor) -> Any:
            return self.apply_gate(h)

    try:
        gm = fx.symbolic_trace(_Gate())
    except Exception:  # code fx cannot trace is not recognised: the module's own code runs
        return False
    env: dict[fx.Node, Any] = {}
    for n in gm.graph.nodes:
        args = [env.get(a, a) if isinstance(a, fx.Node) else a for a in n.args]
        if n.op == "placeholder":
            env[n] = ("h",)
        elif n.op == "call_method" and n.target == "chunk" or n.op == "call_function" and n.target is torch.chunk:
            dim = n.kwargs.get("dim", args[2] if len(args) > 2 else 0)
            if args[0] != ("h",) or args[1:2] != [2] or dim != -1 or set(n.kwargs) - {"dim"}:
                return False
            env[n] = ("halves",)
        elif n.op == "call_function" and n.target is operator.getitem and args[0] == ("halves",):
            env[n] = ("half", args[1])
        elif n.op == "call_module" and _act_name(gm.get_submodule(str(n.target))) == act and not n.kwargs:
            env[n] = ("act", args[0])
        elif call_activation(n) == act:  # F.silu, F.relu, F.gelu (with its approximate) ...
            env[n] = ("act", args[0])
        elif n.op == "call_function" and n.target in (operator.mul, torch.mul) and not n.kwargs:
            env[n] = ("mul", frozenset(map(repr, args)))
        elif n.op == "output":
            want = frozenset(map(repr, [("act", ("half", 0)), ("half", 1)]))
            return args[0] == ("mul", want)
        else:
            return False
    return False


def interface_region(path: str, module: Any) -> ir.MoERegion:
    up = module.gate_up_proj if module.has_gate else module.up_proj
    E = int(up.shape[0])
    F_ = int(module.down_proj.shape[1] if module.is_transposed else module.down_proj.shape[2])
    H = int(up.shape[1] if module.is_transposed else up.shape[2])
    act = _act_name(getattr(module, "act_fn", None))
    gate_is_default = False
    if module.has_gate and act is not None:
        try:
            from transformers.integrations.moe import _default_apply_gate

            gate_is_default = type(module)._apply_gate is _default_apply_gate
        except ImportError:
            gate_is_default = False
        gate_is_default = gate_is_default or gate_is_glu(module, act)
    if getattr(module, "has_post_expert_norm", False) or act is None:
        fn = "module"
    elif module.has_gate:
        fn = torch_backend.glu_name(act) if gate_is_default and getattr(module, "is_concatenated", True) else "module"
    else:
        fn = f"mlp_{act}"
    top_k = int(getattr(getattr(module, "config", None), "num_experts_per_tok", 0) or 0)
    reason = "" if fn != "module" else "custom gate/activation: the module's own code runs between the grouped GEMMs"
    names = [n for n, _ in module.named_parameters(recurse=False)]
    return ir.MoERegion(
        path,
        "hf_experts",
        E,
        top_k,
        H,
        F_,
        fn,
        "lifted",
        reason,
        [f"{path}.{n}" for n in names],
        bool(module.has_bias),
    )


def glu_kind(region: ir.MoERegion) -> str | None:
    """The activation of a region whose experts compute act(gate) * up over [gate | up] halves with the module's
    default gate (what `moecc.glu` computes), else None: the module's own gate code runs."""
    return torch_backend.glu_act(region.expert_fn)


def interface_forward(
    self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts interface computed with moecc ops; the gate/activation is the module's own code."""
    w1 = self.gate_up_proj if self.has_gate else self.up_proj
    E = getattr(self, "_moecc_num_experts", w1.shape[0])  # all experts; w1 holds this rank's slice under ep
    T, K = top_k_index.shape
    capacity = ops.expert_capacity(getattr(self, "_moecc_capacity_factor", None), T, K, E)
    x_SH, src_S, eid_S, offs_E = ops.route_permute(hidden_states, top_k_index, E, capacity)
    h = ops.grouped_mm(x_SH, w1 if self.is_transposed else w1.transpose(1, 2), offs_E)
    if self.has_bias:
        h = h + (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias)[eid_S]
    glu = getattr(self, "_moecc_glu", None)
    if glu is not None:  # the default gate over [gate | up] halves: one op (a kernel on the triton backend)
        h = ops.glu(h, glu)
    else:
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    y = ops.grouped_mm(h, self.down_proj if self.is_transposed else self.down_proj.transpose(1, 2), offs_E)
    if self.has_bias:
        y = y + self.down_proj_bias[eid_S]
    if getattr(self, "has_post_expert_norm", False):
        y = self.post_expert_norm(y)
    return ops.unpermute_combine(y, src_S, offs_E, top_k_weights).to(hidden_states.dtype)


def verify_interface_region(region: ir.MoERegion, original: nn.Module, lifted: nn.Module) -> None:
    """Compare the lifted experts with the module's own forward on random routing of the real weights."""
    p = next(original.parameters())
    gen = torch.Generator(device="cpu").manual_seed(0)
    T, K = 37, max(region.top_k, 1)
    x = torch.randn(T, region.hidden, generator=gen).to(p.device, p.dtype)
    idx = torch.stack([torch.randperm(region.num_experts, generator=gen)[:K] for _ in range(T)]).to(p.device)
    w = torch.rand(T, K, generator=gen).to(p.device, p.dtype)
    with torch.no_grad():
        expect = original(x, idx, w).float()
        got = lifted(x, idx, w).float()
    tol = 1e-4 if p.dtype == torch.float32 else 3e-2  # relative to the output's magnitude
    err = (got - expect).abs().max().item()
    scale = expect.abs().max().item()
    if not err <= tol * scale + 1e-12:
        raise MoeccError(
            f"verify: {region.path}: the lifted experts ({region.expert_fn}) differ from the module's "
            f"own forward by {err:.3g} (max |ref| {scale:.3g}, tolerance {tol}); not using them"
        )


# ---------------------------------------------------------------------------------------------------------
# a compile session: one per compiled module, many graphs (graph breaks, recompiles)


@dataclasses.dataclass
class Session:
    options: CompileOptions
    model_name: str
    module_regions: dict[str, ir.MoERegion]
    mesh: Mesh = dataclasses.field(default_factory=Mesh)
    released: frozenset[str] = frozenset()  # other ranks' ModuleList experts' parameters (stand-ins here)
    sliced: frozenset[str] = frozenset()  # 3-D expert weights cut to this rank's experts
    hooked: list[str] = dataclasses.field(default_factory=list)  # parameters synchronised by hooks
    param_names: dict[int, str] = dataclasses.field(default_factory=dict)  # id(parameter) -> name in the model
    buffer_names: dict[int, str] = dataclasses.field(default_factory=dict)
    compile_only: bool = False  # ahead of time: build the graphs, then stop before running them
    contexts: list[CompileContext] = dataclasses.field(default_factory=list)
    graphs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    dump_root: Path | None = None

    graph_breaks_before: dict[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.graph_breaks_before = dict(torch._dynamo.utils.counters["graph_break"])
        if self.options.dump_dir:
            root = Path(self.options.dump_dir)
            if self.mesh.world > 1:
                root = root / f"rank{self.mesh.rank}"
            self.dump_root = dump.session_root(str(root), self.model_name)

    @property
    def regions(self) -> list[ir.MoERegion]:
        seen: dict[str, ir.MoERegion] = {}
        for c in self.contexts:
            for r in c.regions:
                seen.setdefault(r.path, r)
        return list(seen.values())

    def graph_breaks(self) -> dict[str, int]:
        """Graph breaks Dynamo reported since this session started (reason -> count)."""
        now = dict(torch._dynamo.utils.counters["graph_break"])
        return {
            k: v - self.graph_breaks_before.get(k, 0) for k, v in now.items() if v > self.graph_breaks_before.get(k, 0)
        }

    def counters(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for c in self.contexts:
            for k, v in c.counters.items():
                total[k] = total.get(k, 0) + v
        return total

    def backend(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        """The Dynamo backend: dynamo-stage passes, then AOTAutograd with the aot-stage passes."""
        n = len(self.contexts)
        try:
            return self._compile(gm, example_inputs)
        except torch._dynamo.exc.RestartAnalysis:
            # Dynamo traces the frame again and calls this backend anew (e.g. with dynamic shapes, to turn a
            # Python scalar into a tensor): this attempt's context is dropped so that nothing is counted twice
            del self.contexts[n:]
            raise

    def _compile(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        gid = len(self.contexts)
        device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), None)
        profile = cost.default_profile(device, self.options.profile)
        if self.options.cuda_graph:
            profile = cost.replayed(profile)
        ctx = CompileContext(
            self.options,
            self.mesh,
            profile,
            gid,
            self.module_regions,
            self.released,
        )
        self.contexts.append(ctx)
        absolute_paths(gm, self.param_names)
        if self.dump_root is not None:
            ctx.dumper = dump.Dumper(self.dump_root, gid)
            ctx.dumper.write_graph(gm, "capture", "dynamo", 0.0)
        sig = [ir.node_comment(n) for n in gm.graph.nodes if n.op == "placeholder"]
        ctx.plan["graph_inputs"] = [self._input_source(n) for n in gm.graph.nodes if n.op == "placeholder"]
        ctx.plan["num_outputs"] = len(next(n for n in gm.graph.nodes if n.op == "output").args[0])
        gm = run_stage(gm, ctx, "dynamo", "dynamo")
        if self.options.cuda_graph:
            refuse_host_sized_exchanges(gm, ctx)
        from moecc.passes.schedule_overlap import check_collective_order

        check_collective_order(gm, ctx)
        for r in ctx.regions:
            if r.kind == "hf_experts" and not r.top_k:
                r.top_k = _top_k_from_graph(gm, r.path)

        def compile_aot(kind: str) -> Callable:
            def compiler(g: fx.GraphModule, _inputs: list[Any]) -> Callable:
                out = run_stage(g, ctx, "aot", kind)
                if ctx.dumper is not None:
                    ctx.dumper.write_index(ctx)
                from moecc.profile import NodeTimer, measured

                run = measured(NodeTimer(out, ctx.graph_id, kind) if ctx.options.profile_nodes else out)
                if kind == "backward" and self.mesh.world > 1:
                    run = _naming_peer_failures(run, f"a collective of {self.model_name}'s backward")
                return make_boxed_func(run)

            return compiler

        t0 = time.perf_counter()
        compiled = aot_module_simplified(
            gm,
            example_inputs,
            fw_compiler=compile_aot("forward"),
            bw_compiler=compile_aot("backward"),
            partition_fn=functools.partial(partition, ctx=ctx),
        )
        ctx.note(f"AOTAutograd took {(time.perf_counter() - t0) * 1e3:.0f} ms")
        self.graphs.append(
            {
                "graph_id": gid,
                "inputs": "; ".join(sig[:4]) + (" ..." if len(sig) > 4 else ""),
                "regions": ", ".join(r.path for r in ctx.regions) or "-",
            }
        )
        if ctx.dumper is not None:
            ctx.dumper.write_index(ctx)
        if self.compile_only:
            raise CompileOnly(ctx)
        return compiled

    def _input_source(self, node: fx.Node) -> list[Any]:
        """Where a graph input comes from: ["param" | "buffer", name in the model] or ["arg", position] or
        ["kwarg", name] of the compiled module's call, or ["other", Dynamo's source]."""
        ga = node.meta.get("grapharg")
        example = getattr(ga, "example", None)
        if id(example) in self.param_names:
            return ["param", self.param_names[id(example)]]
        if id(example) in self.buffer_names:
            return ["buffer", self.buffer_names[id(example)]]
        source = "" if ga is None else (ga.source.name if isinstance(ga.source.name, str) else ga.source.name())
        m = re.fullmatch(r"L\['args'\]\[(\d+)\]", source)
        if m:
            return ["arg", int(m.group(1))]
        m = re.fullmatch(r"L\['kwargs'\]\['(\w+)'\]", source)
        if m:
            return ["kwarg", m.group(1)]
        return ["other", source]


class CompileOnly(Exception):
    """Raised by the backend in ahead-of-time compiles, once the graphs exist, so that nothing runs."""

    def __init__(self, ctx: CompileContext):
        super().__init__("compiled ahead of time; not run")
        self.ctx = ctx


_SELF_PATH = re.compile(r"^(L\['[^']*'\])\.?(.*)$")


def absolute_paths(gm: fx.GraphModule, param_names: dict[int, str]) -> None:
    """Make module paths and parameter names in a Dynamo graph relative to the compiled model.

    A graph Dynamo captures after a graph break starts in a submodule's frame, and names modules and
    parameters from that submodule; the parameters' identities say which submodule it is. Each parameter
    input gets its model-level name in `meta["moecc_param"]`, and `nn_module_stack` paths get the prefix.
    """
    from moecc.passes.lift_moe import relative_param_name

    prefix = None
    for n in gm.graph.nodes:
        rel = relative_param_name(n)
        ga = n.meta.get("grapharg")
        name = param_names.get(id(getattr(ga, "example", None)))
        if rel is None or name is None:
            continue
        n.meta["moecc_param"] = name
        if prefix is None and name.endswith(rel):
            prefix = name[: len(name) - len(rel)]
    if not prefix:
        return
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack")
        if not stack:
            continue
        for key, (path, cls) in list(stack.items()):
            m = _SELF_PATH.match(path)
            if m:
                rest = f"{prefix}{m.group(2)}" if m.group(2) else prefix.rstrip(".")
                stack[key] = (f"{m.group(1)}.{rest}", cls)


def _naming_peer_failures(fn: Callable[..., Any], where: str) -> Callable[..., Any]:
    """fn, with a transport's peer failure re-raised as moecc's (`dist.raise_named_peer_failure`): the forward's are
    named by the compiled module's call, a backward runs from the autograd engine."""

    def run(*args: Any) -> Any:
        try:
            return fn(*args)
        except RuntimeError as e:
            moecc_dist.raise_named_peer_failure(e, where)
            raise

    return run


def _top_k_from_graph(gm: fx.GraphModule, path: str) -> int:
    for n in gm.graph.nodes:
        if n.target is torch.ops.moecc.route_permute.default and ir.facts(n).get("region") == path:
            idx = n.args[1].meta.get("example_value")
            if isinstance(idx, torch.Tensor):
                return int(idx.shape[1])
    return 0
