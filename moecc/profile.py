"""Predicted against measured: run a training step of a compiled model under torch.profiler and compare the
time of every compiled graph node with what the cost model predicted for it.

Compile with `profile_nodes=True` (what `moecc profile` does): the compiled graphs then run node by node, each
node inside a `record_function` range named `moecc/<graph>/<forward|backward>/<node>`, so that the profiler
measures exactly the nodes the schedule pass costed. `profile_step` writes, into the model's dump folder:

- `measured.json`: the profiler's Chrome trace of the step (open it next to `graph_*/timeline.*.json`);
- `timeline.md`: per operation, the number of nodes, the predicted and measured time (on a GPU the time of the
  kernels the node launched, on the CPU its CPU time), and their ratio; and the step's predicted time (the
  schedule's critical path summed over graphs) against its measured wall time, with the relative error.

Running node by node costs some host overhead per node, which the wall time (and on the CPU the per-node
figures) include.
"""

from __future__ import annotations

import collections
import contextlib
import operator
import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.utils._python_dispatch
import torch.utils._pytree

from moecc import cost, dist, ir

PREFIX = "moecc/"


class NodeTimer(fx.Interpreter):
    """Runs a graph node by node, each in a profiler range named after its graph, kind and node."""

    def __init__(self, gm: fx.GraphModule, graph_id: int, kind: str) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.tag = f"{PREFIX}{graph_id}/{kind}/"

    def run_node(self, n: fx.Node) -> Any:
        if n.op != "call_function":
            return super().run_node(n)
        with torch.profiler.record_function(self.tag + n.name):
            return super().run_node(n)

    def __call__(self, *args: Any) -> Any:
        return self.run(*args)


class PeakMemory(torch.utils._python_dispatch.TorchDispatchMode):
    """Measures the peak of the bytes held by tensors that ops create while it is active (on any device).

    Every op's outputs are seen as they are made; a storage counts from its first appearance until it is
    freed (a finalizer on the storage), whether that is inside the mode or after. Storages that existed
    before (parameters, inputs) are not counted, nor are temporaries that live only inside one op. `peak`
    is in bytes. Compiled graphs run under it through `graph_memory`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.live or storage.nbytes() == 0:
                continue
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._freed, key)
        return out


_MEASURING: list[PeakMemory] = []


@contextlib.contextmanager
def graph_memory() -> Iterator[PeakMemory]:
    """Measure the peak memory of moecc's compiled graphs (forward and backward) run meanwhile: what their
    ops allocate, including saved activations held from forward to backward; not the parameters, nor what
    runs outside the compiled graphs.

        with moecc.profile.graph_memory() as mem:
            model(x).sum().backward()
        print(mem.peak)
    """
    mem = PeakMemory()
    _MEASURING.append(mem)
    try:
        yield mem
    finally:
        _MEASURING.remove(mem)


def measured(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A compiled graph's runner: under the active `graph_memory`, if any."""

    def run(*args: Any) -> Any:
        if not _MEASURING:
            return fn(*args)
        with _MEASURING[-1]:
            return fn(*args)

    return run


def _nodes(cm: Any) -> dict[str, fx.Node]:
    """range name -> node, for every call of every compiled graph."""
    return {
        f"{PREFIX}{ctx.graph_id}/{kind}/{n.name}": n
        for ctx in cm.session.contexts
        for kind, gm in ctx.final_graphs.items()
        for n in gm.graph.nodes
        if n.op == "call_function"
    }


def _predicted(cm: Any) -> dict[str, tuple[str, float]]:
    """range name -> (operation, predicted us) for every costed node of every compiled graph."""
    return {key: (ir.op_name(n), ir.facts(n).get("cost_us", 0.0)) for key, n in _nodes(cm).items()}


