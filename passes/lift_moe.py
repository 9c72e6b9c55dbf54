"""lift_moe: find the experts computation (dispatch by top-k index -> expert FFN -> weighted combine) and
replace it by moecc ops. The router stays model code.

Two recognisers:

* experts modules with the transformers experts interface (`forward(hidden_states, top_k_index,
  top_k_weights)` over 3-D `gate_up_proj`/`up_proj` and `down_proj`) are recognised by interface at
  capture (`moecc.capture`), before Dynamo would decompose them; here their moecc ops are tagged.
* an `nn.ModuleList` of identical FFN modules driven by a top-k router is recognised in the graph:

      before                                           after
      out = zeros_like(x_TH)                           x_SH, src_S, eid_S, offs_E = moecc.route_permute(x_TH, idx_TK, E)
      for e, expert in enumerate(experts):             h_SF = moecc.grouped_mm(x_SH, w1_EHF, offs_E); h_SF = silu(g)*u
          tok, slot = where(idx_TK == e)               y_SH = moecc.grouped_mm(h_SF, w2_EFH, offs_E)
          out.index_add_(0, tok, expert(x_TH[tok])     out = moecc.unpermute_combine(y_SH, src_S, offs_E, w_TK)
                         * w_TK[tok, slot, None])

  The region found structurally is always replayed against the lifted ops on random inputs before it is
  replaced (a mismatch raises: the structure looked like an MoE loop but computes something else).
  Expert functions other than SwiGLU/GeGLU/MLP keep the model's own code (reported as fallback).
"""

from __future__ import annotations

import math
import operator
import re
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F

from moecc import ir, ops
from moecc.backends import torch_backend
from moecc.options import MoeccError
from moecc.pass_manager import CompileContext

_PATH_HEAD = re.compile(r"^L\['[^']*'\]\.?")
_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]")
_INDEX = re.compile(r"^(.*)\.(\d+)$")


def module_paths(node: fx.Node) -> list[str]:
    """The module paths (relative to the compiled module) of the modules a node was traced inside."""
    stack = node.meta.get("nn_module_stack") or {}
    return [_PATH_HEAD.sub("", v[0]) for v in stack.values()]


def param_fqn(node: fx.Node) -> str | None:
    """`layers.0.moe.experts.3.w1.weight` for a Dynamo placeholder lifted from a parameter, else None."""
    return node.meta.get("moecc_param") or relative_param_name(node)


def relative_param_name(node: fx.Node) -> str | None:
    """A parameter input's name from the traced frame's `self` (the model, or a submodule after a break)."""
    ga = node.meta.get("grapharg")
    if node.op != "placeholder" or ga is None:
        return None
    name = ga.source.name if isinstance(ga.source.name, str) else ga.source.name()
    if "._parameters[" not in name:
        return None
    return ".".join(_SOURCE_PART.findall(name))


def _example(node: Any) -> Any:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else node


def _mutated_arg(node: fx.Node) -> fx.Node | None:
    """The tensor an in-place node writes to (Dynamo graphs keep mutation)."""
    if (
        node.op == "call_method"
        and isinstance(node.target, str)
        and node.target.endswith("_")
        and not node.target.startswith("__")
    ):
        a = node.args[0]
        return a if isinstance(a, fx.Node) else None
    if node.op == "call_function" and node.target is operator.setitem:
        a = node.args[0]
        return a if isinstance(a, fx.Node) else None
    return None


def dependence_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """Data dependences plus mutation: a node reading a tensor after an in-place write depends on it."""
    g = nx.DiGraph()
    last_write: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        g.add_node(n)
        for a in n.all_input_nodes:
            g.add_edge(a, n)
            if a in last_write and last_write[a] is not n:
                g.add_edge(last_write[a], n)
        m = _mutated_arg(n)
        if m is not None:
            last_write[m] = n
    return g


# --------------------------------------------------------------------------------------------------------
# expert function recognition (on the nodes of expert 0)

_ACTS = {
    F.silu: "silu",
    F.relu: "relu",
    torch.relu: "relu",
    torch.nn.functional.gelu: "gelu",
    torch._C._nn.gelu: "gelu",
}
_LINEAR = {torch._C._nn.linear, F.linear}
_MUL = {operator.mul, torch.mul}


