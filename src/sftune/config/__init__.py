"""One schema for every setting: defaults, meaning, validation, and the three ways in (Python, YAML, CLI flags).

Field names follow TRL's SFTConfig / ModelConfig / ScriptArguments where the meaning is the same, so a TRL
user's YAML mostly runs as-is. The settings are grouped, a module per group (model, adapters, data, training,
evaluation, checkpoints, output and Hub); `schema` composes them into SFTConfig, `compat` holds other tools' names,
`files` reads and writes YAML. This package is the ground floor: it imports nothing else from sftune but errors.
"""

from sftune.config.compat import ALIASES, NOT_SUPPORTED, check_launch_value
from sftune.config.data import check_dataset_entries, data_seed_of, eval_rows_packed, loss_mask_of_flags
from sftune.config.fields import join_problems
from sftune.config.files import CONFIG_FILENAME, load_config, read_yaml, without_secrets
from sftune.config.output import HUB_MODEL_ID, TRACKERS
from sftune.config.schema import (
    RESOLVED_WHEN_UNSET,
    SFTConfig,
    changed_settings,
    field_help,
    field_is_bool,
    unknown_key_message,
)
from sftune.config.training import unset_learning_rate

__all__ = [
    "ALIASES", "check_launch_value", "CONFIG_FILENAME", "HUB_MODEL_ID", "NOT_SUPPORTED", "RESOLVED_WHEN_UNSET", "TRACKERS", "SFTConfig",
    "changed_settings", "check_dataset_entries", "data_seed_of", "eval_rows_packed", "field_help", "field_is_bool", "join_problems", "load_config",
    "loss_mask_of_flags", "read_yaml", "unknown_key_message", "unset_learning_rate", "without_secrets",
]
