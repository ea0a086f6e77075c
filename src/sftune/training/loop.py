"""The training loop. One class owns it; read `fit` top to bottom to see every step.

Data order is a pure function of (seed, epoch), and each optimizer step takes the next `rows_per_step` rows of
that order, split into micro-batches and across processes; so the data position of a run is its step number,
and a checkpoint plus that number resumes it exactly. The loss of a step is the sum of its token losses over
every micro-batch and process, divided by the number of trained tokens in the whole step, so gradient
accumulation and data parallelism give the same update as one big batch.
"""

from __future__ import annotations

import logging
import math
import signal
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sftune.batching import BatchingPlan
from sftune.config import CONFIG_FILENAME, SFTConfig
from sftune.config.evaluation import best_model_problems
from sftune.config.fields import steps_of
from sftune.data.order import epoch_order
from sftune.data.render import IGNORE_INDEX
from sftune.errors import ConfigError, TrainingError, TrainingInterrupted, UserError, write_failure_reason
from sftune.export.save import save_model
from sftune.generation import greedy_answer
from sftune.precision import PrecisionPlan, apply_precision, plan_precision
from sftune.training import checkpoint, moe, sharded
from sftune.training.best_model import BestModelTracker, tracks_best
from sftune.training.interrupt import StopSignals
from sftune.training.loss import CausalLMWithLoss
from sftune.training.metrics import TokenTotals, eval_metrics, train_metrics
from sftune.training.neftune import NEFTune, input_embedding
from sftune.training.offload import ActivationOffload
from sftune.training.optim import build_optimizer, build_scheduler
from sftune.training.report import Reporter, peak_memory_mb
from sftune.training.vision import drop_blank_gradients

log = logging.getLogger("sftune")

Rows = list[dict[str, Any]]
Batch = dict[str, torch.Tensor]


