"""The model's share of peak memory: weights, gradients and optimizer state, in bytes, from the model's config
(built on the meta device, so no weight is read) and which parameters the run trains (full, LoRA of rank r,
QLoRA's 4-bit base), in the dtypes the precision plan (sftune/precision.py) gives them.

These three lines are exact up to small extras (quantization constants, bias terms peft adds): they are counts
of parameters times bytes per parameter, the same on every device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sftune.config import SFTConfig
from sftune.precision import PrecisionPlan

BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
FOUR_BIT_BYTES = 0.5 + 4 / 64  # a 4-bit value plus its block's fp32 absmax (blocks of 64)
EIGHT_BIT_BYTES = 1.0 + 4 / 4096  # int8 plus per-row scales (LLM.int8), about


@dataclass(frozen=True)
class ModelSize:
    total_params: int  # as loaded, before adapters
    trained_params: int
    quantized_params: int  # frozen linear weights held in 4 or 8 bits
    weights_bytes: float
    gradients_bytes: float
    optimizer_bytes: float
    linear_params: int  # parameters of the decoder's Linear layers (the matmuls FLOPs are counted from)


def meta_model(config: SFTConfig) -> nn.Module:
    """The run's architecture with no storage: exact parameter names and shapes, nothing read or allocated.
    A vision-language model's tower is counted in its weights; its activations are not (formula.py)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from sftune.model.load import IMAGE_TEXT_TO_TEXT, load_model_config, model_class_of

    auto = AutoModelForImageTextToText if model_class_of(config) == IMAGE_TEXT_TO_TEXT else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(load_model_config(config))


def loaded_weight_dtype(config: SFTConfig, model_config: Any) -> torch.dtype:
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, torch.float32)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def lora_targets(model: nn.Module, config: SFTConfig) -> list[tuple[str, nn.Linear]]:
    """The Linear layers LoRA wraps: lora_target_modules (short or full names, or all-linear), else the attention
    projections sftune targets by default."""
    from sftune.model.adapters import ALL_LINEAR, default_target_modules

    targets = config.lora_target_modules or default_target_modules(model)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if ALL_LINEAR in targets:
        head = model.get_output_embeddings()
        return [(name, m) for name, m in linears if m is not head]
    return [(name, m) for name, m in linears if name in targets or name.rsplit(".", 1)[-1] in targets]


def model_size(config: SFTConfig, precision: PrecisionPlan, model: nn.Module | None = None) -> ModelSize:
    model = model if model is not None else meta_model(config)
    params = {id(p): p for p in model.parameters()}  # tied weights once
    total = sum(p.numel() for p in params.values())
    head = model.get_output_embeddings()
    linear_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and m is not head}
    linear_params = sum(params[i].numel() for i in linear_ids if i in params)
    loaded = loaded_weight_dtype(config, model.config)
    trained_bytes = BYTES[precision.trained_dtype]
    frozen_bytes = BYTES[precision.frozen_dtype or loaded]
    quantized = 0
    if config.use_peft:
        targets = lora_targets(model, config)
        trained = sum(config.lora_r * (m.in_features + m.out_features) for _, m in targets)
        if config.use_dora:
            trained += sum(m.out_features for _, m in targets)
        for name in config.lora_modules_to_save or []:
            trained += sum(p.numel() for n, p in model.named_parameters() if n.split(".")[-2:-1] == [name]
                           or name in n.split("."))
        frozen = total
        if config.load_in_4bit or config.load_in_8bit:
            quantized = linear_params
        per_quantized = FOUR_BIT_BYTES if config.load_in_4bit else EIGHT_BIT_BYTES
        weights = trained * trained_bytes + (frozen - quantized) * frozen_bytes + quantized * per_quantized
    else:
        trained = total
        weights = trained * trained_bytes
    gradients = trained * trained_bytes
    return ModelSize(total, trained, quantized, weights, gradients, trained * optimizer_bytes_per_param(config, precision),
                     linear_params)


def optimizer_bytes_per_param(config: SFTConfig, precision: PrecisionPlan) -> float:
    """AdamW keeps two moments in the trained weight's dtype; Kahan AdamW two bf16 moments and a bf16
    compensation buffer; 8-bit AdamW two 8-bit moments (plus block scales); SGD without momentum none."""
    if precision.kahan:
        return 3 * 2
    if config.optim == "adamw_8bit":
        return 2 * (1 + 4 / 2048)
    if config.optim == "sgd":
        return 0.0
    return 2 * BYTES[precision.trained_dtype]
