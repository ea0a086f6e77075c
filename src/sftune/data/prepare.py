"""Datasets -> prepared training and eval rows (see rows.py), cached on disk.

The stages: read each source and normalise its rows (formats.py); hold out eval rows; render and tokenize with
loss masks and template checks (render.py; in parallel processes for large datasets); truncate; drop rows left
with nothing to train; mix the sources by weight; pack (pack.py). Everything after this sees only the rows.

The result is cached under $SFTUNE_CACHE/data/<fingerprint> (or $SFTUNE_DATA_CACHE/<fingerprint>); the
fingerprint covers the data files' bytes (or a Hub dataset's fingerprint), the tokenizer with its template and
special tokens, a vision-language processor's settings, and every setting that changes the rows. A second run
with the same inputs loads the rows. Rows with images keep references to them, never pixels; image files must be
unchanged (size and time) for cached rows to be used, and images that are not files are stored in the entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sftune.config import SFTConfig, data_seed_of, eval_rows_packed
from sftune.data import doctor
from sftune.data.doctor_report import log_findings
from sftune.data.formats import apply_formatting_func, detect_format, is_conversation, normalise, rename_columns
from sftune.data.images import processor_fingerprint
from sftune.data.loss_turns import split_assistant_turns
from sftune.data.pack import plan_packing
from sftune.data.render import CHECKS, IGNORE_INDEX, ExampleTokenizer, Tokenized
from sftune.data.rows import Documents, RowStore
from sftune.data.sources import (
    DatasetSpec, OpenedSplit, SourceRows, dataset_specs, hold_out, mixture_rows, open_split, source_names,
)
from sftune.errors import ConfigError, DataError
from sftune.paths import VERSION, cache_dir
from sftune.tokenizer import shaped_tokenizer, stop_token_ids, with_default_template

log = logging.getLogger("sftune")

CACHE_LAYOUT = "4"  # bump when the prepared rows would differ for the same inputs
PARALLEL_MIN_ROWS = 2000  # below this, starting worker processes costs more than it saves
EXAMPLES_PER_CHECK = 3
SETTINGS = (  # every config field that changes the prepared rows
    "dataset_name", "dataset_config", "dataset_train_split", "dataset_text_field", "datasets", "dataset_test_split",
    "eval_ratio", "test_split_size", "dataset_format", "dataset_columns", "max_length", "truncation_mode", "loss_mask",
    "packing", "packing_strategy", "seed", "dedupe", "eval_packing", "shuffle_dataset", "data_seed", "split_assistant_turns",
)


@dataclass
class PreparedData:
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]  # empty without an eval split or eval_ratio
    stats: dict[str, Any] = field(default_factory=dict)
    source_names: list[str] = field(default_factory=list)  # index = the rows' `source`
    # The tokenizer the rows were made with: the one given, shaped for this run (see sftune/tokenizer.py). Save
    # this one with the model. It is a copy wherever the shaping changed something; the given one is untouched.
    tokenizer: Any = None


def trained_token_count(labels: np.ndarray) -> int:
    """Tokens that carry loss: position 0 is never predicted, so its label never counts."""
    return int((labels[1:] != IGNORE_INDEX).sum())


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
    if folder is not None and (folder / "stats.json").is_file():
        data = _load(folder)
        if data is not None:
            data.tokenizer = inputs.tokenizer
            if data.stats.get("default_template"):
                data.tokenizer, _ = with_default_template(inputs.tokenizer, keep_eos=bool(config.eos_token))
            log.info("data: using the prepared data cached in %s (%d train rows, %d eval rows)",
                     folder, len(data.train_rows), len(data.eval_rows))
            log_findings(data.stats, log)
            return data
        log.info("data: image files changed since the data was cached in %s: preparing it again", folder)
        shutil.rmtree(folder, ignore_errors=True)

    sources = _read_sources(inputs, config)
    documents, stats = _tokenize_sources(sources, inputs, config, check_data=check_data)
    refuse_packing(config, documents, inputs.processor)
    train, evaluation = _assemble(documents, sources, config, stats)
    stats["seconds"] = round(time.perf_counter() - started, 3)
    names = source_names(inputs.specs) + (["eval_dataset"] if inputs.eval_dataset is not None else [])
    data = PreparedData(train.rows(), evaluation.rows(), stats, names, inputs.tokenizer)
    _log_stats(stats)
    if folder is not None:
        try:
            _save(folder, train, evaluation, data)
            log.info("data: prepared in %.1f s; cached in %s", stats["seconds"], folder)
        except OSError as err:  # the cache only saves time: a full or read-only disk must not stop the run
            log.warning("data: prepared in %.1f s; not cached (%s: %s)", stats["seconds"], folder,
                        err.strerror or err)
        else:
            if train.images is not None or evaluation.images is not None:
                # rows as a cache hit gives them: images that were bytes or PIL images are now files in the entry,
                # so the rows do not hold every image in memory
                saved = _load(folder)
                if saved is not None:
                    data.train_rows, data.eval_rows = saved.train_rows, saved.eval_rows
    return data


def prepare_documents(config: SFTConfig, tokenizer: Any, limit: int | None = None, train_dataset: Any = None,
                      formatting_func: Callable[[dict], Any] | None = None,
                      processor: Any = None, sizes: dict | None = None) -> tuple[list[Documents], list[SourceRows]]:
    """The training documents of each source in dataset order, before mixing and packing (for `sftune inspect`);
    with `limit`, only from the first `limit` rows of each source. `sizes` (--dry_run) receives each source's
    whole train and eval row counts, before `limit` cuts them."""
    inputs = _open_inputs(config, tokenizer, train_dataset, None, formatting_func, processor)
    sources = _read_sources(inputs, config)
    if sizes is not None:
        sizes.update(train=[len(s.train) for s in sources], eval=[len(s.eval) for s in sources])
    if limit is not None:
        for source in sources:
            source.train, source.train_index, source.eval = source.train[:limit], source.train_index[:limit], []
    documents, _ = _tokenize_sources(sources, inputs, config, require_rows=False)
    return [d["train"] for d in documents], [s.rows for s in sources]


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


def refuse_packing(config: SFTConfig, documents: list[dict[str, Documents]], processor: Any) -> None:
    """(issue 14) Packing documents with images, refused where it would be wrong. Each document is packed whole
    with its own images: strategies that cut documents (bfd_split, wrapped) would cut images from their tokens.
    And a model whose processor marks image tokens in token_type_ids (Gemma 3's bidirectional attention within an
    image) gets, in transformers 5.24, sliding-window masks that let a packed document see another's image blocks."""
    packing = config.packing or eval_rows_packed(config)
    if not packing or not any(d.images is not None and any(d.images) for s in documents for d in s.values()):
        return
    if config.packing_strategy != "bfd":
        raise ConfigError(f"packing_strategy: {config.packing_strategy} cuts documents, but the data has images, "
                          "which cannot be cut from their tokens: use packing_strategy: bfd (it packs each document "
                          "whole, and drops rows whose images do not fit in max_length)")
    from sftune.data.vision_inputs import vision_inputs_of

    if "token_type_ids" in vision_inputs_of(processor).text_inputs:
        raise ConfigError(f"packing: true, but {type(processor).__name__}'s model attends bidirectionally within "
                          "each image (token_type_ids), and transformers' masks for it let packed documents see each "
                          "other's images: set packing: false (padding_free, the default on CPU, keeps rows apart)")


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


