"""SFTConfig: every group's settings in one dataclass, resolved and checked as a whole.

The groups live in their own modules (model, adapters, data, training, evaluation, checkpoints, output and Hub);
SFTConfig inherits them all. A dataclass lists inherited fields from the last base to the first, so the bases are
written in reverse of the order `--help` shows them.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from sftune.config.adapters import AdapterSettings
from sftune.config.checkpoints import CheckpointSettings
from sftune.config.compat import ALIASES, LAUNCH_KEYS, NOT_SUPPORTED, TRL_FIELD_VALUES, check_launch_value
from sftune.config.trl import TRL_KEY, accepts_as_no_op, refusal
from sftune.config.data import DataSettings, loss_mask_of_flags
from sftune.config.evaluation import EvaluationSettings
from sftune.config.fields import (
    SEE_HELP,
    Problems,
    coerce,
    default_of,
    join_problems,
    type_label,
)
from sftune.config.model import ModelSettings
from sftune.config.output import HubSettings, OutputSettings
from sftune.config.training import TrainingSettings, unset_learning_rate
from sftune.errors import ConfigError, did_you_mean


@dataclass(init=False)
class SFTConfig(HubSettings, OutputSettings, CheckpointSettings, EvaluationSettings, TrainingSettings,
                DataSettings, AdapterSettings, ModelSettings):
    """Everything that defines a run. Build it in Python, from a YAML file, or from CLI flags: the same schema.

    Every way in takes the same keys: sftune's fields, their aliases (warmup_ratio, group_by_length,
    gradient_checkpointing, ...) and all of TRL's keys (config/trl.py), so `SFTConfig(**trl_settings)` behaves as
    the same settings in a YAML file. Keys TRL has that mean nothing here are kept in `ignored_keys`.
    """

    def __init__(self, **values: Any) -> None:
        resolved, self.ignored_keys, self.launch_settings, problems = resolve_keys(values)
        if problems:
            raise ConfigError(join_problems(problems))
        for f in dataclasses.fields(self):
            setattr(self, f.name, resolved[f.name] if f.name in resolved else default_of(f))
        self.__post_init__()

    # Older names, still read by callers written against them.
    @property
    def gradient_checkpointing(self) -> bool:
        return self.activation_checkpointing

    @property
    def gradient_checkpointing_kwargs(self) -> dict | None:
        return self.activation_checkpointing_kwargs

    @property
    def group_by_length(self) -> bool:
        return self.train_sampling_strategy == "group_by_length"

    def __post_init__(self) -> None:
        hints = type_hints()
        problems = []  # every mistyped key at once, not one per run
        for f in dataclasses.fields(self):
            try:
                setattr(self, f.name, coerce(f.name, getattr(self, f.name), hints[f.name]))
            except ConfigError as err:
                problems.append(str(err))
        if problems:
            raise ConfigError(join_problems(problems))
        # Resolved here, so the saved config holds the value used and repeats the run as it was.
        self.learning_rate_is_default = self.learning_rate is None
        if self.learning_rate is None:
            self.learning_rate = unset_learning_rate(self.use_peft)
        if self.resume_from_checkpoint is False:
            self.resume_from_checkpoint = None
        if self.loss_type == "chunked_nll":  # TRL's older name: sftune's nll is chunked
            self.loss_type = "nll"
        if self.datasets == []:  # TRL's default: no mixture
            self.datasets = None
        if self.skips_preparation:  # TRL's skip_prepare_dataset: pre-tokenized rows, used as they are
            self.dataset_format = "tokenized" if self.dataset_format == "auto" else self.dataset_format
        self.loss_mask = self._resolved_loss_mask()
        found = Problems(self)  # every value out of range and every conflict at once
        for check in (self._check_model, self._check_adapters, self._check_data, self._check_training,
                      self._check_evaluation, self._check_checkpoints, self._check_output, self._check_hub):
            check(found)
        found.raise_any()

    def check_ready_to_train(self, dataset_given: bool = False) -> None:
        """The keys a training run cannot do without; checked at train time, so a partial config can be built."""
        if self.model_name_or_path is None:
            raise ConfigError("missing required key 'model_name_or_path': set it in the YAML file or with "
                              "--model_name_or_path")
        if not dataset_given and self.dataset_name is None and not self.datasets:
            raise ConfigError("missing required key 'dataset_name': set it (or 'datasets') in the YAML file "
                              "or with --dataset_name")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> SFTConfig:
        """Build from a plain mapping (parsed YAML, CLI flags); unknown keys get a did-you-mean error."""
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: expected a mapping of key: value, got {type(values).__name__}")
        problems = resolve_keys(values)[-1]
        if problems:
            raise ConfigError(f"{where}: {join_problems(problems)}")
        return cls(**{str(key): value for key, value in values.items()})

    def save(self, path: Any) -> None:
        """Write the resolved config as YAML that `sftune train <path>` runs again, atomically (sftune.config.files)."""
        from sftune.config.files import save_config

        save_config(self, path)


_HINTS: dict[str, Any] = {}


def field_names() -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(SFTConfig))


def resolve_keys(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], list[str]]:
    """(field values, ignored TRL keys, launch keys, problems) of a mapping of keys: every bad key of a file at
    once, so that a TRL config is cleared in one run, not one per key. A field wins over the TRL table (so a not-yet
    key becomes a field when a merge adds it); then aliases (converted); then TRL's launch keys and its other keys
    (config/trl.py)."""
    fields = field_names()
    resolved: dict[str, Any] = {}
    spelled: dict[str, str] = {}  # field -> the key that gave it
    ignored: dict[str, Any] = {}
    launch: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in values.items():
        key, name = str(key), str(key)
        if key in fields:
            value = TRL_FIELD_VALUES[key](value) if key in TRL_FIELD_VALUES else value
        elif key in ALIASES:
            alias = ALIASES[key]
            name = alias.target
            if alias.convert is not None:
                try:
                    value = alias.convert(value)
                except ConfigError as err:
                    problems.append(str(err))
                    continue
        elif key in LAUNCH_KEYS:
            try:
                launch[key] = check_launch_value(key, value)
            except ConfigError as err:
                problems.append(str(err))
            continue
        elif key in TRL_KEY:
            row = TRL_KEY[key]
            if row.status != "field" and accepts_as_no_op(row, value):
                if row.status == "inert":
                    ignored[key] = value
            else:
                problems.append(refusal(row, value))
            continue
        else:
            problems.append(unknown_key_message(key))
            continue
        if name in resolved:
            problems.append(f"key '{name}' is given twice (as '{spelled[name]}' and as '{key}'): keep one of them")
        else:
            resolved[name], spelled[name] = value, key
    return resolved, ignored, launch, problems


def type_hints() -> dict[str, Any]:
    """Every field's type, evaluated once."""
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(SFTConfig))
    return _HINTS


