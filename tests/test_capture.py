"""Recognising an experts module's gate by its code: a module with the transformers experts interface whose
`_apply_gate` is act(gate) * up over the halves of its input gets the GLU op (a kernel on the triton
backend), whatever class defines it; any other gate code keeps running as written."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moecc
from moecc import capture
from moecc.backends import torch_backend


class Experts(nn.Module):
    """Stacked SwiGLU experts behind the transformers experts interface, without transformers."""

    has_gate, has_bias, is_transposed, is_concatenated = True, False, False, True

    def __init__(self, E: int, H: int, F_: int, act: nn.Module | None = None) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * F_, H) * H**-0.5)
        self.down_proj = nn.Parameter(torch.randn(E, H, F_) * F_**-0.5)
        self.act_fn = act if act is not None else nn.SiLU()

    def _apply_gate(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in range(self.gate_up_proj.shape[0]):
            tok, slot = torch.where(idx == e)
            y = F.linear(self._apply_gate(F.linear(x[tok], self.gate_up_proj[e])), self.down_proj[e])
            out.index_add_(0, tok, y * w[tok, slot, None])
        return out


class Clamped(Experts):
    def _apply_gate(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return self.act_fn(gate.clamp(max=0.5)) * up


class UpTimesFunctional(Experts):
    def _apply_gate(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = torch.chunk(h, 2, -1)
        return up * F.silu(gate)


class Swapped(Experts):
    def _apply_gate(self, h: torch.Tensor) -> torch.Tensor:
        up, gate = h.chunk(2, dim=-1)
        return self.act_fn(gate) * up


class Scaled(Experts):
    def _apply_gate(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return self.act_fn(gate) * up * 2


class GeluTanhFunctional(Experts):
    def _apply_gate(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


class GeluFunctional(Experts):
    def _apply_gate(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return F.gelu(gate) * up


class InplaceRelu(Experts):
    def _apply_gate(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return F.relu(gate, inplace=True) * up


class Layer(nn.Module):
    def __init__(self, experts: Experts, top_k: int = 2) -> None:
        super().__init__()
        self.router = nn.Linear(experts.gate_up_proj.shape[2], experts.gate_up_proj.shape[0], bias=False)
        self.experts = experts
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = torch.topk(torch.softmax(self.router(x), -1), self.top_k, -1)
        return x + self.experts(x, idx, w / w.sum(-1, keepdim=True))


@pytest.mark.parametrize(
    "cls,act,name,glu",
    [
        (Experts, nn.SiLU(), "silu", True),
        (Experts, nn.GELU(approximate="tanh"), "gelu_tanh", True),
        (Experts, nn.GELU(approximate="tanh"), "gelu", False),  # not the module's activation
        (UpTimesFunctional, nn.SiLU(), "silu", True),
        (Clamped, nn.SiLU(), "silu", False),
        (Swapped, nn.SiLU(), "silu", False),
        (Scaled, nn.SiLU(), "silu", False),
        # functional GELU gates, read with their approximation: the module's activation must be the one applied
        (GeluTanhFunctional, nn.GELU(approximate="tanh"), "gelu_tanh", True),
        (GeluTanhFunctional, nn.GELU(), "gelu", False),
        (GeluFunctional, nn.GELU(), "gelu", True),
        (GeluFunctional, nn.GELU(approximate="tanh"), "gelu_tanh", False),
        (InplaceRelu, nn.ReLU(), "relu", False),  # writes into its input: not what the GLU op does
    ],
)
def test_gate_is_recognised_by_its_code(cls: type[Experts], act: nn.Module, name: str, glu: bool) -> None:
    assert capture.gate_is_glu(cls(2, 4, 3, act), name) is glu


@pytest.mark.parametrize(
    "cls,act,fn",
    [
        (Experts, nn.SiLU(), "swiglu"),
        (UpTimesFunctional, nn.SiLU(), "swiglu"),
        (GeluTanhFunctional, nn.GELU(approximate="tanh"), "geglu_tanh"),
        (Clamped, nn.SiLU(), "module"),
    ],
)
def test_interface_experts_with_their_own_gate_train_like_eager(cls: type[Experts], act: nn.Module, fn: str) -> None:
    torch.manual_seed(0)
    model = Layer(cls(4, 16, 12, act))
    ref = copy.deepcopy(model)
    cm = moecc.compile(model, backend="torch")
    x = torch.randn(24, 16)
    before = torch_backend.COUNTERS["glu.torch"]
    out = cm(x)
    assert [(r.kind, r.expert_fn) for r in cm.regions] == [("hf_experts", fn)]
    assert (torch_backend.COUNTERS["glu.torch"] > before) is (fn != "module")  # the GLU op, or the module's code
    want = ref(x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    out.square().mean().backward()
    want.square().mean().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=n)