def call_activation(node: fx.Node) -> str | None:
    """The moecc name of the activation a call_function node applies to its tensor (F.silu, F.relu, torch.relu,
    F.gelu: "gelu", or "gelu_tanh" with approximate="tanh"); None for any other node, and for arguments that
    change the function (anything but gelu's approximate and a false inplace)."""
    if node.op != "call_function" or node.target not in _ACTS:
        return None
    kind = _ACTS[node.target]
    options = dict(node.kwargs)
    if kind == "gelu" and len(node.args) == 2:
        options["approximate"] = node.args[1]
    elif len(node.args) != 1:
        return None
    approximate = options.pop("approximate", "none") if kind == "gelu" else "none"
    if options.pop("inplace", False) or options or approximate not in ("none", "tanh"):
        return None
    return "gelu_tanh" if approximate == "tanh" else kind


class Unrecognised(Exception):
    pass


def _interpret_expert(nodes: list[fx.Node], x_in: fx.Node, params: dict[fx.Node, str], out: fx.Node) -> tuple:
    """Symbolic value of the expert's output: nested tuples of ("linear", in, w, b), ("act", k, in), ..."""
    env: dict[fx.Node, Any] = {x_in: ("x",)}
    env.update({p: ("param", name) for p, name in params.items()})

    def v(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a not in env:
                raise Unrecognised(f"value {a.name} comes from outside the expert")
            return env[a]
        return a

    for n in nodes:
        t = n.target
        if n.op == "call_function" and t in _LINEAR:
            b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
            wv, bv = v(n.args[1]), v(b)
            env[n] = ("linear", v(n.args[0]), wv[1], bv[1] if bv is not None else None)
        elif n.op == "call_function" and t in _ACTS:
            kind = call_activation(n)
            if kind is None:
                raise Unrecognised(f"{t.__name__} with arguments {n.args[1:]} {n.kwargs}: another function")
            env[n] = ("act", kind, v(n.args[0]))
        elif n.op == "call_function" and t in _MUL:
            env[n] = ("mul", v(n.args[0]), v(n.args[1]))
        elif n.op == "call_method" and t == "chunk":
            dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0)
            if n.args[1] != 2 or dim not in (-1, 1):
                raise Unrecognised("chunk other than 2 halves of the last dim")
            env[n] = ("chunked", v(n.args[0]))
        elif (
            n.op == "call_function"
            and t is operator.getitem
            and isinstance(v(n.args[0]), tuple)
            and v(n.args[0])[0] == "chunked"
        ):
            env[n] = ("half", v(n.args[0])[1], n.args[1])
        else:
            raise Unrecognised(f"op {ir.op_name(n)} ({n.name})")
    return env[out]


def match_expert_fn(expr: tuple) -> dict[str, Any]:
    """Match the symbolic expert output against the standard FFNs; returns a spec or raises Unrecognised."""
    if expr[0] != "linear":
        raise Unrecognised("the expert does not end with a linear layer")
    _, h, w2, b2 = expr
    if h[0] == "act" and h[2][0] == "linear" and h[2][1] == ("x",):
        return {"fn": f"mlp_{h[1]}", "act": h[1], "w1": [h[2][2]], "b1": [h[2][3]], "w2": w2, "b2": b2}
    if h[0] == "mul":
        a, b = h[1], h[2]
        if b[0] == "act":
            a, b = b, a
        if a[0] == "act":
            g, u = a[2], b
            if g[0] == "linear" and u[0] == "linear" and g[1] == ("x",) and u[1] == ("x",):
                return {
                    "fn": torch_backend.glu_name(a[1]),
                    "act": a[1],
                    "w1": [g[2], u[2]],
                    "b1": [g[3], u[3]],
                    "w2": w2,
                    "b2": b2,
                }
            if (
                g[0] == "half"
                and u[0] == "half"
                and g[1] == u[1]
                and (g[2], u[2]) == (0, 1)
                and g[1][0] == "linear"
                and g[1][1] == ("x",)
            ):
                return {
                    "fn": torch_backend.glu_name(a[1]),
                    "act": a[1],
                    "w1": [g[1][2]],
                    "b1": [g[1][3]],
                    "w2": w2,
                    "b2": b2,
                }
    raise Unrecognised("not a SwiGLU/GeGLU/MLP of linear layers")


