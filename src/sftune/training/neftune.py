"""NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): uniform noise on the
input embeddings of the training forward passes.

The noise is what transformers' Trainer adds: uniform in [-m, m] with m = alpha / sqrt(length * hidden), length
being the batch row's length in tokens (the padded width, or a packed / joined row's whole length, as in TRL).
It goes in through torch's forward-hook API on the model's input embedding module, registered only while the
loop runs a training micro-batch and removed right after: evaluation, generation and every save see the model
exactly as it is, and no hook is ever left on the model a run returns.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class NEFTune:
    """`with NEFTune(embedding, alpha):` the forward passes inside get noisy embeddings; none outside."""

    def __init__(self, embedding: nn.Module, alpha: float):
        self.embedding, self.alpha = embedding, alpha
        self._hook = self._add_noise  # one bound method for every registration (torch.compile guards on it)
        self._handle: Any = None

    def __enter__(self) -> NEFTune:
        if self._handle is None:
            self._handle = self.embedding.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _add_noise(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        length, hidden = output.shape[-2], output.shape[-1]
        magnitude = self.alpha / math.sqrt(length * hidden)
        # uniform in [-magnitude, magnitude], written as tensor arithmetic: uniform_ would need the magnitude as a
        # concrete number, and under torch.compile that recompiles the backbone for every new sequence length
        return output + (torch.rand_like(output) * 2 - 1) * magnitude


def input_embedding(causal_lm: nn.Module) -> nn.Module:
    """The module whose output is the token embeddings (a vision-language model's text embeddings)."""
    embedding = causal_lm.get_input_embeddings()
    if embedding is None:
        raise ValueError(f"{type(causal_lm).__name__} has no input embedding module for NEFTune")
    return embedding
