"""Canonical rows -> model-ready tensors, with the labels shifted to the targets each position predicts.

The batching plan (batching.py) names the layout; this module builds it:
- padded: rows right-padded to the longest, with an attention_mask (padding gets no attention and no target).
- packed / joined: no attention_mask; position_ids restart at 0 at each document. transformers then builds a
  block-diagonal causal mask from position_ids on sdpa and eager attention (only when attention_mask is None and
  no cache is used, which CausalLMWithLoss ensures), and FlashAttention runs its varlen kernel with cu_seqlens
  taken from them. FlashAttention reads position_ids that way only for a batch of one row, so for it the batch's
  rows are joined into one row (joined); on sdpa/eager packed rows stay rows (packed), since attention there
  costs the square of a row's length.
- rows (padding_free on sdpa/eager): a joined row would cost attention over its whole length, so instead each
  row becomes a micro-batch of its own, run one after another: no padding and no attention across rows. The loop
  normalises by the trained tokens of the whole optimizer step, so the update is the padded batch's.

Every batch also carries `source_ids`, aligned with `targets`: the source dataset of the document each target
belongs to, -1 where there is no target. It is for per-source loss reports. A position batch whose rows are
padded to a common width also carries `token_mask` (true at real tokens): without an attention mask, it is what
tells an MoE model's balancing loss (training/moe.py) which positions are padding.

A vision-language model's rows take the same layouts plus its images and other inputs (vision_batches.py);
pixels are made per batch, so the prepared data holds only references to the images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sftune.batching import BatchingPlan
from sftune.data.render import IGNORE_INDEX

Rows = list[dict[str, Any]]
Batch = dict[str, torch.Tensor]


def next_token_targets(labels: np.ndarray, seq_lengths: np.ndarray | None = None) -> np.ndarray:
    """targets[t] = labels[t + 1] within the same document; the last position of each document predicts nothing."""
    targets = np.full(len(labels), IGNORE_INDEX, dtype=np.int64)
    targets[:-1] = labels[1:]
    ends = np.cumsum(seq_lengths) - 1 if seq_lengths is not None else np.array([len(labels) - 1])
    targets[ends] = IGNORE_INDEX
    return targets


def document_lengths(row: dict[str, Any]) -> np.ndarray:
    lengths = row.get("seq_lengths")
    return np.asarray(lengths) if lengths is not None else np.array([len(row["input_ids"])])


def token_sources(row: dict[str, Any]) -> np.ndarray:
    """The source of the document each token belongs to."""
    return np.repeat(np.asarray(row.get("source", 0)).reshape(-1), document_lengths(row))


def _row_arrays(row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    targets = next_token_targets(row["labels"], row.get("seq_lengths"))
    sources = np.where(targets != IGNORE_INDEX, token_sources(row), -1)
    return np.asarray(row["input_ids"]), targets, sources


def padded_width(longest: int, multiple: int | None) -> int:
    """`longest`, rounded up to a multiple of `multiple` (pad_to_multiple_of) when it is set."""
    return longest if not multiple else -(-longest // multiple) * multiple


def pad_batch(rows: list[dict[str, Any]], pad_token_id: int, multiple: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row (rounded up to `multiple`). Padding gets attention_mask 0 and no target."""
    width = padded_width(max(len(r["input_ids"]) for r in rows), multiple)
    input_ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(rows), width), dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    source_ids = np.full((len(rows), width), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        ids, row_targets, sources = _row_arrays(row)
        n = len(ids)
        input_ids[i, :n] = ids
        attention_mask[i, :n] = 1
        targets[i, :n] = row_targets
        source_ids[i, :n] = sources
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "targets": torch.from_numpy(targets),
        "source_ids": torch.from_numpy(source_ids),
    }


def position_batch(rows: list[dict[str, Any]], pad_token_id: int, join: bool,
                   multiple: int | None = None) -> dict[str, torch.Tensor]:
    """No attention_mask: position_ids restart at every document. `join` makes the batch one row, no padding
    (but up to a multiple of `multiple`, pad_to_multiple_of, when it is set)."""
    parts = [_row_arrays(row) + (_positions(document_lengths(row)),) for row in rows]
    if join:
        parts = [tuple(np.concatenate(column) for column in zip(*parts))]
    width = padded_width(max(len(p[0]) for p in parts), multiple)
    input_ids = np.full((len(parts), width), pad_token_id, dtype=np.int64)
    targets = np.full((len(parts), width), IGNORE_INDEX, dtype=np.int64)
    source_ids = np.full((len(parts), width), -1, dtype=np.int64)
    # padding positions restart at 0 too: the padding is then a document of its own that no real token sees
    position_ids = np.tile(np.arange(width, dtype=np.int64), (len(parts), 1))
    for i, (ids, row_targets, sources, positions) in enumerate(parts):
        n = len(ids)
        input_ids[i, :n], targets[i, :n], source_ids[i, :n] = ids, row_targets, sources
        position_ids[i, :n] = positions
        position_ids[i, n:] -= n
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "position_ids": torch.from_numpy(position_ids),
        "targets": torch.from_numpy(targets),
        "source_ids": torch.from_numpy(source_ids),
    }
    lengths = np.array([len(p[0]) for p in parts])
    if (lengths < width).any():
        batch["token_mask"] = torch.from_numpy(np.arange(width)[None, :] < lengths[:, None])
    return batch


def _positions(lengths: np.ndarray) -> np.ndarray:
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(int(np.sum(lengths)), dtype=np.int64) - starts


def make_collator(plan: BatchingPlan, tokenizer: Any, processor: Any = None,
                  evaluation: bool = False) -> Callable[[Rows], list[Batch]]:
    """The micro-batch builder for `plan` (`processor`: a vision-language model's; `evaluation`: for the eval rows,
    which may be packed where the training rows are not). It always returns a list: the micro-batches the loop
    runs one after another for these rows (one, except in the `rows` layout)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = pad if pad is not None else 0
    layout = (plan.eval_layout or plan.layout) if evaluation else plan.layout
    if processor is not None:  # the same layouts, plus the images and the processor's other inputs
        from sftune.data.vision_batches import vision_collator
        from sftune.data.vision_inputs import vision_inputs_of

        return vision_collator(vision_inputs_of(processor), pad, layout, plan.pad_to_multiple_of)
    multiple = plan.pad_to_multiple_of
    if layout == "rows":
        return lambda rows: [position_batch([row], pad, join=True, multiple=multiple) for row in rows]
    if layout in ("packed", "joined"):
        join = layout == "joined"
        return lambda rows: [position_batch(rows, pad, join=join, multiple=multiple)]
    return lambda rows: [pad_batch(rows, pad, multiple)]
