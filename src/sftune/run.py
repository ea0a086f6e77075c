"""train(config): the one way through. Config -> tokenizer and model -> prepared data -> loop -> saved model."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftune import logs
from sftune.batching import BatchingPlan, plan_batching
from sftune.config import CONFIG_FILENAME, SFTConfig
from sftune.config.trl import log_compatibility
from sftune.cpu import CompetitionCheck, use_threads
from sftune.errors import UserError
from sftune.preflight import check_before_loading, check_output_dir

log = logging.getLogger("sftune")


@dataclass
class TrainResult:
    output_dir: Path
    history: list[dict[str, Any]]  # one entry per logging step and per evaluation, as in metrics.jsonl
    global_step: int
    data_stats: dict[str, Any]
    train_seconds: float
    plan: BatchingPlan  # how the rows were batched
    model: Any = field(repr=False, default=None)  # a peft model when training adapters
    tokenizer: Any = field(repr=False, default=None)
    processor: Any = field(repr=False, default=None)  # vision-language models only
    step_losses: list[dict[str, float]] = field(repr=False, default_factory=list)  # every step of this process


def setup_logging() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own log says what is loading and saving; one progress bar is enough
    logs.setup_logging()


def claim_output_dir(config: SFTConfig, resume_from: Path | None) -> Path:
    """Take output_dir for this run once its model and data are ready: a failed start leaves nothing behind."""
    from sftune.output_guard import clear_earlier_run
    from sftune.training.report import trim_metrics_after

    out = check_output_dir(config, resume_from)
    continuing = resume_from is not None and resume_from.resolve().parent == out.resolve()
    try:
        if config.overwrite_output_dir and not continuing and out.is_dir():
            clear_earlier_run(out)  # its later checkpoints would otherwise be resumed as this run's
        out.mkdir(parents=True, exist_ok=True)
        if continuing:
            trim_metrics_after(out, _checkpoint_step(resume_from))
        else:
            for name in ("metrics.jsonl", "samples.jsonl"):  # a previous run's lines would mix with ours
                (out / name).unlink(missing_ok=True)
        config.save(out / CONFIG_FILENAME)
    except OSError as err:
        raise UserError(f"cannot write to output_dir '{out}' ({err.strerror or err}): choose another output_dir") from None
    return out


def _checkpoint_step(path: Path) -> int:
    import json

    from sftune.training.checkpoint import STATE_FILE

    return json.loads((path / STATE_FILE).read_text())["global_step"]


def make_accelerator(config: SFTConfig) -> Any:
    """The accelerate engine this process trains with: one process, DDP, FSDP or DeepSpeed, as `accelerate launch`
    (or its environment) set it up; on a machine without GPUs (or with use_cpu), CPU processes over gloo."""
    import torch
    from accelerate import Accelerator

    # mixed_precision="no": sftune runs autocast and loss scaling itself (sftune/precision.py); accelerate's own would
    # scale the loss a second time. `accelerate launch --mixed_precision X` still chooses when bf16/fp16 are unset.
    return Accelerator(cpu=config.use_cpu or not torch.cuda.is_available(), mixed_precision="no")


def log_plan(plan: BatchingPlan) -> None:
    chosen = " (padding_free unset, so chosen for this machine)" if plan.padding_free_chosen else ""
    log.info("batching: %s; %s%s", plan.describe_layout(), plan.describe_step(), chosen)


def train(config: SFTConfig, train_dataset: Any = None, eval_dataset: Any = None,
          formatting_func: Any = None) -> TrainResult:
    """`train_dataset` / `eval_dataset` (a datasets.Dataset or a list of dicts) replace the config's datasets;
    `formatting_func` turns each raw row into text or into a row of any supported format."""
    run_started = time.perf_counter()
    # config, output folder, checkpoint and local paths: a mistake there is reported before anything slow loads
    resume_from = check_before_loading(config, dataset_given=train_dataset is not None)
    competition = CompetitionCheck()  # other work on our cores, measured over the start-up

    from accelerate.utils import set_seed

    from sftune.data.prepare import prepare_train_data
    from sftune.export.hub import check_push_settings
    from sftune.model.adapters import prepare_for_training
    from sftune.model.liger import check_liger
    from sftune.precision import log_precision, plan_precision
    from sftune.data.collate import make_collator
    from sftune.model.load import load_model, load_processor, load_tokenizer
    from sftune.training import sharded
    from sftune.training.loop import Trainer
    from sftune.tokenizer import attach_to_processor, fit_model_to_tokenizer
    from sftune.training.report import requested_trackers

    setup_logging()
    threads, why_threads = use_threads(config)  # before loading and preparing, which compute too
    requested_trackers(config)  # a missing tracker package fails now, not after data preparation
    repo_id = check_push_settings(config) if config.push_to_hub else None  # and a missing Hub token
    if config.full_determinism:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    accelerator = make_accelerator(config)
    output_dir = Path(config.output_dir).expanduser()
    if config.resume_from_checkpoint is True and resume_from is None:
        log.info("no checkpoint in %s yet: starting from the beginning", output_dir)
    set_seed(config.seed, deterministic=config.full_determinism)
    if config.use_peft and config.learning_rate_is_default:
        log.info("learning_rate: %g, the default with use_peft (set learning_rate to change it)", config.learning_rate)

    check_liger(config)
    plan = plan_batching(config, device_type=accelerator.device.type, engine=sharded.engine_of(accelerator),
                         num_processes=accelerator.num_processes)  # impossible combinations fail here
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    precision = plan_precision(config, accelerator.device.type, engine=sharded.engine_of(accelerator),
                               launcher=launcher)
    if precision.chosen:  # resolved, so that the saved config repeats the choice on any machine
        config.bf16, config.fp16 = precision.bf16, precision.fp16
    processor = load_processor(config)  # None for text-only models
    tokenizer = processor.tokenizer if processor is not None else load_tokenizer(config)
    # one process prepares and caches (per node, or once on a shared file system); the others wait on its lock,
    # not on a barrier, which would time out on a long preparation (data/cache_lock.py)
    data = prepare_train_data(config, tokenizer, train_dataset, eval_dataset, formatting_func, processor)
    tokenizer = data.tokenizer  # shaped for this run (template, EOS): the one saved with the model
    if processor is not None:
        attach_to_processor(processor, tokenizer)
    if config.eval_strategy != "no" and not data.eval_rows:
        raise UserError(f"eval_strategy: {config.eval_strategy}, but there is no eval data: set dataset_test_split "
                        "or eval_ratio (or pass eval_dataset), or set eval_strategy: no")
    if config.eval_on_start and not data.eval_rows:
        raise UserError("eval_on_start: true, but there is no eval data: set dataset_test_split or eval_ratio (or "
                        "pass eval_dataset), or set eval_on_start: false")
    if accelerator.is_main_process and accelerator.num_processes == 1:  # the formula is for one process
        from sftune.estimate.fit import log_and_check

        log_and_check(config, data, accelerator.device.type)  # before the model loads: a run too big stops here
    model = load_model(config, device=accelerator.device, precision=precision)
    fit_model_to_tokenizer(model, tokenizer)  # embeddings for tokens the template added; the EOS stops generation
    model = prepare_for_training(model, config)

    trainer = Trainer(model, tokenizer, data.train_rows, data.eval_rows, data.source_names, config, accelerator,
                      output_dir, plan, make_collator(plan, tokenizer, processor), processor=processor,
                      eval_collate=make_collator(plan, tokenizer, processor, evaluation=True), precision=precision)
    if accelerator.is_main_process:  # only now, so that a run that failed to start leaves output_dir as it was
        claim_output_dir(config, resume_from)
    accelerator.wait_for_everyone()
    if resume_from is not None:
        trainer.resume(resume_from)
    log_plan(plan)
    log_compatibility(config, log)  # only now: a run that fails to start does not print it
    wanted = config.launch_settings.get("num_processes", 1)
    if wanted != accelerator.num_processes and "SFTUNE_LAUNCHED_ARGV" not in os.environ:
        log.warning("num_processes: %d in the config, but this run has %d process(es): the config's launch keys "
                    "take effect through `sftune train CONFIG` (or `accelerate launch`)", wanted,
                    accelerator.num_processes)
    log_precision(precision, launcher)
    log.info("training: %d steps (%d per epoch)", trainer.total_steps, trainer.steps_per_epoch)
    competition.report(threads, why_threads, computing_on_cpu=accelerator.device.type == "cpu")
    started = time.perf_counter()
    history = trainer.fit()
    seconds = time.perf_counter() - started

    trainer.save_final_model()
    what = "adapter" if config.use_peft else "model"
    log.info("saved the %s to %s (%.0f s of training)", what, output_dir, seconds)
    result = TrainResult(output_dir, history, trainer.step, data.stats, seconds, plan, trainer.model, tokenizer,
                         processor, trainer.reporter.step_losses)
    if accelerator.is_main_process:
        describe_and_publish(result, config, repo_id, time.perf_counter() - run_started)
    return result


def describe_and_publish(result: TrainResult, config: SFTConfig, repo_id: str | None, run_seconds: float) -> None:
    """After the final save: the model card and loss plot, then the push to the Hub when asked for. A failed push
    raises HubPushError (the CLI exits with code 2); the saved run stays as it is."""
    from sftune.export.card import RunSummary, write_model_card
    from sftune.export.hub import push_run

    summary = RunSummary(config, result.output_dir, result.data_stats, result.history, result.train_seconds,
                         run_seconds, result.plan, repo_id, vision=result.processor is not None,
                         step_losses=result.step_losses)
    try:
        write_model_card(summary)
    except OSError as err:
        raise UserError(f"could not write the model card to {result.output_dir} ({err.strerror or err}); the model "
                        "is saved") from None
    if repo_id is not None:
        push_run(result.output_dir, repo_id, config.hub_private_repo)
