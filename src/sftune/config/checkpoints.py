"""The checkpoints group: when checkpoints are written, how many are kept, and resuming from one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sftune.config.fields import Problems, opt


@dataclass
class CheckpointSettings:
    save_strategy: Literal["no", "steps", "epoch"] = opt(
        "steps", "When to write a checkpoint: never, every save_steps, or after every epoch.", "checkpoints"
    )
    save_steps: int | float = opt(
        500, "Write a checkpoint every this many optimizer steps, or a float in (0, 1) for that ratio of the total "
        "steps.", "checkpoints"
    )
    save_total_limit: int | None = opt(None, "Keep only the newest this many checkpoints (unset: all).", "checkpoints")
    resume_from_checkpoint: bool | str | None = opt(
        None, "true: continue from the newest checkpoint in output_dir; or a checkpoint folder to continue from.",
        "checkpoints",
    )
    resume_allow_changes: bool = opt(
        False, "Resume although steps, epochs, logging, saving or evaluation settings differ from the checkpoint's "
        "(each change is logged). Settings that change training are refused whatever this says.", "checkpoints"
    )

    # TRL training keys (issue 15)
    save_only_model: bool = opt(
        False, "Checkpoints hold only the model (or adapter), tokenizer and config: no optimizer, schedule or "
        "random-generator state, so they are smaller but cannot be resumed (a stop by Ctrl-C still writes a full "
        "one).", "checkpoints",
    )

    def _check_checkpoints(self, problems: Problems) -> None:
        problems.need(self.save_steps > 0, "save_steps", "must be >= 1, or a ratio of the total steps in (0, 1)")
        problems.need(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit", "must be >= 1")
