"""Shared test helpers: the examples and the tiny transformers models are importable, dynamo starts clean
in every test module."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

# Triton kernels run on the CPU under the interpreter; the flag is read when a kernel module is imported
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT / "examples", ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


def example_module(name: str) -> Any:
    """The module of `examples/<name>.py` (as `moecc.examples.<name>` where that package is installed)."""
    try:
        return importlib.import_module(f"moecc.examples.{name}")
    except ImportError:
        return importlib.import_module(name)


def load_example(name: str, **kw: Any) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """`examples/<name>.py`'s `build(**kw)`: a tiny model and its example inputs."""
    return example_module(name).build(**kw)


def logits_of(out: Any) -> torch.Tensor:
    """The logits of an example model (a tensor) or of a transformers model (an output with `.logits`)."""
    return out.logits if hasattr(out, "logits") else out


def next_token_loss(out: Any, input_ids: torch.Tensor) -> torch.Tensor:
    logits = logits_of(out)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


def assert_close_scaled(got: torch.Tensor, expect: torch.Tensor, rel: float, what: str = "") -> None:
    """|got - expect| <= rel * (max |expect| + tiny): a loose check for low-precision results."""
    got, expect = got.detach().float(), expect.detach().float()
    assert got.shape == expect.shape, what
    err = (got - expect).abs().max().item() if got.numel() else 0.0
    scale = expect.abs().max().item() if expect.numel() else 0.0
    assert err <= rel * scale + 1e-6, f"{what}: max err {err:.3g} vs max |ref| {scale:.3g} (rel {rel})"


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo():
    """Each test module starts with empty Dynamo caches (and recompile counts) and graph-break counters."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