# --------------------------------------------------------------------------------------------------------
# the lifted computation, built as a function over proxies (traced into the graph) or real tensors


def lifted_experts(
    x_TH, idx_TK, w_TK, acc, params: dict[str, list], spec: dict[str, Any], E: int, zero_acc: bool, capacity: int = -1
):
    """The moecc ops for one region; `params[name]` lists that parameter of each expert (Linear layout)."""
    x_SH, src_S, eid_S, offs_E = ops.route_permute(x_TH, idx_TK, E, capacity)
    w1 = torch.cat([torch.stack(params[n]) for n in spec["w1"]], dim=1)  # [E, (2)F, H]
    h = ops.grouped_mm(x_SH, w1.transpose(1, 2), offs_E)
    if any(b is not None for b in spec["b1"]):
        h = h + torch.cat([torch.stack(params[b]) for b in spec["b1"]], dim=1)[eid_S]
    if len(spec["w1"]) == 2 or spec["fn"] in ("swiglu", "geglu", "geglu_tanh") or spec["fn"].startswith("glu_"):
        if spec["act"] in torch_backend.GLU_ACTS:
            h = ops.glu(h, spec["act"])  # one op (a kernel on the triton backend) for chunk, act and multiply
        else:
            gate, up = h.chunk(2, dim=-1)
            h = torch_backend.act(spec["act"], gate) * up
    else:
        h = torch_backend.act(spec["act"], h)
    y = ops.grouped_mm(h, torch.stack(params[spec["w2"]]).transpose(1, 2), offs_E)
    if spec["b2"] is not None:
        y = y + torch.stack(params[spec["b2"]])[eid_S]
    out = ops.unpermute_combine(y, src_S, offs_E, w_TK)
    return out if zero_acc else acc + out


# --------------------------------------------------------------------------------------------------------
# the ModuleList recogniser


def _candidates(gm: fx.GraphModule) -> dict[str, list[str]]:
    """ModuleList-like parents whose children 0..n-1 appear in the graph: {parent: [child paths]}."""
    children: dict[str, set[int]] = {}
    for n in gm.graph.nodes:
        for p in module_paths(n):
            m = _INDEX.match(p)
            if m:
                children.setdefault(m.group(1), set()).add(int(m.group(2)))
    return {
        p: [f"{p}.{i}" for i in range(len(ix))]
        for p, ix in children.items()
        if len(ix) >= 2 and ix == set(range(len(ix)))
    }


def _is_gather(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[1], fx.Node)


def _is_index_add(n: fx.Node) -> bool:
    return (n.op == "call_method" and n.target in ("index_add_", "index_add")) or (
        n.op == "call_function" and n.target in (torch.index_add, torch.Tensor.index_add_, torch.Tensor.index_add)
    )


def _topk_indices(gm: fx.GraphModule) -> list[fx.Node]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is operator.getitem and n.args[1] == 1:
            src = n.args[0]
            if isinstance(src, fx.Node) and (
                (src.op == "call_method" and src.target == "topk") or src.target is torch.topk
            ):
                out.append(n)
    return out


def _fail(ctx: CompileContext, path: str, num_experts: int, what: str) -> ir.MoERegion:
    msg = (
        f"{path}: looks like an MoE experts loop but cannot be lifted: {what}. "
        "Pass allow_fallback=True to run the model's own code for it (reported in the dumps), "
        "or write the loop as `tok, slot = torch.where(idx == e); "
        "out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])`."
    )
    if not ctx.options.allow_fallback:
        raise MoeccError(msg)
    ctx.counters["lift_moe.fallback"] += 1
    return ir.MoERegion(path, "module_list", num_experts, 0, 0, 0, "module", status="fallback", reason=what)


