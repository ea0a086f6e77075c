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


# Keys another tool may bring that are not TRL's, with what to do instead.
NOT_SUPPORTED = {
    "push_to_hub_token": "a token in the config would be saved with the run: set HF_TOKEN or run `hf auth login`",
}
