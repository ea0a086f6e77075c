"""The precision plan: which dtypes a run computes in, keeps its weights in and saves them in, decided once,
before the model loads, from the config and the machine. Every reader (model loading, the loop, the optimizer,
checkpoints, the final save, the log) reads this record; none works it out again.

Modes:
- fp32: every weight in fp32, no autocast. The default on CPU, where fp32 is also the fast dtype.
- bf16 / fp16 (TRL's flags, TRL's meaning): the trained weights are fp32 master copies that the optimizer
  updates, whatever dtype the checkpoint has; forward and loss run under torch.autocast in bf16 / fp16. fp16
  scales the loss (torch.amp.GradScaler): a step whose gradients overflow is skipped and counted in the metrics.
  Frozen weights (a LoRA base) stay in the dtype they were loaded in. bf16 is the default on a CUDA GPU with bf16.
- bf16_plain (`bf16_weights: plain`): every weight kept and updated in bf16 ("pure bf16"). AdamW's small updates
  are rounded away (on the 30-step test about a quarter of the weights ever change, against three quarters with
  fp32 masters); there for comparison and for users who know they want it.
- bf16_kahan (`bf16_weights: kahan`): every weight in bf16 and AdamW with Kahan-compensated updates (torch-optimi):
  each update's rounding error is kept in a bf16 buffer and added to the next, so small updates add up as with
  fp32 masters, at bf16 memory (no 4-byte master copy, bf16 moments).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch

from sftune.errors import ConfigError

log = logging.getLogger("sftune")

Mode = Literal["fp32", "bf16", "fp16", "bf16_plain", "bf16_kahan"]
SHARDED_ENGINES = ("fsdp", "deepspeed")
LAUNCHER_CHOICES = ("bf16", "fp16")  # what `accelerate launch --mixed_precision` may ask for


@dataclass(frozen=True)
class PrecisionPlan:
    mode: Mode
    chosen: bool  # bf16 / fp16 were unset, so this plan chose the mode for the machine
    device_type: str
    save_dtype: str = "auto"  # a dtype name, or 'auto': the dtype the weights were loaded in

    @property
    def bf16(self) -> bool:
        """TRL's bf16 flag as resolved: bf16 autocast over fp32 masters."""
        return self.mode == "bf16"

    @property
    def fp16(self) -> bool:
        return self.mode == "fp16"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mode)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype matrix products run in (also the compute dtype of 4- and 8-bit quantized layers)."""
        if self.mode == "fp32":
            return torch.float32
        return torch.float16 if self.mode == "fp16" else torch.bfloat16

    @property
    def trained_dtype(self) -> torch.dtype:
        """The dtype of the weights the optimizer updates: fp32 masters, except for bf16 weights."""
        return torch.bfloat16 if self.mode.startswith("bf16_") else torch.float32

    @property
    def frozen_dtype(self) -> torch.dtype | None:
        """The dtype of weights that are not trained; None: as they were loaded (autocast computes in its dtype)."""
        if self.mode == "fp32":
            return torch.float32
        return torch.bfloat16 if self.mode.startswith("bf16_") else None

    @property
    def scales_loss(self) -> bool:
        return self.mode == "fp16"

    @property
    def kahan(self) -> bool:
        return self.mode == "bf16_kahan"

    def autocast(self) -> AbstractContextManager:
        """The context the forward and the loss run in; backward runs outside it, as torch recommends."""
        dtype = self.autocast_dtype
        return torch.autocast(self.device_type, dtype=dtype) if dtype is not None else nullcontext()

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16's dynamic loss scaling (starts at 2**16, halves on overflow, doubles after 2000 clean steps)."""
        return torch.amp.GradScaler(self.device_type) if self.scales_loss else None

    def describe(self) -> str:
        """For the log, the card and `sftune inspect`."""
        return {
            "fp32": "fp32 (weights and compute)",
            "bf16": "bf16 mixed precision (fp32 master weights, bf16 autocast)",
            "fp16": "fp16 mixed precision (fp32 master weights, fp16 autocast, dynamic loss scaling)",
            "bf16_plain": "pure bf16 (bf16 weights updated in bf16: small updates are rounded away)",
            "bf16_kahan": "bf16 weights with Kahan-compensated AdamW (torch-optimi)",
        }[self.mode]

    def resolved_save_dtype(self, loaded: torch.dtype) -> torch.dtype:
        """The dtype model files are written in: save_dtype, or the dtype the weights were loaded in."""
        return loaded if self.save_dtype == "auto" else getattr(torch, self.save_dtype)