# ---------------------------------------------------------------- stage 2: read and normalise


@dataclass
class _Source:
    label: str
    format: str
    rows: SourceRows  # the training split (where errors point)
    train: list[dict]  # canonical examples
    train_index: np.ndarray  # their rows in the source dataset
    eval_rows: SourceRows | None = None
    eval: list[dict] = field(default_factory=list)
    eval_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    read: int = 0
    weight: float | None = None
    fraction: float | None = None


def _read_sources(inputs: _Inputs, config: SFTConfig) -> list[_Source]:
    sources = []
    rng = np.random.default_rng([data_seed_of(config), 7])
    for spec, train_split, test_split in zip(inputs.specs, inputs.train, inputs.test):
        rows = train_split.load()
        fmt, examples = _normalised(rows, spec, config, inputs.formatting_func)
        index = np.arange(len(examples))
        source = _Source(spec.label, fmt, rows, examples, index, read=len(examples), weight=spec.weight,
                         fraction=spec.fraction)
        if test_split is not None:
            test_rows = test_split.load()
            source.eval_rows, source.eval = test_rows, _normalised(test_rows, spec, config, inputs.formatting_func)[1]
            source.eval_index = np.arange(len(source.eval))
        elif config.held_out_ratio > 0:
            keep, held = hold_out(len(examples), config.held_out_ratio, rng)
            source.train, source.train_index = [examples[i] for i in keep], keep
            source.eval_rows, source.eval, source.eval_index = rows, [examples[i] for i in held], held
        sources.append(source)
    if inputs.eval_dataset is not None:
        rows = inputs.eval_dataset.load()
        spec = DatasetSpec("eval_dataset", columns=config.dataset_columns, format=config.dataset_format)
        fmt, examples = _normalised(rows, spec, config, inputs.formatting_func)
        sources.append(_Source("eval_dataset", fmt, rows, [], np.zeros(0, dtype=np.int64), rows, examples,
                               np.arange(len(examples))))
    if config.split_assistant_turns:
        for source in sources:
            source.train, source.train_index = split_assistant_turns(source.train, source.train_index, config.loss_mask)
            source.eval, source.eval_index = split_assistant_turns(source.eval, source.eval_index, config.loss_mask)
    if inputs.processor is not None:
        from sftune.data.vision_inputs import vision_inputs_of

        vision_inputs_of(inputs.processor)  # refuses, by name, a model input sftune cannot build
    return sources


