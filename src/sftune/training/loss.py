"""The training loss: cross-entropy over the trained tokens only, projected to the vocabulary in chunks.

The backbone runs once. Only positions with a target are projected to the vocabulary, a chunk of tokens at a
time, so neither the `[tokens, vocab]` logits of the batch nor those of untrained positions (prompts, padding)
ever exist. Within a chunk the gradients for the hidden states and the head are computed during the forward
pass and scaled in the backward pass: no logits are kept for backward and none are recomputed. Token accuracy
and entropy come from the same chunks, so nothing else ever builds logits for metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sftune.data.render import IGNORE_INDEX
from sftune.data.vision_inputs import multimodal_position_ids, uses_multimodal_positions
from sftune.training.moe import router_spec, routing_of

# Tokens per chunk are chosen so that one chunk's fp32 logits hold about this many elements (256 MB).
CHUNK_ELEMENTS = 1 << 26


@dataclass
class TokenStats:
    """Per trained token, detached: what reporting needs, in the order of the trained positions."""

    nll: torch.Tensor  # negative log-likelihood of the target
    correct: torch.Tensor  # argmax equals target
    entropy: torch.Tensor  # entropy of the predicted distribution
    # the minimised per-token loss where it is not the nll or DFT's weighted nll (label smoothing); else None
    objective: torch.Tensor | None = None


@dataclass(frozen=True)
class LogitTransform:
    """What some architectures do to logits after the head: multiply by `scale`, then soft-cap with tanh."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def scale_gradient_(self, grad: torch.Tensor, transformed: torch.Tensor) -> torch.Tensor:
        """Turn d(loss)/d(transformed logits) into d(loss)/d(head output), in place."""
        if self.softcap:
            grad.mul_(1 - (transformed / self.softcap) ** 2)
        if self.scale != 1.0:
            grad.mul_(self.scale)
        return grad


