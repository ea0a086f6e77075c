"""Datasets -> prepared training and eval rows (see rows.py), cached on disk.

The stages: read each source and normalise its rows (formats.py); render and tokenize with loss masks and
template checks (render.py; in parallel processes for large datasets); truncate; drop rows left with nothing to
train; hold out eval rows; mix the sources by weight; pack (pack.py). Everything after this sees only the rows.
Preparation streams the sources shard by shard and writes the rows to disk as it goes (build.py), so its memory
does not grow with the dataset; the rows are then read memory-mapped.

The result is cached under $SFTUNE_CACHE/data/<fingerprint> (or $SFTUNE_DATA_CACHE/<fingerprint>); the
fingerprint covers the data files' bytes (or a Hub dataset's fingerprint), the tokenizer with its template and
special tokens, a vision-language processor's settings, and every setting that changes the rows. A second run
with the same inputs loads the rows. Rows with images keep references to them, never pixels; image files must be
unchanged (size and time) for cached rows to be used, and images that are not files are stored in the entry.
Several processes (data parallel, several nodes) prepare each entry once: the first holds a lock and writes into
a hidden folder renamed into place when complete; the others wait and read it (cache_lock.py).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sftune.config import SFTConfig
from sftune.data.build import build, documents_of
from sftune.data.cache_lock import STAGING_PREFIX, preparing, release_lock_file
from sftune.data.doctor_report import log_findings
from sftune.data.images import processor_fingerprint
from sftune.data.render import CHECKS
from sftune.data.rows import Documents, RowList, RowStore
from sftune.data.sources import DatasetSpec, OpenedSplit, SourceRows, dataset_specs, open_split, source_names
from sftune.errors import DataError
from sftune.manifest import manifest_problem, write_manifest
from sftune.paths import VERSION, cache_dir
from sftune.tokenizer import shaped_tokenizer, stop_token_ids, with_default_template

log = logging.getLogger("sftune")

CACHE_LAYOUT = "6"  # bump when the prepared rows would differ for the same inputs (5: streamed; 6: manifest)
SETTINGS = (  # every config field that changes the prepared rows
    "dataset_name", "dataset_config", "dataset_train_split", "dataset_text_field", "datasets", "dataset_test_split",
    "eval_ratio", "test_split_size", "dataset_format", "dataset_columns", "max_length", "truncation_mode", "loss_mask",
    "packing", "packing_strategy", "seed", "dedupe", "eval_packing", "shuffle_dataset", "data_seed",
    "split_assistant_turns",
)


@dataclass
class PreparedData:
    train_rows: RowList  # a read-only list of row dicts, made from the memory-mapped entry when asked for
    eval_rows: RowList  # empty without an eval split or eval_ratio
    stats: dict[str, Any] = field(default_factory=dict)
    source_names: list[str] = field(default_factory=list)  # index = the rows' `source`
    # The tokenizer the rows were made with: the one given, shaped for this run (see sftune/tokenizer.py). Save
    # this one with the model. It is a copy wherever the shaping changed something; the given one is untouched.
    tokenizer: Any = None


def data_cache_dir() -> Path:
    override = os.environ.get("SFTUNE_DATA_CACHE")
    return Path(override).expanduser() if override else cache_dir() / "data"


# ---------------------------------------------------------------- the entry point


def prepare_train_data(config: SFTConfig, tokenizer: Any, train_dataset: Any = None, eval_dataset: Any = None,
                       formatting_func: Callable[[dict], Any] | None = None, processor: Any = None,
                       check_data: bool = True) -> PreparedData:
    """Prepared train and eval rows for `config`, from the cache when the same inputs were prepared before.

    `tokenizer` is shaped for the run (chat_template_path, eos_token, the processor's template, the ChatML default
    for conversations on a tokenizer without a template) on a copy, returned as `PreparedData.tokenizer`; the one
    given is not changed. `processor`, a vision-language model's, turns each image into its tokens.
    `check_data=False` skips the data doctor (doctor.py), only to measure what it costs (bench/prepare_data.py).
    """
    started = time.perf_counter()
    inputs = _open_inputs(config, tokenizer, train_dataset, eval_dataset, formatting_func, processor)
    if not check_data and inputs.fingerprint:
        inputs.fingerprint += "-unchecked"
    folder = data_cache_dir() / inputs.fingerprint if inputs.fingerprint else None
    cached = _cached(folder, inputs, config)
    if cached is not None:
        return cached
    with preparing(folder) if folder is not None else contextlib.nullcontext(False):
        cached = _cached(folder, inputs, config)  # prepared by another process while this one waited
        if cached is not None:
            return cached
        stage = _staging_folder(folder)
        try:
            stats, labels = build(inputs, config, stage, folder or stage, check_data, _available_cores())
            stats["seconds"] = round(time.perf_counter() - started, 3)
            names = source_names(inputs.specs) + (["eval_dataset"] if inputs.eval_dataset is not None else [])
            _log_stats(stats)
            data = None
            if folder is not None:
                try:
                    _save(stage, folder, stats, names)
                    log.info("data: prepared in %.1f s; cached in %s", stats["seconds"], folder)
                    release_lock_file(folder)
                    data = _load(folder)
                    data.stats = stats  # as prepared (not marked "cached")
                except OSError as err:  # the cache only saves time: a full or read-only disk must not stop the run
                    log.warning("data: prepared in %.1f s; not cached (%s: %s)", stats["seconds"], folder,
                                err.strerror or err)
            if data is None:
                data = _load_uncached(stage, folder or stage, stats, names)
        finally:
            if stage.exists() and not (stage / "keep").exists():
                shutil.rmtree(stage, ignore_errors=True)  # the rows stay mapped: the files go when unmapped
    data.tokenizer = inputs.tokenizer
    return data


def _cached(folder: Path | None, inputs: _Inputs, config: SFTConfig) -> PreparedData | None:
    if folder is None or not (folder / "stats.json").is_file():
        return None
    problem = manifest_problem(folder)
    if problem is not None:  # damaged since it was written (a full disk, a copy, a crash of the machine)
        log.warning("data: the prepared data cached in %s is damaged (%s): preparing it again", folder, problem)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    data = _load(folder)
    if data is None:
        log.info("data: image files changed since the data was cached in %s: preparing it again", folder)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    data.tokenizer = inputs.tokenizer
    if data.stats.get("default_template"):
        data.tokenizer, _ = with_default_template(inputs.tokenizer, keep_eos=bool(config.eos_token))
    log.info("data: using the prepared data cached in %s (%d train rows, %d eval rows)",
             folder, len(data.train_rows), len(data.eval_rows))
    log_findings(data.stats, log)
    return data


def _staging_folder(folder: Path | None) -> Path:
    """Where the entry is written: a hidden folder beside it (renamed into place when complete), or a temporary
    folder when there is no entry (data that cannot be fingerprinted) or its folder cannot be written."""
    if folder is not None:
        stage = folder.parent / f"{STAGING_PREFIX}{folder.name}-{uuid.uuid4().hex[:8]}"
        try:
            stage.mkdir(parents=True)
            return stage
        except OSError:
            pass
    return Path(tempfile.mkdtemp(prefix="sftune-data-"))


def prepare_documents(config: SFTConfig, tokenizer: Any, limit: int | None = None, train_dataset: Any = None,
                      formatting_func: Callable[[dict], Any] | None = None,
                      processor: Any = None, sizes: dict | None = None) -> tuple[list[Documents], list[SourceRows]]:
    """The training documents of each source in dataset order, before mixing and packing (for `sftune inspect`);
    with `limit`, only from the first `limit` rows of each source. `sizes` (--dry_run) receives each source's
    whole train and eval row counts, before `limit` cuts them."""
    inputs = _open_inputs(config, tokenizer, train_dataset, None, formatting_func, processor)
    return documents_of(inputs, config, limit, sizes)


# ---------------------------------------------------------------- stage 1: open sources and fingerprint them


@dataclass
class _Inputs:
    specs: list[DatasetSpec]
    train: list[OpenedSplit]
    test: list[OpenedSplit | None]
    eval_dataset: OpenedSplit | None
    formatting_func: Callable[[dict], Any] | None
    stop_ids: set[int]
    fingerprint: str | None  # None: not cacheable (a formatting_func that cannot be hashed)
    tokenizer: Any  # shaped for the run (see sftune/tokenizer.py); the ChatML default may still be added
    processor: Any = None


def _open_inputs(config: SFTConfig, tokenizer: Any, train_dataset: Any, eval_dataset: Any,
                 formatting_func: Callable | None, processor: Any = None) -> _Inputs:
    tokenizer, changes = shaped_tokenizer(tokenizer, config, processor)
    specs = dataset_specs(config, train_dataset)
    for spec in specs:
        if spec.test_split and spec.path and Path(spec.path).expanduser().is_file():
            raise DataError(f"dataset '{spec.path}' is a single file, so it has no '{spec.test_split}' split: "
                            "use eval_ratio, or a folder with train/test files")
    train = [open_split(spec, spec.split) for spec in specs]
    test = [open_split(spec, spec.test_split) if spec.test_split else None for spec in specs]
    evaluation = open_split(DatasetSpec("eval_dataset", data=eval_dataset), "") if eval_dataset is not None else None
    stop_ids = stop_token_ids(tokenizer, config.model_name_or_path)
    parts = {
        "layout": CACHE_LAYOUT, "sftune": VERSION, "changes": changes,
        "settings": {name: getattr(config, name) for name in SETTINGS},
        "tokenizer": tokenizer_fingerprint(tokenizer), "stop_ids": sorted(stop_ids),
        "data": [s.fingerprint for s in train], "test": [s.fingerprint if s else None for s in test],
        "eval_dataset": evaluation.fingerprint if evaluation else None,
        "processor": processor_fingerprint(processor) if processor is not None else None,
    }
    fingerprint: str | None = None
    function_hash = _function_fingerprint(formatting_func)
    if formatting_func is None or function_hash is not None:
        parts["formatting_func"] = function_hash
        fingerprint = hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()
    return _Inputs(specs, train, test, evaluation, formatting_func, stop_ids, fingerprint, tokenizer, processor)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    digest = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    template = tokenizer.chat_template
    extra = {"class": type(tokenizer).__name__, "template": template, "special": tokenizer.special_tokens_map,
             "added": {k: str(v) for k, v in tokenizer.added_tokens_decoder.items()}}
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _function_fingerprint(function: Callable | None) -> str | None:
    if function is None:
        return None
    try:
        from datasets.fingerprint import Hasher

        return Hasher.hash(function)
    except Exception:  # a function that cannot be pickled: prepare again every time
        return None


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _log_stats(stats: dict[str, Any]) -> None:
    dropped = stats["rows_dropped"]
    dropped_text = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in dropped.items())
    log.info("data: %d documents, %d tokens (%.1f%% trained); %d truncated to max_length; %d dropped%s",
             stats["documents"], stats["tokens"], 100 * stats["trained_fraction"], stats["rows_truncated"],
             sum(dropped.values()), f" ({dropped_text})" if dropped else "")
    if stats.get("images"):
        log.info("data: %d images in the kept rows (%d image tokens)", stats["images"], stats.get("image_tokens", 0))
    if stats["packing"]:
        log.info("data: packed into %d rows of %d tokens (%.1f%% full)", stats["rows"], stats["packing"]["length"],
                 100 * stats["packing"]["efficiency"])
    if stats["eval_rows"]:
        log.info("data: %d eval rows", stats["eval_rows"])
    log_findings(stats, log)
    empty = stats.get("empty_replies") or {}
    if empty.get("turns"):
        log.warning("data: %d empty assistant replies (in %d rows) are not trained, e.g. %s", empty["turns"],
                    empty["rows"], "; ".join(empty["examples"]))
    checks = stats["template_checks"]
    if stats["rows_checked"]:
        failed = {name: c for name, c in checks.items() if c["rows"]}
        if not failed:
            log.info("template check: passed on all %d checked rows (%d assistant turns)", stats["rows_checked"],
                     stats["turns_checked"])
        for name, c in failed.items():
            log.warning("template check: %d of %d rows: %s, e.g. %s", c["rows"], stats["rows_checked"], CHECKS[name],
                        "; ".join(c["examples"]))


# ---------------------------------------------------------------- the cache


def _save(stage: Path, folder: Path, stats: dict[str, Any], names: list[str]) -> None:
    """Complete the entry written in `stage` and rename it into place: a crash never leaves a half-written entry
    (stats.json, then the manifest, written last, mark a complete one)."""
    (stage / "stats.json").write_text(json.dumps({"stats": stats, "source_names": names}, indent=1, default=str),
                                      encoding="utf-8")
    write_manifest(stage)  # last: an entry whose files do not match it is prepared again (sftune/manifest.py)
    try:
        os.replace(stage, folder)
    except OSError:
        if not (folder / "stats.json").is_file():  # not a concurrent writer (without a lock) finishing first
            raise


def _load(folder: Path) -> PreparedData | None:
    """The cached data; None when image files it refers to changed since."""
    saved = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
    stats = {**saved["stats"], "cached": True}
    train, evaluation = RowStore.load(folder, "train"), RowStore.load(folder, "eval")
    if train is None or evaluation is None:
        return None
    return PreparedData(train.rows(), evaluation.rows(), stats, saved["source_names"])


def _load_uncached(stage: Path, final: Path, stats: dict[str, Any], names: list[str]) -> PreparedData:
    """The rows just written into `stage`, which is not a cache entry. Images stored there (not files) are kept
    until the process ends; everything else is mapped, so the folder can go at once."""
    train, evaluation = RowStore.load(stage, "train"), RowStore.load(stage, "eval")
    assert train is not None and evaluation is not None  # just written: every image file is as stamped
    for store in (train, evaluation):
        if store.images is not None:
            prefix = str(final / "images")
            store.images = [str(stage / "images") + ref[len(prefix):] if ref.startswith(prefix) else ref
                            for ref in store.images]
            if (stage / "images").is_dir():
                (stage / "keep").touch()
                atexit.register(shutil.rmtree, stage, True)
    return PreparedData(train.rows(), evaluation.rows(), stats, names)
