"""Canonical rows -> model-ready tensors, with the labels shifted to the targets each position predicts."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from sftune.config import SFTConfig
from sftune.data.render import IGNORE_INDEX


def next_token_targets(labels: np.ndarray, seq_lengths: np.ndarray | None = None) -> np.ndarray:
    """targets[t] = labels[t + 1] within the same document; the last position of each document predicts nothing."""
    targets = np.full_like(labels, IGNORE_INDEX)
    targets[:-1] = labels[1:]
    ends = np.cumsum(seq_lengths) - 1 if seq_lengths is not None else np.array([len(labels) - 1])
    targets[ends] = IGNORE_INDEX
    return targets


def pad_batch(rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. Padding gets attention_mask 0 and no target."""
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(rows), width), dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = row["input_ids"]
        attention_mask[i, :n] = 1
        targets[i, :n] = next_token_targets(row["labels"], row.get("seq_lengths"))
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "targets": torch.from_numpy(targets),
    }


def make_collator(config: SFTConfig, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """The batch builder the loop uses for this run's rows."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return partial(pad_batch, pad_token_id=pad if pad is not None else 0)