def _try_lift_module_list(gm: fx.GraphModule, ctx: CompileContext, parent: str, kids: list[str]) -> ir.MoERegion | None:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    fqn = {n: param_fqn(n) for n in gm.graph.nodes if n.op == "placeholder"}
    E = len(kids)
    ins, outs, groups, params = [], [], [], []
    for kid in kids:
        group = [n for n in gm.graph.nodes if n.op != "placeholder" and kid in module_paths(n)]
        kid_params = {p: f[len(kid) + 1 :] for p, f in fqn.items() if f and f.startswith(kid + ".")}
        members = set(group)
        ext = {a for n in group for a in n.all_input_nodes if a not in members and a not in kid_params}
        leaving = [n for n in group if any(u not in members for u in n.users)]
        if len(ext) != 1 or len(leaving) != 1:
            return None
        (x_in,) = ext
        if not _is_gather(x_in):
            return None  # children not fed by a row gather: not experts (e.g. a stack of layers)
        ins.append(x_in)
        outs.append(leaving[0])
        groups.append(group)
        params.append(kid_params)
    X = ins[0].args[0]
    if any(i.args[0] is not X for i in ins):
        return _fail(ctx, parent, E, "the experts gather their rows from different tensors")
    dep = dependence_graph(gm)
    toks = [i.args[1] for i in ins]
    cands = [c for c in _topk_indices(gm) if all(nx.has_path(dep, c, t) for t in toks)]
    if not cands:
        return _fail(ctx, parent, E, "no torch.topk indices feed the experts' token selection")
    IDX = max(cands, key=order.__getitem__)
    desc_idx = nx.descendants(dep, IDX)
    A = [(nx.ancestors(dep, t) & desc_idx) | {t} for t in toks]
    shared = set.intersection(*A)
    per_expert = [a - shared for a in A]
    accs = []
    for o in outs:
        adds = sorted((n for n in nx.descendants(dep, o) if _is_index_add(n)), key=order.__getitem__)
        if not adds:
            return _fail(ctx, parent, E, "the experts' outputs are not accumulated with index_add_/index_add")
        accs.append(adds[0])
    for a, t in zip(accs, toks, strict=True):
        if a.args[1] != 0 or a.args[2] is not t:
            return _fail(ctx, parent, E, f"{a.name} does not add rows back at the gathered token indices")
    inplace = all(a.target == "index_add_" or a.target is torch.Tensor.index_add_ for a in accs)
    base = accs[0].args[0]
    if inplace and all(a.args[0] is base for a in accs):
        final = accs[-1]
    elif not inplace and all(accs[i].args[0] is accs[i - 1] for i in range(1, E)):
        final = accs[-1]
    else:
        return _fail(ctx, parent, E, "the experts' outputs do not accumulate into one tensor")
    region: set[fx.Node] = set(shared)
    for e in range(E):
        core = per_expert[e] | {ins[e]} | set(groups[e])
        down = set().union(*(nx.descendants(dep, c) for c in core))
        region |= core | (down & nx.ancestors(dep, accs[e])) | {accs[e]}
    region_params = {p for ps in params for p in ps}
    free = {a for n in region for a in n.all_input_nodes if a not in region and a not in region_params}
    others = free - {X, IDX, base}
    T, K = _example(IDX).shape
    weights = [
        w
        for w in others
        if isinstance(_example(w), torch.Tensor)
        and _example(w).is_floating_point()
        and tuple(_example(w).shape) == (T, K)
    ]
    if len(weights) != 1 or others - set(weights):
        names = sorted(a.name for a in others)
        return _fail(
            ctx,
            parent,
            E,
            f"expected the region to read only x, the top-k indices and a [T, K] weight; it reads {names}",
        )
    W = weights[0]
    zero_acc = base.op == "call_function" and base.target in (torch.zeros_like,) and base.args[0] is X
    try:
        spec = match_expert_fn(_interpret_expert(groups[0], ins[0], params[0], outs[0]))
        status, reason = "lifted", ""
    except Unrecognised as e:
        spec, status, reason = (
            None,
            "fallback",
            f"expert function not recognised ({e}); the model's code runs",
        )
    xv = _example(X)
    region_rec = ir.MoERegion(
        path=parent,
        kind="module_list",
        num_experts=E,
        top_k=int(K),
        hidden=int(xv.shape[1]),
        ffn=0,
        expert_fn=spec["fn"] if spec else "module",
        status=status,
        reason=reason,
        param_names=sorted({f"{parent}.*.{n}" for n in params[0].values()}),
        has_bias=bool(spec and (spec["b2"] is not None or any(spec["b1"]))),
    )
    if spec is None:
        ctx.note(f"fallback {parent}: {reason}")
        ctx.counters["lift_moe.fallback"] += 1
        return region_rec
    by_name = [{name: p for p, name in ps.items()} for ps in params]
    w2 = _example(by_name[0][spec["w2"]])
    region_rec.ffn = int(w2.shape[1])
    _probe(
        gm,
        ctx,
        parent,
        region,
        final if not inplace else base,
        [X, IDX, W, base],
        by_name,
        spec,
        E,
        zero_acc,
        inplace,
    )
    # splice the lifted ops in just before the last accumulate, then reroute the result's readers
    with gm.graph.inserting_before(final):
        tracer = _GraphEmitter(gm.graph)
        proxies = {n: tracer.proxy(n) for n in (X, IDX, W, base)}
        pp = {name: [tracer.proxy(by_name[e][name]) for e in range(E)] for name in by_name[0]}
        capacity = -1  # dropless
        if ctx.options.capacity_factor is not None:
            if isinstance(T, torch.SymInt):
                raise MoeccError(
                    f"{parent}: capacity_factor={ctx.options.capacity_factor} with a symbolic token count (dynamic "
                    "shapes): an expert's capacity is fixed at compile time from the token count. Compile with "
                    "dynamic=False (one program per token count), or leave capacity_factor unset (dropless)."
                )
            capacity = ops.expert_capacity(ctx.options.capacity_factor, int(T), int(K), E)
        new = lifted_experts(proxies[X], proxies[IDX], proxies[W], proxies[base], pp, spec, E, zero_acc, capacity).node
    for n in tracer.created:
        ir.tag_region(n, parent, "lift_moe")
    if inplace:
        after = {u for u in base.users if order.get(u, math.inf) > order[final] and u not in region}
        for u in after:
            u.replace_input_with(base, new)
    else:
        for u in list(final.users):
            if u not in region and u not in tracer.created:
                u.replace_input_with(final, new)
    # what only the old loop used: its nodes, and the shape checks hanging off its token selections
    side = {
        n
        for pe in per_expert
        for p in pe
        for n in nx.descendants(dep, p)
        if order[n] < order[final] and _mutated_arg(n) is None
    }
    _erase_dead(gm, region | side | {base})
    gm.graph.lint()
    gm.recompile()
    return region_rec


