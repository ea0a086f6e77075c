"""What `sftune train` does with the estimate: logs it before the model loads, and stops a run the formula
predicts will not fit the device, with the settings that would make it fit and their predicted peaks.

The check uses the uncalibrated formula (nothing is loaded to make it); on a GPU it adds the CUDA context that
max_memory_allocated leaves out. SFTUNE_SKIP_MEMORY_CHECK=1 trains anyway, for a formula that is wrong for a
model it does not know.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

from sftune.config import SFTConfig
from sftune.errors import UserError
from sftune.estimate.formula import CUDA_CONTEXT_MB
from sftune.estimate.report import Estimate, estimate_run

log = logging.getLogger("sftune")
SKIP_VARIABLE = "SFTUNE_SKIP_MEMORY_CHECK"


def device_memory_mb(device_type: str) -> float:
    """What the run may use: the GPU's memory, or on a CPU the memory available now plus this process's own."""
    if device_type == "cuda":
        import torch

        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**20
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    own = next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return (float(fields["MemAvailable"].split()[0]) + float(own)) / 1024


def needed_mb(estimate: Estimate, device_type: str) -> float:
    return estimate.peak_memory_mb + (CUDA_CONTEXT_MB if device_type == "cuda" else 0)


def alternatives(config: SFTConfig) -> list[tuple[str, SFTConfig]]:
    """The settings that lower peak memory, each as the changed config (the others kept)."""
    def changed(**settings: Any) -> SFTConfig:
        other = copy.deepcopy(config)
        for key, value in settings.items():
            setattr(other, key, value)
        return other

    out = []
    if not config.activation_checkpointing:
        out.append(("activation_checkpointing: true", changed(activation_checkpointing=True)))
    if config.per_device_train_batch_size > 1:
        half = config.per_device_train_batch_size // 2
        out.append((f"per_device_train_batch_size: {half} with gradient_accumulation_steps: "
                    f"{config.gradient_accumulation_steps * 2}",
                    changed(per_device_train_batch_size=half,
                            gradient_accumulation_steps=config.gradient_accumulation_steps * 2)))
    if config.max_length and config.max_length > 256:
        out.append((f"max_length: {config.max_length // 2}", changed(max_length=config.max_length // 2)))
    if not config.use_peft:
        out.append(("use_peft: true", changed(use_peft=True)))
    if not config.load_in_4bit:
        out.append(("use_peft: true with load_in_4bit: true", changed(use_peft=True, load_in_4bit=True)))
    if config.optim != "adamw_8bit" and not config.use_peft:
        out.append(("optim: adamw_8bit", changed(optim="adamw_8bit")))
    return out


def log_and_check(config: SFTConfig, data: Any, device_type: str) -> Estimate | None:
    """Log the estimate; raise UserError when it does not fit the device. None when this model has no formula."""
    try:
        estimate = estimate_run(config, "cpu" if device_type == "cpu" else None, calibrate=False, data=data,
                                log_progress=False, probe_seconds=0.05)
    except (UserError, ValueError, KeyError, AttributeError, TypeError, ImportError, OSError) as err:
        log.info("estimate: none for this model (%s)", str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None
    parts = ", ".join(f"{k.replace('_', ' ')} {v:,.0f}" for k, v in estimate.parts_mb.items())
    log.info("estimate (formula, uncalibrated; `sftune estimate` calibrates): peak %s MB (%s), %.3g s per step, "
             "%d steps, about %.0f s in all", f"{estimate.peak_memory_mb:,.0f}", parts, estimate.step_seconds,
             estimate.steps, estimate.total_seconds)
    available = device_memory_mb(device_type)
    needed = needed_mb(estimate, device_type)
    if needed <= available or os.environ.get(SKIP_VARIABLE) == "1":
        return estimate
    options = []
    for label, other in alternatives(config):
        try:
            other_data = data if other.max_length == config.max_length else None  # another max_length: new rows
            peak = needed_mb(estimate_run(other, "cpu" if device_type == "cpu" else None, calibrate=False,
                                          data=other_data, log_progress=False, probe_seconds=0.0), device_type)
        except (UserError, ValueError, KeyError, AttributeError, TypeError, ImportError, OSError):
            continue
        options.append((peak, label))
    fitting = [(p, label) for p, label in sorted(options) if p <= available]
    shown = fitting or sorted(options)
    listed = "; ".join(f"{label} ({p:,.0f} MB)" for p, label in shown)
    advice = f"settings that fit: {listed}" if fitting else f"none of these alone fits: {listed}"
    raise UserError(f"this run needs about {needed:,.0f} MB but the {device_type} device has {available:,.0f} MB "
                    f"(estimated before loading the model); {advice}; or set {SKIP_VARIABLE}=1 to train anyway")