def _normalised(rows: SourceRows, spec: DatasetSpec, config: SFTConfig, formatting_func: Callable | None):
    apply_formatting_func(rows, formatting_func, config.dataset_text_field)
    rename_columns(rows, spec.columns)
    fmt = detect_format(rows, config.dataset_text_field, spec.format)
    examples = normalise(rows, fmt, config.dataset_text_field)
    if config.loss_mask in ("assistant", "last_assistant") and not is_conversation(examples[0]):
        flag = "assistant_only_loss" if config.loss_mask == "assistant" else "last_assistant_only_loss"
        raise DataError(f"{flag} is set (loss_mask: {config.loss_mask}), but dataset '{spec.label}' has {fmt} "
                        "rows, not conversations: unset it, or use completion_only_loss for prompt/completion rows")
    if config.completion_only_loss and is_conversation(examples[0]) and examples[0]["completion_start"] is None:
        raise DataError(f"completion_only_loss: true means nothing for dataset '{spec.label}': its {fmt} rows are "
                        "conversations without a prompt/completion split, so every token would be trained; set "
                        "assistant_only_loss: true to train the assistant turns (or unset completion_only_loss)")
    return fmt, examples


# ---------------------------------------------------------------- stage 3: tokenize, truncate, check


def _tokenize_sources(sources: list[_Source], inputs: _Inputs, config: SFTConfig, require_rows: bool = True,
                      check_data: bool = True) -> tuple[list[dict[str, Documents]], dict[str, Any]]:
    stats: dict[str, Any] = {"format": sources[0].format, "default_template": False}
    if any(s.train and is_conversation(s.train[0]) or s.eval and is_conversation(s.eval[0]) for s in sources):
        if not getattr(inputs.tokenizer, "chat_template", None):
            inputs.tokenizer, added = with_default_template(inputs.tokenizer, keep_eos=bool(config.eos_token))
            stats["default_template"] = True
            log.info("data: the tokenizer has no chat template, so sftune uses ChatML (<|im_start|>role ... "
                     "<|im_end|>) and <|im_end|> ends each turn%s", f"; added tokens {', '.join(added)}" if added else "")
            inputs.stop_ids = stop_token_ids(inputs.tokenizer, config.model_name_or_path)
    worker = ExampleTokenizer(inputs.tokenizer, config, inputs.stop_ids, inputs.processor)
    jobs = [(s, split, i) for s, source in enumerate(sources) for split in ("train", "eval")
            for i in range(len(getattr(source, split)))]
    results = _run_tokenizer(worker, [getattr(sources[s], split)[i] for s, split, i in jobs],
                             config.dataset_num_proc, check_data)

    checks = {name: {"rows": 0, "examples": []} for name in CHECKS}
    empty: dict[str, Any] = {"turns": 0, "rows": 0, "examples": []}  # empty assistant replies, never trained
    dropped: dict[str, int] = {}
    dropped_from_training: dict[str, int] = {}
    counters = {"rows_checked": 0, "turns_checked": 0, "rows_truncated": 0, "images": 0, "image_tokens": 0}
    kept: dict[tuple[int, str], list[tuple[int, Tokenized]]] = {}
    for (s, split, i), result in zip(jobs, results):
        source = sources[s]
        index = int((source.train_index if split == "train" else source.eval_index)[i])
        origin = source.rows if split == "train" else source.eval_rows
        if result.error:
            raise DataError(f"{origin.where(index)}: {result.error}")
        if result.checked_turns or result.problems:
            counters["rows_checked"] += 1
            counters["turns_checked"] += result.checked_turns
        for name in {name for name, _ in result.problems}:
            checks[name]["rows"] += 1
            if len(checks[name]["examples"]) < EXAMPLES_PER_CHECK:
                detail = next(d for n, d in result.problems if n == name)
                checks[name]["examples"].append(f"{origin.where(index)}: {detail}")
        if result.untrained:
            empty["turns"] += len(result.untrained)
            empty["rows"] += 1
            if len(empty["examples"]) < EXAMPLES_PER_CHECK:
                empty["examples"].append(f"{origin.where(index)}: "
                                         + ", ".join(f"message {m + 1}" for m in result.untrained))
        reason = result.drop
        if reason is None:
            counters["rows_truncated"] += result.truncated
            if trained_token_count(result.labels) == 0:
                reason = "truncated_to_nothing" if result.truncated else "no_trained_tokens"
        if reason is not None:
            dropped[reason] = dropped.get(reason, 0) + 1
            if split == "train":
                dropped_from_training[reason] = dropped_from_training.get(reason, 0) + 1
            continue
        counters["images"] += len(result.images or ())
        counters["image_tokens"] += sum(result.image_tokens or ())
        kept.setdefault((s, split), []).append((index, result))

    stats["doctor"] = _examine(kept, sources, config) if check_data else None
    removed = (stats["doctor"] or {}).get("dedupe") or {}
    if removed.get("train_removed") or removed.get("eval_removed"):
        dropped["duplicates"] = removed["train_removed"] + removed["eval_removed"]
    documents = []
    for s, source in enumerate(sources):
        per_split = {}
        for split in ("train", "eval"):
            items = kept.get((s, split), [])
            per_split[split] = Documents(
                [r.ids for _, r in items], [r.labels for _, r in items],
                np.full(len(items), s, dtype=np.int32), np.array([i for i, _ in items], dtype=np.int64),
                [r.images or [] for _, r in items] if any(r.images is not None for _, r in items) else None,
                [r.image_tokens or [] for _, r in items] if any(r.images is not None for _, r in items) else None,
            )
        documents.append(per_split)
    stats.update(counters, rows_dropped=dropped, template_checks=checks, empty_replies=empty)
    stats["sources"] = [
        {"name": source.label, "format": source.format, "rows_read": source.read,
         "train_documents": len(documents[s]["train"]), "eval_documents": len(documents[s]["eval"])}
        for s, source in enumerate(sources)
    ]
    if require_rows and not any(len(d["train"]) for d in documents):
        missing = checks["content_not_rendered"]["examples"]  # a row, so the template's gap can be seen
        raise DataError(_nothing_left_message(config, dropped_from_training, sum(len(s.train) for s in sources),
                                              [s.label for s in sources if s.train])
                        + (f"; e.g. {missing[0]}" if missing else ""))
    return documents, stats


