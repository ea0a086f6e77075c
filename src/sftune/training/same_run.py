"""A resume continues the same run: settings that change what is trained must be the checkpoint's.

Every checkpoint holds the resolved config of the run that wrote it (sftune_config.yaml). Resuming compares it
with the config given now, before the model loads. A difference in anything that changes training (data, model,
adapters, batch, optimizer, schedule, loss) is refused with the list of differences: mixing two runs' settings
would train neither. A few settings only change how long the run goes on or what it reports; those may differ
with `resume_allow_changes: true`, and each is logged. Settings that never touch training are not compared.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from sftune.errors import UserError

log = logging.getLogger("sftune")

# Where the run is written, how fast the machine works, where it is reported: never part of what is trained.
NOT_COMPARED = {"resume_from_checkpoint", "output_dir", "overwrite_output_dir", "resume_allow_changes",
                "num_threads", "dataset_num_proc", "report_to", "run_name", "push_to_hub", "hub_model_id",
                "hub_private_repo"}
# How long the run goes on, how often it logs, saves and evaluates: allowed to differ by resume_allow_changes.
# More steps (or epochs) stretch the learning-rate schedule from here on; that is the user's explicit choice.
SAFE_TO_CHANGE = {"max_steps", "num_train_epochs", "logging_steps", "save_strategy", "save_steps",
                  "save_total_limit", "eval_strategy", "eval_steps", "per_device_eval_batch_size",
                  "generation_prompts", "generation_max_new_tokens", "on_nonfinite_loss"}


def check_same_run(config: Any, checkpoint: Path) -> None:
    """Refuse to resume `checkpoint` with settings that differ from its run's (see the module's docstring)."""
    from sftune.config import CONFIG_FILENAME
    from sftune.config.files import without_secrets

    saved_file = checkpoint / CONFIG_FILENAME
    if not saved_file.is_file():
        return  # written by a version that did not keep the config with each checkpoint: nothing to compare
    try:
        saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raise UserError(f"checkpoint '{checkpoint}': its {CONFIG_FILENAME} cannot be read: resume from an earlier "
                        "checkpoint, or start a new run") from None
    keep_run_precision(config, saved)  # before the comparison: an unset precision is the run's, not a change
    # the values as they would be saved now, so both sides went through the same YAML round trip
    now = yaml.safe_load(yaml.safe_dump(without_secrets(config.to_dict()), sort_keys=False, allow_unicode=True))
    differences = {key: (saved[key], now[key]) for key in saved.keys() & now.keys()
                   if key not in NOT_COMPARED and saved[key] != now[key]}
    refused = {k: v for k, v in differences.items() if k not in SAFE_TO_CHANGE or not config.resume_allow_changes}
    if refused:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in sorted(refused.items()))
        unsafe = [k for k in refused if k not in SAFE_TO_CHANGE]
        way_out = ("start a new run (another output_dir) to train with them" if unsafe else
                   "set resume_allow_changes: true to continue with them")
        raise UserError(f"resuming {checkpoint} with settings that differ from its run ({listed}): use the "
                        f"checkpoint's settings, or {way_out}")
    for key, (old, new) in sorted(differences.items()):
        log.warning("resuming with %s changed from %r to %r (resume_allow_changes)", key, old, new)


def keep_run_precision(config: Any, saved: dict[str, Any]) -> None:
    """A resumed run whose config leaves the precision unset (bf16, fp16, bf16_weights) continues in the one its
    run chose for its machine, which the checkpoint's config holds resolved: a resume is the same run, also on
    another machine (sftune/precision.py)."""
    if config.bf16 is not None or config.fp16 or config.bf16_weights is not None:
        return
    if isinstance(saved, dict) and isinstance(saved.get("bf16"), bool):
        config.bf16, config.fp16 = saved["bf16"], saved.get("fp16") is True
