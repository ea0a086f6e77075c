"""`sftune train CONFIG --dry_run`: everything a run checks before it trains, and the plan it would follow, with
nothing trained and nothing written (output_dir is not made or claimed, no data is cached, no model is loaded).

It validates the config, the output folder (without writing to it), the checkpoint to resume from, the local files,
the tokenizer and chat template, and renders a sample of rows through the template with its checks. Then it prints
the resolved config and the plan: precision, batching, steps, rows and trained tokens per step, checkpoints, and
what gets saved. Step counts are exact for unpacked rows (rows the template checks would drop are not known
until preparation); with packing the packed-row count is estimated from the sample's lengths.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from sftune.batching import BatchingPlan, plan_batching
from sftune.config import SFTConfig, without_secrets
from sftune.config.fields import steps_of
from sftune.config.trl import defaults_unlike_trl, ignored_summary
from sftune.errors import UserError

SAMPLE_ROWS = 64  # rows of each source rendered through the template and checked


@dataclass
class DataPlan:
    train_rows: list[int]  # per source, after the eval hold-out, before mixing
    eval_rows: int
    mixed_rows: list[int]  # per source, in one epoch
    sampled: int  # documents rendered and checked
    mean_tokens: float  # per sampled document
    mean_trained: float

    @property
    def epoch_rows(self) -> int:
        return sum(self.mixed_rows)


def dry_run(config: SFTConfig, num_processes: int = 1, accelerate_config: str | None = None,
            out: TextIO | None = None) -> None:
    from sftune.preflight import check_input_paths, check_output_dir, unfinished_run
    from sftune.training.checkpoint import resolve_resume_path

    out = out or sys.stdout
    config.check_ready_to_train()
    output_dir = Path(config.output_dir).expanduser()
    resume_from = resolve_resume_path(output_dir, config.resume_from_checkpoint)
    if config.resume_from_checkpoint is True and resume_from is None and output_dir.is_dir() \
            and any(output_dir.iterdir()) and not unfinished_run(output_dir):
        raise UserError(f"resume_from_checkpoint: true, but output_dir '{output_dir}' holds no checkpoint")
    check_output_dir(config, resume_from, probe=False)
    check_input_paths(config)

    import torch

    from sftune.run import setup_logging

    setup_logging()
    device_type = "cuda" if torch.cuda.is_available() and not config.use_cpu else "cpu"
    engine = engine_of_launch(num_processes, accelerate_config)
    plan = plan_batching(config, device_type=device_type, engine=engine, num_processes=num_processes)
    data = _sample_data(config)
    if config.eval_strategy != "no" and not data.eval_rows:
        raise UserError(f"eval_strategy: {config.eval_strategy}, but there is no eval data: set dataset_test_split "
                        "or eval_ratio, or set eval_strategy: no")
    print("# sftune train --dry_run: nothing was trained or written", file=out)
    print("# resolved config (what the run saves as sftune_config.yaml)", file=out)
    print(yaml.safe_dump(without_secrets(config.to_dict()), sort_keys=False, allow_unicode=True).rstrip(), file=out)
    print("\n# plan", file=out)
    if engine != "single" or accelerate_config:
        how = f" with accelerate config {accelerate_config}" if accelerate_config else ""
        print(f"launch: `accelerate launch`{how}: {num_processes} process{'es' if num_processes > 1 else ''}, "
              f"{engine.upper() if engine != 'single' else 'one process'}", file=out)
    for line in plan_lines(config, plan, data, resume_from):
        print(line, file=out)


def engine_of_launch(num_processes: int, accelerate_config: str | None) -> str:
    """The engine a launch would train with: TRL's named configs by name, a config file by its distributed_type."""
    kind = accelerate_config or ""
    if accelerate_config and Path(accelerate_config).expanduser().is_file():
        settings = yaml.safe_load(Path(accelerate_config).expanduser().read_text()) or {}
        kind = str(settings.get("distributed_type", "")).lower()
    if kind.startswith(("zero", "deepspeed")):
        return "deepspeed"
    if kind.startswith("fsdp"):
        return "fsdp"
    return "ddp" if num_processes > 1 else "single"


def _sample_data(config: SFTConfig) -> DataPlan:
    """Every source's row counts, and a sample of its rows rendered through the template with the template checks
    (logged as in training). Nothing is cached."""
    from sftune.data.prepare import prepare_documents
    from sftune.data.sources import dataset_specs, fraction_counts, mixture_counts
    from sftune.model.load import load_processor, load_tokenizer

    processor = load_processor(config)
    tokenizer = processor.tokenizer if processor is not None else load_tokenizer(config)
    sizes: dict[str, list[int]] = {}
    documents, _ = prepare_documents(config, tokenizer, limit=SAMPLE_ROWS, processor=processor, sizes=sizes)
    specs = dataset_specs(config)
    train_rows = sizes["train"][:len(specs)]
    fractions, weights = [s.fraction for s in specs], [s.weight for s in specs]
    if any(f is not None for f in fractions):
        mixed = fraction_counts(train_rows, fractions)
    else:
        mixed = mixture_counts(train_rows, weights if any(w is not None for w in weights) else None)
    lengths = [len(ids) for docs in documents for ids in docs.ids]
    trained = [int((labels != -100).sum()) for docs in documents for labels in docs.labels]
    if not lengths:
        raise UserError("no row of the sample has any token to train on: check the data and the loss settings "
                        "(`sftune inspect` shows the rows)")
    return DataPlan(train_rows, sum(sizes["eval"]), mixed, len(lengths), sum(lengths) / len(lengths),
                    sum(trained) / len(trained))


