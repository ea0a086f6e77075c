"""The training loop. One class owns it; read `fit` top to bottom to see every step.

Data order is a pure function of (seed, epoch), and each optimizer step takes the next `rows_per_step` rows of
that order, split into micro-batches and across processes. The loss of a step is the sum of its token losses
over every micro-batch and process, divided by the number of trained tokens in the whole step, so gradient
accumulation and data parallelism give the same update as one big batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sftune.config import SFTConfig
from sftune.data.order import epoch_order
from sftune.data.render import IGNORE_INDEX
from sftune.training.loss import CausalLMWithLoss
from sftune.training.optim import build_optimizer, build_scheduler
from sftune.training.report import Reporter


class Trainer:
    def __init__(self, model: torch.nn.Module, rows: list[dict[str, Any]], config: SFTConfig,
                 accelerator: Any, output_dir: Path, collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]):
        self.config = config
        self.accelerator = accelerator
        self.rows = rows
        self.collate = collate
        self.world_size = accelerator.num_processes
        self.micro_batch_rows = config.per_device_train_batch_size * self.world_size  # one micro-batch, all ranks
        self.rows_per_step = self.micro_batch_rows * config.gradient_accumulation_steps
        self.steps_per_epoch = math.ceil(len(rows) / self.rows_per_step)
        if config.max_steps > 0:
            self.total_steps = config.max_steps
        else:
            self.total_steps = max(1, math.ceil(config.num_train_epochs * self.steps_per_epoch))

        loss_model = CausalLMWithLoss(model)
        loss_model.train()
        optimizer = build_optimizer(loss_model, config)
        self.scheduler = build_scheduler(optimizer, config, self.total_steps)
        self.loss_model, self.optimizer = accelerator.prepare(loss_model, optimizer)
        self.output_dir = output_dir
        self.step = 0
        self.num_tokens = 0  # trained tokens so far, all processes

    @property
    def model(self) -> torch.nn.Module:
        """The transformers model being trained, without any wrapper."""
        return self.accelerator.unwrap_model(self.loss_model).model

    def fit(self) -> list[dict[str, Any]]:
        self.reporter = Reporter(self.output_dir, self.total_steps, self.accelerator.is_main_process, self.step)
        history: list[dict[str, Any]] = []
        interval_loss, interval_tokens, interval_start = 0.0, 0, time.perf_counter()
        while self.step < self.total_steps:
            epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
            order = epoch_order(self.rows, self.config, epoch)
            micro_batches = self._micro_batches(order, step_in_epoch)
            learning_rate = self.scheduler.get_last_lr()[0]

            loss_sum, tokens, grad_norm = self._optimizer_step(micro_batches)

            self.step += 1
            self.num_tokens += tokens
            interval_loss += loss_sum
            interval_tokens += tokens
            elapsed = time.perf_counter() - interval_start
            self.reporter.step(loss_sum / max(tokens, 1), learning_rate, interval_tokens / max(elapsed, 1e-9))
            if self.step % self.config.logging_steps == 0 or self.step == self.total_steps:
                metrics = {
                    "step": self.step,
                    "epoch": round(self.step / self.steps_per_epoch, 4),
                    "loss": interval_loss / max(interval_tokens, 1),
                    "learning_rate": learning_rate,
                    "grad_norm": grad_norm,
                    "num_tokens": self.num_tokens,
                    "tokens_per_second": interval_tokens / max(elapsed, 1e-9),
                }
                self.reporter.log(metrics)
                history.append(metrics)
                interval_loss, interval_tokens, interval_start = 0.0, 0, time.perf_counter()
        self.reporter.close()
        return history

    def _micro_batches(self, order: np.ndarray, step_in_epoch: int) -> list[dict[str, torch.Tensor]]:
        """This process's share of each micro-batch of one optimizer step, collated."""
        step_rows = order[step_in_epoch * self.rows_per_step:(step_in_epoch + 1) * self.rows_per_step]
        rank, size = self.accelerator.process_index, self.config.per_device_train_batch_size
        batches = []
        for start in range(0, len(step_rows), self.micro_batch_rows):
            global_rows = step_rows[start:start + self.micro_batch_rows]
            mine = [self.rows[i] for i in global_rows[rank * size:(rank + 1) * size]]
            if not mine:  # the epoch's last micro-batch can leave a process without rows; it still joins in
                mine = [_without_targets(self.rows[global_rows[0]])]
            batches.append(self.collate(mine))
        return batches

    def _optimizer_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, int, float]:
        """Forward and backward every micro-batch, then one clipped optimizer step. Returns (loss sum, tokens, grad norm)."""
        accelerator = self.accelerator
        local_tokens = sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in micro_batches)
        step_tokens = int(self._sum_over_processes(float(local_tokens)))
        # Data parallelism averages gradients over processes; multiplying by world_size turns that into a sum.
        scale = self.world_size / max(step_tokens, 1)
        loss_sum = torch.zeros((), device=accelerator.device)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with nullcontext() if last else accelerator.no_sync(self.loss_model):
                out = self.loss_model(**{k: v.to(accelerator.device) for k, v in batch.items()})
                accelerator.backward(out["loss_sum"] * scale)
            loss_sum += out["loss_sum"].detach().float()
        max_norm = self.config.max_grad_norm or float("inf")
        grad_norm = accelerator.clip_grad_norm_(self.loss_model.parameters(), max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._sum_over_processes(loss_sum), step_tokens, float(grad_norm)

    def _sum_over_processes(self, value: float | torch.Tensor) -> float:
        if self.world_size == 1:
            return float(value)
        tensor = torch.as_tensor(value, dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="sum"))


def _without_targets(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "labels": np.full_like(row["labels"], IGNORE_INDEX)}
