"""Public API: `moecc.compile` (function and class decorator) and the `torch.compile(backend="moecc")` backend."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from moecc import capture, dist
from moecc.options import CompileOptions, MoeccError
from moecc.pass_manager import PassCheckError

# Dynamo settings moecc traces under: data-dependent routing (torch.where on expert masks) must not break
# the graph inside an MoE region, and a recompile storm must fail loudly rather than drop to eager.
_DYNAMO_CONFIG: dict[str, Any] = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True}
for _flag in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
    if hasattr(torch._dynamo.config, _flag):
        _DYNAMO_CONFIG[_flag] = True
        break

_ENTRY_IDS = itertools.count()
_EXPERTS_NAME = re.compile(r"(^|\.)(experts?|moe_experts|local_experts)$")


def moe_looking_modules(model: nn.Module) -> list[str]:
    """Paths of modules that look like MoE experts: an experts interface module, or a ModuleList named
    like experts whose children are of one class."""
    out = []
    for path, m in model.named_modules():
        if capture.interface_experts(m):
            out.append(path)
        elif (
            isinstance(m, nn.ModuleList)
            and len(m) >= 2
            and _EXPERTS_NAME.search(path)
            and len({type(c) for c in m}) == 1
        ):
            out.append(path)
    return out


def _entry_point(module: nn.Module) -> Callable[..., Any]:
    """A function calling `module`, with a code object of its own: Dynamo caches compiled code per code
    object, so each compiled model keeps its own cache (and its own backend) instead of piling entries, and
    recompile-limit counts, onto the model class's shared `forward`."""

    def entry(*args: Any, **kwargs: Any) -> Any:
        return module(*args, **kwargs)

    entry.__code__ = entry.__code__.replace(co_name=f"moecc_{type(module).__name__}_{next(_ENTRY_IDS)}")
    return entry


def expert_lists_of(module: nn.Module) -> dict[str, int]:
    """ModuleList experts (by moe_looking_modules) and how many experts each holds."""
    looking = set(moe_looking_modules(module))
    return {p: len(m) for p, m in module.named_modules() if isinstance(m, nn.ModuleList) and p in looking}


def place_experts(
    clone: nn.Module, interface_counts: dict[str, int], expert_lists: dict[str, int], ep: int | None, name: str
) -> tuple[Any, frozenset[str], frozenset[str]]:
    """Choose the mesh and shard `clone` in place for it: each rank keeps its slice of every experts module.

    3-D expert weights (experts-interface modules) are replaced by a new parameter holding this rank's
    slice; ModuleList experts of other ranks have their weights released (one-element stand-ins, which the
    graph never reads). Returns the mesh, the released parameter names and the sliced ones.
    """
    world_size = dist.world()[1]
    counts = {**interface_counts, **expert_lists}
    mesh = dist.make_mesh(dist.choose_ep(world_size, list(counts.values()), ep, f"moecc.compile({name})"))
    for path, e in counts.items():
        if e % mesh.ep:
            ok = [d for d in dist.divisors(e) if world_size % d == 0]
            raise MoeccError(f"{path}: {e} experts do not divide ep={mesh.ep}; pick ep in {ok} or pad experts")
    released: set[str] = set()
    sliced: set[str] = set()
    if mesh.ep == 1:
        return mesh, frozenset(), frozenset()
    modules = dict(clone.named_modules())
    for path, E in interface_counts.items():
        m = modules[path]
        lo, hi = mesh.ep_index * E // mesh.ep, (mesh.ep_index + 1) * E // mesh.ep
        for pname, p in list(m.named_parameters(recurse=False)):
            if p.ndim >= 2 and p.shape[0] == E:
                m._parameters[pname] = nn.Parameter(p.detach()[lo:hi].clone(), requires_grad=p.requires_grad)
                p.data = dist.standin(p)
                sliced.add(f"{path}.{pname}" if path else pname)
        m._moecc_num_experts = E
    for path, E in expert_lists.items():
        lo, hi = mesh.ep_index * E // mesh.ep, (mesh.ep_index + 1) * E // mesh.ep
        for e, child in enumerate(modules[path]):
            if not lo <= e < hi:
                for pname, p in child.named_parameters():
                    p.data = dist.standin(p)
                    released.add(f"{path}.{e}.{pname}")
    return mesh, frozenset(released), frozenset(sliced)


