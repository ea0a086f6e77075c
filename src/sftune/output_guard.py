"""Every path sftune writes is checked against what the user already has, before anything is written.

Three commands write where the user points them: `sftune train` (output_dir), `sftune merge` (--output) and
`sftune inspect` (--jsonl). None may write onto, or replace a folder above, a file the run reads (its data, model,
template, adapter or run folder), and an explicit overwrite (`overwrite_output_dir`, `--overwrite`) replaces only
what the same command wrote before: a folder that holds anything else is refused, never deleted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from sftune.errors import UserError

# Written into every folder `sftune merge` makes; `--overwrite` replaces only folders that hold it.
MERGE_MARKER = "sftune_merge.json"
# The keys of a row `sftune inspect --jsonl` writes; a file whose first line has exactly these may be replaced.
PREPARED_ROW_KEYS = {"index", "input_ids", "labels"}


def resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def refuse_overlap(output: str | Path, inputs: Iterable[tuple[str, str | Path]], option: str,
                   replaces_contents: bool = True) -> None:
    """`output` must not be anything the command reads, nor lie above it when what is there gets replaced
    (`replaces_contents`), nor lie inside a data folder (its files would become training rows of the next run)."""
    out = resolved(output)
    for what, path in inputs:
        source = resolved(path)
        if not source.exists():
            continue
        if out == source or (replaces_contents and source.is_relative_to(out)):
            relation = "is" if out == source else "holds"
            raise UserError(f"{option} '{output}' {relation} the {what} '{path}', which this command reads: "
                            f"writing there would replace it; choose another path")
        if what.startswith("dataset") and source.is_dir() and out.is_relative_to(source):
            raise UserError(f"{option} '{output}' is inside the {what} folder '{path}': its files would be read as "
                            "training data by the next run; choose a folder outside it")


def config_inputs(config) -> list[tuple[str, str]]:
    """The local paths a training config reads (Hub ids are not paths here and are skipped by refuse_overlap)."""
    from sftune.data.sources import dataset_specs

    inputs = [("model folder", config.model_name_or_path)] if config.model_name_or_path else []
    for spec in dataset_specs(config):
        if spec.path:
            inputs.append(("dataset", spec.path))
    for what, path in (("chat template", config.chat_template_path), ("adapter", config.adapter_name_or_path)):
        if path:
            inputs.append((what, path))
    return inputs


def check_overwrite_output_dir(out: Path) -> None:
    """`overwrite_output_dir: true` replaces an earlier sftune run's folder, never a folder of anything else."""
    from sftune.config import CONFIG_FILENAME

    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILENAME).is_file():
        raise UserError(f"output_dir '{out}' holds files no sftune run wrote ({_some_names(out)}): "
                        "overwrite_output_dir replaces only an earlier run's folder; choose another output_dir")


def clear_earlier_run(out: Path) -> None:
    """Remove an earlier run's files from output_dir (checked by check_overwrite_output_dir), so none of its
    checkpoints, weights or metrics can be mistaken for this run's, and a later resume continues this run."""
    import shutil

    check_overwrite_output_dir(out)
    for entry in out.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def check_merge_output(run_dir: Path, output: Path, overwrite: bool) -> None:
    """`sftune merge`: --output is a new or empty folder, or (with --overwrite) an earlier merge's output."""
    inputs = [("run folder", run_dir)]
    base = adapter_base(run_dir)
    if base:
        inputs.append(("base model folder", base))
    refuse_overlap(output, inputs, "--output")
    if output.exists() and not output.is_dir():
        raise UserError(f"--output '{output}' is a file: choose a new folder")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise UserError(f"--output '{output}' already exists and is not empty: choose a new folder, or pass "
                            "--overwrite to replace an earlier merge's output")
        if not (output / MERGE_MARKER).is_file():
            raise UserError(f"--output '{output}' holds files sftune merge did not write ({_some_names(output)}): "
                            "--overwrite replaces only an earlier merge's output; choose a new folder")


def adapter_base(run_dir: Path) -> str | None:
    """The base model an adapter names (peft writes it into adapter_config.json), read without loading torch."""
    try:
        return json.loads((run_dir / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None


def merge_marker(run_dir: Path) -> dict[str, str]:
    """The marker file a merged folder carries: where it came from, and the proof that sftune merge wrote it."""
    text = json.dumps({"merged_from": str(run_dir), "base_model": adapter_base(run_dir)}, indent=2) + "\n"
    return {MERGE_MARKER: text}


def check_jsonl_output(path: Path, config) -> None:
    """`sftune inspect --jsonl FILE`: FILE is new, or an earlier `--jsonl` output; never a data file of the run."""
    refuse_overlap(path, config_inputs(config), "--jsonl")
    if path.is_dir():
        raise UserError(f"--jsonl '{path}' is a folder: give a file name, for example {path / 'prepared.jsonl'}")
    if path.exists() and not _is_prepared_jsonl(path):
        raise UserError(f"--jsonl '{path}' already exists and is not an earlier `sftune inspect --jsonl` output: "
                        "choose a new file name")
    parent = path.parent if path.parent != Path("") else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UserError(f"--jsonl '{path}': '{parent}' is a file, not a folder: choose another path")


def _is_prepared_jsonl(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as handle:
            first = handle.readline()
        return not first or set(json.loads(first)) == PREPARED_ROW_KEYS
    except (OSError, ValueError, TypeError):
        return False


def _some_names(folder: Path, shown: int = 3) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
