"""A tiny Switch-Transformer-style causal LM written in plain PyTorch.

Each block is pre-RMSNorm causal self-attention followed by a pre-RMSNorm MoE block: a linear router with a
float32 softmax sends each token to its top-1 of 4 experts, weighted by that expert's probability (not
renormalised). The experts are biased two-layer GELU MLPs in an ``nn.ModuleList``, run with the usual
``torch.where`` / ``index_add_`` dispatch loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

if __package__:  # imported as moecc.examples.switch_style
    from .tiny_lm import TinyLM, TinyLMConfig, build_tiny_lm
else:  # imported as a top-level module, with examples/ on sys.path
    from tiny_lm import TinyLM, TinyLMConfig, build_tiny_lm


@dataclass
class Config(TinyLMConfig):
    num_experts: int = 4
    top_k: int = 1


class MLPExpert(nn.Module):
    """One expert: ``fc2(gelu(fc1(x)))`` with biases."""

    def __init__(self, hidden_size: int, ffn_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, ffn_size, bias=True)
        self.act = nn.GELU(approximate="none")
        self.fc2 = nn.Linear(ffn_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwitchStyleMoE(nn.Module):
    """Softmax top-1 router (weight = the chosen expert's probability) over an ``nn.ModuleList`` of MLPs."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList([MLPExpert(cfg.hidden_size, cfg.ffn_size) for _ in range(cfg.num_experts)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H = x.shape[-1]
        x_TH = x.reshape(-1, H)
        probs_TE = torch.softmax(self.router(x_TH), dim=-1, dtype=torch.float32)
        w_TK, idx_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        out_TH = torch.zeros_like(x_TH)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx_TK == e)
            out_TH.index_add_(0, tok, (expert(x_TH[tok]) * w_TK[tok, slot, None]).to(out_TH.dtype))
        return out_TH.reshape(x.shape)


class SwitchStyleLM(TinyLM):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, lambda layer: SwitchStyleMoE(cfg))


def build(
    seed: int = 0, dtype: torch.dtype = torch.float32, tokens: int = 32
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A tiny randomly initialised model and example ``input_ids`` of shape ``[2, tokens // 2]``."""
    return build_tiny_lm(SwitchStyleLM, Config(), seed, dtype, tokens)
