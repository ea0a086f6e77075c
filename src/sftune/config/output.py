"""The output group: where the run writes, what it logs and to which trackers; and the Hub, where the result
is pushed when training ends."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sftune.config.fields import Problems, opt

TRACKERS = ("none", "all", "tensorboard", "wandb", "trackio")
_HUB_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
HUB_MODEL_ID = re.compile(rf"^(?:{_HUB_NAME}/)?{_HUB_NAME}$")


@dataclass
class OutputSettings:
    output_dir: str = opt("trainer_output", "Folder for the trained model, metrics and the resolved config.", "output")
    overwrite_output_dir: bool = opt(
        False, "Replace an earlier sftune run in output_dir: its files are removed when this run starts (a folder "
        "holding anything else is refused).", "output"
    )
    logging_steps: int | float = opt(
        10, "Write a line to metrics.jsonl every this many optimizer steps, or a float in (0, 1) for that ratio of "
        "the total steps.", "output"
    )
    report_to: list[str] = opt(
        ["none"], "Trackers besides metrics.jsonl: tensorboard, wandb, trackio, all, or none.", "output"
    )
    run_name: str | None = opt(None, "Run name shown in trackers (unset: the output_dir's name).", "output")

    # TRL training keys (issue 15)
    logging_first_step: bool = opt(False, "Also log the first optimizer step (besides every logging_steps).", "output")

    def _check_output(self, problems: Problems) -> None:
        problems.need(bool(self.output_dir), "output_dir", "must be a folder path")
        problems.need(self.logging_steps > 0, "logging_steps", "must be >= 1, or a ratio of the total steps in (0, 1)")
        problems.need(all(tracker in TRACKERS for tracker in self.report_to), "report_to",
                      f"each entry must be one of {', '.join(TRACKERS)}")
        if "none" in self.report_to and len(self.report_to) > 1:
            problems.add(f"config key 'report_to' = {self.report_to!r}: 'none' cannot be combined with trackers")


@dataclass
class HubSettings:
    """Push the result when training ends. No token field: the token comes from HF_TOKEN or the `hf auth login`
    file, so that it is never saved with the run."""

    push_to_hub: bool = opt(
        False,
        "When training ends, upload the model or adapter, tokenizer, model card, loss plot, metrics and config to "
        "the Hugging Face Hub (token: HF_TOKEN or `hf auth login`; checkpoints are not uploaded).",
        "hub",
    )
    hub_model_id: str | None = opt(
        None, "Hub repository to push to: 'name' (under your account) or 'owner/name' (unset: the output_dir's "
        "folder name under your account).", "hub",
    )
    hub_private_repo: bool | None = opt(
        None, "Create the Hub repository as private (true) or public (false); unset: the Hub's default.", "hub"
    )

    def _check_hub(self, problems: Problems) -> None:
        name = self.hub_model_id
        if name is not None and (not HUB_MODEL_ID.match(name) or len(name.split("/")[-1]) > 96
                                 or ".." in name or "--" in name or name.endswith(".git")):
            problems.add(
                f"config key 'hub_model_id' = {name!r}: expected 'name' or 'owner/name' (letters, digits, '-', '_', "
                "'.'; no '--' or '..'; at most 96 characters)"
            )
