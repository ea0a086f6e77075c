"""The training loss: cross-entropy summed over the trained tokens only.

The backbone runs once; only positions with a target are projected to the vocabulary, so the `[tokens, vocab]`
logits of untrained positions (prompts, padding) are never built.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sftune.data.render import IGNORE_INDEX


def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


class CausalLMWithLoss(nn.Module):
    """Wraps a transformers causal LM so that forward returns the summed loss of a batch.

    Being one module, it is what accelerate wraps for data parallelism: every parameter the loss touches is
    reached through this forward, so gradient synchronisation sees them all.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # a transformers model, or a peft model wrapping one
        text_config = _text_config(model.config)
        # Some architectures transform logits after the head; apply the same here so the loss matches theirs.
        self.final_logit_softcapping = getattr(text_config, "final_logit_softcapping", None)
        scale = getattr(model, "logit_scale", None)  # Cohere keeps it on the model as a float
        self.logit_scale = scale if isinstance(scale, float) else None
        self.logits_scaling = getattr(text_config, "logits_scaling", None)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **model_inputs: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """`model_inputs`: what else the backbone takes, e.g. a vision-language model's pixel_values."""
        causal_lm = self.causal_lm
        backbone = getattr(causal_lm, causal_lm.base_model_prefix)
        # Image batches arrive in fp32; the vision tower computes in the model's dtype.
        model_inputs = {k: v.to(causal_lm.dtype) if v.is_floating_point() else v for k, v in model_inputs.items()}
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
            **model_inputs,
        ).last_hidden_state
        selected = targets != IGNORE_INDEX
        logits = causal_lm.get_output_embeddings()(hidden[selected])
        logits = self._postprocess(logits).float()
        loss_sum = F.cross_entropy(logits, targets[selected], reduction="sum")
        return {"loss_sum": loss_sum, "num_tokens": selected.sum()}

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers model; under peft, the base model with the adapter layers injected into it."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _postprocess(self, logits: torch.Tensor) -> torch.Tensor:
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logits_scaling:
            logits = logits / self.logits_scaling
        if self.final_logit_softcapping:
            logits = torch.tanh(logits / self.final_logit_softcapping) * self.final_logit_softcapping
        return logits
