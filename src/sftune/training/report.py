"""What the user sees and keeps: a progress bar, and one JSON line per logging step in metrics.jsonl."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

METRICS_FILENAME = "metrics.jsonl"


class Reporter:
    def __init__(self, output_dir: Path, total_steps: int, enabled: bool, initial_step: int = 0):
        self.enabled = enabled
        self.metrics_path = output_dir / METRICS_FILENAME
        self.bar = tqdm(
            total=total_steps, initial=initial_step, desc="train", unit="step", disable=not enabled,
            dynamic_ncols=True, file=sys.stderr,
        )

    def step(self, loss: float, learning_rate: float, tokens_per_second: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{learning_rate:.2e}", tok_s=f"{tokens_per_second:,.0f}")

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics, allow_nan=True) + "\n")
        shown = " ".join(f"{k}={_short(v)}" for k, v in metrics.items())
        self.bar.write(shown, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def _short(value: Any) -> str:
    if isinstance(value, float):
        if math.isfinite(value) and value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)
