"""A tiny Mixtral-style causal LM written in plain PyTorch.

Each block is pre-RMSNorm causal self-attention followed by a pre-RMSNorm sparse MoE block: a linear router
with a float32 softmax picks the top-2 of 8 SwiGLU experts per token, the two weights are renormalised, and
the experts (an ``nn.ModuleList``) are run with the usual ``torch.where`` / ``index_add_`` dispatch loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

if __package__:  # imported as moecc.examples.mixtral_style
    from .tiny_lm import TinyLM, TinyLMConfig, build_tiny_lm
else:  # imported as a top-level module, with examples/ on sys.path
    from tiny_lm import TinyLM, TinyLMConfig, build_tiny_lm


@dataclass
class Config(TinyLMConfig):
    num_experts: int = 8
    top_k: int = 2


class SwiGLUExpert(nn.Module):
    """One expert: ``w2(silu(w1(x)) * w3(x))``."""

    def __init__(self, hidden_size: int, ffn_size: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden_size, ffn_size, bias=False)  # gate
        self.w3 = nn.Linear(hidden_size, ffn_size, bias=False)  # up
        self.w2 = nn.Linear(ffn_size, hidden_size, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MixtralStyleMoE(nn.Module):
    """Softmax top-k router (renormalised) over an ``nn.ModuleList`` of SwiGLU experts."""

    expert_cls: type[nn.Module] = SwiGLUExpert

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList([self.expert_cls(cfg.hidden_size, cfg.ffn_size) for _ in range(cfg.num_experts)])

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


class MixtralStyleLM(TinyLM):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, lambda layer: MixtralStyleMoE(cfg))


def build(
    seed: int = 0, dtype: torch.dtype = torch.float32, tokens: int = 32
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A tiny randomly initialised model and example ``input_ids`` of shape ``[2, tokens // 2]``."""
    return build_tiny_lm(MixtralStyleLM, Config(), seed, dtype, tokens)