def bf16_available(device_type: str) -> bool:
    """Whether this device computes in bf16: CUDA GPUs from Ampere on (and ROCm), CPUs (torch emulates it where
    the cores lack it), and whatever else torch's autocast accepts bf16 on."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        return True
    return torch.amp.is_autocast_available(device_type)


def plan_precision(config: Any, device_type: str, engine: str = "single", bf16_supported: bool | None = None,
                   launcher: str | None = None) -> PrecisionPlan:
    """The plan for `config` on this machine. `launcher` is what `accelerate launch --mixed_precision` asked for
    (ACCELERATE_MIXED_PRECISION); it decides only when the config leaves bf16 and fp16 unset. Raises ConfigError
    for a choice the machine or the engine cannot do (the config itself refuses contradictory keys)."""
    if bf16_supported is None:
        bf16_supported = bf16_available(device_type)
    chosen = config.bf16 is None and not config.fp16 and config.bf16_weights is None
    mode: Mode
    if configured_mode(config) is not None:
        mode = configured_mode(config)
    elif chosen and launcher in LAUNCHER_CHOICES:
        mode = launcher  # type: ignore[assignment]
    elif chosen and device_type == "cuda" and bf16_supported:
        mode = "bf16"
    else:
        mode = "fp32"
    if mode.startswith("bf16") and not bf16_supported:
        key = "bf16_weights" if config.bf16_weights is not None else "bf16"
        where = "accelerate launch --mixed_precision bf16" if chosen else f"config key '{key}'"
        raise ConfigError(f"{where} asks for bf16, but this {device_type} device has no bf16 support: "
                          "set fp16: true (fp16 mixed precision) or bf16: false (fp32)")
    if mode == "fp16" and engine in SHARDED_ENGINES:
        raise ConfigError(f"fp16: true is not supported under {engine.upper()} (its loss scaling would have to "
                          "see every shard): use bf16: true, or fp16 without FSDP/DeepSpeed")
    return PrecisionPlan(mode, chosen, device_type, config.save_dtype)


def configured_mode(config: Any) -> Mode | None:
    """The mode the config's keys ask for; None when they leave it to the machine (bf16 unset, fp16 false, no
    bf16_weights) or ask for fp32 by bf16: false."""
    if config.bf16_weights is not None:
        return "bf16_kahan" if config.bf16_weights == "kahan" else "bf16_plain"
    if config.fp16:
        return "fp16"
    return "bf16" if config.bf16 else None


def describe_config(config: Any) -> str:
    """What a finished run's (resolved) config trained in, for the model card."""
    return PrecisionPlan(configured_mode(config) or "fp32", False, "cpu").describe()


def log_precision(plan: PrecisionPlan, launcher: str | None = None) -> None:
    why = ""
    if plan.chosen:
        why = (f" (bf16 and fp16 unset: from accelerate launch --mixed_precision {launcher})"
               if launcher in LAUNCHER_CHOICES else " (bf16 and fp16 unset, so chosen for this machine)")
    log.info("precision: %s%s", plan.describe(), why)


def apply_precision(model: torch.nn.Module, plan: PrecisionPlan) -> torch.dtype:
    """Bring the loaded model's weights to the plan's dtypes, in place; returns the dtype they were loaded in.

    Trained weights become fp32 masters under fp32 and mixed precision (bf16 for bf16 weights); frozen ones are
    upcast only under fp32, so a bf16 LoRA base stays bf16 under mixed precision. Quantized (integer) weights
    are left alone. A shared parameter (tied embeddings) is one object and stays shared.
    """
    loaded = loaded_dtype(model)
    for param in model.parameters():
        if not param.is_floating_point():
            continue
        target = plan.trained_dtype if param.requires_grad else plan.frozen_dtype
        if target is not None and param.dtype != target:
            param.data = param.data.to(target)
    return loaded


def loaded_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype most of the model's floating-point weights have (a quantized model's unquantized layers)."""
    counts: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if param.is_floating_point():
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    return max(counts, key=counts.get) if counts else torch.float32
