"""Where rows come from: local files (json, jsonl, csv, parquet, arrow), folders of them, the Hugging Face Hub,
or a `datasets.Dataset` / list of dicts handed to the Python API; and how several sources are mixed.

Every row keeps its origin (file and row number) so that an error can name it. Every source has a fingerprint
of its content (the bytes of its files, or the Hub dataset's own fingerprint) for the prepared-data cache.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sftune.config import SFTConfig
from sftune.data.images import fingerprint_default
from sftune.errors import ConfigError, DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")
SPLIT_NAMES = ("train", "test", "validation", "valid", "eval", "dev")


@dataclass
class SourceRows:
    """The rows of one dataset split (or of one shard of it: then `offset` is its first row's number in the
    split), and where each came from."""

    name: str
    rows: list[dict[str, Any]]
    origins: Any  # (file or dataset id, 1-based row within it) per row of the split: a list, or Origins
    offset: int = 0

    def where(self, index: int) -> str:
        origin, row = self.origins[self.offset + index]
        return f"{origin} row {row}"


class Origins:
    """Where each row of a split came from, in a few bytes per file (not per row): row i lies in the last file
    that starts at or before it."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.starts: list[int] = []

    def add(self, name: str, start: int) -> None:
        if not self.names or self.names[-1] != name:
            self.names.append(name)
            self.starts.append(start)

    def __getitem__(self, index: int) -> tuple[str, int]:
        k = bisect.bisect_right(self.starts, index) - 1
        return self.names[k], index - self.starts[k] + 1


@dataclass
class DatasetSpec:
    """One training source: a path or Hub id from the config, or data handed to the Python API."""

    label: str  # how messages and stats name it
    path: str | None = None
    subset: str | None = None  # Hub configuration name
    split: str = "train"
    test_split: str | None = None
    weight: float | None = None
    fraction: float | None = None  # TRL's share of the mixture, taken as the source's first rows
    columns: dict[str, str] | list[str] | None = None
    format: str = "auto"
    data: Any = None  # a datasets.Dataset or a list of dicts (Python API)
    data_dir: str | None = None  # TRL / load_dataset's data_dir and data_files
    data_files: str | list[str] | dict[str, Any] | None = None


@dataclass
class OpenedSplit:
    """A split whose content is fingerprinted; its rows are read (only on a cache miss) in shards by `stream`,
    or all at once by `load`."""

    fingerprint: str
    batches: Callable[[], Iterator[tuple[str, list[dict[str, Any]]]]] = field(repr=False)  # (origin, rows) in order
    name: str = ""
    empty: str = ""  # why the split has no rows, for the error
    origins: Origins = field(default_factory=Origins, repr=False)  # filled as `stream` reads

    def stream(self, size: int) -> Iterator[SourceRows]:
        """The rows in shards of `size` (the last one shorter); a shard's `where` names the split's file and row."""
        self.origins = origins = Origins()
        buffer: list[dict[str, Any]] = []
        start = 0
        for origin, rows in self.batches():
            origins.add(origin, start + len(buffer))
            buffer += rows
            while len(buffer) >= size:
                yield SourceRows(self.name, buffer[:size], origins, start)
                buffer, start = buffer[size:], start + size
        if buffer:
            yield SourceRows(self.name, buffer, origins, start)
        elif not start:
            raise DataError(self.empty or f"dataset '{self.name}' is empty")

    def load(self) -> SourceRows:
        rows = [row for shard in self.stream(1 << 16) for row in shard.rows]
        return SourceRows(self.name, rows, self.origins)


def source_names(specs: list[DatasetSpec]) -> list[str]:
    """Short, unique names for metrics and logs: a local file's or folder's name without suffix, else the Hub id."""
    names: list[str] = []
    for spec in specs:
        path = Path(spec.path).expanduser() if spec.path else None
        name = (path.name.split(".")[0] or spec.label) if path is not None and path.exists() else spec.label
        unique, number = name, 1
        while unique in names:
            number += 1
            unique = f"{name}#{number}"
        names.append(unique)
    return names


