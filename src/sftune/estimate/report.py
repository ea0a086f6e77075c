"""The estimate of one run: its memory lines, time per step, steps and total time, as printed by `sftune estimate`
and logged by `sftune train` before step 1.

Memory lines: weights, gradients and optimizer state (exact counts x bytes, model_size.py); activations of the
largest micro-batch and the loss's buffers (formula.py, or measured: calibrate.py); allocator overhead; on a CPU
also the process itself (Python, torch, tokenizer, prepared data), since a CPU's peak is the process's
resident set. peak_memory_mb is what metrics.jsonl will report as peak_memory_mb (max_memory_allocated on a
GPU, peak RSS on a CPU).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from sftune.config import SFTConfig
from sftune.estimate import formula
from sftune.estimate.devices import Device, named_device
from sftune.estimate.model_size import model_size, meta_model
from sftune.estimate.shapes import longest_micro_batch, step_tokens

MB = 2**20


@dataclass
class Estimate:
    device: str
    calibrated: bool
    parts_mb: dict[str, float]  # each memory line, in MiB
    step_seconds: float
    steps: int
    longest_batch: dict[str, int]  # rows, width, tokens, trained_tokens of the costed micro-batch
    device_memory_mb: float | None = None  # what the device has (None: this machine's CPU)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_memory_mb(self) -> float:
        return sum(self.parts_mb.values())

    @property
    def total_seconds(self) -> float:
        return self.step_seconds * self.steps

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "calibrated": self.calibrated, "peak_memory_mb": round(self.peak_memory_mb, 1),
                "step_seconds": round(self.step_seconds, 4), "steps": self.steps,
                "total_seconds": round(self.total_seconds, 1),
                "parts_mb": {k: round(v, 1) for k, v in self.parts_mb.items()},
                "longest_batch": self.longest_batch, "device_memory_mb": self.device_memory_mb,
                "notes": self.notes}

    def lines(self) -> list[str]:
        how = "calibrated on this machine" if self.calibrated else "formula only, uncalibrated"
        b = self.longest_batch
        out = [f"estimate for {self.device} ({how}); largest micro-batch {b['rows']} x {b['width']} positions "
               f"({b['trained_tokens']:,} trained tokens)"]
        for name, mb in self.parts_mb.items():
            out.append(f"  {name.replace('_', ' ')}: {mb:,.1f} MB")
        fits = ""
        if self.device_memory_mb:
            fits = f" of {self.device_memory_mb:,.0f} MB"
        out.append(f"peak_memory_mb: {self.peak_memory_mb:,.1f}{fits}")
        out.append(f"step_seconds: {self.step_seconds:.3f} (median optimizer step)")
        out.append(f"steps: {self.steps:,}")
        out.append(f"total_seconds: {self.total_seconds:,.0f} ({_duration(self.total_seconds)})")
        out += [f"note: {n}" for n in self.notes]
        return out

    def print(self, as_json: bool = False) -> None:
        if as_json:
            print(json.dumps(self.to_json(), indent=1))
        else:
            print("\n".join(self.lines()))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def total_steps(config: SFTConfig, steps_per_epoch: int) -> int:
    """As the loop counts them (training/loop.py)."""
    if config.max_steps > 0:
        return config.max_steps
    return max(1, math.ceil(config.num_train_epochs * steps_per_epoch))


def estimate_run(config: SFTConfig, device: str | None = None, calibrate: bool = True, data: Any = None,
                 log_progress: bool = True, probe_seconds: float = 0.25) -> Estimate:
    """The estimate for `config` on `device` (None or 'local': this machine's device; 'cpu'; 'cuda'; a name of
    devices.DEVICES). A named device is never calibrated. `data`: the prepared data when the caller has it."""
    import torch

    from sftune.batching import plan_batching
    from sftune.precision import plan_precision

    local_cuda = torch.cuda.is_available() and not config.use_cpu
    target: Device | None = None
    if device in (None, "local"):
        device_type = "cuda" if local_cuda else "cpu"
    elif device == "cpu":
        device_type = "cpu"
    else:
        target = named_device(device)
        device_type = "cuda"
    here = target is None and (device_type == "cuda") == local_cuda
    calibrate = calibrate and here
    if target is None and device_type == "cuda":
        target = named_device("cuda")
    plan = plan_batching(config, device_type=device_type)
    precision = plan_precision(config, device_type, bf16_supported=True if target is not None else None)
    if data is None:
        data = _prepared_data(config)
    rows = data.train_rows
    longest = longest_micro_batch(rows, plan, data.tokenizer)
    steps = total_steps(config, plan.steps_per_epoch(len(rows)))
    per_step = step_tokens(rows, config, plan, steps)

    model = meta_model(config)
    size = model_size(config, precision, model)
    arch = formula.architecture_of(model.config)
    head = model.get_output_embeddings()
    head_params = head.weight.numel() if head is not None else 0
    compute_bytes = 4 if precision.mode == "fp32" else 2
    head_trained = not config.use_peft or any(n in ("lm_head",) for n in config.lora_modules_to_save or [])
    parts: dict[str, float] = {"weights": size.weights_bytes / MB, "gradients": size.gradients_bytes / MB,
                               "optimizer_state": size.optimizer_bytes / MB}
    loss = formula.loss_bytes(arch, config, longest.trained_tokens, head_trained)
    activations = formula.activation_bytes(arch, config, longest.tokens, longest.width, longest.rows, compute_bytes)
    if precision.mode in ("bf16", "fp16") and not config.use_peft:
        activations += 2 * size.linear_params  # autocast's half-precision copies of the fp32 masters, kept for backward
    notes: list[str] = []
    if calibrate:
        from sftune.estimate.calibrate import calibrate as run_calibration

        if log_progress:
            _log("calibrating: a few optimizer steps of the run's model on its largest micro-batch")
        cal = run_calibration(config, plan, precision, data, longest)
        if device_type == "cpu":
            parts = {"process": cal.baseline_bytes / MB, **parts}
        measured_static = cal.loaded_bytes - size.weights_bytes - size.optimizer_bytes
        parts["activations"] = max(0.0, cal.step_growth_bytes - size.gradients_bytes - loss) / MB
        parts["loss"] = loss / MB
        parts["allocator_overhead"] = max(0.0, measured_static) / MB
        seconds = [cal.optimizer_seconds + sum(cal.micro_batch_seconds(t) for t in step) for step in per_step]
        notes.append(f"time fitted on this machine: {cal.token_seconds * 1e6:.2f} us per position, "
                     f"{cal.batch_seconds * 1e3:.1f} ms per micro-batch, {cal.optimizer_seconds * 1e3:.1f} ms per "
                     "optimizer update")
    else:
        if device_type == "cpu":
            from sftune.estimate.calibrate import process_baseline_bytes

            parts = {"process": process_baseline_bytes() / MB, **parts}
        parts["activations"] = activations / MB
        parts["loss"] = loss / MB
        parts["allocator_overhead"] = formula.ALLOCATOR_OVERHEAD * (sum(parts.values()) - parts.get("process", 0))
        rate = target.effective_flops if target is not None else cpu_flops(probe_seconds)
        seconds = [formula.step_flops(arch, size.linear_params, head_params, config, step, _widths(step, plan))
                   / rate for step in per_step]
        notes.append("uncalibrated: activations from the per-architecture formula, time from "
                     + (f"{target.bf16_flops / 1e12:,.0f} TFLOP/s bf16 at {target.mfu:.0%} MFU" if target is not None
                        else f"this CPU's measured matmul rate ({rate / 1e9:,.0f} GFLOP/s)"))
    step_seconds = statistics.median(seconds) if seconds else 0.0
    name = target.name if target is not None else "cpu (this machine)"
    return Estimate(name, calibrate, parts, step_seconds, steps,
                    {"rows": longest.rows, "width": longest.width, "tokens": longest.tokens,
                     "trained_tokens": longest.trained_tokens},
                    target.memory_mb if target is not None else None, notes)


def _widths(step: list[int], plan: Any) -> list[int]:
    """Sequence width of each micro-batch of positions `step` (attention's cost grows with it)."""
    rows = 1 if plan.layout in ("rows", "joined") else plan.micro_batch_rows
    return [max(1, t // rows) for t in step]


def cpu_flops(seconds: float = 0.25) -> float:
    """This CPU's fp32 matmul rate, from `seconds` of 512 x 512 products (what the formula's time uses on a CPU
    without calibration); at least one product."""
    import torch

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    done, started = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - started < seconds:
        a @ b
        done += 1
    return 2 * 512**3 * done / (time.perf_counter() - started)


def _prepared_data(config: SFTConfig) -> Any:
    from sftune.data.prepare import prepare_train_data
    from sftune.model.load import load_processor, load_tokenizer

    processor = load_processor(config)
    tokenizer = processor.tokenizer if processor is not None else load_tokenizer(config)
    return prepare_train_data(config, tokenizer, processor=processor)


def _log(message: str) -> None:
    import logging

    logging.getLogger("sftune").info(message)