class CompiledModule(nn.Module):
    """What `moecc.compile` returns: shares the model's parameters and buffers, runs the compiled program.

    `parameters()`, `named_parameters()` and `state_dict()` use the original model's names. In one process
    (or with ep = 1) they are the model's own tensors, so an optimizer or a checkpoint works unchanged. With
    expert parallelism (ep > 1) they are this rank's shard: the replicated parameters plus this rank's
    experts. The model is sharded in place: its other experts' weights are released (each becomes a
    one-element stand-in), so after compiling with ep > 1 run the compiled module, not the model.
    """

    def __init__(self, model: nn.Module, options: CompileOptions):
        super().__init__()
        self.options = options
        self.module = capture.clone_tree(model)
        object.__setattr__(self, "_original", model)  # not a submodule: no second copy of the parameters
        self._original: nn.Module
        regions: dict[str, Any] = {}
        originals: dict[str, nn.Module] = {}
        if options.enabled("lift_moe"):
            for path, m in self.module.named_modules():
                if capture.interface_experts(m):
                    regions[path] = capture.interface_region(path, m)
                    m.forward = functools.partial(capture.interface_forward, m)
                    m._moecc_capacity_factor = options.capacity_factor
                    m._moecc_glu = capture.glu_kind(regions[path])
                    if options.verify:
                        originals = originals if originals else dict(model.named_modules())
                        capture.verify_interface_region(regions[path], originals[path], m)
        name = type(model).__name__
        # before any other collective: ranks that disagree would otherwise wait on different ones
        dist.check_same_on_all_ranks(
            f"moecc.compile({name}) options and model",
            (dataclasses.replace(options, dump_dir=None), dist.model_fingerprint(model)),
        )
        counts = {p: r.num_experts for p, r in regions.items()}
        mesh, released, sliced = place_experts(self.module, counts, expert_lists_of(self.module), options.ep, name)
        self.session = capture.Session(options, name, regions, mesh=mesh, released=released, sliced=sliced)
        self.session.param_names = {id(p): n for n, p in self.module.named_parameters(remove_duplicate=False)}
        self.session.buffer_names = {id(b): n for n, b in self.module.named_buffers(remove_duplicate=False)}
        self._compiled = torch.compile(_entry_point(self.module), backend=self.session.backend, dynamic=options.dynamic)
        self._checked = False
        self._pairs: list[tuple[nn.Module, nn.Module]] = []  # (user's module, traced clone), decorator only

    # the parameters and state use the original model's names; with ep > 1 they are this rank's shard
    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        released = self.session.released
        for name, p in self.module.named_parameters(prefix, recurse, remove_duplicate):
            if name[len(prefix) + 1 if prefix else 0 :] not in released:
                yield name, p

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        sd = self.module.state_dict(*args, **kwargs)
        for name in self.session.released:
            sd.pop(name, None)
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Loads this rank's shard (`state_dict()`) or the whole model's state (the eager model's state_dict(), a
        pretrained checkpoint, `full_state_dict()`): with ep > 1, other ranks' experts are skipped and 3-D
        expert weights are cut to this rank's experts."""
        mesh, own = self.session.mesh, dict(self.module.named_parameters())
        mine: dict[str, Any] = {}
        for k, v in state_dict.items():
            if k in self.session.released:
                continue
            if k in self.session.sliced and isinstance(v, torch.Tensor) and v.shape[0] == own[k].shape[0] * mesh.ep:
                n = own[k].shape[0]
                v = v[mesh.ep_index * n : (mesh.ep_index + 1) * n]
            mine[k] = v
        result = self.module.load_state_dict(mine, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if k not in self.session.released]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"load_state_dict: missing keys {missing}, unexpected keys {result.unexpected_keys}")
        return result

    def _is_expert(self) -> Callable[[str], bool]:
        """Whether a parameter or state name is one of this rank's experts' (a 3-D expert weight, sliced, or a
        ModuleList expert's): what differs across the expert-parallel group."""
        lists = tuple(f"{p}." for p in expert_lists_of(self.module))
        return lambda name: name in self.session.sliced or name.startswith(lists)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` for the whole model, on every rank: the norm is the eager model's
        (replicated gradients once, every rank's expert gradients summed over the expert-parallel group), and
        every rank scales by the same factor, so replicated parameters stay identical across ranks. Clipping
        this rank's parameters with torch's function instead would use a different norm on each rank.
        Returns the total norm."""
        mesh = self.session.mesh
        if mesh.ep == 1:
            return torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm, norm_type)
        grads = {n: p.grad for n, p in self.named_parameters() if p.grad is not None}
        expert = self._is_expert()
        rep = [g for n, g in grads.items() if not expert(n)]
        exp = [g for n, g in grads.items() if expert(n)]
        device = next(iter(grads.values())).device if grads else torch.device("cpu")

        def norm(gs: list[torch.Tensor]) -> torch.Tensor:
            if not gs:
                return torch.zeros((), device=device)
            return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, norm_type) for g in gs]),
                                            norm_type)  # fmt: skip

        group = dist.group_by_name(mesh.ep_group)
        if norm_type == float("inf"):
            e = norm(exp).float()
            torch.distributed.all_reduce(e, torch.distributed.ReduceOp.MAX, group=group)
            total = torch.maximum(norm(rep).float(), e)
        else:
            e = norm(exp).float() ** norm_type
            torch.distributed.all_reduce(e, group=group)
            total = (norm(rep).float() ** norm_type + e) ** (1.0 / norm_type)
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads.values():
            g.mul_(scale.to(g.dtype))
        return total

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state under its own names, on the CPU: every expert, 3-D expert weights whole, as
        the eager model's state_dict() gives it, so that a checkpoint of it loads into the model without moecc
        (or back through `load_state_dict`). With ep > 1 it gathers every rank's experts over the
        expert-parallel group: a collective, to be called on every rank."""
        sd = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        mesh = self.session.mesh
        if mesh.ep == 1:
            return sd
        expert = self._is_expert()
        mine = {k: v for k, v in sd.items() if expert(k)}
        gathered: list[Any] = [None] * mesh.ep  # in ep_index order: the group's ranks are
        torch.distributed.all_gather_object(gathered, mine, group=dist.group_by_name(mesh.ep_group))
        for part in gathered:
            sd.update({k: v for k, v in part.items() if k not in self.session.sliced})
        for k in self.session.sliced:
            sd[k] = torch.cat([part[k] for part in gathered])
        return {k: sd[k] for k in self.module.state_dict()}  # the model's own order

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            if self.options.check_inputs and self.session.mesh.world > 1:
                modes = {"grad mode": torch.is_grad_enabled(), "training": self.module.training}
                dist.check_step_inputs(f"moecc.compile({type(self._original).__name__})", args, kwargs, modes)
            with torch._dynamo.config.patch(**_DYNAMO_CONFIG):
                out = self._compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            if isinstance(e.inner_exception, (MoeccError, PassCheckError)):
                raise e.inner_exception from None
            raise
        except torch._dynamo.exc.FailOnRecompileLimitHit as e:
            raise MoeccError(
                f"moecc.compile({type(self._original).__name__}): inputs changed shape or dtype more times than "
                "the recompile limit allows; pad inputs to a few fixed shapes"
            ) from e
        except RuntimeError as e:
            dist.raise_named_peer_failure(e, f"a collective of {type(self._original).__name__}'s step")
            raise
        if not self._checked:
            self._checked = True
            self._after_first_call()
        return out

    def _after_first_call(self) -> None:
        regions = self.session.regions
        covered = {r.path for r in regions}
        missed = [
            p
            for p in moe_looking_modules(self.module)
            if p not in covered and not any(c.startswith(p + ".") or p.startswith(c + ".") for c in covered)
        ]
        if missed and self.options.enabled("lift_moe"):
            msg = (
                f"{', '.join(missed)}: looks like MoE experts but no lifted region covers it (a graph break "
                "inside the MoE block, or a dispatch loop moecc does not recognise); see the dumps' summary"
            )
            if not self.options.allow_fallback:
                raise MoeccError(msg + "; pass allow_fallback=True to run the model's own code for it")
            warnings.warn("moecc: fallback: " + msg, stacklevel=3)
        if self.session.mesh.world > 1:
            self._sync_grads_outside_graphs()
        if not regions and not missed:
            warnings.warn(
                f"moecc: no MoE region found in {type(self._original).__name__}; "
                "it is compiled and runs as a dense model",
                stacklevel=3,
            )
        self.write_summary()

    def _sync_grads_outside_graphs(self) -> None:
        """Parameters that no compiled graph takes as input (used only in code Dynamo ran eagerly, after a
        graph break) get their gradient averaged over all ranks by a hook; the others are synchronised in
        the compiled backward graphs (sync_grads)."""
        in_graphs = {n for c in self.session.contexts for n in c.plan.get("input_params", []) if n}
        mesh = self.session.mesh
        for name, p in self.named_parameters():
            if name in in_graphs or not p.requires_grad:
                continue
            self.session.hooked.append(name)

            def average(param: torch.Tensor, group: str = mesh.world_group, world_size: int = mesh.world) -> None:
                assert param.grad is not None
                torch.distributed.all_reduce(param.grad, group=_resolve_group(group))
                param.grad.div_(world_size)

            p.register_post_accumulate_grad_hook(average)
        if self.session.hooked:
            warnings.warn(
                f"moecc: {len(self.session.hooked)} parameter(s) are used outside the compiled graphs "
                f"(graph breaks); their gradients are averaged by hooks: {self.session.hooked[:4]}",
                stacklevel=4,
            )

    def write_summary(self) -> None:
        if self.session.dump_root is not None:
            from moecc import dump

            dump.write_summary(
                self.session.dump_root, self.session.graphs, self.session.regions, self.session.graph_breaks()
            )

    @property
    def regions(self) -> list[Any]:
        """The MoE regions found so far (after the first call)."""
        return self.session.regions

    @property
    def dump_root(self) -> Any:
        return self.session.dump_root


def _resolve_group(name: str) -> Any:
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)  # type: ignore[arg-type]


def compile(model: Any = None, **kwargs: Any) -> Any:
    """Compile an MoE model.

    `moecc.compile(model, ep=None, backend="auto", dump_dir=None, verify=False, disable_passes=(),
    allow_fallback=False, debug=None, capacity_factor=None, profile=None)` returns a `CompiledModule`
    sharing `model`'s parameters.
    Used as `@moecc.compile(...)` on an `nn.Module` subclass, instances compile lazily at their first call.
    See `CompileOptions` for what each option does.
    """
    options = CompileOptions.make(**kwargs)
    if model is None:
        return functools.partial(_compile_with, options)
    return _compile_with(options, model)


def _compile_with(options: CompileOptions, model: Any) -> Any:
    if isinstance(model, type) and issubclass(model, nn.Module):
        return _decorate_class(model, options)
    if not isinstance(model, nn.Module):
        raise MoeccError(f"moecc.compile expects an nn.Module instance or subclass, got {type(model).__name__}")
    return CompiledModule(model, options)


def _decorate_class(cls: type[nn.Module], options: CompileOptions) -> type[nn.Module]:
    original_forward = cls.forward

    @functools.wraps(original_forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        compiled = self.__dict__.get("_moecc_compiled")
        if compiled is None:
            # trace the class's own forward: the clone's instance forward bypasses this wrapper
            self.__dict__["_moecc_building"] = True
            try:
                compiled = CompiledModule(self, options)
            finally:
                del self.__dict__["_moecc_building"]
            compiled.module.forward = functools.partial(original_forward, compiled.module)
            compiled._pairs = list(zip(self.modules(), compiled.module.modules(), strict=True))
            self.__dict__["_moecc_compiled"] = compiled
        for mine, traced in compiled._pairs:  # train()/eval() on the instance reach the traced clone
            traced.training = mine.training
        return compiled(*args, **kwargs)

    cls.forward = forward
    cls.__moecc_options__ = options  # type: ignore[attr-defined]
    return cls


def _dynamo_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
    """`torch.compile(model, backend="moecc")`: the graph-level passes with default options. Experts
    modules with the transformers experts interface need `moecc.compile` (which lifts them before tracing);
    ModuleList experts need `torch._dynamo.config.capture_dynamic_output_shape_ops = True`."""
    session = capture.Session(CompileOptions.make(), "torch_compile", {})
    return session.backend(gm, example_inputs)


def register_dynamo_backend() -> None:
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "moecc" not in _BACKENDS:
        register_backend(name="moecc")(_dynamo_backend)
