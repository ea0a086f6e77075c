"""Tiny Mixture-of-Experts models built from configs (nothing downloaded): Qwen3-MoE and OLMoE, with fused 3-D
expert weights as transformers 5 makes them, and the ChatML tokenizer of the other tiny models."""

from __future__ import annotations

from pathlib import Path

from conftest import build_tokenizer

FAMILIES = ("qwen3_moe", "olmoe")  # trained in the tests
LOSS_FAMILIES = (*FAMILIES, "mixtral", "gpt_oss", "qwen2_moe")  # their balancing loss checked on one batch
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def build_moe(family: str, vocab_size: int, pad_token_id: int, eos_token_id: int, seed: int = 0):
    import torch
    from transformers import OlmoeConfig, OlmoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                  pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None,
                  num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(seed)
    if family == "qwen3_moe":
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16, head_dim=8,
                                                  **common))
    if family == "olmoe":
        return OlmoeForCausalLM(OlmoeConfig(intermediate_size=16, **common))
    # more families, for the balancing loss against each one's own (forward only)
    from transformers import (
        GptOssConfig, GptOssForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM,
    )

    experts = common.pop("num_experts")
    if family == "mixtral":
        return MixtralForCausalLM(MixtralConfig(intermediate_size=16, num_local_experts=experts, **common))
    if family == "gpt_oss":
        return GptOssForCausalLM(GptOssConfig(intermediate_size=16, num_local_experts=experts, head_dim=8,
                                              layer_types=["sliding_attention", "full_attention"], sliding_window=8,
                                              **common))
    if family == "qwen2_moe":
        return Qwen2MoeForCausalLM(Qwen2MoeConfig(intermediate_size=16, moe_intermediate_size=16,
                                                  shared_expert_intermediate_size=16, num_experts=experts, **common))
    raise ValueError(family)


def save_moe(family: str, folder: Path) -> Path:
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(folder)
    build_moe(family, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id).save_pretrained(folder)
    return folder