def default_chunk_tokens(vocab_size: int) -> int:
    return max(64, CHUNK_ELEMENTS // max(vocab_size, 1))


def _chunk_forward(logits: torch.Tensor, targets: torch.Tensor, dft: bool, smoothing: float = 0.0):
    """From one chunk's fp32 logits: (objective sum, nll, correct, entropy, softmax, per-token loss weights,
    per-token smoothed loss or None).

    The softmax is computed once and serves the entropy and the gradient alike. Label smoothing `eps` is
    F.cross_entropy's: (1 - eps) * nll + eps * mean over the vocabulary of -log p.
    """
    log_norm = torch.logsumexp(logits, dim=-1)
    nll = log_norm - logits.gather(1, targets[:, None]).squeeze(1)
    correct = logits.argmax(dim=-1) == targets
    probs = torch.exp(logits - log_norm[:, None])
    # entropy = log Z - sum(p * z), as a batched dot product so no [tokens, vocab] temporary is made
    entropy = log_norm - torch.bmm(probs[:, None, :], logits[:, :, None]).view(-1)
    # DFT (dynamic fine-tuning): each token's loss is weighted by its own detached probability.
    weights = torch.exp(-nll) if dft else None
    smoothed = None
    if smoothing:
        smoothed = (1.0 - smoothing) * nll + smoothing * (log_norm - logits.mean(dim=-1))
        objective = smoothed.sum()
    else:
        objective = (weights * nll).sum() if dft else nll.sum()
    return objective, nll, correct, entropy, probs, weights, smoothed


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of per-token losses of `transform(hidden @ weight.T + bias)`, gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform, dft, smoothing, chunk_tokens):  # type: ignore[override]
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        stats = []
        for start in range(0, hidden.shape[0], chunk_tokens):
            chunk, chunk_targets = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
            # Precision: under autocast the head's projection runs in the autocast dtype (bf16 / fp16), like every
            # other linear layer; from here on the loss computes in fp32 whatever the autocast dtype: the logits are
            # upcast before the log-sum-exp, softmax, entropy and d(loss)/d(logits), and the head's gradient is
            # accumulated in fp32 across chunks (in-place addmm_ is not autocast).
            logits = transform(F.linear(chunk, weight, bias).float())
            objective, nll, correct, entropy, probs, weights, smoothed = _chunk_forward(
                logits, chunk_targets, dft, smoothing)
            total += objective
            stats.append((nll, correct, entropy, smoothed if smoothed is not None else nll[:0]))
            # d(nll)/d(logits) = softmax - onehot; DFT scales each row by its detached weight. With label
            # smoothing eps the target is (1 - eps) * onehot + eps / vocab, so that is what is subtracted.
            grad_logits = probs
            grad_logits[torch.arange(len(chunk_targets), device=probs.device), chunk_targets] -= 1.0 - smoothing
            if smoothing:
                grad_logits -= smoothing / logits.shape[-1]
            if weights is not None:
                grad_logits.mul_(weights[:, None])
            transform.scale_gradient_(grad_logits, logits)
            grad_logits = grad_logits.to(weight.dtype)
            if need_hidden:
                grad_hidden[start:start + chunk_tokens] = grad_logits @ weight
            if need_weight:  # accumulated in fp32 across chunks (.float() is free for fp32 inputs)
                grad_weight.addmm_(grad_logits.t().float(), chunk.float())
            if need_bias:
                grad_bias += grad_logits.float().sum(0)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.needs = (need_hidden, need_weight, need_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        nll, correct, entropy, smoothed = (torch.cat(parts) for parts in zip(*stats))
        ctx.mark_non_differentiable(nll, correct, entropy, smoothed)
        return total, nll, correct, entropy, smoothed

    @staticmethod
    def backward(ctx, grad_total, *_unused):  # type: ignore[override]
        saved = iter(ctx.saved_tensors)
        need_hidden, need_weight, need_bias = ctx.needs
        grad_hidden = grad_weight = grad_bias = None
        if need_hidden:
            grad_hidden = next(saved)
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if need_weight:
            grad_weight = (next(saved) * grad_total).to(ctx.dtypes[0])
        if need_bias:
            grad_bias = (next(saved) * grad_total).to(ctx.dtypes[1])
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def chunked_lm_loss(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
    transform: LogitTransform = LogitTransform(), dft: bool = False, chunk_tokens: int | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, TokenStats]:
    """Loss sum over the rows of `hidden` ([N, H], trained positions only) through `head`, and per-token stats.

    `label_smoothing` is F.cross_entropy's (values and gradients); it does not combine with DFT."""
    if label_smoothing and dft:
        raise ValueError("label smoothing does not combine with the DFT loss")
    weight = head.weight
    chunk_tokens = chunk_tokens or default_chunk_tokens(weight.shape[0])
    if hidden.shape[0] == 0:  # nothing to train in this micro-batch: a zero that still joins the graph
        zero = sum((p.sum() for p in head.parameters()), hidden.sum()).float() * 0.0
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return zero, TokenStats(empty, empty.bool(), empty)
    grad_wanted = torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, *head.parameters()))
    if grad_wanted and type(head) is nn.Linear:
        total, nll, correct, entropy, smoothed = _ChunkedLinearCrossEntropy.apply(
            hidden, weight, head.bias, targets, transform, dft, label_smoothing, chunk_tokens
        )
        return total, TokenStats(nll, correct, entropy, smoothed if label_smoothing else None)

    def one_chunk(chunk: torch.Tensor, chunk_targets: torch.Tensor):
        # A head that is not a plain Linear (an adapter or a quantized layer) is called as a module.
        logits = transform(head(chunk).float())  # fp32 from the logits on, as in the fused path above
        objective, nll, correct, entropy, _, _, smoothed = _chunk_forward(logits, chunk_targets, dft, label_smoothing)
        smoothed = smoothed.detach() if smoothed is not None else nll[:0].detach()
        return objective, nll.detach(), correct, entropy.detach(), smoothed

    parts = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        args = (hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens])
        # Without the fused path, memory stays bounded by recomputing each chunk's logits in backward.
        parts.append(checkpoint(one_chunk, *args, use_reentrant=False) if grad_wanted else one_chunk(*args))
    total = torch.stack([p[0] for p in parts]).sum()
    nll, correct, entropy, smoothed = (torch.cat([p[k] for p in parts]) for k in (1, 2, 3, 4))
    return total, TokenStats(nll, correct, entropy, smoothed if label_smoothing else None)


