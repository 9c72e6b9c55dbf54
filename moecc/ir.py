"""IR helpers: moecc facts on FX nodes, MoE region records, the checker, and readable printing.

The IR is a `torch.fx` graph. moecc facts live in `node.meta["moecc"]` (a dict): `region` (the MoE region a
node belongs to), `placement` ("replicated" | "expert-sharded" | "token-partitioned"), `stream`
("compute" | "comm"), `cost_us` (predicted time), `created_by` (the pass that made the node).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any

import torch
import torch.fx as fx

from moecc import ops


@dataclasses.dataclass
class MoERegion:
    """One lifted (or refused) experts computation.

    `path` is the experts module's path in the model, `kind` how it was recognised ("hf_experts": a
    transformers experts module; "module_list": an nn.ModuleList of FFN modules driven by a top-k router),
    `expert_fn` the recognised expert function ("swiglu", "geglu", "mlp_gelu", ... or "module" when the
    module's own activation code runs between the two grouped GEMMs), `status` "lifted" or "fallback".
    """

    path: str
    kind: str
    num_experts: int
    top_k: int
    hidden: int
    ffn: int
    expert_fn: str
    status: str = "lifted"
    reason: str = ""
    param_names: list[str] = dataclasses.field(default_factory=list)
    has_bias: bool = False

    def row(self) -> list[Any]:
        return [
            self.path,
            self.kind,
            self.num_experts,
            self.top_k,
            self.hidden,
            self.ffn,
            self.expert_fn,
            self.status,
            self.reason,
        ]

    HEADERS = ["region", "recognised as", "experts", "top-k", "hidden", "ffn", "expert fn", "status", "note"]


def tag_region(node: fx.Node, path: str, created_by: str) -> None:
    """Mark a node as part of an MoE region. The mark also goes into `meta["custom"]`, which AOTAutograd
    copies onto the forward and backward nodes it derives from this one."""
    set_facts(node, region=path, created_by=created_by)
    node.meta.setdefault("custom", {})["moecc_region"] = path


def marked_region(node: fx.Node) -> str | None:
    """The region `tag_region` marked this node (or the node AOTAutograd derived it from) with, if any."""
    return (node.meta.get("custom") or {}).get("moecc_region")


def restore_regions(gm: fx.GraphModule) -> None:
    """On a graph AOTAutograd produced: region facts back from the marks `tag_region` left."""
    for n in gm.graph.nodes:
        path = marked_region(n)
        if path is not None:
            set_facts(n, region=path)


def facts(node: fx.Node) -> dict[str, Any]:
    return node.meta.setdefault("moecc", {})


def set_facts(node: fx.Node, **kw: Any) -> None:
    facts(node).update(kw)


def is_moe_op(node: fx.Node) -> bool:
    return node.op == "call_function" and (
        node.target in ops.MOE_OPS
        or getattr(node.target, "namespace", None) == "moecc"
        or str(node.target).startswith("moecc.")
    )


def op_name(node: fx.Node) -> str:
    """A short, stable name for what a node computes (for op counts in the dumps)."""
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._schema.name.split('::')[-1]}"
    if isinstance(t, torch._ops.OpOverloadPacket):
        return f"{t._qualified_op_name.replace('::', '.')}"
    if isinstance(t, str):
        return f"method.{t}"
    return getattr(t, "__name__", str(t))


def op_counts(gm: fx.GraphModule) -> collections.Counter[str]:
    return collections.Counter(op_name(n) for n in gm.graph.nodes if n.op not in ("placeholder", "output"))


def check_graph(gm: fx.GraphModule, *, stage: str) -> None:
    """The structural checker run after every pass in debug mode: lint, topological order, moecc ops typed."""
    gm.graph.lint()
    seen: set[fx.Node] = set()
    for node in gm.graph.nodes:
        for inp in node.all_input_nodes:
            if inp not in seen:
                raise AssertionError(f"node {node.name} uses {inp.name} before it is defined")
        seen.add(node)
        if is_moe_op(node) and stage != "dynamo" and "val" not in node.meta and "example_value" not in node.meta:
            raise AssertionError(f"moecc op {node.name} has no shape metadata")


def _describe_val(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        dt = str(v.dtype).replace("torch.", "").replace("float", "f").replace("bfloat16", "bf16")
        return f"{v.device.type} {dt}{list(v.shape)}"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_describe_val(x) for x in v) + ")"
    return type(v).__name__


def node_comment(node: fx.Node) -> str:
    val = node.meta.get("val", node.meta.get("example_value"))
    parts = [_describe_val(val)] if val is not None else []
    f = node.meta.get("moecc") or {}
    parts += [f"{k}={v}" for k, v in f.items() if k != "cost_us"]
    if "cost_us" in f:
        parts.append(f"cost={f['cost_us']:.1f}us")
    return "  ".join(parts)


_ASSIGN = re.compile(r"^(\s+)(\w+)(?::[^=]*)? = ")


def readable(gm: fx.GraphModule, header: str) -> str:
    """The graph as Python, each assignment followed by a comment with its shape and moecc facts."""
    by_name = {n.name: n for n in gm.graph.nodes}
    code = gm.print_readable(print_output=False, include_stride=False, include_device=True)
    out = [header]
    for line in code.splitlines():
        m = _ASSIGN.match(line)
        node = by_name.get(m.group(2)) if m else None
        if node is not None and node.meta.get("moecc"):
            line = f"{line}  # moecc: {node_comment(node)}"
        out.append(line)
    return "\n".join(out) + "\n"
