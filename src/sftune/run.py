"""train(config): the one way through. Config -> tokenizer and model -> prepared data -> loop -> saved model."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftune.config import CONFIG_FILENAME, SFTConfig
from sftune.errors import UserError

log = logging.getLogger("sftune")


@dataclass
class TrainResult:
    output_dir: Path
    history: list[dict[str, Any]]  # one entry per logging step, as in metrics.jsonl
    global_step: int
    data_stats: dict[str, Any]
    train_seconds: float
    model: Any = field(repr=False, default=None)  # a peft model when training adapters
    tokenizer: Any = field(repr=False, default=None)
    processor: Any = field(repr=False, default=None)  # vision-language models only


class _StderrHandler(logging.StreamHandler):
    """Writes to the current sys.stderr, not the one at set-up (pytest and notebooks replace it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own log says what is loading and saving; one progress bar is enough
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[sftune] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def claim_output_dir(config: SFTConfig) -> Path:
    """Make sure this run may write into output_dir: never silently over another run's files."""
    out = Path(config.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir '{out}' is a file, not a folder: choose another output_dir")
    if out.is_dir() and any(out.iterdir()) and not config.overwrite_output_dir:
        raise UserError(
            f"output_dir '{out}' already holds files (another run?): choose another output_dir, "
            "or set overwrite_output_dir: true to write over them"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)  # a previous run's metrics would mix with ours
    except OSError as err:
        raise UserError(f"cannot write to output_dir '{out}': {err.strerror}") from None
    config.save(out / CONFIG_FILENAME)
    return out


def train(config: SFTConfig) -> TrainResult:
    config.check_ready_to_train()

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from sftune.data.collate import make_collator
    from sftune.data.prepare import prepare_train_data
    from sftune.export.save import save_model
    from sftune.model.adapters import prepare_for_training
    from sftune.model.load import load_model, load_processor, load_tokenizer
    from sftune.train.loop import Trainer

    setup_logging()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    output_dir = Path(config.output_dir).expanduser()
    if accelerator.is_main_process:
        output_dir = claim_output_dir(config)
    accelerator.wait_for_everyone()
    set_seed(config.seed)
    if config.use_peft and config.learning_rate_is_default:
        log.info("learning_rate: %g, the default with use_peft (set learning_rate to change it)", config.learning_rate)

    processor = load_processor(config)  # None for text-only models
    tokenizer = processor.tokenizer if processor is not None else load_tokenizer(config)
    data = prepare_train_data(config, tokenizer)
    model = prepare_for_training(load_model(config, device=accelerator.device), config)
    trainer = Trainer(model, data.rows, config, accelerator, output_dir, make_collator(config, tokenizer))
    log.info(
        "training: %d steps (%d per epoch), %d rows per step (%d x %d accumulation x %d processes)",
        trainer.total_steps, trainer.steps_per_epoch, trainer.rows_per_step,
        config.per_device_train_batch_size, config.gradient_accumulation_steps, accelerator.num_processes,
    )
    started = time.perf_counter()
    history = trainer.fit()
    seconds = time.perf_counter() - started

    model = trainer.model
    if accelerator.is_main_process:
        save_model(model, processor or tokenizer, output_dir)
        what = "adapter" if config.use_peft else "model"
        log.info("saved the %s to %s (%.0f s of training)", what, output_dir, seconds)
    accelerator.wait_for_everyone()
    return TrainResult(output_dir, history, trainer.step, data.stats, seconds, model, tokenizer, processor)
