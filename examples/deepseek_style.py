"""A tiny DeepSeek-V3-style causal LM written in plain PyTorch.

Each block is pre-RMSNorm causal self-attention followed by a pre-RMSNorm MoE block with fine-grained experts
(16 experts of ffn 16, top-4) and one shared SwiGLU expert. The router uses sigmoid scores; an
``e_score_correction_bias`` buffer is added for expert selection only, with group-limited routing (4 groups,
the best 2 kept, a group scored by the sum of its top-2 biased scores). The weights are the unbiased sigmoid
scores at the chosen experts, normalised and scaled by ``routed_scaling_factor``. The routed experts (an
``nn.ModuleList`` with a fused ``gate_up`` projection) run with the usual ``torch.where`` / ``index_add_``
dispatch loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

if __package__:  # imported as moecc.examples.deepseek_style
    from .tiny_lm import TinyLM, TinyLMConfig, build_tiny_lm
else:  # imported as a top-level module, with examples/ on sys.path
    from tiny_lm import TinyLM, TinyLMConfig, build_tiny_lm


@dataclass
class Config(TinyLMConfig):
    num_experts: int = 16
    top_k: int = 4
    ffn_size: int = 16
    shared_ffn_size: int = 32
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 2.5


class Expert(nn.Module):
    """One routed expert: a fused ``gate_up`` projection, ``silu(gate) * up``, then ``down``."""

    def __init__(self, hidden_size: int, ffn_size: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * ffn_size, bias=False)
        self.down = nn.Linear(ffn_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up(x)
        gate, up = h.chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class SharedExpert(nn.Module):
    """The always-active shared expert: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, ffn_size: int) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden_size, ffn_size, bias=False)
        self.up = nn.Linear(hidden_size, ffn_size, bias=False)
        self.down = nn.Linear(ffn_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class DeepSeekStyleMoE(nn.Module):
    """Sigmoid, bias-corrected, group-limited top-k router over fine-grained experts, plus a shared expert."""

    e_score_correction_bias: torch.Tensor

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        self.experts = nn.ModuleList([Expert(cfg.hidden_size, cfg.ffn_size) for _ in range(cfg.num_experts)])
        self.shared_expert = SharedExpert(cfg.hidden_size, cfg.shared_ffn_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H = x.shape[-1]
        x_TH = x.reshape(-1, H)
        T, E, G = x_TH.shape[0], self.num_experts, self.n_group
        # router: sigmoid scores; the correction bias only affects which experts are selected
        scores_TE = torch.sigmoid(self.router(x_TH).float())
        biased_TE = scores_TE + self.e_score_correction_bias.float()
        group_TG = biased_TE.view(T, G, E // G).topk(2, dim=-1).values.sum(dim=-1)
        group_idx = torch.topk(group_TG, self.topk_group, dim=-1, sorted=False).indices
        group_mask_TG = torch.zeros_like(group_TG).scatter(1, group_idx, 1.0)
        expert_mask_TE = group_mask_TG.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
        masked_TE = biased_TE.masked_fill(expert_mask_TE == 0, float("-inf"))
        idx_TK = torch.topk(masked_TE, self.top_k, dim=-1, sorted=False).indices
        w_TK = scores_TE.gather(1, idx_TK)
        w_TK = w_TK / (w_TK.sum(dim=-1, keepdim=True) + 1e-20) * self.routed_scaling_factor
        out_TH = torch.zeros_like(x_TH)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx_TK == e)
            out_TH.index_add_(0, tok, (expert(x_TH[tok]) * w_TK[tok, slot, None]).to(out_TH.dtype))
        out_TH = out_TH + self.shared_expert(x_TH)
        return out_TH.reshape(x.shape)


class DeepSeekStyleLM(TinyLM):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, lambda layer: DeepSeekStyleMoE(cfg))


def build(
    seed: int = 0, dtype: torch.dtype = torch.float32, tokens: int = 32
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A tiny randomly initialised model and example ``input_ids`` of shape ``[2, tokens // 2]``."""
    model, inputs = build_tiny_lm(DeepSeekStyleLM, Config(), seed, dtype, tokens)
    for m in model.modules():  # the selection bias stays float32 whatever the model dtype
        if isinstance(m, DeepSeekStyleMoE):
            m.e_score_correction_bias = m.e_score_correction_bias.float()
    return model, inputs
