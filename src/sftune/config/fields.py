"""The building blocks of the schema: a field with its help and group, one coercion of values from YAML, CLI
flags and Python into a field's type, the label `--help` shows for a type, and the collector of problems that lets
every group's checks report all their findings in one line."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import field
from typing import Any, Literal

from sftune.errors import ConfigError, did_you_mean

SEE_HELP = " (see `sftune train --help`)"


def opt(default: Any, help: str, group: str) -> Any:
    """A config field: its default, its `--help` text and the `--help` group it is listed under."""
    metadata = {"help": help, "group": group}
    if isinstance(default, (list, dict)):  # each config gets its own copy of a mutable default
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def steps_of(value: int | float, total_steps: int) -> int:
    """A steps setting as a count: a whole number as it is; a float in (0, 1) as that ratio of the run's total
    steps, rounded up as transformers does (computed on a rounded product, so 0.1 of 30 steps is 3, not 4)."""
    if isinstance(value, float) and 0.0 < value < 1.0:
        return max(1, math.ceil(round(value * total_steps, 6)))
    return int(value)


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def join_problems(problems: list[str]) -> str:
    """One line for one problem or several: `3 problems: a; b; c`, with the pointer to --help said once."""
    if len(problems) == 1:
        return problems[0]
    see_help = any(problem.endswith(SEE_HELP) for problem in problems)
    trimmed = [problem.removesuffix(SEE_HELP) for problem in problems]
    return f"{len(problems)} problems: " + "; ".join(trimmed) + (SEE_HELP if see_help else "")


class Problems:
    """What is wrong with a config, gathered over every group's checks, then raised as one line."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.found: list[str] = []

    def need(self, ok: bool, key: str, rule: str) -> None:
        """A rule on one key's value: `config key 'key' = value: rule` when it does not hold."""
        if not ok:
            self.found.append(f"config key '{key}' = {getattr(self.config, key)!r}: {rule}")

    def add(self, problem: str) -> None:
        self.found.append(problem)

    def raise_any(self) -> None:
        if self.found:
            raise ConfigError(join_problems(self.found))


# ---------------------------------------------------------------- types: one coercion for YAML, CLI and Python

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


# Keys that name a local path (or a Hub id): `$VAR` and `${VAR}` in them are expanded as a shell would.
PATH_KEYS = {"model_name_or_path", "dataset_name", "output_dir", "chat_template_path", "adapter_name_or_path",
             "resume_from_checkpoint"}
# Lists of free text: one string given for them is one item, though it holds commas.
WHOLE_TEXT_LISTS = {"generation_prompts"}


def expand_variables(key: str, value: Any) -> Any:
    """`$HOME/data`, `${RUN}/out` in a path: expanded; an unset variable is an error, not a folder named '$RUN'."""
    if not isinstance(value, str) or "$" not in value:
        return value
    for name in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", value):
        if name not in os.environ:
            raise ConfigError(f"config key '{key}' = {value!r}: environment variable ${name} is not set: set it, "
                              "or write the path out")
    return os.path.expandvars(value)


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Turn a value from YAML (typed) or a CLI flag (text) into the field's type, or say clearly why not."""
    if key in PATH_KEYS:
        value = expand_variables(key, value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~", "")):
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(key, value, inner[0] if len(inner) == 1 else typing.Union[tuple(inner)])
    if origin in (typing.Union, types.UnionType) and set(args) == {int, float}:  # steps, or a ratio of them
        number = coerce(key, value, float)
        if number.is_integer():
            return int(number)
        if not 0.0 < number < 1.0:
            raise ConfigError(f"config key '{key}' = {value!r}: expected a whole number of steps, or a ratio of the "
                              "total steps in (0, 1)")
        return number
    if origin in (typing.Union, types.UnionType) and set(args) == {bool, str}:  # a switch or a path
        if isinstance(value, bool) or (isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE):
            return coerce(key, value, bool)
        return coerce(key, value, str)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        if isinstance(value, bool):  # YAML reads an unquoted `no` (also off, false) as false; the choice is meant
            spelled = [word for word in (("true", "yes", "on") if value else ("false", "no", "off")) if word in args]
            if spelled:
                return spelled[0]
        hint_text = did_you_mean(str(value), [str(a) for a in args])
        raise ConfigError(
            f"config key '{key}' = {value!r}: expected one of {', '.join(map(str, args))}{hint_text}"
        )
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"config key '{key}' = {value!r}: expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    number = float(value)
                    if number.is_integer():
                        return int(number)
                except ValueError:
                    pass
        raise ConfigError(f"config key '{key}' = {value!r}: expected a whole number")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:  # YAML reads `1e-4` (no dot) as text, so numbers arrive as strings from files too
                number = float(value.strip())
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"config key '{key}' = {value!r}: expected a number")
        if not math.isfinite(number):  # .inf / .nan pass every range check written as a comparison
            raise ConfigError(f"config key '{key}' = {value!r}: expected a finite number")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' = {value!r}: expected text")
    if origin is list:
        if isinstance(value, str) and value.strip().startswith("["):
            try:  # a JSON list on the command line, e.g. --datasets '[{"path": "a.jsonl"}]'
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(f"config key '{key}': not a valid JSON list") from None
        if isinstance(value, str) and key in WHOLE_TEXT_LISTS:
            value = [value]
        elif isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a list")
        return [coerce(f"{key}[{i}]", item, args[0]) for i, item in enumerate(value)] if args else value
    if origin is dict or hint is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(f"config key '{key}': expected a mapping (JSON on the command line)") from None
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a mapping")
        return value
    raise TypeError(f"no coercion for field {key} of type {hint}")  # a schema bug, not a user error


def type_label(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return type_label(inner[0]) if len(inner) == 1 else type_label(typing.Union[tuple(inner)])
    if set(args) == {int, float}:
        return "STEPS|RATIO"
    if set(args) == {bool, str}:
        return "BOOL|PATH"
    if args:
        return "VALUE"
    if hint is bool:
        return "BOOL"
    if hint is int:
        return "INT"
    if hint is float:
        return "FLOAT"
    if origin is list:
        return "LIST"
    if origin is dict:
        return "JSON"
    return "TEXT"

