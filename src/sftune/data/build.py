"""Building a prepared-data entry in bounded memory: the sources are read, normalised and tokenized shard by shard
(shards.py) and the documents' tokens spilled to disk as they come (row_writer.py); then the eval hold-out, the
data doctor's comparison, deduplication, mixing and packing work on arrays of a few bytes per document, and the rows
are copied from the spill into the entry's files. Memory, summed over the main and worker processes, does not grow
with the number of rows beyond those arrays (about 330 bytes a document with the data doctor on, 40 without) and
the image references of data with images."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sftune.config import SFTConfig, data_seed_of, eval_rows_packed
from sftune.data import doctor
from sftune.data.formats import apply_formatting_func, detect_format, is_conversation, normalise, rename_columns
from sftune.data.loss_turns import split_assistant_turns
from sftune.data.pack import PackingPlan, plan_packing
from sftune.data.render import CHECKS, ExampleTokenizer
from sftune.data.row_writer import TokenSpill, WrittenStore, write_store
from sftune.data.rows import Documents
from sftune.data.shards import EXAMPLES_PER_CHECK, ChunkResult, tokenize_chunk, tokenized_chunks
from sftune.data.sources import DatasetSpec, OpenedSplit, SourceRows, hold_out, mixture_rows
from sftune.errors import ConfigError, DataError
from sftune.tokenizer import stop_token_ids, with_default_template

log = logging.getLogger("sftune")

SHARD_ROWS = 4096  # rows read and normalised at a time
CHUNK_ROWS = 256  # rows per task of a worker process (small: long conversations even out across workers)
PARALLEL_MIN_ROWS = 2000  # below this, starting worker processes costs more than it saves


@dataclass
class _Split:
    """One split being read: a source's training split, its test split, or the eval_dataset."""

    source: int
    from_test: bool  # a test split or the eval_dataset: all of its rows are eval rows
    spec: DatasetSpec
    opened: OpenedSplit
    # (rows read, their examples, the source row of each example: split_assistant_turns makes several of one row)
    shards: Iterator[tuple[SourceRows, list[dict], np.ndarray]] = field(repr=False, default=iter(()))
    format: str = ""
    read: int = 0  # rows read

    def where(self, index: int) -> str:
        return SourceRows(self.opened.name, [], self.opened.origins).where(index)


@dataclass
class _Docs:
    """The kept documents, in spill order, as arrays (growing by one piece per chunk)."""

    source: list[np.ndarray] = field(default_factory=list)
    from_test: list[np.ndarray] = field(default_factory=list)
    index: list[np.ndarray] = field(default_factory=list)
    lengths: list[np.ndarray] = field(default_factory=list)
    truncated: list[np.ndarray] = field(default_factory=list)
    prints: list[doctor.PrintTable] = field(default_factory=list)
    images: list[list] | None = None
    image_tokens: list[list[int]] | None = None


def read_splits(inputs: Any, config: SFTConfig) -> list[_Split]:
    """Every split to read, in order, each with its first shard read (its format known)."""
    splits = []
    for s, (spec, train, test) in enumerate(zip(inputs.specs, inputs.train, inputs.test)):
        splits.append(_Split(s, False, spec, train))
        if test is not None:
            splits.append(_Split(s, True, spec, test))
    if inputs.eval_dataset is not None:
        spec = DatasetSpec("eval_dataset", columns=config.dataset_columns, format=config.dataset_format)
        splits.append(_Split(len(inputs.specs), True, spec, inputs.eval_dataset))
    for split in splits:
        stream = _normalised_shards(split, config, inputs.formatting_func)
        first = next(stream)
        split.shards = itertools.chain([first], stream)
    return splits


