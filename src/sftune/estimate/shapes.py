"""The shapes memory and time are costed at, from the prepared data's real lengths (the same rows, through the
same cache, that `sftune train` reads): the largest micro-batch the batching plan will build, and the tokens of
every micro-batch of the run's optimizer steps, in the order the loop takes them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sftune.batching import BatchingPlan
from sftune.config import SFTConfig
from sftune.data.collate import make_collator, padded_width
from sftune.data.order import epoch_order
from sftune.data.render import IGNORE_INDEX

Batch = dict[str, torch.Tensor]
STEPS_COSTED = 2000  # steps whose micro-batches are costed one by one; later steps repeat the epoch's mix


@dataclass
class LongestBatch:
    batch: Batch  # collated exactly as the loop would
    rows: int  # sequences in it (after the layout: a joined batch is one)
    width: int  # positions per sequence, padding included
    trained_tokens: int

    @property
    def tokens(self) -> int:
        return self.rows * self.width


def longest_micro_batch(rows: list[dict[str, Any]], plan: BatchingPlan, tokenizer: Any) -> LongestBatch:
    """The micro_batch_rows longest rows, collated by the run's collator: for padded batches every row padded to
    the longest, so the costliest micro-batch the run can meet. In the `rows` layout (each row its own
    micro-batch) that is the longest row."""
    by_length = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]), reverse=True)
    chosen = [rows[i] for i in by_length[:plan.micro_batch_rows]]
    batches = make_collator(plan, tokenizer)(chosen)
    batch = max(batches, key=lambda b: b["input_ids"].numel())
    batch = {k: v for k, v in batch.items() if k != "source_ids"}
    rows_in, width = batch["input_ids"].shape
    return LongestBatch(batch, rows_in, width, int((batch["targets"] != IGNORE_INDEX).sum()))


def micro_batch_tokens(lengths: list[int], layout: str, multiple: int | None) -> list[int]:
    """Positions (padding included) of each micro-batch the collator makes from rows of these lengths."""
    if layout == "rows":
        return [padded_width(n, multiple) for n in lengths]
    if layout == "joined":
        return [padded_width(sum(lengths), multiple)]
    return [len(lengths) * padded_width(max(lengths), multiple)]


def step_tokens(rows: list[dict[str, Any]], config: SFTConfig, plan: BatchingPlan, total_steps: int) -> list[list[int]]:
    """For each optimizer step (the first STEPS_COSTED), this process's micro-batches' positions, in the loop's
    order (epoch_order, the same seed)."""
    lengths = np.array([len(r["input_ids"]) for r in rows])
    per_step, size = plan.rows_per_step, plan.micro_batch_rows
    steps_per_epoch = plan.steps_per_epoch(len(rows))
    out: list[list[int]] = []
    orders: dict[int, np.ndarray] = {}
    for step in range(min(total_steps, STEPS_COSTED)):
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if epoch not in orders:
            orders[epoch] = epoch_order(rows, config, epoch)
        order = orders[epoch]
        step_rows = order[in_epoch * per_step:(in_epoch + 1) * per_step]
        tokens: list[int] = []
        for start in range(0, len(step_rows), plan.rows_per_micro_step):
            mine = step_rows[start:start + plan.rows_per_micro_step][:size]  # process 0's share
            if len(mine):
                tokens += micro_batch_tokens([int(n) for n in lengths[mine]], plan.layout, plan.pad_to_multiple_of)
        out.append(tokens)
    return out