def unknown_key_message(key: str) -> str:
    """What to say about a key the schema does not have: not supported (and what instead), a close key, or --help."""
    if key in NOT_SUPPORTED:
        return f"key '{key}' is not supported: {NOT_SUPPORTED[key]}"
    if key in TRL_KEY and TRL_KEY[key].status == "refused":
        return f"key '{key}' is not supported: {TRL_KEY[key].note}"
    names = [f.name for f in dataclasses.fields(SFTConfig)] + list(ALIASES)
    hint = did_you_mean(key, names)
    for name, alias in ALIASES.items():  # suggest the field an alias stands for
        hint = hint.replace(f"'{name}'", f"'{alias.target}'")
    return f"unknown key '{key}'{hint or SEE_HELP}"


# Settings the schema fills in when they are unset, from the others: what "unset" resolves to for a config.
RESOLVED_WHEN_UNSET = {
    "learning_rate": lambda config: unset_learning_rate(config.use_peft),
    "loss_mask": lambda config: loss_mask_of_flags(config) or "completion",
}


def changed_settings(config: SFTConfig) -> list[tuple[str, Any]]:
    """(name, value) of every setting that differs from its default as `sftune train --help` shows it, in schema
    order. A setting the schema fills in when unset (learning_rate, loss_mask) differs only when it is not what
    unset gives."""
    changed = []
    for _, name, default, _, _ in field_help():
        value = getattr(config, name)
        if name in RESOLVED_WHEN_UNSET:
            default = RESOLVED_WHEN_UNSET[name](config)
        if value != default:
            changed.append((name, value))
    return changed


def field_help() -> list[tuple[str, str, Any, str, str]]:
    """(group, name, default, type label, help) for every field, in schema order: what `--help` prints."""
    hints = type_hints()
    return [(f.metadata["group"], f.name, default_of(f), type_label(hints[f.name]), f.metadata["help"])
            for f in dataclasses.fields(SFTConfig)]


def field_is_bool(name: str) -> bool:
    """A flag that may stand alone on the command line (`--bf16` for `--bf16 true`): bool, or bool | None."""
    return type_hints()[name] in (bool, bool | None)