def _examine(kept: dict[tuple[int, str], list[tuple[int, Tokenized]]], sources: list[_Source],
             config: SFTConfig) -> dict[str, Any]:
    """The data doctor's report on the kept rows (all training rows, then all eval rows); with `dedupe`, the
    duplicates it finds are taken out of `kept` here."""
    order = [(s, split) for split in ("train", "eval") for s in range(len(sources)) if (s, split) in kept]
    items = [(s, split, index, result) for s, split in order for index, result in kept[(s, split)]]

    def where(k: int) -> str:
        s, split, index, _ = items[k]
        return (sources[s].rows if split == "train" else sources[s].eval_rows).where(index)

    report, remove = doctor.examine(
        [r.fingerprint for *_, r in items], np.array([split == "eval" for _, split, _, _ in items], dtype=bool),
        np.array([s for s, *_ in items], dtype=np.int64), np.array([len(r.ids) for *_, r in items], dtype=np.int64),
        np.array([r.truncated for *_, r in items], dtype=bool), where, [s.label for s in sources], config.dedupe)
    if remove.any():
        position = 0
        for key in order:
            count = len(kept[key])
            kept[key] = [item for item, gone in zip(kept[key], remove[position:position + count]) if not gone]
            position += count
        log.info("data: dedupe: %s removed %d training rows that repeat an earlier row and %d eval rows that repeat "
                 "a training row or an earlier eval row", config.dedupe, report["dedupe"]["train_removed"],
                 report["dedupe"]["eval_removed"])
    return report