def _normalised_shards(split: _Split, config: SFTConfig, formatting_func: Callable | None
                       ) -> Iterator[tuple[SourceRows, list[dict], np.ndarray]]:
    for shard in split.opened.stream(SHARD_ROWS):
        apply_formatting_func(shard, formatting_func, config.dataset_text_field)
        rename_columns(shard, split.spec.columns)
        fmt = detect_format(shard, config.dataset_text_field, split.format or split.spec.format)
        examples = normalise(shard, fmt, config.dataset_text_field)
        if not split.format:
            split.format = fmt
            if config.loss_mask in ("assistant", "last_assistant") and not is_conversation(examples[0]):
                flag = "assistant_only_loss" if config.loss_mask == "assistant" else "last_assistant_only_loss"
                raise DataError(f"{flag} is set (loss_mask: {config.loss_mask}), but dataset '{split.spec.label}' "
                                f"has {fmt} rows, not conversations: unset it, or use completion_only_loss for "
                                "prompt/completion rows")
            if config.completion_only_loss and is_conversation(examples[0]) and examples[0]["completion_start"] is None:
                raise DataError(f"completion_only_loss: true means nothing for dataset '{split.spec.label}': its {fmt} "
                                "rows are conversations without a prompt/completion split, so every token would be "
                                "trained; set assistant_only_loss: true to train the assistant turns (or unset "
                                "completion_only_loss)")
        split.read += len(examples)
        rows = shard.offset + np.arange(len(examples), dtype=np.int64)
        if config.split_assistant_turns:
            examples, rows = split_assistant_turns(examples, rows, config.loss_mask)
        yield shard, examples, rows


def example_tokenizer(inputs: Any, config: SFTConfig, splits: list[_Split], stats: dict[str, Any]) -> ExampleTokenizer:
    """The tokenizer for the examples; conversations on a tokenizer without a chat template get ChatML."""
    if any(split.format in ("messages", "sharegpt", "alpaca") or _first_is_conversation(split) for split in splits):
        if not getattr(inputs.tokenizer, "chat_template", None):
            inputs.tokenizer, added = with_default_template(inputs.tokenizer, keep_eos=bool(config.eos_token))
            stats["default_template"] = True
            log.info("data: the tokenizer has no chat template, so sftune uses ChatML (<|im_start|>role ... "
                     "<|im_end|>) and <|im_end|> ends each turn%s", f"; added tokens {', '.join(added)}" if added else "")
            inputs.stop_ids = stop_token_ids(inputs.tokenizer, config.model_name_or_path)
    return ExampleTokenizer(inputs.tokenizer, config, inputs.stop_ids, inputs.processor)


def _first_is_conversation(split: _Split) -> bool:
    first = next(split.shards)
    split.shards = itertools.chain([first], split.shards)
    return bool(first[1]) and is_conversation(first[1][0])


