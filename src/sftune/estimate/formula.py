"""The analytic terms: activations kept for backward, the chunked loss's buffers, the allocator's overhead, and
the FLOPs of one step. Used as they are for another device (`--device`), and as the starting point that
calibration replaces with measurements on this machine.

Activations, per decoder layer and per token, for a Llama-style block (RMSNorm, attention with grouped KV heads,
gated MLP), in elements of the compute dtype (4 bytes in fp32, 2 under bf16/fp16 autocast), h = hidden size,
kv = KV heads x head dim, I = MLP width:
- the two RMSNorms keep their fp32 input and their output: 2 x (h fp32 + h)
- attention keeps q, k before and after the rotary embedding, v and its output, and o_proj's input: 4h + 4kv
- the gated MLP keeps gate's and up's outputs, the activation's output and down's input: 4I
- eager attention also keeps the [heads, L, L] scores and probabilities (sdpa and FlashAttention keep O(L))
- LoRA with dropout keeps each wrapped layer's dropped-out input (and its mask, 1 byte)
With gradient checkpointing each layer keeps only its input (h); one layer's activations are rebuilt during
backward. Assumptions: no activation offloading, dropout off in the base model, MoE layers counted as one
expert's MLP per token (top-k x that with k experts routed), vision towers not counted. Calibration measures
the real figure; on this CPU the formula's whole peak came out 11-20% under the measured one on the six
configurations of tests/test_estimate.py (README, "Memory and time").

The chunked loss (training/loss.py) keeps, from forward to backward, the fp32 gradient of the hidden states of
the trained tokens [trained, h] and, when the head is trained, the head's fp32 gradient [vocab, h]; while a
chunk is computed it holds [chunk, vocab] fp32 logits, probabilities and their gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sftune.config import SFTConfig

ALLOCATOR_OVERHEAD = 0.08  # PyTorch's caching allocator: fragmentation and rounding of what is allocated
CUDA_CONTEXT_MB = 500  # CUDA context and kernels: outside max_memory_allocated, inside the device's memory


@dataclass(frozen=True)
class Architecture:
    layers: int
    hidden: int
    kv_dim: int
    intermediate: int
    heads: int
    vocab: int
    routed_experts: int = 1  # top-k of an MoE model (1 for dense)


def architecture_of(model_config: Any) -> Architecture:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    intermediate = getattr(text, "moe_intermediate_size", None) or getattr(text, "intermediate_size", 4 * hidden)
    top_k = getattr(text, "num_experts_per_tok", None) or 1
    return Architecture(text.num_hidden_layers, hidden, kv_heads * head_dim, intermediate, heads, text.vocab_size,
                        top_k)


def activation_bytes(arch: Architecture, config: SFTConfig, tokens: int, width: int, sequences: int,
                     compute_bytes: int) -> float:
    """Bytes the backbone keeps for backward at the peak, for `sequences` rows of `width` positions."""
    h, kv, mlp = arch.hidden, arch.kv_dim, arch.intermediate * arch.routed_experts
    per_token = 2 * (4 * h + compute_bytes * h) + compute_bytes * (4 * h + 4 * kv + 4 * mlp)
    if config.use_peft and config.lora_dropout > 0:
        per_token += (compute_bytes + 1) * (4 * h + 2 * h + mlp)  # dropped-out inputs of the wrapped layers
    per_layer = per_token * tokens
    if (config.attn_implementation or "sdpa") == "eager":
        per_layer += 2 * compute_bytes * arch.heads * width * width * sequences
    embeddings = compute_bytes * h * tokens
    if config.activation_checkpointing:
        return arch.layers * compute_bytes * h * tokens + per_layer + embeddings
    return arch.layers * per_layer + embeddings


def loss_bytes(arch: Architecture, config: SFTConfig, trained_tokens: int, head_trained: bool) -> float:
    from sftune.training.loss import default_chunk_tokens

    chunk = min(config.loss_chunk_size or default_chunk_tokens(arch.vocab), max(trained_tokens, 1))
    kept = 4 * arch.hidden * trained_tokens + (4 * arch.vocab * arch.hidden if head_trained else 0)
    return kept + 3 * 4 * chunk * arch.vocab


def step_flops(arch: Architecture, linear_params: float, head_params: float, config: SFTConfig,
               step_tokens: list[int], widths: list[int]) -> float:
    """Matmul FLOPs of one optimizer step: 2 per weight per token forward, 2 more for the input gradients, 2 more
    for weight gradients when the weights are trained (LoRA trains none of the base's); a forward again under
    gradient checkpointing; attention's scores 4 x L x h per token per layer, times the same factors."""
    passes = 2 + 2 + (0 if config.use_peft else 2) + (2 if config.activation_checkpointing else 0)
    flops = 0.0
    for tokens, width in zip(step_tokens, widths):
        flops += passes * (linear_params + head_params) * tokens
        flops += (passes / 2) * 4 * arch.layers * arch.hidden * width * tokens / 2  # causal: half the scores
    return flops
