"""What FSDP and DeepSpeed need beyond plain data parallelism, kept out of the loop's way.

With DDP every process holds the whole model and optimizer, so the main process saves them. With FSDP or
DeepSpeed ZeRO they are sharded: the full weights must be gathered by all processes together, the optimizer
state is saved shard by shard through accelerate, and DeepSpeed runs the optimizer step inside its backward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sftune.batching import BatchingPlan, Engine

ACCELERATE_STATE = "accelerate_state"


def engine_of(accelerator: Any) -> Engine:
    """Which engine carries this run: one process, DDP, FSDP or DeepSpeed."""
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if kind == "FSDP":
        return "fsdp"
    if kind == "DEEPSPEED":
        return "deepspeed"
    return "ddp" if accelerator.num_processes > 1 else "single"


def is_sharded(accelerator: Any) -> bool:
    return engine_of(accelerator) in ("fsdp", "deepspeed")


def is_deepspeed(accelerator: Any) -> bool:
    return engine_of(accelerator) == "deepspeed"


def configure_deepspeed(accelerator: Any, plan: BatchingPlan, max_grad_norm: float) -> None:
    """sftune accumulates and normalises micro-batches itself; DeepSpeed clips and steps at our boundaries."""
    if not is_deepspeed(accelerator):
        return
    settings = accelerator.state.deepspeed_plugin.deepspeed_config
    settings["train_micro_batch_size_per_gpu"] = plan.micro_batch_rows
    settings["gradient_accumulation_steps"] = 1
    settings["gradient_clipping"] = max_grad_norm


def backward(accelerator: Any, loss: torch.Tensor, last_micro_batch: bool) -> None:
    """DeepSpeed must be told where an optimizer step ends: its engine steps inside backward at that boundary."""
    if is_deepspeed(accelerator):
        accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=last_micro_batch)
    else:
        accelerator.backward(loss)


def full_state_dict(accelerator: Any, loss_model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on the main process (every process must call this); None when not sharded."""
    if not is_sharded(accelerator):
        return None
    state = accelerator.get_state_dict(loss_model)
    return {key.removeprefix("model."): value for key, value in state.items()} if state is not None else None


def save_shards(accelerator: Any, folder: Path) -> None:
    """Optimizer (and model) shards of every process, through accelerate; every process must call this."""
    accelerator.save_state(str(folder / ACCELERATE_STATE))


def load_shards(accelerator: Any, folder: Path) -> None:
    accelerator.load_state(str(folder / ACCELERATE_STATE))
