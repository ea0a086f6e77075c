"""Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) for GPU runs, through Liger's own per-model integration.

Only the layer kernels are asked for: the loss stays sftune's chunked linear + cross-entropy, which already never
builds the logits (Liger's fused linear cross-entropy would replace the model's forward, which sftune does not use).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch

from sftune.config import SFTConfig
from sftune.errors import UserError

log = logging.getLogger("sftune")

LAYER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                 "fused_linear_cross_entropy": False}


def check_liger(config: SFTConfig) -> None:
    """Fail before any work when use_liger_kernel cannot be honoured on this machine."""
    if not config.use_liger_kernel:
        return
    if not torch.cuda.is_available():
        raise UserError("use_liger_kernel: true needs a CUDA GPU (Liger's kernels are written in Triton); "
                        "set use_liger_kernel: false on this machine")
    if importlib.util.find_spec("liger_kernel") is None:
        raise UserError("use_liger_kernel: true needs the liger-kernel package: pip install liger-kernel")


def apply_liger_kernels(model: Any) -> Any:
    """Swap the model's norms, rotary embedding and gated MLPs for Liger's kernels, in place."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, **LAYER_KERNELS)
    log.info("liger kernels: rope, rms_norm and swiglu applied to %s", type(model).__name__)
    return model
