"""Sums over trained tokens (loss, accuracy, entropy), per data source, merged across processes when read."""

from __future__ import annotations

import math
from typing import Any

import torch

from sftune.training.loss import TokenStats

_TOKENS, _OBJECTIVE, _NLL, _CORRECT, _ENTROPY = range(5)


class TokenTotals:
    """Running sums of one interval (a logging interval, or one evaluation)."""

    def __init__(self, source_names: list[str], dft: bool, device: torch.device):
        self.source_names = source_names
        self.dft = dft
        self.sums = torch.zeros(max(len(source_names), 1), 5, dtype=torch.float64, device=device)

    def add(self, stats: TokenStats, token_sources: torch.Tensor | None = None) -> None:
        nll = stats.nll.double()
        if stats.objective is not None:  # label smoothing: the smoothed loss is what training minimises
            objective = stats.objective.double()
        else:
            objective = torch.exp(-nll) * nll if self.dft else nll
        columns = torch.stack([torch.ones_like(nll), objective, nll, stats.correct.double(), stats.entropy.double()], 1)
        if token_sources is None:
            token_sources = torch.zeros(len(nll), dtype=torch.long, device=nll.device)
        self.sums.index_add_(0, token_sources.to(self.sums.device, torch.long), columns.to(self.sums.device))

    def merged(self, accelerator: Any) -> torch.Tensor:
        return accelerator.reduce(self.sums, reduction="sum") if accelerator.num_processes > 1 else self.sums

    def reset(self) -> None:
        self.sums.zero_()


def train_metrics(sums: torch.Tensor, source_names: list[str]) -> dict[str, float]:
    """loss (the objective being minimised), mean_token_accuracy and entropy, overall and per source."""
    metrics = _summarise(sums.sum(0), loss_column=_OBJECTIVE)
    metrics.pop("perplexity")
    for name, row in _per_source(sums, source_names):
        metrics[f"loss/{name}"] = _summarise(row, loss_column=_OBJECTIVE)["loss"]
    return metrics


def eval_metrics(sums: torch.Tensor, source_names: list[str]) -> dict[str, float]:
    """eval_loss (cross-entropy), eval_perplexity, eval_mean_token_accuracy, eval_entropy, overall and per source."""
    metrics = {f"eval_{k}": v for k, v in _summarise(sums.sum(0), loss_column=_NLL).items()}
    for name, row in _per_source(sums, source_names):
        for key, value in _summarise(row, loss_column=_NLL).items():
            metrics[f"eval_{key}/{name}"] = value
    return metrics


def _per_source(sums: torch.Tensor, source_names: list[str]):
    if len(source_names) > 1:
        for name, row in zip(source_names, sums):
            if row[_TOKENS] > 0:
                yield name, row


def _summarise(row: torch.Tensor, loss_column: int) -> dict[str, float]:
    tokens = max(float(row[_TOKENS]), 1.0)
    loss = float(row[loss_column]) / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "mean_token_accuracy": float(row[_CORRECT]) / tokens,
        "entropy": float(row[_ENTROPY]) / tokens,
    }