def _run_tokenizer(worker: ExampleTokenizer, examples: list[dict], num_proc: int | None,
                   check_data: bool = True) -> list[Tokenized]:
    if num_proc is None:  # one process per core, each with at least PARALLEL_MIN_ROWS / 2 rows
        num_proc = min(_available_cores(), len(examples) * 2 // PARALLEL_MIN_ROWS) or 1
    if num_proc <= 1 or len(examples) < 2 * num_proc:
        return _tokenized(worker, examples, check_data)
    size = -(-len(examples) // (num_proc * 16))  # many small chunks: long conversations even out across workers
    chunks = [(i, min(i + size, len(examples))) for i in range(0, len(examples), size)]
    worker.shape(None)  # analyse the template once, before the workers copy the tokenizer
    global _WORKER, _EXAMPLES, _CHECK_DATA
    # forked workers read these; spawned ones get them through initargs
    _WORKER, _EXAMPLES, _CHECK_DATA = worker, examples, check_data
    forking = "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if forking else "spawn")
    initargs = (None, None, check_data) if forking else (worker, examples, check_data)
    try:
        with context.Pool(num_proc, initializer=_set_worker, initargs=initargs) as pool:
            parts = pool.map(_work, chunks, chunksize=1)
    finally:
        _WORKER = _EXAMPLES = None
    return [result for part in parts for result in part]


_WORKER: ExampleTokenizer | None = None
_EXAMPLES: list[dict] | None = None
_CHECK_DATA = True


def _set_worker(worker: ExampleTokenizer | None, examples: list[dict] | None, check_data: bool) -> None:
    global _WORKER, _EXAMPLES, _CHECK_DATA
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _CHECK_DATA = check_data
    if worker is not None:
        _WORKER, _EXAMPLES = worker, examples


def _work(chunk: tuple[int, int]) -> list[Tokenized]:
    assert _WORKER is not None and _EXAMPLES is not None
    return _tokenized(_WORKER, _EXAMPLES[chunk[0]:chunk[1]], _CHECK_DATA)


def _tokenized(worker: ExampleTokenizer, examples: list[dict], check_data: bool) -> list[Tokenized]:
    """The examples tokenized and, for the data doctor, fingerprinted in the same process (doctor.py)."""
    results = worker(examples)
    if check_data:  # the rows that can be trained (those dropped here are counted apart)
        usable = [i for i, result in enumerate(results) if result.drop is None and result.error is None]
        max_words = None if worker.keep_end else worker.max_length  # what training can see of each row
        checked = doctor.fingerprints([examples[i] for i in usable], max_words)
        for i, fingerprint in zip(usable, checked):
            results[i].fingerprint = fingerprint
    return results


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _nothing_left_message(config: SFTConfig, dropped: dict[str, int], total: int, names: list[str]) -> str:
    why = {
        "no_assistant_turn": "have no assistant turn to train (end each conversation with an assistant reply)",
        "unlocated_turn": "have an assistant turn the chat template renders beyond recognition",
        "truncated_to_nothing": f"keep no trained token after truncation to max_length={config.max_length} "
                                f"(truncation_mode={config.truncation_mode}): raise max_length",
        "no_trained_tokens": "have no token to train",
        "empty_reply": "have only empty assistant replies (an empty reply is never trained)",
        "all_turns_masked": "have every assistant message masked (weight: 0 or train: false)",
        "content_not_rendered": "hold text, tool calls or tools the chat template leaves out (use a chat template "
                                "that renders them: chat_template_path)",
        "image_beyond_max_length": f"have images whose tokens do not fit in max_length={config.max_length} "
                                   "(truncation never cuts an image): raise max_length",
    }
    parts = "; ".join(f"{count} {why[reason]}" for reason, count in dropped.items())
    return f"no training row is left: of {total} rows, {parts} (dataset: {', '.join(names)})"


# ---------------------------------------------------------------- stage 4: mix, pack


def _assemble(documents: list[dict[str, Documents]], sources: list[_Source], config: SFTConfig,
              stats: dict[str, Any]) -> tuple[RowStore, RowStore]:
    rng = np.random.default_rng([data_seed_of(config), 11])
    sizes = [len(d["train"]) for d in documents]
    picks = mixture_rows(sizes, [s.weight for s in sources], [s.fraction for s in sources], rng)
    counts = [len(pick) for pick in picks]
    parts = [d["train"].take(pick) for d, pick in zip(documents, picks) if len(pick)]
    train = _join(parts)
    evaluation = _join([d["eval"] for d in documents])
    for source_stats, count in zip(stats["sources"], counts):
        source_stats["mixed_documents"] = count

    if config.shuffle_dataset and len(train):  # TRL's shuffle before packing; its own stream leaves rng as it was
        train = train.take(np.random.default_rng([data_seed_of(config), 13]).permutation(len(train)))
    stores = []
    for docs, packed in ((train, config.packing), (evaluation, eval_rows_packed(config))):
        if packed and len(docs):
            docs = docs.take(rng.permutation(len(docs)))  # so rows mix sources, and wrapped rows mix documents
            stores.append(RowStore.from_plan(docs, plan_packing(docs.lengths(), config.max_length,
                                                                config.packing_strategy)))
        else:
            stores.append(RowStore.unpacked(docs))
    _describe(stores[0], stores[1], train, config, stats)
    return stores[0], stores[1]


def _join(parts: list[Documents]) -> Documents:
    images = image_tokens = None
    if any(p.images is not None for p in parts):
        images = [refs for p in parts for refs in (p.images if p.images is not None else [[]] * len(p))]
        image_tokens = [n for p in parts for n in (p.image_tokens if p.image_tokens is not None else [[]] * len(p))]
    return Documents(
        [x for p in parts for x in p.ids], [x for p in parts for x in p.labels],
        np.concatenate([p.source for p in parts]) if parts else np.zeros(0, dtype=np.int32),
        np.concatenate([p.index for p in parts]) if parts else np.zeros(0, dtype=np.int64),
        images, image_tokens,
    )


def _describe(train: RowStore, evaluation: RowStore, docs: Documents, config: SFTConfig, stats: dict) -> None:
    lengths = docs.lengths()
    tokens = int(len(train.input_ids))
    trained = _trained_tokens(train)
    stats.update(
        rows=len(train), eval_rows=len(evaluation), documents=len(docs), tokens=tokens, trained_tokens=trained,
        trained_fraction=round(trained / max(tokens, 1), 4),
        length_percentiles={f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)} | {"max": int(lengths.max())},
        eval_tokens=int(len(evaluation.input_ids)), eval_trained_tokens=_trained_tokens(evaluation),
        packing=None,
    )
    if train.packed:
        stats["packing"] = {"strategy": config.packing_strategy, "length": config.max_length,
                            "efficiency": round(tokens / max(len(train) * config.max_length, 1), 4)}
    token_source = np.repeat(train.doc_source, train.doc_lengths)
    per_source_tokens = np.bincount(token_source, minlength=len(stats["sources"]))
    per_source_trained = np.bincount(token_source[_trained_mask(train)], minlength=len(stats["sources"]))
    for s, source_stats in enumerate(stats["sources"]):
        source_stats["tokens"] = int(per_source_tokens[s])
        source_stats["trained_tokens"] = int(per_source_trained[s])


def _trained_tokens(store: RowStore) -> int:
    """Trained targets: labels that are not masked, minus each document's first token (never predicted)."""
    return int(_trained_mask(store).sum())


def _trained_mask(store: RowStore) -> np.ndarray:
    """Per token: a trained target (as counted by _trained_tokens)."""
    mask = store.labels != IGNORE_INDEX
    if len(mask):
        mask[np.concatenate([[0], np.cumsum(store.doc_lengths)[:-1]]).astype(np.int64)] = False
    return mask


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


def _save(folder: Path, train: RowStore, evaluation: RowStore, data: PreparedData) -> None:
    """Write into a hidden folder, then rename it into place: a crash never leaves a half-written cache entry."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    stage = folder.parent / f".staging-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        train.save(stage, "train", folder)
        evaluation.save(stage, "eval", folder)
        (stage / "stats.json").write_text(json.dumps({"stats": data.stats, "source_names": data.source_names},
                                                     indent=1, default=str), encoding="utf-8")
        os.replace(stage, folder)
    except OSError:
        if not (folder / "stats.json").is_file():  # not a concurrent writer finishing first
            raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _load(folder: Path) -> PreparedData | None:
    """The cached data; None when image files it refers to changed since."""
    saved = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
    stats = {**saved["stats"], "cached": True}
    train, evaluation = RowStore.load(folder, "train"), RowStore.load(folder, "eval")
    if train is None or evaluation is None:
        return None
    return PreparedData(train.rows(), evaluation.rows(), stats, saved["source_names"])
