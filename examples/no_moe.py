"""A tiny dense causal LM written in plain PyTorch (no experts).

Each block is pre-RMSNorm causal self-attention followed by a pre-RMSNorm SwiGLU MLP. It has the same
``build`` signature as the MoE examples and serves as a model in which a compiler should find no MoE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

if __package__:  # imported as moecc.examples.no_moe
    from .tiny_lm import TinyLM, TinyLMConfig, build_tiny_lm
else:  # imported as a top-level module, with examples/ on sys.path
    from tiny_lm import TinyLM, TinyLMConfig, build_tiny_lm


@dataclass
class Config(TinyLMConfig):
    """The shared tiny-LM sizes; a dense model needs no more."""


class MLP(nn.Module):
    """A dense SwiGLU MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, ffn_size: int) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden_size, ffn_size, bias=False)
        self.up = nn.Linear(hidden_size, ffn_size, bias=False)
        self.down = nn.Linear(ffn_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class DenseLM(TinyLM):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, lambda layer: MLP(cfg.hidden_size, cfg.ffn_size), ffn_name="mlp")


def build(
    seed: int = 0, dtype: torch.dtype = torch.float32, tokens: int = 32
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A tiny randomly initialised model and example ``input_ids`` of shape ``[2, tokens // 2]``."""
    return build_tiny_lm(DenseLM, Config(), seed, dtype, tokens)
