"""Calibration on this machine: the run's own model, loaded as `sftune train` loads it, takes a few real optimizer
steps (forward, backward, AdamW) on the longest micro-batch and on half of it, and the memory and time those
steps measure replace the formula's activation, overhead and time terms.

Memory on a GPU is torch.cuda.max_memory_allocated (what metrics.jsonl's peak_memory_mb reports there); on a
CPU it is the process's resident set, whose high-water mark Linux resets through /proc/self/clear_refs, so that
the growth during one step is measured apart from everything before it.

Time is fitted as  step = optimizer + sum over micro-batches of (per_batch + per_token x positions): one
micro-batch of the long shape, one of the half shape, and two of the half shape give the three terms.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sftune.batching import BatchingPlan
from sftune.config import SFTConfig
from sftune.cpu import process_memory_kb
from sftune.estimate.shapes import Batch, LongestBatch
from sftune.precision import PrecisionPlan

REPEATS = 3  # timed repetitions of each shape; the median is kept (one slow step on a busy machine moves no fit)


@dataclass(frozen=True)
class Calibration:
    baseline_bytes: float  # the process before the model loads (CPU resident set; 0 on a GPU)
    loaded_bytes: float  # model, optimizer state and what stays allocated between steps, above the baseline
    step_growth_bytes: float  # memory one optimizer step adds at its peak on the longest micro-batch
    optimizer_seconds: float
    batch_seconds: float  # fixed cost of one micro-batch
    token_seconds: float  # per position of a micro-batch

    def micro_batch_seconds(self, tokens: int) -> float:
        return self.batch_seconds + self.token_seconds * tokens


class MemoryProbe:
    """Current and peak memory of this process's device, with the peak reset on demand."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def current(self) -> float:
        if self.cuda:
            return float(torch.cuda.memory_allocated())
        return process_memory_kb("VmRSS") * 1024.0

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        except OSError:
            pass  # not Linux, or not allowed: the peak then includes what came before (an overestimate)

    def peak(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return float(torch.cuda.max_memory_allocated())
        return process_memory_kb("VmHWM") * 1024.0


def process_baseline_bytes() -> float:
    """The CPU process as it stands (Python, torch, tokenizer, prepared data): the floor of its peak RSS."""
    return process_memory_kb("VmRSS") * 1024.0


def half_batch(longest: LongestBatch) -> tuple[Batch, int]:
    """The longest micro-batch cut to half its width: the second shape of the time fit."""
    width = max(1, longest.width // 2)
    return {k: v[:, :width] if v.dim() == 2 else v for k, v in longest.batch.items()}, width * longest.rows


def calibrate(config: SFTConfig, plan: BatchingPlan, precision: PrecisionPlan, data: Any,
              longest: LongestBatch) -> Calibration:
    from sftune.data.collate import make_collator
    from sftune.model.adapters import prepare_for_training
    from sftune.model.load import load_model
    from sftune.run import make_accelerator
    from sftune.tokenizer import fit_model_to_tokenizer
    from sftune.training.loop import Trainer
    from sftune.training.report import Reporter

    accelerator = make_accelerator(config)
    probe = MemoryProbe(accelerator.device)
    baseline = probe.current() if not probe.cuda else 0.0
    model = load_model(config, device=accelerator.device, precision=precision, quiet=True)
    fit_model_to_tokenizer(model, data.tokenizer)
    model = prepare_for_training(model, config)
    with tempfile.TemporaryDirectory(prefix="sftune-estimate-") as scratch:
        trainer = Trainer(model, data.tokenizer, data.train_rows, [], data.source_names, config, accelerator,
                          Path(scratch), plan, make_collator(plan, data.tokenizer), precision=precision)
        trainer.reporter = Reporter(config, Path(scratch), 1, enabled=False)
        trainer.optimizer_step_on([dict(longest.batch)])  # warm-up: allocates the optimizer state
        before = probe.current()
        probe.reset_peak()
        _timed(trainer, [longest.batch], probe.cuda)  # the step whose peak is measured: not timed (page faults)
        growth = max(0.0, probe.peak() - before)
        long_seconds = [_timed(trainer, [longest.batch], probe.cuda) for _ in range(REPEATS)]
        short, short_tokens = half_batch(longest)
        one = statistics.median(_timed(trainer, [short], probe.cuda) for _ in range(REPEATS))
        two = statistics.median(_timed(trainer, [short, short], probe.cuda) for _ in range(REPEATS))
        trainer.reporter.close()
    per_short = max(two - one, 1e-6)
    optimizer = max(one - per_short, 0.0)
    long_step = statistics.median(long_seconds)
    per_token = max((long_step - one) / max(longest.tokens - short_tokens, 1), 0.0)
    per_batch = max(per_short - per_token * short_tokens, 0.0)
    return Calibration(baseline, max(0.0, before - baseline), growth, optimizer, per_batch, per_token)


def _timed(trainer: Any, batches: list[Batch], cuda: bool) -> float:
    started = time.perf_counter()
    trainer.optimizer_step_on([dict(b) for b in batches])
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started