class _GraphEmitter(fx.Tracer):
    """Records torch calls on proxies as nodes of an existing graph (at its current insert point)."""

    def __init__(self, graph: fx.Graph):
        super().__init__()
        self.graph = graph
        self.created: list[fx.Node] = []

    def proxy(self, node: fx.Node) -> Any:  # a Proxy, used where the ops expect tensors
        return fx.Proxy(node, self)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        n = super().create_node(kind, target, args, kwargs, name, type_expr)
        self.created.append(n)
        return n


def _erase_dead(gm: fx.GraphModule, candidates: set[fx.Node]) -> None:
    for n in reversed(list(gm.graph.nodes)):
        if n in candidates and not n.users and n.op != "placeholder":
            gm.graph.erase_node(n)


def _size_hint(v: int | torch.SymInt) -> int:
    """A size as an int: itself, or a symbolic size's value in the example inputs (no guard is added)."""
    if isinstance(v, torch.SymInt):
        return int(v.node.hint) if v.node.hint is not None else 8
    return int(v)


def _probe(gm, ctx, path, region, result, inputs, by_name, spec, E, zero_acc, inplace) -> None:
    """Replay the matched region and the lifted ops on the same random inputs; raise if they differ."""
    X, IDX, W, base = inputs
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    params = sorted({p for ps in by_name for p in ps.values()}, key=lambda n: n.name)
    for n in [X, IDX, W, base, *params]:
        env[n] = sub.placeholder(n.name)
    for n in gm.graph.nodes:
        if n in region:
            env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(env[result])
    replay = fx.GraphModule(gm, sub)
    # concrete sizes under dynamic shapes too (the example's own sizes, without a guard on them)
    T, K = (_size_hint(v) for v in _example(IDX).shape)
    H = _size_hint(_example(X).shape[1])
    # in the model's dtypes: the region's own code may cast to them
    gen = torch.Generator().manual_seed(1234)
    xdt, wdt = _example(X).dtype, _example(W).dtype
    x = torch.randn(T, H, generator=gen).to(xdt)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=gen).to(wdt)
    acc0 = torch.zeros(T, H, dtype=xdt) if zero_acc else torch.randn(T, H, generator=gen).to(xdt)
    pvals = [
        (torch.randn(tuple(_example(p).shape), generator=gen) / math.sqrt(_example(p).shape[-1])).to(_example(p).dtype)
        for p in params
    ]
    with torch.no_grad():
        expect = replay(x, idx, w, acc0.clone(), *pvals)
        pmap = dict(zip(params, pvals, strict=True))
        got = lifted_experts(
            x,
            idx,
            w,
            acc0.clone(),
            {name: [pmap[by_name[e][name]] for e in range(E)] for name in by_name[0]},
            spec,
            E,
            zero_acc,
        )
    ctx.counters["lift_moe.probes"] += 1
    # 16-bit arithmetic on either side under autocast (the replayed nn.Linear layers and the grouped GEMMs)
    tol = 1e-5 if xdt in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu") else 3e-2
    err = (got.float() - expect.float()).abs().max().item()
    if not err <= tol * (1 + expect.float().abs().max().item()):
        raise MoeccError(
            f"{path}: the lifted experts ({spec['fn']}) differ from the model's code by {err:.3g} on "
            "random inputs; refusing to replace it. Please report this model; allow_fallback=True runs "
            "the model's own code meanwhile."
        )