def dataset_specs(config: SFTConfig, train_dataset: Any = None) -> list[DatasetSpec]:
    """The training sources this run reads, in config order."""
    if train_dataset is not None:
        if config.dataset_name is not None or config.datasets:
            raise ConfigError(
                "a train_dataset was passed to train() and the config also names a dataset "
                "(dataset_name / datasets): keep one of them"
            )
        return [DatasetSpec("train_dataset", data=train_dataset, columns=config.dataset_columns,
                            format=config.dataset_format)]
    if config.datasets:
        return [
            DatasetSpec(
                label=entry["path"], path=entry["path"], subset=entry.get("name"),
                split=entry.get("split", config.dataset_train_split),
                test_split=entry.get("test_split", config.dataset_test_split),
                weight=entry.get("weight"), fraction=entry.get("fraction"), columns=entry.get("columns"),
                format=entry.get("format", config.dataset_format), data_dir=entry.get("data_dir"),
                data_files=entry.get("data_files"),
            )
            for entry in config.datasets
        ]
    return [DatasetSpec(
        label=config.dataset_name, path=config.dataset_name, subset=config.dataset_config,
        split=config.dataset_train_split, test_split=config.dataset_test_split,
        columns=config.dataset_columns, format=config.dataset_format,
    )]


def open_split(spec: DatasetSpec, split: str) -> OpenedSplit:
    """Fingerprint one split of a source without parsing it (local files are hashed byte by byte)."""
    if spec.data is not None:
        return _open_in_memory(spec.label, spec.data)
    name = spec.path
    local = local_files_of(spec, split)
    if local is not None:
        return _open_files(name, local)
    path = Path(name).expanduser()
    if path.is_file():
        return _open_files(name, [path])
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return _open_saved_dataset(name, path, split)
        return _open_files(name, _files_for_split(path, split))
    check_dataset_path(name)
    return _open_hub(name, split, spec.subset, spec.data_dir, spec.data_files)


# load_dataset's builder names for plain files: `path: json` with `data_files: ...` reads those local files.
FILE_BUILDERS = {"json": (".jsonl", ".json"), "csv": (".csv",), "parquet": (".parquet",), "arrow": (".arrow",)}


def local_files_of(spec: DatasetSpec, split: str) -> list[Path] | None:
    """The local files a `datasets` entry's data_dir / data_files name (as load_dataset reads them), or None when
    the entry is not local: a Hub dataset with data_dir / data_files, or no such keys at all."""
    if spec.data_dir is None and spec.data_files is None:
        return None
    builder = spec.path in FILE_BUILDERS
    folder = Path(".") if builder else Path(spec.path).expanduser()
    if not builder and not folder.is_dir():
        return None  # a Hub dataset: load_dataset takes data_dir and data_files itself
    if spec.data_dir is not None:
        folder = folder / spec.data_dir
    where = f"dataset '{spec.path}'"
    if spec.data_files is None:
        if not folder.is_dir():
            raise DataError(f"{where}: data_dir '{folder}' is not a folder")
        return _files_for_split(folder, split)
    files = spec.data_files
    if isinstance(files, dict):
        if split not in files:
            raise DataError(f"{where}: data_files names no split '{split}' (splits: {', '.join(files)})")
        files = files[split]
    elif split != "train":  # load_dataset puts a file or a list of files in the train split alone
        raise DataError(f"{where}: data_files gives one split (train), so there is no '{split}' split: give "
                        "data_files as a mapping {train: ..., test: ...}, or use test_split_size")
    paths: list[Path] = []
    for pattern in [files] if isinstance(files, str) else files:
        matched = sorted(folder.glob(pattern)) if any(c in pattern for c in "*?[") else [folder / pattern]
        if not matched or not all(p.is_file() for p in matched):
            raise DataError(f"{where}: data_files '{pattern}' matches no file in '{folder}'")
        paths.extend(matched)
    return paths


def check_dataset_path(name: str) -> None:
    """A dataset named by a plainly local path (a data file's suffix, or starting with '.', '/' or '~') must exist;
    any other name may be a Hub dataset id."""
    if Path(name).expanduser().exists():
        return
    if Path(name).suffix.lower() in LOCAL_SUFFIXES or name.startswith((".", "/", "~")):
        raise DataError(f"dataset '{name}' does not exist: check the path in dataset_name")


def load_source(name: str, split: str = "train", config_name: str | None = None) -> SourceRows:
    """Read one dataset split. A path that exists is read locally; anything else is a Hub dataset id."""
    return open_split(DatasetSpec(label=name, path=name, subset=config_name), split).load()


# ---------------------------------------------------------------- opening each kind of source


def _files_for_split(folder: Path, split: str) -> list[Path]:
    # Hidden files and folders (.ipynb_checkpoints, .git, editor back-ups) hold copies, not training rows.
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
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
            "set dataset_train_split or dataset_test_split"
        )
    return chosen


def _split_of(path: Path) -> str | None:
    stem = path.name.split(".")[0].lower()
    for part in (stem, path.parent.name.lower()):
        for split in SPLIT_NAMES:
            if part == split or part.startswith((split + "-", split + "_")):
                return split
    return None