def logit_transform(model: nn.Module) -> LogitTransform:
    """Read the post-head logit transform of an architecture, so our loss matches its own forward."""
    config = getattr(model.config, "text_config", None) or model.config
    scale = 1.0
    cohere_scale = getattr(model, "logit_scale", None)  # Cohere keeps it on the model as a float
    if isinstance(cohere_scale, float):
        scale *= cohere_scale
    if getattr(config, "logits_scaling", None):  # Granite divides
        scale /= config.logits_scaling
    return LogitTransform(scale=scale, softcap=getattr(config, "final_logit_softcapping", None))


class CausalLMWithLoss(nn.Module):
    """Wraps a transformers causal LM so that forward returns the summed loss of a batch and its token statistics.

    Being one module, it is what accelerate wraps for data parallelism: every parameter the loss touches is
    reached through this forward, so gradient synchronisation sees them all.
    """

    def __init__(self, model: nn.Module, loss_type: str = "nll", chunk_tokens: int | None = None,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.model = model  # a transformers model, or a peft model wrapping one
        self.dft = loss_type == "dft"
        # Training only: in eval mode the loss is plain cross-entropy, so eval_loss (and perplexity) stay
        # comparable between runs with and without smoothing.
        self.label_smoothing = label_smoothing
        self.chunk_tokens = chunk_tokens
        self.transform = logit_transform(model)
        # FSDP's auto-wrap policy reads the layer classes that must not be split from the root module
        self._no_split_modules = getattr(self.causal_lm, "_no_split_modules", None)
        self.blank_images = None  # data parallel vision-language training: see training/vision.py
        self.router = router_spec(self.causal_lm)  # Mixture-of-Experts: see training/moe.py

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers model; under peft, the base model with the adapter layers injected into it."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        routing_only: bool = False,
        **model_inputs: torch.Tensor,
    ) -> dict[str, Any]:
        """`model_inputs`: what else the backbone takes, e.g. a vision-language model's pixel_values.

        An MoE model's output also holds `routing` (training/moe.py), counted over the real tokens: those of
        `token_mask` (the collator's, for padded rows without an attention mask), else of `attention_mask`.
        `routing_only` skips the loss and returns only that (the balancing loss's pre-pass)."""
        causal_lm = self.causal_lm
        outputs = self.backbone_outputs(input_ids, attention_mask, position_ids, **model_inputs)
        routing = None
        if self.router is not None:
            real = token_mask if token_mask is not None else attention_mask
            routing = routing_of(outputs.router_logits, real, self.router)
            if routing_only:
                return {"routing": routing}
        hidden = outputs.last_hidden_state
        selected = targets != IGNORE_INDEX
        loss_sum, stats = chunked_lm_loss(
            hidden[selected], causal_lm.get_output_embeddings(), targets[selected], self.transform, self.dft,
            self.chunk_tokens, self.label_smoothing if self.training else 0.0,
        )
        if self.blank_images is not None and self.blank_images.needed(model_inputs):
            backbone = getattr(causal_lm, causal_lm.base_model_prefix)
            loss_sum = loss_sum + self.blank_images.zero_loss(backbone, causal_lm.dtype, hidden.device)
        return {"loss_sum": loss_sum, "num_tokens": selected.sum(), "token_stats": stats, "routing": routing}

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, **model_inputs: torch.Tensor) -> torch.Tensor:
        """The backbone's last hidden states for a batch as the collator makes it (no cache, no logits)."""
        return self.backbone_outputs(input_ids, attention_mask, position_ids, **model_inputs).last_hidden_state

    def backbone_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         position_ids: torch.Tensor | None = None, **model_inputs: torch.Tensor) -> Any:
        """The backbone's outputs (last hidden states; an MoE model's router logits too)."""
        causal_lm = self.causal_lm
        backbone = getattr(causal_lm, causal_lm.base_model_prefix)
        # Image batches arrive in fp32; the vision tower computes in the model's dtype.
        model_inputs = {k: v.to(causal_lm.dtype) if v.is_floating_point() else v for k, v in model_inputs.items()}
        if position_ids is not None and position_ids.ndim == 2 and uses_multimodal_positions(backbone):
            # packed or padding-free rows on an M-RoPE model (Qwen-VL): each document's own multimodal positions
            position_ids = multimodal_position_ids(backbone, input_ids, position_ids,
                                                   model_inputs.get("mm_token_type_ids"),
                                                   model_inputs.get("image_grid_thw"))
        if self.router is not None:  # the router logits of every MoE layer (the backbone records them on request)
            model_inputs["output_router_logits"] = True
        return backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
            **model_inputs,
        )
