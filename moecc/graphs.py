"""A whole training step replayed from one CUDA graph: `moecc.graph_step`.

    cm = moecc.compile(model, cuda_graph=True)
    opt = torch.optim.AdamW(cm.parameters(), lr=torch.tensor(3e-4, device="cuda"), capturable=True)

    def train(ids, targets):
        loss = cm(ids, targets)
        loss.backward()
        opt.step()
        return loss.detach()

    step = moecc.graph_step(train, cm, optimizers=[opt])
    for ids, targets in data:
        loss = step(ids, targets)

A compiled MoE step issues hundreds of kernels a layer, and at training sizes the host's time to issue them
(Python, Dynamo's guards, the dispatcher, Triton's launcher) is close to the device's time to run them. Captured
once, the step replays with one launch. This works because nothing in moecc's compiled layers waits for the
host: routing counts stay on the device, and the fused expert-parallel kernels meet their peers through
symmetric-memory signals derived from call counters kept on the device.

`moecc.compile(..., cuda_graph=True)` states the intent at compile time: a sharded MoE region that cannot be
replayed (one left unfused, whose all-to-all row counts the host reads every step) is an error there, naming
the region, and the cost model's timeline has no host lane (a replay issues nothing).

The first `warmup` calls run `fn` as it is (on a side stream: Dynamo compiles, Triton builds its kernels, the
symmetric buffers are allocated); the next call captures `fn` into a graph and replays it; every later call
copies its arguments into the graph's input buffers and replays. Every call is a real step. What replaying
changes, and what graph_step checks for:

- Arguments: tensors keep the captured shape, dtype and device (their values are copied in); other arguments
  keep their captured values. A different one raises (pad to the captured shape, or make a second step).
- Gradients: each call's gradients replace the parameters' `.grad` (as if set to None before the step); after a
  replay every parameter's `.grad` is the graph's gradient buffer again, whatever the caller did to `.grad` in
  between. Accumulate micro-batches inside `fn`.
- Optimizers: an optimizer stepped inside `fn` must be capturable (`capturable=True` for Adam and AdamW), and
  its hyperparameters are baked into the graph: pass it in `optimizers` and a replay raises if a float one
  (such as a scheduler's learning rate) changed since the capture; hold such a value in a tensor and update it
  in place instead.
- Outputs: tensors are copied out of the graph's buffers, so a returned loss stays valid after the next call.
- The graph holds its memory (activations, gradients) and, where the step has collectives, their NCCL
  communicators: call `close()` before `torch.distributed.destroy_process_group()`, which otherwise waits for
  the graph forever. The next call after `close()` warms up and captures again.
- Anything that synchronises with the host during the step (`.item()`, a shape that depends on values, the
  unfused expert-parallel path's count exchange, a collective over gloo) makes the capture fail: the error
  says so. The Python code of `fn` runs only at the capture: state it reads on the host is frozen there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from moecc.options import MoeccError


def graph_step(
    fn: Callable[..., Any],
    model: nn.Module,
    *,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    warmup: int = 2,
) -> GraphStep:
    """Replay the training step `fn(*args, **kwargs)` of `model` from a CUDA graph (see the module docstring).

    model: the module whose parameters' gradients `fn` produces (a `moecc.compile`d model or any module), on a
        CUDA device.
    optimizers: the optimizers `fn` steps: checked to be capturable, and their hyperparameters checked at every
        replay against the values the graph holds.
    warmup: calls run as they are before the capture (at least 1: the first call compiles).
    """
    return GraphStep(fn, model, optimizers=optimizers, warmup=warmup)


def _where(path: pytree.KeyPath) -> str:
    return "argument" + pytree.keystr(path)


class GraphStep:
    """What `graph_step` returns: call it as `fn`. `replays` counts the calls served by the graph."""

    def __init__(
        self,
        fn: Callable[..., Any],
        model: nn.Module,
        *,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        warmup: int = 2,
    ) -> None:
        name = getattr(fn, "__name__", type(fn).__name__)
        self.name = f"moecc.graph_step({name})"
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise MoeccError(f"{self.name}: warmup={warmup!r} must be an integer >= 1 (the first call compiles)")
        self.optimizers = list(optimizers)
        for opt in self.optimizers:
            for i, group in enumerate(opt.param_groups):
                if group.get("capturable") is False:
                    raise MoeccError(
                        f"{self.name}: {type(opt).__name__} param group {i} has capturable=False: its step reads "
                        f"its step count on the host and cannot be captured; construct it with capturable=True"
                    )
        self.params = [p for p in model.parameters() if p.requires_grad]
        off = sorted({str(p.device) for p in self.params if p.device.type != "cuda"})
        if off:
            model_name = type(getattr(model, "_original", model)).__name__
            raise MoeccError(f"{self.name}: parameters of {model_name} are on {off}; move the model to a "
                             "CUDA device before compiling it (CUDA graphs replay device work only)")  # fmt: skip
        if not torch.cuda.is_available():
            raise MoeccError(f"{self.name}: CUDA graphs need a CUDA device, and none is available here")
        self.fn = fn
        self.warmup = warmup
        self.calls = 0
        self.replays = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._spec: pytree.TreeSpec | None = None
        self._static: list[Any] = []  # the graph's input buffers (tensors) and the captured values (others)
        self._paths: list[pytree.KeyPath] = []
        self._out: Any = None
        self._grads: list[torch.Tensor | None] = []
        self._hyper: list[list[dict[str, Any]]] = []

    # ---------------------------------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.graph is not None:
            return self._replay(args, kwargs)
        if self.calls <= self.warmup:
            return self._eager(args, kwargs)
        return self._capture(args, kwargs)

    def _clear_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def _eager(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A warm-up call: on a side stream, as a capture wants (no work left on the capturing stream)."""
        self._clear_grads()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.fn(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        leaves, self._spec = pytree.tree_flatten_with_path((args, kwargs))
        self._paths = [path for path, _ in leaves]
        self._static = [v.detach().clone() if isinstance(v, torch.Tensor) else v for _, v in leaves]
        for path, v in zip(self._paths, self._static, strict=True):
            if isinstance(v, torch.Tensor) and v.device.type != "cuda":
                raise MoeccError(f"{self.name}: {_where(path)} is on {v.device}; a CUDA graph reads its inputs "
                                 "from the device: pass it on the model's CUDA device")  # fmt: skip
        static_args, static_kwargs = pytree.tree_unflatten(self._static, self._spec)
        self._clear_grads()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(graph):
                out = self.fn(*static_args, **static_kwargs)
        except Exception as e:
            raise MoeccError(
                f"{self.name}: the step could not be captured in a CUDA graph ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). Something in it waits for the host: a tensor's "
                "value read in Python (.item(), .tolist(), a condition on a tensor), a shape that depends on "
                "values (nonzero, unique, boolean indexing), a collective over gloo, or moecc's unfused "
                "expert-parallel path (MOECC_FUSED_EP=0, or an expert-parallel group across hosts), whose "
                "all-to-all sizes come from the host. Run the step without graph_step, or remove the "
                "synchronisation"
            ) from e
        self.graph = graph
        self._out = out
        self._grads = [p.grad for p in self.params]
        self._hyper = [[self._floats(g) for g in opt.param_groups] for opt in self.optimizers]
        graph.replay()  # the capture ran nothing: this call's step
        self.replays += 1
        return self._outputs()

    @staticmethod
    def _floats(group: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in group.items() if k != "params" and isinstance(v, (bool, int, float))}

    def _replay(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if spec != self._spec:
            raise MoeccError(f"{self.name}: called with arguments structured as {spec}, captured with "
                             f"{self._spec}; pass the same arguments every call")  # fmt: skip
        self._check_optimizers()
        for path, static, new in zip(self._paths, self._static, leaves, strict=True):
            if isinstance(static, torch.Tensor):
                if not isinstance(new, torch.Tensor):
                    raise MoeccError(f"{self.name}: {_where(path)} is a {type(new).__name__}, captured as a tensor")
                if new.shape != static.shape or new.dtype != static.dtype or new.device != static.device:
                    raise MoeccError(
                        f"{self.name}: {_where(path)} is {new.dtype} {list(new.shape)} on {new.device}; the graph "
                        f"was captured with {static.dtype} {list(static.shape)} on {static.device}. A graph replays "
                        "one shape: pad inputs to it, or make another graph_step for this shape"
                    )
                if new.data_ptr() != static.data_ptr():
                    static.copy_(new)
            elif not _same(new, static):
                raise MoeccError(
                    f"{self.name}: {_where(path)} is {new!r}, the graph was captured with {static!r}; values other "
                    "than tensors are fixed at the capture: make another graph_step for this value"
                )
        assert self.graph is not None
        self.graph.replay()
        self.replays += 1
        for p, g in zip(self.params, self._grads, strict=True):
            if p.grad is not g:
                p.grad = g
        return self._outputs()

    def close(self) -> None:
        """Release the graph and its buffers, and set the parameters' `.grad` (the graph's gradient buffers) to
        None; the next call starts over (warm-up, capture)."""
        if self.graph is not None:
            torch.cuda.synchronize()
        self.graph, self._out, self._static, self._grads, self._hyper = None, None, [], [], []
        for p in self.params:  # the gradients live in the graph's memory pool
            p.grad = None
        self.calls = 0

    def _check_optimizers(self) -> None:
        for opt, groups in zip(self.optimizers, self._hyper, strict=True):
            for i, (group, held) in enumerate(zip(opt.param_groups, groups, strict=True)):
                for k, v in held.items():
                    if not _same(group.get(k), v):
                        raise MoeccError(
                            f"{self.name}: {type(opt).__name__} param group {i} has {k}={group.get(k)!r}, but the "
                            f"graph was captured with {k}={v!r} and replays that value. Hold {k} in a tensor "
                            f"(e.g. {k}=torch.tensor(value, device='cuda') at construction) and update it in place "
                            "(.fill_()), which the graph reads at every replay"
                        )

    def _outputs(self) -> Any:
        return pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, self._out)

    @property
    def inputs(self) -> list[Any]:
        """The graph's input buffers, after the capture (writing them directly saves the copy)."""
        return list(self._static)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b
