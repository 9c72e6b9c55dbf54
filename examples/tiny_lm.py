"""The scaffolding the tiny example LMs share, written in plain PyTorch.

A ``TinyLM`` is a token embedding, ``num_layers`` decoder ``Block``s, a final RMSNorm and an untied LM head. Each
block is pre-RMSNorm causal self-attention followed by a pre-RMSNorm feed-forward module that the example supplies
(its MoE block, or a dense MLP), so an example file only holds what makes it distinctive: its feed-forward module,
its ``Config`` (a ``TinyLMConfig`` with extra fields) and a ``build()`` that calls ``build_tiny_lm``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import torch
from torch import nn


@dataclass
class TinyLMConfig:
    vocab_size: int = 64
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    ffn_size: int = 64
    rms_eps: float = 1e-6


ConfigT = TypeVar("ConfigT", bound=TinyLMConfig)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention with plain matmuls and softmax."""

    def __init__(self, cfg: TinyLMConfig) -> None:
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


class Block(nn.Module):
    """``x + attn(attn_norm(x))``, then ``x + ffn(ffn_norm(x))``.

    The feed-forward module is registered as ``<ffn_name>`` and its norm as ``<ffn_name>_norm`` ("moe" for the MoE
    examples, "mlp" for the dense one). ``make_ffn`` is called last, so that the modules are created (and draw from
    the random generator) in the order ``attn_norm``, ``attn``, ``<ffn_name>_norm``, ``<ffn_name>``.
    """

    def __init__(self, cfg: TinyLMConfig, make_ffn: Callable[[], nn.Module], ffn_name: str = "moe") -> None:
        super().__init__()
        self.ffn_name = ffn_name
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = CausalSelfAttention(cfg)
        self.add_module(f"{ffn_name}_norm", RMSNorm(cfg.hidden_size, cfg.rms_eps))
        self.add_module(ffn_name, make_ffn())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ffn_norm, ffn = getattr(self, f"{self.ffn_name}_norm"), getattr(self, self.ffn_name)
        x = x + self.attn(self.attn_norm(x))
        x = x + ffn(ffn_norm(x))
        return x


class TinyLM(nn.Module):
    """Embedding, ``cfg.num_layers`` blocks (layer ``i``'s feed-forward module is ``make_ffn(i)``), norm, LM head."""

    def __init__(self, cfg: TinyLMConfig, make_ffn: Callable[[int], nn.Module], ffn_name: str = "moe") -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Block(cfg, partial(make_ffn, i), ffn_name) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(init_weights)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=1.0)


def build_tiny_lm(
    model_cls: Callable[[ConfigT], nn.Module], cfg: ConfigT, seed: int, dtype: torch.dtype, tokens: int
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``model_cls(cfg)`` built after ``torch.manual_seed(seed)`` and cast to ``dtype``, and example ``input_ids``
    of shape ``[2, tokens // 2]`` drawn right after it."""
    torch.manual_seed(seed)
    model = model_cls(cfg).to(dtype)
    input_ids = torch.randint(0, cfg.vocab_size, (2, tokens // 2), dtype=torch.int64)
    return model, (input_ids,)
