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
    save_steps: int = opt(500, "Write a checkpoint every this many optimizer steps.", "checkpoints")
    save_total_limit: int | None = opt(None, "Keep only the newest this many checkpoints (unset: all).", "checkpoints")
    resume_from_checkpoint: bool | str | None = opt(
        None, "true: continue from the newest checkpoint in output_dir; or a checkpoint folder to continue from.",
        "checkpoints",
    )

    # TRL training keys (issue 15)
    save_only_model: bool = opt(
        False, "Checkpoints hold only the model (or adapter), tokenizer and config: no optimizer, schedule or "
        "random-generator state, so they are smaller but cannot be resumed (a stop by Ctrl-C still writes a full "
        "one).", "checkpoints",
    )

    def _check_checkpoints(self, problems: Problems) -> None:
        problems.need(self.save_steps >= 1, "save_steps", "must be >= 1")
        problems.need(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit", "must be >= 1")
