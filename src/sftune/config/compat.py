"""Other tools' names for sftune's settings: aliases that are mapped (with their value converted where the meaning
moved, as warmup_ratio into a float warmup_steps), and the few non-TRL keys refused with what to do instead. TRL's
own keys, all 163 of them, are in config/trl.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sftune.errors import ConfigError


def _ratio(name: str) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        from sftune.config.fields import coerce

        ratio = coerce(name, value, float)
        if not 0.0 <= ratio < 1.0:
            raise ConfigError(f"config key '{name}' = {value!r}: must be in [0, 1)")
        return ratio if ratio > 0 else 0

    return convert


def _group_by_length(value: Any) -> str:
    from sftune.config.fields import coerce

    return "group_by_length" if coerce("group_by_length", value, bool) else "random"


def _auto_padding(value: Any) -> Any:
    # TRL's "auto" pads to a multiple of 128 on AWS Neuron only, and not at all elsewhere: sftune runs elsewhere
    return None if isinstance(value, str) and value.strip().lower() == "auto" else value


# TRL spellings of a field's value that mean one of sftune's values; converted before the field's type is checked.
TRL_FIELD_VALUES: dict[str, Callable[[Any], Any]] = {
    "pad_to_multiple_of": _auto_padding,
    # transformers: unset means the loss
    "metric_for_best_model": lambda value: "eval_loss" if value is None else value,
}


@dataclass(frozen=True)
class Alias:
    target: str
    why: str
    convert: Callable[[Any], Any] | None = None  # the alias's value in the target's terms


# Names for an sftune setting from TRL, transformers or sftune's own past; accepted and mapped, so older files run.
ALIASES: dict[str, Alias] = {
    "max_seq_length": Alias("max_length", "TRL before 0.20"),
    "torch_dtype": Alias("dtype", "transformers before 5"),
    "warmup_ratio": Alias("warmup_steps", "transformers before 5: a float warmup_steps below 1 is the ratio now",
                          _ratio("warmup_ratio")),
    "group_by_length": Alias("train_sampling_strategy", "transformers before 5",
                             _group_by_length),
    "gradient_checkpointing": Alias("activation_checkpointing", "transformers 5 renamed it"),
    "gradient_checkpointing_kwargs": Alias("activation_checkpointing_kwargs", "transformers 5 renamed it"),
}


# Keys of TRL's command line (and its YAML files) that go to `accelerate launch`, not to the trainer. `sftune train`
# takes them the same way: N data-parallel processes, an accelerate config file or one of TRL's named ones, and
# `env`, environment variables set before anything loads (TRL's example config shows CUDA_VISIBLE_DEVICES).
LAUNCH_KEYS = ("num_processes", "accelerate_config", "env")
TRL_ACCELERATE_CONFIGS = ("single_gpu", "multi_gpu", "zero1", "zero2", "zero3", "fsdp1", "fsdp2")


def check_launch_value(key: str, value: Any) -> Any:
    """A launch key's value, checked: a whole number of processes >= 1, or a named or existing accelerate config."""
    from pathlib import Path

    from sftune.config.fields import coerce

    if key == "env":
        if not isinstance(value, dict) or not all(isinstance(v, (str, int, float, bool)) for v in value.values()):
            raise ConfigError(f"config key 'env' = {value!r}: expected a mapping of variable: value")
        return {str(name): str(v).lower() if isinstance(v, bool) else str(v) for name, v in value.items()}
    if key == "num_processes":
        number = coerce(key, value, int)
        if number < 1:
            raise ConfigError(f"config key 'num_processes' = {value!r}: must be >= 1")
        return number
    name = coerce(key, value, str)
    if name not in TRL_ACCELERATE_CONFIGS and not Path(name).expanduser().is_file():
        raise ConfigError(f"config key 'accelerate_config' = {name!r}: not an accelerate config file, nor one of "
                          f"TRL's named configs ({', '.join(TRL_ACCELERATE_CONFIGS)})")
    return name


# Keys another tool may bring that are not TRL's, with what to do instead.
NOT_SUPPORTED = {
    "push_to_hub_token": "a token in the config would be saved with the run: set HF_TOKEN or run `hf auth login`",
}