# --------------------------------------------------------------------------------------------------------


def lift_moe(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    # regions lifted by interface at capture: tag their ops
    found: dict[str, ir.MoERegion] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            continue
        for p in module_paths(n):
            if p in ctx.module_regions:
                ir.tag_region(n, p, "lift_moe (capture: experts interface)")
                found[p] = ctx.module_regions[p]
    for p, r in found.items():
        ctx.regions.append(r)
        ctx.counters["lift_moe.lifted"] += 1
        ctx.note(f"lifted {p}: {r.kind}, {r.num_experts} experts, top-{r.top_k}, {r.expert_fn}")
    # ModuleList experts, recognised in the graph
    done: set[str] = set()
    while True:
        todo = [(p, k) for p, k in _candidates(gm).items() if p not in done]
        if not todo:
            break
        parent, kids = todo[0]
        done.add(parent)
        rec = _try_lift_module_list(gm, ctx, parent, kids)
        if rec is not None:
            ctx.regions.append(rec)
            verb = "lifted" if rec.status == "lifted" else "fallback"
            ctx.note(
                f"{verb} {parent}: module_list, {rec.num_experts} experts, top-{rec.top_k}, {rec.expert_fn}"
                + (f" ({rec.reason})" if rec.reason else "")
            )
            if rec.status == "lifted":
                ctx.counters["lift_moe.lifted"] += 1
    return gm


def check_lifted(gm: fx.GraphModule, ctx: CompileContext) -> None:
    """Invariant: every lifted region of this graph still dispatches (route_permute) and combines
    (unpermute_combine) through moecc ops."""
    have: dict[str, set[str]] = {}
    for n in gm.graph.nodes:
        if ir.is_moe_op(n) and n.meta.get("moecc"):
            have.setdefault(ir.facts(n).get("region", ""), set()).add(ir.op_name(n))
    for r in ctx.regions:
        if r.status == "lifted":
            missing = {"moecc.route_permute", "moecc.unpermute_combine"} - have.get(r.path, set())
            if missing:
                raise AssertionError(f"region {r.path} was lifted but its {sorted(missing)} op(s) are gone")
