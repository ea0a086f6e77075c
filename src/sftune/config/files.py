"""The config on disk: read a YAML file with CLI overrides on top, and write the resolved config that repeats the
run, without credentials."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from sftune.config.compat import ALIASES
from sftune.config.schema import SFTConfig
from sftune.errors import ConfigError

CONFIG_FILENAME = "sftune_config.yaml"

# Keys that hold credentials (a Hub token, a tracker key), at any depth (model_init_kwargs: {token: ...}):
# never written to a saved config. Tokenizer keys such as eos_token are settings, not secrets.
_SECRET_KEY = re.compile(r"^(token|use_auth_token|hub_token|.*api_key|.*secret.*|.*password.*|.*access_token)$",
                         re.IGNORECASE)


def without_secrets(values: Any) -> Any:
    """`values` with every credential key removed, for writing to disk."""
    if isinstance(values, dict):
        return {k: without_secrets(v) for k, v in values.items() if not _SECRET_KEY.match(str(k))}
    if isinstance(values, list):
        return [without_secrets(v) for v in values]
    return values


def save_config(config: SFTConfig, path: str | Path) -> None:
    """Write the resolved config as YAML that `sftune train <path>` runs again, atomically.

    Continuing this run's own checkpoints (resume_from_checkpoint true, or a checkpoint in output_dir) is how the
    run was carried on, not what the run is: it is saved unset, so the file repeats the run from its start.
    A checkpoint of another run stays: this run started from it.
    """
    path = Path(path)
    values = config.to_dict()
    resume = values["resume_from_checkpoint"]
    if resume is True or (isinstance(resume, str) and _inside(Path(resume), Path(config.output_dir))):
        values["resume_from_checkpoint"] = None
    text = "# sftune resolved config: `sftune train " + path.name + "` repeats this run\n"
    text += yaml.safe_dump(without_secrets(values), sort_keys=False, allow_unicode=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.expanduser().resolve().is_relative_to(folder.expanduser().resolve())
    except OSError:
        return False


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> SFTConfig:
    """Defaults, then the YAML file at `path`, then `overrides` (CLI flags): the resolved config."""
    values: dict[str, Any] = {}
    if path is not None:
        values = read_yaml(Path(path))
    where = str(path) if path is not None else "config"
    for key, value in (overrides or {}).items():
        name = ALIASES[key].target if key in ALIASES else key
        # A flag replaces the file's value even when the file spelled the key by another name.
        for other in [name, *(alias for alias, rule in ALIASES.items() if rule.target == name)]:
            values.pop(other, None)
        values[key] = value
    return SFTConfig.from_dict(values, where=where)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping: plain YAML keeps the last silently, so the run would
    use a value the user may think they replaced."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{self.name} line {key_node.start_mark.line + 1}: key '{key}' is given twice "
                                  f"(first on line {seen[key] + 1}): keep one of them")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}): save the config file as UTF-8") from None
    try:
        loader = _UniqueKeyLoader(text)
        loader.name = str(path)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level, got {type(data).__name__}")
    return data