def _process_count(config: SFTConfig, splits: list[_Split], cores: int) -> int:
    if config.dataset_num_proc is not None:
        return config.dataset_num_proc
    # a split whose first shard is full may hold any number of rows; one process per core then
    known = sum(split.read for split in splits)
    if any(split.read >= SHARD_ROWS for split in splits):
        return cores
    return min(cores, known * 2 // PARALLEL_MIN_ROWS) or 1


def _chunks(splits: list[_Split], size: int) -> Iterator[tuple[tuple[int, np.ndarray], list[dict]]]:
    for number, split in enumerate(splits):
        for _, examples, rows in split.shards:
            for start in range(0, len(examples), size):
                yield (number, rows[start:start + size]), examples[start:start + size]


# ---------------------------------------------------------------- the build


def build(inputs: Any, config: SFTConfig, stage: Path, final: Path, check_data: bool, cores: int,
          ) -> tuple[dict[str, Any], list[str]]:
    """Prepare the data into `stage` (train.* and eval.* stores; it becomes the cache entry `final`). Returns the
    stats and the source names' labels."""
    stats: dict[str, Any] = {"default_template": False}
    splits = read_splits(inputs, config)
    stats["format"] = splits[0].format
    worker = example_tokenizer(inputs, config, splits, stats)
    num_proc = _process_count(config, splits, cores)
    spill = TokenSpill(stage)
    docs = _Docs()
    found = _Findings()
    chunk_size = CHUNK_ROWS if num_proc > 1 else SHARD_ROWS
    for (number, rows), chunk in tokenized_chunks(worker, _chunks(splits, chunk_size), num_proc, check_data):
        split = splits[number]
        found.add(chunk, split, rows)
        spill.append(chunk.ids, chunk.labels, chunk.lengths)
        count = len(chunk.kept)
        docs.source.append(np.full(count, split.source, dtype=np.int32))
        docs.from_test.append(np.full(count, split.from_test, dtype=bool))
        docs.index.append(rows[chunk.kept])
        docs.lengths.append(chunk.lengths)
        docs.truncated.append(chunk.truncated)
        if chunk.prints is not None:
            docs.prints.append(chunk.prints)
        if chunk.images is not None and docs.images is None:  # the first rows with images: earlier ones had none
            previous = int(sum(len(x) for x in docs.lengths)) - count
            docs.images, docs.image_tokens = [[] for _ in range(previous)], [[] for _ in range(previous)]
        if docs.images is not None:
            docs.images += chunk.images if chunk.images is not None else [[] for _ in range(count)]
            docs.image_tokens += chunk.image_tokens if chunk.image_tokens is not None else [[] for _ in range(count)]
    spill.close()
    try:
        names = _assemble(inputs, config, splits, spill, docs, found, stats, stage, final, check_data)
    finally:
        spill.remove()
    return stats, names


class _Findings:
    """What the tokenizer found, over all chunks: template checks, dropped rows, counters."""

    def __init__(self) -> None:
        self.checks = {name: {"rows": 0, "examples": []} for name in CHECKS}
        self.counters = {"rows_checked": 0, "turns_checked": 0, "rows_truncated": 0, "images": 0, "image_tokens": 0}
        self.empty: dict[str, Any] = {"turns": 0, "rows": 0, "examples": []}  # empty assistant replies, never trained
        self.dropped_source: list[int] = []
        self.dropped_from_test: list[bool] = []
        self.dropped_index: list[int] = []
        self.dropped_reason: list[str] = []

    def add(self, chunk: ChunkResult, split: _Split, rows: np.ndarray) -> None:
        """`rows`: the source row of each of the chunk's examples."""
        if chunk.error is not None:
            raise DataError(f"{split.where(int(rows[chunk.error[0]]))}: {chunk.error[1]}")
        self.counters["rows_checked"] += chunk.checked_rows
        self.counters["turns_checked"] += chunk.checked_turns
        self.counters["rows_truncated"] += int(chunk.truncated.sum()) + chunk.truncated_dropped
        for name, failing in chunk.check_rows.items():
            self.checks[name]["rows"] += failing
            for position, detail in chunk.check_examples[name]:
                if len(self.checks[name]["examples"]) < EXAMPLES_PER_CHECK:
                    self.checks[name]["examples"].append(f"{split.where(int(rows[position]))}: {detail}")
        self.empty["turns"] += chunk.empty_turns
        self.empty["rows"] += chunk.empty_rows
        for position, messages in chunk.empty_examples:
            if len(self.empty["examples"]) < EXAMPLES_PER_CHECK:
                self.empty["examples"].append(f"{split.where(int(rows[position]))}: {messages}")
        if chunk.images is not None:
            self.counters["images"] += sum(len(refs) for refs in chunk.images)
            self.counters["image_tokens"] += sum(sum(tokens) for tokens in chunk.image_tokens or ())
        for position, reason in chunk.dropped:
            self.dropped_source.append(split.source)
            self.dropped_from_test.append(split.from_test)
            self.dropped_index.append(int(rows[position]))
            self.dropped_reason.append(reason)


def _assemble(inputs: Any, config: SFTConfig, splits: list[_Split], spill: TokenSpill, docs: _Docs,
              found: _Findings, stats: dict[str, Any], stage: Path, final: Path, check_data: bool) -> list[str]:
    source = np.concatenate(docs.source) if docs.source else np.zeros(0, np.int32)
    from_test = np.concatenate(docs.from_test) if docs.from_test else np.zeros(0, bool)
    index = np.concatenate(docs.index) if docs.index else np.zeros(0, np.int64)
    lengths = np.concatenate(docs.lengths) if docs.lengths else np.zeros(0, np.int64)
    truncated = np.concatenate(docs.truncated) if docs.truncated else np.zeros(0, bool)
    labels = [split.spec.label for split in splits if not split.from_test] + (
        ["eval_dataset"] if inputs.eval_dataset is not None else [])
    train_split = {split.source: split for split in splits if not split.from_test}
    eval_split = {split.source: split for split in splits if split.from_test}
    sources = len(labels)

    # the eval hold-out, as a boolean per row read of each source that holds out
    held: dict[int, np.ndarray] = {}
    rng = np.random.default_rng([data_seed_of(config), 7])
    for s, spec in enumerate(inputs.specs):
        if spec.test_split is None and config.held_out_ratio > 0:
            _, out = hold_out(train_split[s].read, config.held_out_ratio, rng)
            held[s] = np.zeros(train_split[s].read, dtype=bool)
            held[s][out] = True
    is_eval = from_test.copy()
    for s, mask in held.items():
        mine = (source == s) & ~from_test
        is_eval[mine] = mask[index[mine]]

    dropped: dict[str, int] = {}
    dropped_from_training: dict[str, int] = {}
    for s, test, i, reason in zip(found.dropped_source, found.dropped_from_test, found.dropped_index,
                                  found.dropped_reason):
        dropped[reason] = dropped.get(reason, 0) + 1
        if not test and not (s in held and held[s][i]):
            dropped_from_training[reason] = dropped_from_training.get(reason, 0) + 1

    kept = np.ones(len(source), dtype=bool)
    stats["doctor"] = None
    if check_data:
        stats["doctor"] = _examine(docs, source, is_eval, from_test, index, lengths, truncated, splits,
                                   train_split, eval_split, labels, config, kept)
    removed = (stats["doctor"] or {}).get("dedupe") or {}
    if removed.get("train_removed") or removed.get("eval_removed"):
        dropped["duplicates"] = removed["train_removed"] + removed["eval_removed"]

    train_of = [np.flatnonzero(kept & ~is_eval & (source == s)) for s in range(sources)]
    eval_of = [np.flatnonzero(kept & is_eval & (source == s)) for s in range(sources)]
    stats.update(found.counters, rows_dropped=dropped, template_checks=found.checks, empty_replies=found.empty)
    stats["sources"] = [
        {"name": label, "format": next((sp.format for sp in splits if sp.source == s), ""),
         "rows_read": train_split[s].read if s in train_split else 0,
         "train_documents": len(train_of[s]), "eval_documents": len(eval_of[s])}
        for s, label in enumerate(labels)
    ]
    if not any(len(t) for t in train_of):
        train_rows = sum(sp.read - int(held[sp.source].sum() if sp.source in held else 0)
                         for sp in splits if not sp.from_test)
        missing = found.checks["content_not_rendered"]["examples"]  # a row, so the template's gap can be seen
        raise DataError(nothing_left_message(config, dropped_from_training, train_rows,
                                             [sp.spec.label for sp in splits if not sp.from_test and sp.read])
                        + (f"; e.g. {missing[0]}" if missing else ""))
    has_images = docs.images is not None and any(docs.images)
    refuse_packing(config, has_images, inputs.processor)

    rng = np.random.default_rng([data_seed_of(config), 11])
    train_specs = [split.spec for split in splits if not split.from_test] + (
        [DatasetSpec("eval_dataset")] if inputs.eval_dataset is not None else [])
    picks = mixture_rows([len(t) for t in train_of], [spec.weight for spec in train_specs],
                         [spec.fraction for spec in train_specs], rng)
    train_docs = np.concatenate([t[pick] for t, pick in zip(train_of, picks) if len(pick)] or [np.zeros(0, np.int64)])
    eval_docs = np.concatenate(eval_of) if eval_of else np.zeros(0, np.int64)
    for source_stats, pick in zip(stats["sources"], picks):
        source_stats["mixed_documents"] = len(pick)
    if config.shuffle_dataset and len(train_docs):  # TRL's shuffle before packing; its own stream leaves rng as it was
        train_docs = train_docs[np.random.default_rng([data_seed_of(config), 13]).permutation(len(train_docs))]

    written = []
    for prefix, chosen, packing in (("train", train_docs, config.packing),
                                    ("eval", eval_docs, eval_rows_packed(config))):
        if packing and len(chosen):
            chosen = chosen[rng.permutation(len(chosen))]  # so rows mix sources, and wrapped rows mix documents
            plan = plan_packing(lengths[chosen], config.max_length, config.packing_strategy)
            packed = True
        else:
            plan, packed = PackingPlan.unpacked(lengths[chosen]), False
        plan.doc = chosen[plan.doc]  # positions in `chosen` -> spilled documents
        written.append(write_store(stage, prefix, final, spill, plan, packed, source, index, sources,
                                   docs.images if has_images else None, lengths))
    _describe(written[0], written[1], lengths[train_docs], config, stats)
    return labels


def _examine(docs: _Docs, source: np.ndarray, is_eval: np.ndarray, from_test: np.ndarray, index: np.ndarray,
             lengths: np.ndarray, truncated: np.ndarray, splits: list[_Split], train_split: dict[int, _Split],
             eval_split: dict[int, _Split], labels: list[str], config: SFTConfig, kept: np.ndarray) -> dict[str, Any]:
    """The data doctor's report on the documents (all training rows, then all eval rows, each by source in dataset
    order); with `dedupe`, the duplicates it finds are cleared in `kept` here."""
    order = np.argsort(is_eval.astype(np.int64) * (len(labels) + 1) + source, kind="stable")
    tables, docs.prints = docs.prints, []  # the chunks' tables go once joined
    prints = doctor.PrintTable.joined(tables).take(order)
    del tables

    def where(k: int) -> str:
        d = int(order[k])
        split = eval_split[int(source[d])] if from_test[d] else train_split[int(source[d])]
        return split.where(int(index[d]))

    report, remove = doctor.examine(prints, is_eval[order], source[order].astype(np.int64), lengths[order],
                                    truncated[order], where, labels, config.dedupe)
    if remove.any():
        kept[order[remove]] = False
        log.info("data: dedupe: %s removed %d training rows that repeat an earlier row and %d eval rows that repeat "
                 "a training row or an earlier eval row", config.dedupe, report["dedupe"]["train_removed"],
                 report["dedupe"]["eval_removed"])
    return report


def _describe(train: WrittenStore, evaluation: WrittenStore, lengths: np.ndarray, config: SFTConfig,
              stats: dict) -> None:
    tokens = train.tokens
    stats.update(
        rows=train.rows, eval_rows=evaluation.rows, documents=len(lengths), tokens=tokens,
        trained_tokens=train.trained_tokens, trained_fraction=round(train.trained_tokens / max(tokens, 1), 4),
        length_percentiles={f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)} | {"max": int(lengths.max())},
        eval_tokens=evaluation.tokens, eval_trained_tokens=evaluation.trained_tokens, packing=None,
    )
    if train.packed:
        stats["packing"] = {"strategy": config.packing_strategy, "length": config.max_length,
                            "efficiency": round(tokens / max(train.rows * config.max_length, 1), 4)}
    for s, source_stats in enumerate(stats["sources"]):
        source_stats["tokens"] = int(train.source_tokens[s])
        source_stats["trained_tokens"] = int(train.source_trained[s])