def host_costs(cm: Any, events: Any, scale: float = 1.0, less_us: float = 0.0) -> dict[str, Any]:
    """The host's time per node of a profiled step, as a hardware profile's host fields (seconds; see
    `cost.HardwareProfile.host_op`): each node range's CPU time, the mean per op for the multi-kernel moecc ops
    (under the name the schedule pass costs them by: before lowering, `moecc.triton_x` is `moecc.x`), and
    over all other ops and over the views. On a GPU this is what the host spends issuing each node at the
    model's own sizes; on the CPU the ops' own time is in it. `scale` multiplies every time (the profiler's
    own time per op is in the ranges: `profile_step` scales them by the step's host time without it), and
    `less_us` is then taken off each range, down to 0 (what a node range itself costs the host)."""
    cpu: dict[str, float] = collections.defaultdict(float)
    for ev in _range_events(events):
        cpu[ev.name] += max(ev.cpu_time_total * scale - less_us, 0.0)
    per: dict[str, list[float]] = collections.defaultdict(list)
    for key, n in _nodes(cm).items():
        if key not in cpu or n.target is operator.getitem:
            continue
        op = ir.op_name(n).replace("moecc.triton_", "moecc.")
        group = op if op.startswith("moecc.") else ("view" if cost.is_view(n) else "op")
        per[group].append(cpu[key] / 1e6)
    mean = {g: sum(v) / len(v) for g, v in per.items()}
    return {
        "host_op": mean.get("op", 0.0),
        "host_view": mean.get("view", 0.0),
        "host_ops": {g: t for g, t in sorted(mean.items()) if g.startswith("moecc.")},
    }


def _on_cuda(cm: Any) -> bool:
    """Whether the compiled model runs on a GPU (its parameters' device; not whether the machine has one)."""
    return dist.device_type(cm, "cuda" if torch.cuda.is_available() else "cpu") == "cuda"


def _timed_step(step: Callable[[], Any], cuda: bool) -> tuple[float, float]:
    """One call of `step` on an idle device: (us until the host has issued it, us until the device has run it)."""
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    host = (time.perf_counter() - t0) * 1e6
    if cuda:
        torch.cuda.synchronize()
    return host, (time.perf_counter() - t0) * 1e6


