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
    from .tiny_lm import TinyLM, TinyLMConfig, build_tiny_lm
else:  # imported as a top-level module, with examples/ on sys.path
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


class CustomExpertMoE(nn.Module):
    """Softmax top-k router (renormalised) over an ``nn.ModuleList`` of custom experts."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList([CustomExpert(cfg.hidden_size, cfg.ffn_size) for _ in range(cfg.num_experts)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H = x.shape[-1]
        x_TH = x.reshape(-1, H)
        probs_TE = torch.softmax(self.router(x_TH), dim=-1, dtype=torch.float32)
        w_TK, idx_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
        out_TH = torch.zeros_like(x_TH)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx_TK == e)
            out_TH.index_add_(0, tok, (expert(x_TH[tok]) * w_TK[tok, slot, None]).to(out_TH.dtype))
        return out_TH.reshape(x.shape)


class CustomExpertLM(TinyLM):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, lambda layer: CustomExpertMoE(cfg))


def build(
    seed: int = 0, dtype: torch.dtype = torch.float32, tokens: int = 32
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A tiny randomly initialised model and example ``input_ids`` of shape ``[2, tokens // 2]``."""
    return build_tiny_lm(CustomExpertLM, Config(), seed, dtype, tokens)