def refuse_packing(config: SFTConfig, has_images: bool, processor: Any) -> None:
    """(issue 14) Packing documents with images, refused where it would be wrong. Each document is packed whole
    with its own images: strategies that cut documents (bfd_split, wrapped) would cut images from their tokens.
    And a model whose processor marks image tokens in token_type_ids (Gemma 3's bidirectional attention within an
    image) gets, in transformers 5.24, sliding-window masks that let a packed document see another's image blocks."""
    if not (config.packing or eval_rows_packed(config)) or not has_images:
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


def nothing_left_message(config: SFTConfig, dropped: dict[str, int], total: int, names: list[str]) -> str:
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


# ---------------------------------------------------------------- examples before packing (sftune inspect)


def documents_of(inputs: Any, config: SFTConfig, limit: int | None, sizes: dict | None = None,
                 ) -> tuple[list[Documents], list[SourceRows]]:
    """The training documents of each source in dataset order, before mixing and packing; with `limit`, only
    from the first `limit` training rows of each source. Held in memory: for inspecting a few rows. `sizes`
    receives each source's whole train and eval row counts (a first pass over the rows counts them)."""
    inputs.eval_dataset = None
    stats: dict[str, Any] = {}
    every = read_splits(inputs, config)
    splits = [split for split in every if not split.from_test]
    worker = example_tokenizer(inputs, config, splits, stats)
    rng = np.random.default_rng([data_seed_of(config), 7])
    documents, origins = [], []
    counts: dict[str, list[int]] = {"train": [], "eval": []}
    for split, spec in zip(splits, inputs.specs):
        out = np.zeros(0, dtype=np.int64)
        holds_out = spec.test_split is None and config.held_out_ratio > 0
        if holds_out or sizes is not None:  # the hold-out needs the row count: a first pass
            total = sum(len(shard.rows) for shard in split.opened.stream(SHARD_ROWS))
            if holds_out:
                _, out = hold_out(total, config.held_out_ratio, rng)
            split.format, split.shards = "", _normalised_shards(split, config, inputs.formatting_func)
            test = next((t for t in every if t.from_test and t.source == split.source), None)
            tested = sum(len(shard.rows) for shard in test.opened.stream(SHARD_ROWS)) if test is not None else 0
            if sizes is not None and config.split_assistant_turns:  # a row may be several examples: count those
                per_row = _examples_per_row(split, config, inputs.formatting_func)
                total, held_examples = int(per_row.sum()), int(per_row[out].sum())
                tested = int(_examples_per_row(test, config, inputs.formatting_func).sum()) if test is not None else 0
                counts["train"].append(total - held_examples)
                counts["eval"].append(held_examples + tested)
            else:
                counts["train"].append(total - len(out))
                counts["eval"].append(len(out) + tested)
        held = set(out.tolist())
        examples, index = [], []
        for _, shard_examples, rows in split.shards:
            for example, row in zip(shard_examples, rows.tolist()):
                if row not in held and (limit is None or len(examples) < limit):
                    examples.append(example)
                    index.append(row)
            if limit is not None and len(examples) >= limit:
                break
        chunk = tokenize_chunk(worker, examples, check_data=False)
        if chunk.error is not None:
            raise DataError(f"{split.where(index[chunk.error[0]])}: {chunk.error[1]}")
        bounds = np.cumsum(chunk.lengths)[:-1]
        documents.append(Documents(np.split(chunk.ids, bounds) if len(chunk.kept) else [],
                                   np.split(chunk.labels, bounds) if len(chunk.kept) else [],
                                   np.full(len(chunk.kept), split.source, dtype=np.int32),
                                   np.asarray(index, dtype=np.int64)[chunk.kept], chunk.images, chunk.image_tokens))
        origins.append(SourceRows(split.opened.name, [], split.opened.origins))
    if sizes is not None:
        sizes.update(counts)
    return documents, origins


def _examples_per_row(split: _Split, config: SFTConfig, formatting_func: Callable | None) -> np.ndarray:
    """How many examples each row of `split` becomes (split_assistant_turns), from a pass of its own."""
    counts: list[np.ndarray] = []
    for shard, _, rows in _normalised_shards(_Split(split.source, split.from_test, split.spec, split.opened), config,
                                             formatting_func):
        counts.append(np.bincount(rows - shard.offset, minlength=len(shard.rows)))
    return np.concatenate(counts) if counts else np.zeros(0, np.int64)
