"""The batching plan: how rows become micro-batches, decided once, before the model loads.

Every reader of these decisions (the collator, the trainer, the run log, `sftune inspect`, the model card) reads
this record; none works them out again. `plan_batching` also refuses combinations that cannot work, so that a run
fails before any model is loaded or any data prepared.

Layouts (see data/collate.py for how each is built):
- padded: the micro-batch's rows right-padded to the longest, with an attention mask.
- packed: packed rows kept as rows; documents told apart by restarting position_ids (sdpa / eager).
- joined: the micro-batch's rows joined into one sequence (FlashAttention's varlen kernel reads position_ids only
  for a batch of one row).
- rows: padding-free on sdpa / eager: each row is a micro-batch of its own, run one after another; no padding and
  no attention across rows. The update is the padded batch's: the loss is normalised per optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from sftune.config import SFTConfig, eval_rows_packed
from sftune.errors import ConfigError

Layout = Literal["padded", "packed", "joined", "rows"]
Engine = Literal["single", "ddp", "fsdp", "deepspeed"]


@dataclass(frozen=True)
class BatchingPlan:
    layout: Layout
    padding_free: bool  # resolved: as set, or chosen for this machine when unset
    padding_free_chosen: bool  # padding_free was unset in the config, so this plan chose it
    micro_batch_rows: int  # rows in one micro-batch of one process (before the `rows` layout splits it)
    gradient_accumulation_steps: int
    num_processes: int
    engine: Engine
    device_type: str
    pad_to_multiple_of: int | None = None  # each micro-batch's sequence length rounded up to a multiple of this
    eval_layout: Layout | None = None  # evaluation's layout where it differs (packed eval rows): see plan_batching

    @property
    def rows_per_micro_step(self) -> int:
        """Rows of one micro-batch across every process."""
        return self.micro_batch_rows * self.num_processes

    @property
    def rows_per_step(self) -> int:
        """Rows of one optimizer step across every micro-batch and process."""
        return self.rows_per_micro_step * self.gradient_accumulation_steps

    def steps_per_epoch(self, rows: int) -> int:
        return max(1, math.ceil(rows / self.rows_per_step))

    def describe_step(self) -> str:
        """'32 rows per step (8 x 2 accumulation x 2 processes)', for the log, the card and `sftune inspect`."""
        processes = f"{self.num_processes} process{'es' if self.num_processes != 1 else ''}"
        return (f"{self.rows_per_step} rows per step ({self.micro_batch_rows} x {self.gradient_accumulation_steps} "
                f"accumulation x {processes})")

    def describe_layout(self) -> str:
        return {
            "padded": "padded batches",
            "packed": "packed rows, documents kept apart by position_ids",
            "joined": "no padding: each micro-batch joined into one sequence (varlen attention)",
            "rows": "no padding: each row runs as a micro-batch of its own",
        }[self.layout]


def plan_batching(config: SFTConfig, device_type: str, engine: Engine = "single",
                  num_processes: int = 1) -> BatchingPlan:
    """The plan for `config` on this machine. Rows with images take the same layouts (each document keeps its
    own images and positions: see data/vision_batches.py). Raises ConfigError for combinations that cannot work;
    the few that depend on the rows themselves (packing that would cut a document's images) are refused by data
    preparation, which also comes before the model loads."""
    flash = "flash" in (config.attn_implementation or "")  # flash_attention_2/3, hub flash kernels
    sharded = engine in ("fsdp", "deepspeed")
    if config.train_sampling_strategy == "group_by_length" and config.packing:
        raise ConfigError("config keys 'train_sampling_strategy' = 'group_by_length' and 'packing' are both set: "
                          "packed rows are all max_length long, so there is nothing to group; keep one of them")
    chosen = config.padding_free is None
    padding_free = _default_padding_free(config, flash, device_type, sharded) if chosen \
        else bool(config.padding_free)
    if padding_free and flash:
        layout: Layout = "joined"
    elif padding_free:
        layout = "rows"
    elif config.packing:
        layout = "joined" if flash else "packed"
    else:
        layout = "padded"
    if layout == "rows" and sharded:
        raise ConfigError(
            f"padding_free on {config.attn_implementation or 'sdpa'} attention runs each row as its own forward, "
            f"but under {engine.upper()} every process must run the same number of forwards: set "
            "attn_implementation: flash_attention_2, use packing instead, or set padding_free: false")
    eval_layout = layout
    if eval_rows_packed(config) and layout == "padded":  # packed eval rows need documents kept apart
        eval_layout = "joined" if flash else "packed"
    return BatchingPlan(layout, padding_free, chosen, config.per_device_train_batch_size,
                        config.gradient_accumulation_steps, num_processes, engine, device_type,
                        config.pad_to_multiple_of, eval_layout)


def _default_padding_free(config: SFTConfig, flash: bool, device_type: str, sharded: bool) -> bool:
    """Unset padding_free is on wherever it is the faster way to the same update: with FlashAttention (one joined
    row, varlen kernel), and on CPU, where a padded position costs as much as a real one and keeps its activations
    for backward. Off with packing (rows are full already), for sdpa/eager on a GPU (rows one at a time would
    underfeed it) and under FSDP/DeepSpeed (every process must run the same number of forwards)."""
    if config.packing:
        return False
    if flash:
        return True
    return device_type == "cpu" and not sharded