def plan_lines(config: SFTConfig, plan: BatchingPlan, data: DataPlan, resume_from: Any) -> list[str]:
    lines = []
    lines.append(f"precision: weights loaded and trained in dtype {config.dtype}"
                 + (" (the checkpoint's own)" if config.dtype == "auto" else "")
                 + f"; device {plan.device_type}")
    lines.append(f"batching: {plan.describe_layout()}; {plan.describe_step()}"
                 + (" (padding_free unset, so chosen for this machine)" if plan.padding_free_chosen else ""))
    sources = ", ".join(f"{n:,}" for n in data.train_rows)
    lines.append(f"data: {sum(data.train_rows):,} training rows ({sources} per source), {data.eval_rows:,} eval rows;"
                 f" {data.sampled} sampled rows checked through the template: {data.mean_tokens:.0f} tokens, "
                 f"{data.mean_trained:.0f} trained, on average")
    if config.packing:
        documents_per_row = max(1.0, config.max_length / max(data.mean_tokens, 1.0))
        epoch_rows = max(1, math.ceil(data.epoch_rows / documents_per_row))
        trained_per_row = data.mean_trained * documents_per_row
        lines.append(f"packing: about {epoch_rows:,} rows of {config.max_length} tokens from {data.epoch_rows:,} "
                     "documents per epoch (estimated from the sample's lengths)")
    else:
        epoch_rows, trained_per_row = data.epoch_rows, data.mean_trained
    steps_per_epoch = plan.steps_per_epoch(epoch_rows)
    total = config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.num_train_epochs * steps_per_epoch))
    how = "max_steps" if config.max_steps > 0 else f"{config.num_train_epochs:g} epochs"
    lines.append(f"steps: {total:,} ({how}; {steps_per_epoch:,} per epoch of {epoch_rows:,} rows)")
    lines.append(f"per step: {plan.rows_per_step} rows, about {trained_per_row * plan.rows_per_step:,.0f} trained "
                 f"tokens")
    warmup = steps_of(config.warmup_steps, total) if config.warmup_steps else 0
    lines.append(f"schedule: {config.lr_scheduler_type}, learning rate {config.learning_rate:g}, {warmup} warm-up "
                 f"steps; a metrics line every {steps_of(config.logging_steps, total)} steps")
    if config.eval_strategy == "steps":
        every = steps_of(config.eval_steps or config.logging_steps, total)
        lines.append(f"evaluation: every {every} steps and at the end, on {data.eval_rows:,} rows")
    elif config.eval_strategy == "epoch":
        lines.append(f"evaluation: after every epoch, on {data.eval_rows:,} rows")
    lines.append(_checkpoints(config, total, steps_per_epoch))
    if resume_from is not None:
        lines.append(f"resume: from {resume_from}")
    what = "the LoRA adapter" if config.use_peft else "the full model"
    pushed = f"; then pushed to the Hub ({config.hub_model_id or 'a repository named after output_dir'})" \
        if config.push_to_hub else ""
    lines.append(f"saved: {what}, tokenizer and chat template, model card and loss plot, metrics.jsonl and "
                 f"sftune_config.yaml in {config.output_dir}{pushed}")
    if config.ignored_keys:
        lines.append(f"ignored TRL keys: {ignored_summary(config.ignored_keys)}")
    unlike = defaults_unlike_trl(config)
    if unlike:
        lines.append(f"defaults unlike TRL's: {', '.join(unlike)}")
    return lines


def _checkpoints(config: SFTConfig, total: int, steps_per_epoch: int) -> str:
    if config.save_strategy == "no":
        return "checkpoints: none (save_strategy: no)"
    every = steps_of(config.save_steps, total) if config.save_strategy == "steps" else steps_per_epoch
    steps = list(range(every, total + 1, every))
    kept = f", keeping the newest {config.save_total_limit}" if config.save_total_limit else ""
    shown = ", ".join(map(str, steps[:6])) + (", ..." if len(steps) > 6 else "")
    return f"checkpoints: {len(steps)} (at steps {shown}){kept}" if steps else \
        f"checkpoints: none (the run is {total} steps, shorter than one save interval of {every})"