class Trainer:
    def __init__(self, model: torch.nn.Module, tokenizer: Any, train_rows: Rows, eval_rows: Rows,
                 source_names: list[str], config: SFTConfig, accelerator: Any, output_dir: Path,
                 plan: BatchingPlan, collate: Callable[[Rows], list[Batch]], processor: Any = None,
                 eval_collate: Callable[[Rows], list[Batch]] | None = None,
                 precision: PrecisionPlan | None = None):
        self.config, self.accelerator, self.output_dir = config, accelerator, output_dir
        self.plan, self.tokenizer, self.collate = plan, tokenizer, collate
        self.eval_collate = eval_collate or collate  # eval rows may be packed where training rows are not
        self.saved_with_model = processor or tokenizer  # a vision-language model's processor holds its tokenizer
        self.train_rows, self.eval_rows, self.source_names = train_rows, eval_rows, source_names
        self.world_size = accelerator.num_processes
        if plan.num_processes != self.world_size:
            raise ValueError(f"the batching plan is for {plan.num_processes} processes, the run has {self.world_size}")
        self.steps_per_epoch = plan.steps_per_epoch(len(train_rows))
        if config.max_steps > 0:
            self.total_steps = config.max_steps
        else:
            self.total_steps = max(1, math.ceil(config.num_train_epochs * self.steps_per_epoch))
        # steps settings as counts, a float below 1 being that ratio of this run's total steps (transformers 5)
        self.logging_every = steps_of(config.logging_steps, self.total_steps)
        self.eval_every = steps_of(config.eval_steps or config.logging_steps, self.total_steps)
        self.save_every = steps_of(config.save_steps, self.total_steps)
        for problem in best_model_problems(config, self.eval_every, self.save_every)[:1]:  # ratios, now as steps
            raise ConfigError(problem)
        # fp32 master weights (or bf16 ones) before the optimizer sees them; files are saved in the loaded dtype
        self.precision = precision or plan_precision(config, accelerator.device.type)
        self.save_dtype = self.precision.resolved_save_dtype(apply_precision(model, self.precision))
        self.scaler = self.precision.grad_scaler()  # fp16 only

        loss_model = CausalLMWithLoss(model, config.loss_type, config.loss_chunk_size, config.label_smoothing_factor)
        loss_model.train()
        if processor is not None and self.world_size > 1 and not sharded.is_sharded(accelerator):
            # vision (issue 14): under DDP, processes whose micro-batch has no images keep in step
            from sftune.training.vision import prepare_data_parallel

            if next(loss_model.parameters()).device != accelerator.device:  # quantized models are placed already
                loss_model.to(accelerator.device)
            prepare_data_parallel(loss_model, processor, collate, accelerator.device)
        if config.torch_compile:
            backbone = getattr(loss_model.causal_lm, loss_model.causal_lm.base_model_prefix)
            backbone.compile()  # in place, so parameter names and saved files stay as they are
        optimizer = build_optimizer(loss_model, config, kahan=self.precision.kahan)
        self.scheduler = build_scheduler(optimizer, config, self.total_steps)
        sharded.configure_deepspeed(accelerator, plan, config.max_grad_norm)
        self.loss_model, self.optimizer = accelerator.prepare(loss_model, optimizer)
        # NEFTune noise only around the training micro-batches (training/neftune.py)
        self.training_noise = nullcontext() if not config.neftune_noise_alpha else NEFTune(
            input_embedding(accelerator.unwrap_model(self.loss_model).causal_lm), config.neftune_noise_alpha)
        # activation_offloading: saved activations in CPU memory between forward and backward (training/offload.py)
        self.offload = ActivationOffload(accelerator.device) if config.activation_offloading else nullcontext()
        # Mixture-of-Experts: the router's balancing loss and expert-load figures (None for a dense model)
        self.balance = moe.balance_for(loss_model.router, config.router_aux_loss_coef, self.world_size,
                                       self._reduce_sum)

        self.step = 0
        self.num_tokens = 0  # trained tokens so far, all processes
        self.skipped_steps = 0
        self.totals = TokenTotals(source_names, config.loss_type == "dft", accelerator.device)
        self.interval_seconds = 0.0
        self.interval_step_seconds: list[float] = []  # wall time of each optimizer step since the last metrics line
        self.last_eval_step = -1
        self.last_logged_step = -1
        self.signals: StopSignals | None = None  # while fit runs
        self.rng_at_step_start: list[dict[str, Any]] | None = None  # what a checkpoint of the last step holds
        # load_best_model_at_end and early stopping (training/best_model.py)
        self.best = BestModelTracker(config) if tracks_best(config) else None
        if self.best is not None:
            self.best.check_sources(source_names)
            if not config.load_best_model_at_end:
                log.info("early stopping without load_best_model_at_end: the saved model is the last one, not the best")
        if self.best is not None and config.load_best_model_at_end and config.save_only_model \
                and sharded.is_sharded(accelerator):
            raise UserError("load_best_model_at_end under FSDP/DeepSpeed reloads the best checkpoint's shards, which "
                            "save_only_model: true leaves out: set save_only_model: false")

    @property
    def model(self) -> torch.nn.Module:
        """The model being trained (a transformers model, or a peft model), without any wrapper."""
        return self.accelerator.unwrap_model(self.loss_model).model

    # ------------------------------------------------------------------ the loop

    def fit(self) -> list[dict[str, Any]]:
        self.reporter = Reporter(self.config, self.output_dir, self.total_steps,
                                 self.accelerator.is_main_process, self.step)
        history: list[dict[str, Any]] = []
        try:
            with StopSignals(self.output_dir, self._last_checkpoint_text) as self.signals:
                if self.config.eval_on_start and self.step == 0 and self.eval_rows:
                    history.append(self.evaluate())  # the model as loaded, before any update
                while self.step < self.total_steps:
                    epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
                    learning_rate = self.scheduler.get_last_lr()[0]
                    started = time.perf_counter()
                    if self.world_size == 1:  # a stop within the step saves the state as it is now
                        self.rng_at_step_start = [checkpoint.rng_state()]
                    micro_batches = self._micro_batches(epoch_order(self.train_rows, self.config, epoch), step_in_epoch)
                    try:
                        step_tokens, grad_norm, step_loss = self._optimizer_step(micro_batches)
                    except _StepAbandoned as stopped:
                        self._stop_within_step(stopped)
                    step_seconds = time.perf_counter() - started
                    self.interval_seconds += step_seconds
                    self.interval_step_seconds.append(step_seconds)
                    self.step += 1
                    self.num_tokens += step_tokens
                    self.reporter.step(step_loss, learning_rate, self._interval_tokens() / max(self.interval_seconds, 1e-9))

                    epoch_done = self.step % self.steps_per_epoch == 0
                    last = self.step == self.total_steps
                    first_logged = self.step == 1 and self.config.logging_first_step
                    if self.step % self.logging_every == 0 or last or first_logged:
                        history.append(self._log(learning_rate, grad_norm))
                    if self._due(self.config.eval_strategy, self.eval_every, epoch_done) and self.eval_rows:
                        history.append(self._evaluate_and_track())
                    if self._due(self.config.save_strategy, self.save_every, epoch_done):
                        self.save_checkpoint()
                    if self._stop_requested():
                        path = self._checkpoint_of_last_step()
                        raise TrainingInterrupted(self.step, str(path), self.signals.signal_number or signal.SIGINT)
                    if self.best is not None and self.best.should_stop():
                        log.info("early stopping at step %d: %s has not improved for %d evaluations (best %g at "
                                 "step %d)", self.step, self.best.key, self.best.patience, self.best.state.best_value,
                                 self.best.state.best_step)
                        if self.last_logged_step != self.step:  # the last interval's line, as at the last step
                            history.append(self._log(learning_rate, grad_norm))
                        break
                if self.config.eval_strategy != "no" and self.eval_rows and self.last_eval_step != self.step:
                    history.append(self._evaluate_and_track())  # the final model is always evaluated
                if self.best is not None and self.config.load_best_model_at_end:
                    history.append(self._end_with_best_model())
        finally:
            self.signals = None
            self.reporter.close()
        return history

    def _optimizer_step(self, micro_batches: list[Batch]) -> tuple[int, float, float]:
        """Forward and backward every micro-batch, then one clipped optimizer step.

        Returns (trained tokens of the step on all processes, gradient norm before clipping, this process's loss).
        """
        accelerator = self.accelerator
        local_tokens = sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in micro_batches)
        step_tokens = int(self._sum_over_processes(float(local_tokens)))
        # Data parallelism averages gradients over processes; multiplying by world_size turns that into a sum.
        scale = self.world_size / max(step_tokens, 1)
        step_totals = TokenTotals(self.source_names, self.config.loss_type == "dft", accelerator.device)
        if self.balance is not None:  # MoE: the step's expert shares, before its first backward (moe.py)
            self.balance.begin_step(micro_batches, self._routing_forward)
        for i, batch in enumerate(micro_batches):
            sources = batch.pop("source_ids", None)
            last = i == len(micro_batches) - 1
            with nullcontext() if last else accelerator.no_sync(self.loss_model), self.training_noise:
                # forward and loss; backward runs outside autocast, and outside the offloading hooks: what backward
                # saves (a reentrant checkpoint's recomputation) is used at once, so moving it would only cost
                with self.precision.autocast(), self.offload:
                    out = self.loss_model(**{k: v.to(accelerator.device) for k, v in batch.items()})
                loss = out["loss_sum"] * scale
                if self.balance is not None and (aux := self.balance.micro_batch_loss(out["routing"])) is not None:
                    loss = loss + aux
                sharded.backward(accelerator, self.scaler.scale(loss) if self.scaler else loss, last)
            step_totals.add(out["token_stats"], _trained(sources, batch["targets"]))
            self.reporter.micro_batch_done(i + 1, len(micro_batches))
            if not last and self._stop_asked_within_step():
                raise _StepAbandoned(i + 1, len(micro_batches))
        if self.balance is not None:
            self.balance.end_step()
        blank = accelerator.unwrap_model(self.loss_model).blank_images
        if blank is not None:  # vision (issue 14): no process had images this step: no vision gradients at all
            drop_blank_gradients(accelerator.unwrap_model(self.loss_model),
                                 self._sum_over_processes(float(blank.step_had_images())) > 0)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clipping sees the true gradients
        max_norm = self.config.max_grad_norm or float("inf")
        norm = accelerator.clip_grad_norm_(self.loss_model.parameters(), max_norm)
        grad_norm = float(norm) if norm is not None else 0.0  # DeepSpeed reports none when it does not clip
        step_loss = float(step_totals.sums[:, 1].sum()) / max(local_tokens, 1)
        if self.scaler is not None:
            self._scaled_step(step_totals, step_loss)
        elif not math.isfinite(grad_norm):
            self._nonfinite(grad_norm)  # raises, or we skip this step's update
            self.scheduler.step()
        else:
            self.optimizer.step()
            self.totals.sums += step_totals.sums
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_tokens, grad_norm, step_loss

    def optimizer_step_on(self, micro_batches: list[Batch]) -> tuple[int, float, float]:
        """One optimizer step on the given micro-batches, outside fit (sftune estimate's calibration)."""
        return self._optimizer_step(micro_batches)

    def _routing_forward(self, batch: Batch) -> moe.Routing:
        """An MoE model's routing of one micro-batch, without the loss (the balancing loss's pre-pass)."""
        inputs = {k: v.to(self.accelerator.device) for k, v in batch.items() if k != "source_ids"}
        # route the inputs as training sees them (NEFTune's noisy embeddings, the precision's autocast)
        with self.training_noise, self.precision.autocast():
            return self.loss_model(**inputs, routing_only=True)["routing"]

    def _scaled_step(self, step_totals: TokenTotals, step_loss: float) -> None:
        """fp16: the scaler steps unless a gradient overflowed; then it lowers the scale and the step is skipped
        (counted in skipped_steps; the schedule waits, as in transformers' Trainer). That is loss scaling doing its
        job, not a non-finite loss: only a loss that is itself not finite goes to on_nonfinite_loss."""
        if not math.isfinite(step_loss):
            self._nonfinite(step_loss)  # raises, or counts the skipped step
            self.scaler.update()  # lowers the scale and readies the scaler for the next step
            return
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.get_scale() < scale:
            self.skipped_steps += 1
            log.info("step %d: fp16 gradients overflowed at loss scale %g; update skipped, scale now %g",
                     self.step + 1, scale, self.scaler.get_scale())
        else:
            self.scheduler.step()
        self.totals.sums += step_totals.sums  # the forward was fine: its loss counts either way

    def _nonfinite(self, grad_norm: float) -> None:
        step = self.step + 1
        if self.config.on_nonfinite_loss == "stop":
            raise TrainingError(
                f"step {step}: the loss or its gradient is not finite (gradient norm {grad_norm}); lower "
                "learning_rate, check the data of this step, or set on_nonfinite_loss: skip"
            )
        self.skipped_steps += 1
        log.warning("step %d: non-finite loss or gradient; this step's update is skipped", step)

    def _micro_batches(self, order: np.ndarray, step_in_epoch: int) -> list[Batch]:
        """This process's share of each micro-batch of one optimizer step, collated."""
        per_step, per_micro_step = self.plan.rows_per_step, self.plan.rows_per_micro_step
        step_rows = order[step_in_epoch * per_step:(step_in_epoch + 1) * per_step]
        rank, size = self.accelerator.process_index, self.plan.micro_batch_rows
        batches = []
        for start in range(0, len(step_rows), per_micro_step):
            global_rows = step_rows[start:start + per_micro_step]
            mine = [self.train_rows[i] for i in global_rows[rank * size:(rank + 1) * size]]
            if not mine:  # the epoch's last micro-batch can leave a process without rows; it still joins in
                batches.extend(_stand_in(self.collate([_without_targets(self.train_rows[global_rows[0]])])))
            else:
                batches.extend(self.collate(mine))
        return batches

    # ------------------------------------------------------------------ logging, evaluation, checkpoints

    def _interval_tokens(self) -> float:
        return float(self.totals.sums[:, 0].sum())

    def _log(self, learning_rate: float, grad_norm: float) -> dict[str, Any]:
        sums = self.totals.merged(self.accelerator)
        metrics = {
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 4),
            **train_metrics(sums, self.source_names),
            "learning_rate": learning_rate,
            "grad_norm": grad_norm,
            "num_tokens": self.num_tokens,
            "tokens_per_second": float(sums[:, 0].sum()) / max(self.interval_seconds, 1e-9),
            "peak_memory_mb": round(peak_memory_mb(), 1),
            # the median, not the mean: `sftune estimate` predicts a typical step, and one slow step (a checkpoint's
            # neighbour, the first step's allocations) should not move it
            "step_seconds": round(statistics.median(self.interval_step_seconds), 4) if self.interval_step_seconds
            else 0.0,
        }
        if self.balance is not None:
            metrics.update(self.balance.interval_metrics())
        if self.skipped_steps:
            metrics["skipped_steps"] = self.skipped_steps
        self.reporter.log(metrics)
        self.last_logged_step = self.step
        self.totals.reset()
        self.interval_seconds = 0.0
        self.interval_step_seconds = []
        return metrics

    def _due(self, strategy: str, every: int, epoch_done: bool) -> bool:
        if strategy == "steps":
            return self.step % every == 0
        return strategy == "epoch" and epoch_done

    def evaluate(self) -> dict[str, Any]:
        """Loss, perplexity, token accuracy and entropy on the eval rows, overall and per source."""
        accelerator, size = self.accelerator, self.config.per_device_eval_batch_size
        totals = TokenTotals(self.source_names, dft=False, device=accelerator.device)
        routing = moe.EvalRouting(self.balance.spec, self.world_size, self._reduce_sum) if self.balance else None
        self.loss_model.eval()
        with torch.no_grad():
            # every process runs the same number of batches (sharded models need all of them in each forward)
            for i in range(math.ceil(len(self.eval_rows) / (size * self.world_size))):
                start = (i * self.world_size + accelerator.process_index) * size
                rows = self.eval_rows[start:start + size]
                batches = (self.eval_collate(rows) if rows else
                           _stand_in(self.eval_collate([_without_targets(self.eval_rows[0])])))
                for batch in batches:
                    sources = batch.pop("source_ids", None)
                    with self.precision.autocast():
                        out = self.loss_model(**{k: v.to(accelerator.device) for k, v in batch.items()})
                    totals.add(out["token_stats"], _trained(sources, batch["targets"]))
                    if routing is not None:
                        routing.add(out["routing"])
        self.loss_model.train()
        metrics = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
                   **eval_metrics(totals.merged(accelerator), self.source_names),
                   **(routing.metrics() if routing is not None else {})}
        self.reporter.log(metrics)
        for prompt in self.config.generation_prompts:
            answer = greedy_answer(self.model, self.tokenizer, prompt, self.config.generation_max_new_tokens)
            self.reporter.sample(self.step, prompt, answer)
        self.last_eval_step = self.step
        return metrics

    def _evaluate_and_track(self) -> dict[str, Any]:
        metrics = self.evaluate()
        if self.best is not None:
            self.best.evaluated(self.step, metrics)
        return metrics

    def _end_with_best_model(self) -> dict[str, Any]:
        """The best kept model becomes the final one: its checkpoint's weights are loaded (every process)."""
        self.best.kept(self.step)  # the final model, evaluated just now, is a candidate too
        best_step = self.best.state.candidate_step
        if best_step is None:  # no evaluation ran (no eval rows): the final model stays
            log.warning("load_best_model_at_end: no evaluation ran, so the saved model is the last one")
            return self.best.summary(self.step)
        if best_step is not None and best_step != self.step:
            path = self.output_dir / f"{checkpoint.PREFIX}{best_step}"
            if not (path / checkpoint.STATE_FILE).is_file():
                raise TrainingError(f"load_best_model_at_end: the best checkpoint {path} is gone; the final model "
                                    f"is in {self.output_dir / checkpoint.PREFIX}{self.step} if it was saved")
            if sharded.is_sharded(self.accelerator):
                sharded.load_shards(self.accelerator, path)
            else:
                checkpoint.load_model_weights(self.model, path)
            self.accelerator.wait_for_everyone()
        log.info("load_best_model_at_end: the saved model is step %s's (%s = %g; the last step was %d)",
                 best_step, self.best.key, self.best.state.candidate_value, self.step)
        summary = self.best.summary(self.step)
        self.reporter.log(summary)
        return summary

    def save_checkpoint(self, rng_states: list[dict[str, Any]] | None = None, model_only: bool | None = None) -> Path:
        """checkpoint-<step>: every process takes part (random generators, sharded weights and optimizer).

        `rng_states` replaces the generators' current states (a stop within a step saves those at its start).
        `model_only` (unset: save_only_model) leaves the optimizer, schedule and generators out."""
        model_only = self.config.save_only_model if model_only is None else model_only
        from accelerate.utils import gather_object

        accelerator = self.accelerator
        stage = checkpoint.stage_path(self.output_dir, self.step)
        if accelerator.is_main_process:
            checkpoint.prepare_stage(stage)
        accelerator.wait_for_everyone()
        rng_states = rng_states or gather_object([checkpoint.rng_state()])
        state_dict = sharded.full_state_dict(accelerator, self.loss_model)
        if sharded.is_sharded(accelerator) and not model_only:
            sharded.save_shards(accelerator, stage)
        path = self.output_dir / f"{checkpoint.PREFIX}{self.step}"
        if self.best is not None:
            self.best.kept(self.step)
        if accelerator.is_main_process:
            state = {"global_step": self.step, "num_tokens": self.num_tokens, "total_steps": self.total_steps,
                     "rows_per_step": self.plan.rows_per_step, "world_size": self.world_size,
                     "skipped_steps": self.skipped_steps, "precision": self.precision.mode}
            if self.scaler is not None:
                state["grad_scaler"] = self.scaler.state_dict()
            if self.best is not None:
                state["best_model"] = self.best.to_dict()
            if model_only:
                state["model_only"] = True
            path = checkpoint.publish_checkpoint(
                stage, self.step, self._save_checkpoint_model(state_dict),
                None if sharded.is_sharded(accelerator) or model_only else self.optimizer,
                None if model_only else self.scheduler, None if model_only else rng_states, state,
                self.output_dir / CONFIG_FILENAME,
            )
            checkpoint.prune_checkpoints(self.output_dir, self.config.save_total_limit, self._protected_checkpoint())
            log.info("saved checkpoint %s", path)
        accelerator.wait_for_everyone()
        return path

    def resume(self, path: Path) -> None:
        """Continue from a checkpoint: weights, optimizer, schedule, random generators and the data position."""
        state = checkpoint.load_training_state(path)
        if sharded.is_sharded(self.accelerator):
            sharded.load_shards(self.accelerator, path)
        else:
            checkpoint.load_model_weights(self.model, path)
            checkpoint.load_master_weights(self.model, path)  # the fp32 masters behind the bf16 model files
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        checkpoint.set_rng_state(rng[self.accelerator.process_index] if len(rng) == self.world_size else rng[0])
        trainer = state["trainer"]
        self.step, self.num_tokens = trainer["global_step"], trainer["num_tokens"]
        self.skipped_steps = trainer.get("skipped_steps", 0)
        if self.best is not None:
            self.best.restore(trainer.get("best_model"))
        if trainer.get("rows_per_step") != self.plan.rows_per_step:
            log.warning("resuming with %d rows per step where the run had %s: the data order will differ from "
                        "an uninterrupted run", self.plan.rows_per_step, trainer.get("rows_per_step"))
        if self.scaler is not None and "grad_scaler" in trainer:
            self.scaler.load_state_dict(trainer["grad_scaler"])
        if trainer.get("precision", self.precision.mode) != self.precision.mode:
            log.warning("resuming a %s run under %s: the steps after the checkpoint differ from an uninterrupted run",
                        trainer["precision"], self.precision.mode)
        log.info("resumed from %s at step %d of %d", path, self.step, self.total_steps)

    def save_final_model(self) -> None:
        """The trained model (or adapter) and tokenizer into output_dir; every process must call this."""
        state_dict = sharded.full_state_dict(self.accelerator, self.loss_model)
        if self.accelerator.is_main_process:
            try:
                save_model(self.model, self.saved_with_model, self.output_dir, state_dict, dtype=self.save_dtype)
            except Exception as err:
                reason = write_failure_reason(err)
                if reason is None:
                    raise
                raise UserError(
                    f"could not save the model to {self.output_dir} ({reason}); files already there are "
                    "untouched, and the checkpoints (if any) can be resumed with resume_from_checkpoint: true"
                ) from None
        self.accelerator.wait_for_everyone()

    def _save_checkpoint_model(self, state_dict: dict[str, Any] | None) -> Callable[[Path], None]:
        """What writes a checkpoint's model: the model files as the final save writes them (in save_dtype), and the
        trained weights as they are (fp32 masters) where those differ, for an exact resume. A sharded engine keeps
        its own full-precision shards (accelerate_state)."""
        def write(folder: Path) -> None:
            save_model(self.model, self.saved_with_model, folder, state_dict, hub_layout=False,
                       dtype=self.save_dtype)
            if not sharded.is_sharded(self.accelerator):
                checkpoint.save_master_weights(self.model, folder, self.save_dtype)
        return write

    # ------------------------------------------------------------------ stopping on a signal (training/interrupt.py)

    def _stop_asked_within_step(self) -> bool:
        """One process stops at a micro-batch boundary; several agree once per step (in _stop_requested), since
        their micro-batches need not line up."""
        return self.world_size == 1 and self.signals is not None and self.signals.requested.is_set()

    def _stop_within_step(self, stopped: _StepAbandoned) -> None:
        """Drop the unfinished step's gradients and stop with the checkpoint of the last completed step."""
        self.optimizer.zero_grad(set_to_none=True)
        log.warning("stopped in step %d after micro-batch %d of %d; this step will run again from its start",
                    self.step + 1, stopped.done, stopped.total)
        path = self._checkpoint_of_last_step(self.rng_at_step_start)
        raise TrainingInterrupted(self.step, str(path), self.signals.signal_number or signal.SIGINT)

    def _stop_requested(self) -> bool:
        wanted = float(self.signals is not None and self.signals.requested.is_set())
        return self._sum_over_processes(wanted) > 0 if self.world_size > 1 else bool(wanted)

    def _checkpoint_of_last_step(self, rng_states: list[dict[str, Any]] | None = None) -> Path:
        """checkpoint-<step>, saved now unless this step's checkpoint is already there."""
        saved = dict(checkpoint.list_checkpoints(self.output_dir))
        if self.step in saved and not checkpoint.is_model_only(saved[self.step]):
            return saved[self.step]
        return self.save_checkpoint(rng_states, model_only=False)  # a stop writes one that resumes

    def _protected_checkpoint(self) -> int | None:
        """The best checkpoint survives save_total_limit while load_best_model_at_end may still need it."""
        return self.best.state.candidate_step if self.best is not None and self.config.load_best_model_at_end else None

    def _last_checkpoint_text(self) -> str:
        saved = checkpoint.list_checkpoints(self.output_dir)
        return f"the last checkpoint, {saved[-1][1]}, is intact" if saved else "no checkpoint had been saved yet"

    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum")

    def _sum_over_processes(self, value: float) -> float:
        if self.world_size == 1:
            return float(value)
        tensor = torch.tensor(value, dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="sum"))


class _StepAbandoned(Exception):
    """A stop was asked for in the middle of an optimizer step: it ends after micro-batch `done` of `total`."""

    def __init__(self, done: int, total: int):
        super().__init__(f"stopped after micro-batch {done} of {total}")
        self.done, self.total = done, total


def _trained(sources: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor | None:
    """The source of each trained token, in the order the loss lists them."""
    return None if sources is None else sources[targets != IGNORE_INDEX]


def _without_targets(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "labels": np.full_like(row["labels"], IGNORE_INDEX)}


def _stand_in(batches: list[Batch]) -> list[Batch]:
    """Batches of a row that only keeps a process in step: no targets, and no token counts as routed (MoE)."""
    for batch in batches:
        batch["token_mask"] = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    return batches