def host_issue_us(step: Callable[[], Any], calls: int = 3, cuda: bool | None = None) -> float:
    """The host's time to issue `step` (us, median of `calls`), each call starting on an idle device (cuda:
    whether the step runs on a GPU; None: whether the machine has one)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return statistics.median(_timed_step(step, cuda)[0] for _ in range(calls))


def profile_step(
    cm: Any, step: Callable[[], Any], out_dir: str | Path | None = None, host_reference_us: float | None = None
) -> dict[str, Any]:
    """Profile one call of `step` (a training step of the compiled model `cm`, which must have been compiled
    with profile_nodes=True and run at least once); write measured.json and timeline.md; return the table.

    `host_reference_us`: the host's time to issue the same step from the model compiled without
    profile_nodes (`host_issue_us`), whose node ranges cost the host time of their own (77 against 48 ms for
    an 8-layer step on an H200 node); the difference, spread evenly over the ranges, is taken off the host
    costs."""
    if not cm.options.profile_nodes:
        raise ValueError("moecc.profile_step: compile the model with profile_nodes=True first")
    if not cm.session.contexts:
        raise ValueError("moecc.profile_step: run the step once before profiling it (nothing is compiled yet)")
    cuda = _on_cuda(cm)
    # the step's time without the profiler, which adds its own to every op: on an H200 node it doubled the
    # host's time to issue a training step (130 against 66 ms) and made the step 35 % slower
    host_us, wall_us = _timed_step(step, cuda)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        profiled_host_us, profiled_wall_us = _timed_step(step, cuda)
    predicted = _predicted(cm)
    events = prof.events()
    ranges = sum(1 for _ in _range_events(events))
    range_us = max(host_us - host_reference_us, 0.0) / max(ranges, 1) if host_reference_us is not None else 0.0
    measured = measured_us(events, cuda)
    rows: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for key, (op, pred) in predicted.items():
        if key in measured:
            r = rows[op]
            r[0] += 1
            r[1] += pred
            r[2] += measured[key]
    predicted_total = sum(sum(c.plan.get("predicted_us", {}).values()) for c in cm.session.contexts)
    result = {
        "wall_us": wall_us,
        "predicted_us": predicted_total,
        # the host's time to issue the step, measured and by the cost model's host lane (0 where the profile
        # has no host costs: on the CPU the host runs the ops, and their time is the step's)
        "host_us": host_us,
        "profiled_host_us": profiled_host_us,
        "profiled_wall_us": profiled_wall_us,
        "predicted_host_us": sum(sum(c.plan.get("predicted_host_us", {}).values()) for c in cm.session.contexts),
        # the nodes' own measured times summed: the device's busy time on a GPU (the step's other time is
        # the device waiting, for the host or for a peer)
        "busy_us": sum(r[2] for r in rows.values()),
        # per node, what the host spent issuing it: a profile's host fields from this step (`host_costs`),
        # scaled by the host's time without the profiler over its time with it, less what a range costs
        "host_scale": host_us / profiled_host_us,
        "host_reference_us": host_reference_us,
        "host_ranges": ranges,
        "host_less_per_node_us": range_us,
        "host_costs": host_costs(cm, events, host_us / profiled_host_us, range_us),
        "error": (predicted_total - wall_us) / wall_us if wall_us else float("nan"),
        "ops": {op: {"nodes": int(n), "predicted_us": p, "measured_us": m} for op, (n, p, m) in rows.items()},
    }
    folder = Path(out_dir) if out_dir is not None else cm.dump_root
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(folder / "measured.json"))
        (folder / "timeline.md").write_text(timeline_table(result))
    return result


def profile_compiled_step(
    compile: Callable[[bool], Any],
    make_step: Callable[[Any], Callable[[], Any]],
    steps: int,
    out_dir: str | Path | None = None,
    reference: bool = True,
    reference_calls: int = 3,
) -> tuple[Any, dict[str, Any]]:
    """`profile_step` of a model as `moecc profile` and calibrate run it: `compile(profile_nodes)` returns the
    compiled model, `make_step(model)` a training step of it. With `reference`, a copy compiled without node
    ranges first runs `steps` steps and the host's time to issue one is the host reference (see
    `profile_step`); the profiled model then runs `steps` steps before the profiled one. Returns (the profiled
    model, `profile_step`'s table)."""
    host_reference_us = None
    if reference:
        plain_cm = compile(False)
        plain = make_step(plain_cm)
        for _ in range(steps):
            plain()
        host_reference_us = host_issue_us(plain, reference_calls, _on_cuda(plain_cm))
    cm = compile(True)
    step = make_step(cm)
    for _ in range(steps):
        step()
    return cm, profile_step(cm, step, out_dir, host_reference_us=host_reference_us)


def measured_us(events: Any, cuda: bool) -> dict[str, float]:
    """Per node range: the time of the kernels its ops launched (on a GPU), or its CPU time (on the CPU).

    Only the ranges' CPU-side events count: on a GPU the profiler also records each range as an annotation
    on the device timeline, spanning from its first kernel's start to its last one's end, gaps and the
    kernels of earlier ranges still queued included, which is not the range's own time."""
    out: dict[str, float] = collections.defaultdict(float)
    for ev in _range_events(events):
        out[ev.name] += ev.device_time_total if cuda else ev.cpu_time_total
    return out


def _range_events(events: Any) -> Iterator[Any]:
    """The CPU-side events of the node ranges (`profile_nodes=True`)."""
    return (e for e in events if e.name.startswith(PREFIX) and e.device_type == torch.autograd.DeviceType.CPU)


def timeline_table(result: dict[str, Any]) -> str:
    lines = [
        "# Predicted vs measured",
        "",
        f"Step: predicted {result['predicted_us']:.0f} us, measured {result['wall_us']:.0f} us "
        f"(error {100 * result['error']:+.1f} %).",
        "",
        f"Host: predicted {result['predicted_host_us']:.0f} us to issue the step, measured {result['host_us']:.0f} us. "
        f"The nodes' measured times sum to {result['busy_us']:.0f} us.",
        "",
        "| operation | nodes | predicted us | measured us | measured / predicted |",
        "|---|---|---|---|---|",
    ]
    ops = sorted(result["ops"].items(), key=lambda kv: -kv[1]["measured_us"])
    for op, r in ops:
        ratio = r["measured_us"] / r["predicted_us"] if r["predicted_us"] else float("inf")
        lines.append(f"| {op} | {r['nodes']} | {r['predicted_us']:.1f} | {r['measured_us']:.1f} | {ratio:.2f} |")
    return "\n".join(lines) + "\n"
