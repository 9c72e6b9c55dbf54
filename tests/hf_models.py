"""Tiny random-weight transformers MoE models (Mixtral, DeepSeek-V3) for tests."""

from __future__ import annotations

import torch


def tiny_mixtral(seed: int = 0, dtype: torch.dtype = torch.float32, experts_implementation: str = "eager"):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        attn_implementation="eager",
        experts_implementation=experts_implementation,
    )
    model = MixtralForCausalLM(cfg).to(dtype)
    ids = torch.randint(0, 64, (2, 8))
    return model, (ids,)


def tiny_deepseek_v3(seed: int = 0, dtype: torch.dtype = torch.float32, experts_implementation: str = "eager"):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = DeepseekV3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=4,
        n_group=2,
        topk_group=1,
        n_shared_experts=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        max_position_embeddings=64,
        attn_implementation="eager",
        experts_implementation=experts_implementation,
    )
    model = DeepseekV3ForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # non-zero selection bias, so that selection and weights differ
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.copy_(torch.randn_like(m.e_score_correction_bias) * 0.1)
    ids = torch.randint(0, 64, (2, 8))
    return model, (ids,)
