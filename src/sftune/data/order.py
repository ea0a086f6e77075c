"""Which rows each optimizer step sees: a pure function of (seed, epoch), the same on every process and rerun."""

from __future__ import annotations

from typing import Any

import numpy as np

from sftune.config import SFTConfig, data_seed_of

GROUP_SPAN = 50  # group_by_length sorts within windows of this many micro-batches (as transformers does)


def epoch_order(rows: list[dict[str, Any]], config: SFTConfig, epoch: int) -> np.ndarray:
    """The row order of one epoch, by train_sampling_strategy: random (shuffled, seeded by data_seed, which
    defaults to seed), sequential (the rows as prepared, every epoch alike), or group_by_length: each window of 50
    micro-batches of the shuffled order sorted longest first, so every micro-batch holds rows of similar length
    (less padding)."""
    if config.train_sampling_strategy == "sequential":
        return np.arange(len(rows))
    order = np.random.default_rng([data_seed_of(config), epoch]).permutation(len(rows))
    if config.train_sampling_strategy != "group_by_length" or config.packing:
        return order
    lengths = np.fromiter((len(rows[i]["input_ids"]) for i in order), dtype=np.int64, count=len(order))
    window = config.per_device_train_batch_size * GROUP_SPAN
    for start in range(0, len(order), window):
        part = slice(start, start + window)
        sorted_part = np.argsort(-lengths[part], kind="stable")
        order[part] = order[part][sorted_part]
    return order
