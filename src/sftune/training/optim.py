"""Optimizer with decay / no-decay parameter groups, and the learning-rate schedule."""

from __future__ import annotations

import torch
from torch import nn

from sftune.config import SFTConfig
from sftune.config.fields import steps_of
from sftune.errors import UserError


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, norms and other 1-D parameters are never decayed."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, config: SFTConfig, kahan: bool = False) -> torch.optim.Optimizer:
    """The configured optimizer; `kahan` (bf16 weights, sftune/precision.py) takes torch-optimi's AdamW with
    Kahan-compensated updates instead of torch's."""
    groups = parameter_groups(model, config.weight_decay)
    adam = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    if kahan:
        return kahan_adamw(groups, config.weight_decay, adam)
    if config.optim == "adamw_torch_fused":
        return torch.optim.AdamW(groups, fused=True, **adam)
    if config.optim == "adamw_torch":
        return torch.optim.AdamW(groups, foreach=True, **adam)
    if config.optim == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("optim adamw_8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, **adam)
    return torch.optim.SGD(groups, lr=config.learning_rate)


def kahan_adamw(groups: list[dict], weight_decay: float, adam: dict) -> torch.optim.Optimizer:
    """AdamW that keeps each bf16 weight's rounding error in a bf16 buffer and adds it to the next update, so small
    updates are not lost (torch-optimi: pure PyTorch, so it runs on CPU too; Triton kernels on a GPU where Triton
    is installed). Its weight decay is torch's decoupled kind (p -= lr * wd * p); its moments are kept in bf16."""
    try:
        import optimi
    except ImportError:
        raise UserError("bf16_weights: kahan needs torch-optimi: pip install 'sftune[kahan]' "
                        "(or pip install torch-optimi)") from None
    return optimi.AdamW(groups, weight_decay=weight_decay, kahan_sum=True, foreach=False, **adam)


def warmup_steps(config: SFTConfig, total_steps: int) -> int:
    """warmup_steps as a count: a float below 1 is that ratio of the total steps (transformers 5), 0 is none."""
    return steps_of(config.warmup_steps, total_steps) if config.warmup_steps else 0


def build_scheduler(optimizer: torch.optim.Optimizer, config: SFTConfig, total_steps: int):
    from transformers import get_scheduler

    kwargs = dict(config.lr_scheduler_kwargs or {})
    if config.lr_scheduler_type == "cosine_with_min_lr" and not {"min_lr", "min_lr_rate"} & set(kwargs):
        raise UserError("lr_scheduler_type cosine_with_min_lr needs lr_scheduler_kwargs with min_lr or min_lr_rate")
    try:
        return get_scheduler(
            config.lr_scheduler_type, optimizer, num_warmup_steps=warmup_steps(config, total_steps),
            num_training_steps=total_steps, scheduler_specific_kwargs=kwargs,
        )
    except TypeError as err:
        raise UserError(f"lr_scheduler_kwargs {kwargs} do not fit lr_scheduler_type {config.lr_scheduler_type}: {err}") from None
