"""A tiny Mixtral-style causal LM written in plain PyTorch.

Each block is pre-RMSNorm causal self-attention followed by a pre-RMSNorm sparse MoE block: a linear router
with a float32 softmax picks the top-2 of 8 SwiGLU experts per token, the two weights are renormalised, and
the experts (an ``nn.ModuleList``) are run with the usual ``torch.where`` / ``index_add_`` dispatch loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    vocab_size: int = 64
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    num_experts: int = 8
    top_k: int = 2
    ffn_size: int = 64
    rms_eps: float = 1e-6


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class Attention(nn.Module):
    """Causal multi-head self-attention with plain matmuls and softmax."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.o = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, H = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        mask = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(mask, float("-inf"))
        att = torch.softmax(att, dim=-1, dtype=torch.float32).to(q.dtype)
        y = (att @ v).transpose(1, 2).reshape(B, S, H)
        return self.o(y)


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

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList([SwiGLUExpert(cfg.hidden_size, cfg.ffn_size) for _ in range(cfg.num_experts)])

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


class Block(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = Attention(cfg)
        self.moe_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.moe = MixtralStyleMoE(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        x = x + self.moe(self.moe_norm(x))
        return x


class MixtralStyleLM(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(_init_weights)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=1.0)


def build(
    seed: int = 0, dtype: torch.dtype = torch.float32, tokens: int = 32
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A tiny randomly initialised model and example ``input_ids`` of shape ``[2, tokens // 2]``."""
    torch.manual_seed(seed)
    cfg = Config()
    model = MixtralStyleLM(cfg).to(dtype)
    input_ids = torch.randint(0, cfg.vocab_size, (2, tokens // 2), dtype=torch.int64)
    return model, (input_ids,)
