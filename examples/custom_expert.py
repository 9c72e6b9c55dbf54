"""A tiny Mixtral-style causal LM whose experts are an unusual (non-standard) FFN.

Same as ``mixtral_style`` (float32 softmax router, top-2 of 4 experts, renormalised weights, an
``nn.ModuleList`` of experts run with the ``torch.where`` / ``index_add_`` dispatch loop), but each expert
computes ``w2(silu(w1(x)) * w3(x)) + 0.1 * tanh(w1(x)).sum(-1, keepdim=True)``: still a per-token function of
its input rows, but not a SwiGLU/GeGLU/MLP that a compiler would recognise as a standard expert FFN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

if __package__:  # imported as moecc.examples.custom_expert
    from .mixtral_style import MixtralStyleMoE
    from .tiny_lm import TinyLM, TinyLMConfig, build_tiny_lm
else:  # imported as a top-level module, with examples/ on sys.path
    from mixtral_style import MixtralStyleMoE
    from tiny_lm import TinyLM, TinyLMConfig, build_tiny_lm


@dataclass
class Config(TinyLMConfig):
    num_experts: int = 4
    top_k: int = 2


class CustomExpert(nn.Module):
    """One expert: a SwiGLU FFN plus a per-token scalar ``0.1 * sum(tanh(w1(x)))`` broadcast over H."""

    def __init__(self, hidden_size: int, ffn_size: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden_size, ffn_size, bias=False)  # gate
        self.w3 = nn.Linear(hidden_size, ffn_size, bias=False)  # up
        self.w2 = nn.Linear(ffn_size, hidden_size, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.w1(x)
        return self.w2(F.silu(g) * self.w3(x)) + 0.1 * torch.tanh(g).sum(-1, keepdim=True)


class CustomExpertMoE(MixtralStyleMoE):
    """The Mixtral-style block (same router and dispatch loop) over custom experts."""

    expert_cls = CustomExpert


class CustomExpertLM(TinyLM):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, lambda layer: CustomExpertMoE(cfg))


def build(
    seed: int = 0, dtype: torch.dtype = torch.float32, tokens: int = 32
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A tiny randomly initialised model and example ``input_ids`` of shape ``[2, tokens // 2]``."""
    return build_tiny_lm(CustomExpertLM, Config(), seed, dtype, tokens)
