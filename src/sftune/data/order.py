"""Which rows each optimizer step sees: a pure function of (seed, epoch), the same on every process and rerun."""

from __future__ import annotations

from typing import Any

import numpy as np

from sftune.config import SFTConfig


def epoch_order(rows: list[dict[str, Any]], config: SFTConfig, epoch: int) -> np.ndarray:
    """The shuffled row order of one epoch."""
    return np.random.default_rng([config.seed, epoch]).permutation(len(rows))