READ_BATCH = 1024  # rows read from a file at a time


def _open_files(name: str, files: list[Path]) -> OpenedSplit:
    suffixes = {p.suffix.lower() for p in files}
    if len(suffixes) > 1:
        raise DataError(f"dataset '{name}' mixes file types ({', '.join(sorted(suffixes))}): keep one type per dataset")
    digest = hashlib.blake2b(digest_size=16)
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)

    def batches() -> Iterator[tuple[str, list[dict[str, Any]]]]:
        for path in files:
            for rows in _file_batches(path):
                yield str(path), rows

    return OpenedSplit("files:" + digest.hexdigest(), batches, name,
                       f"dataset '{name}' is empty: no rows in {', '.join(str(p) for p in files)}")


def _file_batches(path: Path) -> Iterator[list[dict[str, Any]]]:
    try:
        yield from _read_batches(path)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start} of a line or the file): save it as UTF-8") from None
    except DataError:
        raise
    except Exception as err:  # pyarrow's errors for a corrupt or mislabelled parquet / arrow file
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: not a readable {path.suffix} file ({first_line}): check the file or its extension") from None


def _read_batches(path: Path) -> Iterator[list[dict[str, Any]]]:
    """The file's rows, READ_BATCH at a time (a .json document is parsed whole: JSON has no way to read part)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _batched(_json_lines(path))
    elif suffix == ".json":
        yield from _batched(iter(_read_json_document(path)))
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's "CSV UTF-8" starts with a BOM
            yield from _batched(dict(row) for row in csv.DictReader(handle))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_BATCH):
            yield batch.to_pylist()
    elif suffix == ".arrow":
        from datasets import Dataset

        yield from _dataset_batches(Dataset.from_file(str(path)))
    else:
        raise DataError(f"'{path}': unsupported file type '{suffix}' (use one of {', '.join(LOCAL_SUFFIXES)})")


def _batched(rows: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == READ_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _json_lines(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a byte-order mark is no data
            except UnicodeDecodeError as err:
                raise DataError(f"{path} line {number}: not UTF-8 text (byte {err.start} of the line): "
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
            if "\\ud" in line.lower():  # an escaped UTF-16 surrogate: fine in pairs, a lone one is no text
                _refuse_lone_surrogates(row, f"{path} line {number}")
            yield row


def _refuse_lone_surrogates(row: dict, where: str) -> None:
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f"{where}: the text holds a lone UTF-16 surrogate ({err.object[err.start:err.end]!r}), which "
                        "is not a character: the file was written from broken text; fix or drop that row") from None


def _read_json_document(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one object per line in a .json file
            return list(_json_lines(path))
        raise DataError(f"{path} line {err.lineno}: malformed JSON ({err.msg})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} style
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise DataError(f"{path}: expected a list of JSON objects (or one object per line)")
    return data


def _open_saved_dataset(name: str, path: Path, split: str) -> OpenedSplit:
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except Exception as err:  # a damaged or half-copied folder: datasets and pyarrow raise many kinds
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"dataset folder '{path}' (written by datasets' save_to_disk) cannot be read ({first}): "
                        "save or copy it again") from None
    if isinstance(data, DatasetDict):
        if split not in data:
            raise DataError(f"dataset '{name}' has no split '{split}' (splits: {', '.join(data)})")
        data = data[split]
    return _dataset_split("saved:" + data._fingerprint, data, name)


def _open_hub(name: str, split: str, config_name: str | None, data_dir: str | None = None,
              data_files: Any = None) -> OpenedSplit:
    import datasets

    # data_dir / data_files only when set: passing None changes nothing, but keeps the call (and tests spying on
    # it) as it was for every dataset that does not use them
    extra = {key: value for key, value in (("data_dir", data_dir), ("data_files", data_files)) if value is not None}
    try:
        data = datasets.load_dataset(name, config_name, split=split, **extra)
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
    # A Hub dataset's fingerprint is derived from its files' hashes, so it changes when the data does.
    return _dataset_split("hub:" + data._fingerprint, data, f"{name}[{split}]")


def _open_in_memory(label: str, data: Any) -> OpenedSplit:
    if isinstance(data, list):
        if not data:
            raise DataError(f"{label}: the list of rows is empty: give at least one row")
        if not all(isinstance(row, dict) for row in data):
            raise DataError(f"{label}: expected a list of dicts (one per row) or a datasets.Dataset")
        digest = hashlib.blake2b(json.dumps(data, sort_keys=True, default=fingerprint_default).encode(), digest_size=16)
        rows = data

        def batches() -> Iterator[tuple[str, list[dict[str, Any]]]]:
            for start in range(0, len(rows), READ_BATCH):
                yield label, rows[start:start + READ_BATCH]

        return OpenedSplit("list:" + digest.hexdigest(), batches, label, f"dataset '{label}' is empty")
    if hasattr(data, "to_list") and hasattr(data, "data"):  # a datasets.Dataset
        return _dataset_split("dataset:" + _dataset_content_hash(data), data, label)
    if isinstance(data, dict):  # one row, or columns: either way not rows
        raise DataError(f"{label}: expected a datasets.Dataset or a list of dicts (one per row), got a dict: "
                        "wrap one row in a list ([row]), or give columns as datasets.Dataset.from_dict(...)")
    raise DataError(f"{label}: expected a datasets.Dataset or a list of dicts, got {type(data).__name__}")


def _dataset_split(fingerprint: str, data: Any, label: str) -> OpenedSplit:
    """A datasets.Dataset (Arrow, memory-mapped for Hub and saved datasets), read READ_BATCH rows at a time."""
    return OpenedSplit(fingerprint, lambda: ((label, rows) for rows in _dataset_batches(data)), label,
                       f"dataset '{label}' is empty")


def _dataset_batches(data: Any) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(data), READ_BATCH):
        yield data.select(range(start, min(start + READ_BATCH, len(data)))).to_list()


def _dataset_content_hash(data: Any) -> str:
    """Hash the Arrow buffers of an in-memory Dataset (its own fingerprint may be random for in-memory data)."""
    digest = hashlib.blake2b(digest_size=16)
    if data._indices is not None:  # a selection or shuffle: hash the rows it shows, in order
        data = data.flatten_indices()
    table = data.data.table
    digest.update(str(table.schema).encode())
    for batch in table.to_batches():
        for column in batch.columns:
            for buffer in column.buffers():
                if buffer is not None:
                    digest.update(memoryview(buffer))
    return digest.hexdigest()


# ---------------------------------------------------------------- mixing and holding out


def hold_out(count: int, ratio: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices 0..count-1 into (train, eval), eval a seeded `ratio` of them (at least one if ratio > 0)."""
    order = rng.permutation(count)
    n_eval = min(count - 1, max(1, round(count * ratio))) if ratio > 0 and count > 1 else 0
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def mixture_counts(sizes: list[int], weights: list[float] | None) -> list[int]:
    """Rows each source contributes to one epoch. Without weights: all of them. With weights: the epoch keeps the
    total row count of all sources, shared out in proportion to the weights (by rows, not tokens)."""
    if weights is None:
        return list(sizes)
    total, weight_sum = sum(sizes), sum(weights)
    exact = [total * w / weight_sum for w in weights]
    counts = [int(x) for x in exact]
    # hand the rows lost to rounding down to the largest remainders, so the counts add up to the total
    for i in sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mixture_rows(sizes: list[int], weights: list[float | None], fractions: list[float | None],
                 rng: np.random.Generator) -> list[np.ndarray]:
    """The rows of each source in one epoch of the mixture: TRL's fractions (each source's first rows, none
    repeated), sftune's weights (seeded draws, by rows), or every row once. A weight or fraction not given is None
    (never padded with 0.0, which would read as given)."""
    if any(f is not None for f in fractions):
        return [np.arange(count, dtype=np.int64) for count in fraction_counts(sizes, fractions)]
    shares = None
    if any(w is not None for w in weights):  # a source without rows left (or eval-only) gets no share
        shares = [float(w or 0.0) if size else 0.0 for w, size in zip(weights, sizes)]
    return [draw_rows(size, count, rng) if count else np.zeros(0, dtype=np.int64)
            for size, count in zip(sizes, mixture_counts(sizes, shares))]


def fraction_counts(sizes: list[int], fractions: list[float | None]) -> list[int]:
    """Rows each source contributes under TRL's fractions: the shares normalised to one, and the mixture as large as
    it can be without repeating a row of any source; each source gives its first round(share * total) rows. A
    source without a fraction (an eval-only one) gives none."""
    shares = [float(f) if f is not None else 0.0 for f in fractions]
    total_share = sum(shares)
    weights = [share / total_share for share in shares]
    total = min(size / weight for size, weight in zip(sizes, weights) if weight > 0)
    return [min(size, round(weight * total)) for size, weight in zip(sizes, weights)]


def draw_rows(size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` row indices from 0..size-1: whole seeded passes over the rows, then a seeded sample of the rest."""
    passes, rest = divmod(count, size)
    parts = [np.arange(size)] * passes + [np.sort(rng.permutation(size)[:rest])]
    return np.concatenate(parts).astype(np.int64)
