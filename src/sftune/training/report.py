"""What the user sees and keeps: a progress bar, metrics.jsonl (always), samples.jsonl, and optional trackers."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sftune.config import SFTConfig, without_secrets
from sftune.cpu import process_memory_kb
from sftune.errors import UserError

METRICS_FILENAME = "metrics.jsonl"
SAMPLES_FILENAME = "samples.jsonl"
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}

log = logging.getLogger("sftune")


def requested_trackers(config: SFTConfig) -> list[str]:
    """The trackers to use; 'all' means every one that is installed. A named one that is missing is an error."""
    if "all" in config.report_to:
        return [name for name, package in TRACKER_PACKAGES.items() if find_spec(package)]
    names = [name for name in config.report_to if name != "none"]
    for name in names:
        if find_spec(TRACKER_PACKAGES[name]) is None:
            raise UserError(f"report_to {name} needs the {TRACKER_PACKAGES[name]} package: pip install {name}")
    return names


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by torch on a GPU, else the process's peak resident memory (cpu.py says why not
    ru_maxrss)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return process_memory_kb("VmHWM") / 1024


class _TensorBoard:
    def __init__(self, config: SFTConfig, output_dir: Path, run_name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output_dir / "runs" / run_name))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, config: SFTConfig, output_dir: Path, run_name: str):
        import os

        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sftune"), name=run_name, config=without_secrets(config.to_dict()))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({k: v for k, v in metrics.items() if k != "step"}, step=step)

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    def __init__(self, config: SFTConfig, output_dir: Path, run_name: str):
        import os

        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "sftune"), name=run_name, config=without_secrets(config.to_dict()),
                     embed=False)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.trackio.log({k: v for k, v in metrics.items() if k != "step"}, step=step)

    def close(self) -> None:
        self.trackio.finish()


_TRACKERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "trackio": _Trackio}


class Reporter:
    """Everything goes through the main process; on the others every method does nothing.

    While the bar is shown, sftune's log lines (logs.py), metric lines and Python warnings are written above it.
    """

    REFRESH_SECONDS = 0.5  # the in-step position is redrawn at most this often

    def __init__(self, config: SFTConfig, output_dir: Path, total_steps: int, enabled: bool, initial_step: int = 0):
        self.enabled = enabled
        self.output_dir = output_dir
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", disable=not enabled,
                        dynamic_ncols=True, file=sys.stderr)
        self.steps_done = initial_step
        self.step_postfix = ""
        self.step_losses: list[dict[str, float]] = []  # every step's loss: the plot of a run with few logged points
        self.last_refresh = 0.0
        run_name = config.run_name or output_dir.resolve().name
        self.trackers = [_TRACKERS[name](config, output_dir, run_name) for name in requested_trackers(config)] \
            if enabled else []
        self.redirects = ExitStack()
        if enabled:  # warnings and transformers' log, too, go above the bar
            self.redirects.enter_context(_warnings_above_bars())
            self.redirects.enter_context(logging_redirect_tqdm(loggers=[logging.getLogger("transformers")]))

    def step(self, loss: float, learning_rate: float, tokens_per_second: float) -> None:
        self.steps_done += 1
        self.step_losses.append({"step": self.steps_done, "loss": loss, "learning_rate": learning_rate})
        self.step_postfix = f"loss={loss:.4f}, lr={learning_rate:.2e}, tok/s={tokens_per_second:,.0f}"
        self.bar.set_postfix_str(self.step_postfix, refresh=False)
        self.bar.update(1)

    def micro_batch_done(self, done: int, total: int) -> None:
        """Progress within a long step: micro-batches done of the step's total, shown beside the last step's loss."""
        now = time.monotonic()
        if total <= 1 or done >= total or now - self.last_refresh < self.REFRESH_SECONDS:
            return
        self.last_refresh = now
        inside = f"step {self.steps_done + 1}: micro-batch {done}/{total}"
        self.bar.set_postfix_str(f"{self.step_postfix}, {inside}" if self.step_postfix else inside)

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        _append_json(self.output_dir / METRICS_FILENAME, metrics)
        for tracker in self.trackers:
            tracker.log(metrics, metrics["step"])
        self.bar.write(" ".join(f"{k}={_short(v)}" for k, v in metrics.items()), file=sys.stderr)

    def sample(self, step: int, prompt: str, answer: str) -> None:
        if self.enabled:
            _append_json(self.output_dir / SAMPLES_FILENAME, {"step": step, "prompt": prompt, "answer": answer})

    def close(self) -> None:
        self.bar.close()
        self.redirects.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


@contextmanager
def _warnings_above_bars() -> Iterator[None]:
    """Python warnings written through tqdm (warnings.showwarning is the documented hook for where they go)."""
    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: str | None = None):
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n")
        tqdm.write(text, file=file or sys.stderr)

    shown = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def trim_metrics_after(output_dir: Path, step: int) -> None:
    """On resume, drop lines the interrupted run wrote after its checkpoint: they will be written again."""
    for name in (METRICS_FILENAME, SAMPLES_FILENAME):
        path = output_dir / name
        if path.is_file():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _step_of(line) <= step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            tmp.replace(path)


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut short by a kill (or blank) counts as after every checkpoint."""
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return math.inf


def _append_json(path: Path, record: dict[str, Any]) -> None:
    try:
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, allow_nan=True) + "\n")
    except OSError as err:
        raise UserError(
            f"could not write {path} ({err.strerror or err}); the checkpoints are untouched: free some space, "
            "then continue with resume_from_checkpoint: true"
        ) from None


def _short(value: Any) -> str:
    if isinstance(value, float):
        if math.isfinite(value) and value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)
