"""Where rows come from: local files (json, jsonl, csv, parquet, arrow), folders of them, or the Hugging Face Hub.

Every row keeps its origin (file and row number) so that an error can name it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftune.errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")
SPLIT_NAMES = ("train", "test", "validation", "valid", "eval", "dev")


@dataclass
class SourceRows:
    """The rows of one dataset split, and where each came from."""

    name: str
    rows: list[dict[str, Any]]
    origins: list[tuple[str, int]]  # (file or dataset id, 1-based row within it) per row

    def where(self, index: int) -> str:
        origin, row = self.origins[index]
        return f"{origin} row {row}"


def load_source(name: str, split: str = "train", config_name: str | None = None) -> SourceRows:
    """Read one dataset split. A path that exists is read locally; anything else is a Hub dataset id."""
    path = Path(name).expanduser()
    if path.is_file():
        return _from_files(name, [path])
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return _from_saved_dataset(name, path, split)
        return _from_files(name, _files_for_split(path, split))
    if path.suffix.lower() in LOCAL_SUFFIXES or name.startswith((".", "/", "~")):
        raise DataError(f"dataset '{name}' does not exist: check the path in dataset_name")
    return _from_hub(name, split, config_name)


def _files_for_split(folder: Path, split: str) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
    if not files:
        raise DataError(f"dataset folder '{folder}' holds no {', '.join(LOCAL_SUFFIXES)} files")
    named = {p: _split_of(p) for p in files}
    if not any(named.values()):
        return files  # no split names in file names: the whole folder is one split
    chosen = [p for p, s in named.items() if s == split]
    if not chosen:
        found = sorted({s for s in named.values() if s})
        raise DataError(
            f"dataset folder '{folder}' has no files for split '{split}' (found splits: {', '.join(found)}); "
            "set dataset_train_split"
        )
    return chosen


def _split_of(path: Path) -> str | None:
    stem = path.name.split(".")[0].lower()
    for part in (stem, path.parent.name.lower()):
        for split in SPLIT_NAMES:
            if part == split or part.startswith((split + "-", split + "_")):
                return split
    return None


def _from_files(name: str, files: list[Path]) -> SourceRows:
    suffixes = {p.suffix.lower() for p in files}
    if len(suffixes) > 1:
        raise DataError(f"dataset '{name}' mixes file types ({', '.join(sorted(suffixes))}): keep one type per dataset")
    rows: list[dict[str, Any]] = []
    origins: list[tuple[str, int]] = []
    for path in files:
        file_rows = _read_file(path)
        rows.extend(file_rows)
        origins.extend((str(path), i + 1) for i in range(len(file_rows)))
    if not rows:
        raise DataError(f"dataset '{name}' is empty: no rows in {', '.join(str(p) for p in files)}")
    return SourceRows(name, rows, origins)


def _read_file(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_json_lines(path)
    if suffix == ".json":
        return _read_json_document(path)
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return [dict(row) for row in csv.DictReader(handle)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".arrow":
        from datasets import Dataset

        return Dataset.from_file(str(path)).to_list()
    raise DataError(f"'{path}': unsupported file type '{suffix}' (use one of {', '.join(LOCAL_SUFFIXES)})")


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_json_document(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one object per line in a .json file
            return _read_json_lines(path)
        raise DataError(f"{path} line {err.lineno}: malformed JSON ({err.msg})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} style
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise DataError(f"{path}: expected a list of JSON objects (or one object per line)")
    return data


def _from_saved_dataset(name: str, path: Path, split: str) -> SourceRows:
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        if split not in data:
            raise DataError(f"dataset '{name}' has no split '{split}' (splits: {', '.join(data)})")
        data = data[split]
    rows = data.to_list()
    return SourceRows(name, rows, [(name, i + 1) for i in range(len(rows))])


def _from_hub(name: str, split: str, config_name: str | None) -> SourceRows:
    import datasets

    try:
        data = datasets.load_dataset(name, config_name, split=split)
    except ValueError as err:
        if "split" in str(err).lower():
            raise DataError(f"Hub dataset '{name}' has no split '{split}': set dataset_train_split") from None
        raise DataError(f"could not load Hub dataset '{name}': {err}") from None
    except Exception as err:  # network, authentication, missing repository: all end the same way for the user
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"dataset '{name}' is not a local file or folder, and loading it from the Hugging Face Hub failed "
            f"({first_line}); check the name, your network, or pass a local path"
        ) from None
    rows = data.to_list()
    return SourceRows(name, rows, [(f"{name}[{split}]", i + 1) for i in range(len(rows))])
