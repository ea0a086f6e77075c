"""Tokenizing a stream of example chunks in worker processes, in order, with a bounded number of chunks in flight,
each chunk coming back as a few arrays (ChunkResult) rather than a Python object per row: the main process then
holds, whatever the dataset's size, only the chunks in flight and a few bytes per document (prepare.py)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sftune.data import doctor
from sftune.data.render import IGNORE_INDEX, ExampleTokenizer

EXAMPLES_PER_CHECK = 3
IN_FLIGHT_PER_PROCESS = 3  # chunks queued per worker: enough to keep every worker busy, few enough to stay small


@dataclass
class ChunkResult:
    """A chunk of examples, tokenized: the kept documents' tokens end to end, and what was found."""

    count: int  # examples in the chunk
    kept: np.ndarray  # int64: the chunk positions of the kept documents, in order
    lengths: np.ndarray  # int64 per kept document
    ids: np.ndarray  # int32, the kept documents end to end
    labels: np.ndarray  # int32
    truncated: np.ndarray  # bool per kept document
    dropped: list[tuple[int, str]] = field(default_factory=list)  # (chunk position, reason)
    truncated_dropped: int = 0  # truncated rows among the dropped ones (counted as truncated, as before)
    checked_rows: int = 0
    checked_turns: int = 0
    check_rows: dict[str, int] = field(default_factory=dict)  # template check -> rows failing it
    check_examples: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # -> (position, detail), first few
    empty_turns: int = 0  # empty assistant replies (never trained)
    empty_rows: int = 0  # rows holding one
    empty_examples: list[tuple[int, str]] = field(default_factory=list)  # (position, "message 2, ..."), first few
    error: tuple[int, str] | None = None  # the first row that stops preparation
    prints: doctor.PrintTable | None = None  # per kept document (with the data doctor on)
    images: list[list] | None = None  # image references per kept document (data with images only)
    image_tokens: list[list[int]] | None = None


def tokenize_chunk(worker: ExampleTokenizer, examples: list[dict], check_data: bool) -> ChunkResult:
    results = worker(examples)
    kept, dropped, truncated_dropped = [], [], 0
    checks: dict[str, int] = {}
    examples_of: dict[str, list[tuple[int, str]]] = {}
    checked_rows = checked_turns = empty_turns = empty_rows = 0
    empty_examples: list[tuple[int, str]] = []
    error = None
    for i, result in enumerate(results):
        if result.error:
            error = (i, result.error)
            break
        if result.checked_turns or result.problems:
            checked_rows += 1
            checked_turns += result.checked_turns
        for name in {name for name, _ in result.problems}:
            checks[name] = checks.get(name, 0) + 1
            found = examples_of.setdefault(name, [])
            if len(found) < EXAMPLES_PER_CHECK:
                found.append((i, next(d for n, d in result.problems if n == name)))
        if result.untrained:
            empty_turns += len(result.untrained)
            empty_rows += 1
            if len(empty_examples) < EXAMPLES_PER_CHECK:
                empty_examples.append((i, ", ".join(f"message {m + 1}" for m in result.untrained)))
        reason = result.drop
        if reason is None and not (result.labels[1:] != IGNORE_INDEX).any():  # position 0 is never predicted
            reason = "truncated_to_nothing" if result.truncated else "no_trained_tokens"
            truncated_dropped += bool(result.truncated)
        if reason is not None:
            dropped.append((i, reason))
        else:
            kept.append(i)
    kept_results = [results[i] for i in kept]
    lengths = np.fromiter((len(r.ids) for r in kept_results), dtype=np.int64, count=len(kept))
    with_images = any(r.images is not None for r in kept_results)
    chunk = ChunkResult(
        len(examples), np.asarray(kept, dtype=np.int64), lengths,
        np.concatenate([r.ids for r in kept_results]).astype(np.int32) if kept else np.zeros(0, np.int32),
        np.concatenate([r.labels for r in kept_results]).astype(np.int32) if kept else np.zeros(0, np.int32),
        np.fromiter((r.truncated for r in kept_results), dtype=bool, count=len(kept)),
        dropped, truncated_dropped, checked_rows, checked_turns, checks, examples_of, empty_turns, empty_rows,
        empty_examples, error,
        images=[r.images or [] for r in kept_results] if with_images else None,
        image_tokens=[r.image_tokens or [] for r in kept_results] if with_images else None,
    )
    if check_data and error is None:
        max_words = None if worker.keep_end else worker.max_length  # what training can see of each row
        chunk.prints = doctor.PrintTable.of(doctor.fingerprints([examples[i] for i in kept], max_words))
    return chunk


def tokenized_chunks(worker: ExampleTokenizer, chunks: Iterator[tuple[Any, list[dict]]], num_proc: int,
                     check_data: bool) -> Iterator[tuple[Any, ChunkResult]]:
    """(tag, result) for each (tag, examples) of `chunks`, in order; `chunks` is read only as far as the workers
    are behind by at most IN_FLIGHT_PER_PROCESS chunks each."""
    if num_proc <= 1:
        for tag, examples in chunks:
            yield tag, tokenize_chunk(worker, examples, check_data)
        return
    worker.shape(None)  # analyse the template once, before the workers copy the tokenizer
    global _WORKER
    _WORKER = worker  # forked workers inherit it; spawned ones get it through initargs
    forking = "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if forking else "spawn")
    try:
        with stop_quietly(), context.Pool(num_proc, initializer=_set_worker,
                                          initargs=(None if forking else worker,)) as pool:
            waiting: deque = deque()
            for tag, examples in chunks:
                waiting.append((tag, pool.apply_async(_work, (examples, check_data))))
                while len(waiting) >= num_proc * IN_FLIGHT_PER_PROCESS:
                    tag_done, result = waiting.popleft()
                    yield tag_done, result.get()
            while waiting:
                tag_done, result = waiting.popleft()
                yield tag_done, result.get()
    finally:
        _WORKER = None


_WORKER: ExampleTokenizer | None = None


@contextmanager
def stop_quietly() -> Iterator[None]:
    """SIGTERM while the workers run stops this process as Ctrl-C does (KeyboardInterrupt: the pool is torn down,
    the CLI says "interrupted"), instead of killing it and leaving the workers to die on their own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _set_worker(worker: ExampleTokenizer | None) -> None:
    global _WORKER
    # Ctrl-C reaches every process of the terminal's group: a worker that took it would print its own traceback.
    # The main process alone stops, and ends the workers (SIGTERM, at its default: they exit without a word).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    if worker is not None:
        _WORKER = worker


def _work(examples: list[dict], check_data: bool) -> ChunkResult:
    assert _WORKER is not None
    return tokenize_chunk(_WORKER, examples, check_data)
