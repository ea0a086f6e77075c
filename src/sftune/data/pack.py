"""Packing plans: which pieces of which documents fill each packed sequence of `capacity` tokens.

A plan holds, in numpy arrays, one segment (document, start, end) per piece and where each packed row's segments
begin: a few bytes a document, whatever the dataset's size, so that large datasets plan in bounded memory. Rows are
built from it elsewhere (rows.py); every segment stays a document of its own (its own positions, no attention
across segments).

- bfd: best-fit decreasing. Documents longest first, each into the fullest row it still fits; documents longer
  than the capacity keep their first `capacity` tokens.
- bfd_split: the same, but documents longer than the capacity are first cut into capacity-sized pieces.
- wrapped: all documents end to end, cut every `capacity` tokens; documents may be split across rows.

For the same input, the rows and segment lengths equal those of TRL's `pack_dataset` with the same strategy
name (when TRL packs the whole dataset in one batch); ties between equal lengths keep dataset order.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

import numpy as np

Segment = tuple[int, int, int]  # (document index, start, end)
STRATEGIES = ("bfd", "bfd_split", "wrapped")


@dataclass
class PackingPlan:
    doc: np.ndarray  # int64 per segment, in row order
    start: np.ndarray  # int64 per segment: the first token of the document it takes
    end: np.ndarray  # int64 per segment: one past its last token
    row_offsets: np.ndarray  # int64, row r holds segments [row_offsets[r], row_offsets[r + 1])

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    @classmethod
    def unpacked(cls, lengths: np.ndarray) -> PackingPlan:
        """One document per row, whole."""
        count = len(lengths)
        return cls(np.arange(count, dtype=np.int64), np.zeros(count, dtype=np.int64),
                   np.asarray(lengths, dtype=np.int64), np.arange(count + 1, dtype=np.int64))

    def segment_lengths(self) -> np.ndarray:
        return self.end - self.start

    def rows(self) -> list[list[Segment]]:
        """The plan as lists of (document, start, end) per row (for tests and small plans)."""
        bounds = self.row_offsets.tolist()
        segments = list(zip(self.doc.tolist(), self.start.tolist(), self.end.tolist()))
        return [segments[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def plan_packing(lengths: np.ndarray | list[int], capacity: int, strategy: str = "bfd") -> PackingPlan:
    lengths = np.asarray(lengths, dtype=np.int64)
    if strategy == "wrapped":
        return _wrapped(lengths, capacity)
    if strategy == "bfd":
        doc = np.flatnonzero(lengths > 0)
        start = np.zeros(len(doc), dtype=np.int64)
        end = np.minimum(lengths[doc], capacity)
    elif strategy == "bfd_split":
        pieces = -(-lengths // capacity)  # capacity-sized pieces per document (none for an empty one)
        doc = np.repeat(np.arange(len(lengths), dtype=np.int64), pieces)
        first_piece = np.repeat(np.cumsum(pieces) - pieces, pieces)
        start = (np.arange(len(doc), dtype=np.int64) - first_piece) * capacity
        end = np.minimum(start + capacity, lengths[doc])
    else:
        raise ValueError(f"unknown packing strategy {strategy!r} (expected one of {', '.join(STRATEGIES)})")
    order, row_offsets = best_fit_decreasing(end - start, capacity)
    return PackingPlan(doc[order], start[order], end[order], row_offsets)


def best_fit_decreasing(sizes: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Items in bin order and where each bin starts in it. Items go in by decreasing size (stable), each into the
    bin with the least room left that still fits it (the oldest such bin on a tie), else into a new bin; bins are
    in opening order, each bin's items in the order they went in. Memory: a few bytes an item, plus one entry per
    distinct room value (at most `capacity`)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    by_size = np.argsort(-sizes, kind="stable")
    bin_of = np.empty(len(sizes), dtype=np.int64)  # per item, in the order items go in
    opened = 0
    rooms: list[int] = []  # sorted room values that some open bin has, below capacity
    bins_with_room: dict[int, deque[int]] = {}
    for position, size in enumerate(sizes[by_size].tolist()):
        at = bisect.bisect_left(rooms, size)
        if at < len(rooms):
            room = rooms[at]
            waiting = bins_with_room[room]
            target = waiting.popleft()
            if not waiting:
                rooms.pop(at)
        else:
            room, target = capacity, opened
            opened += 1
        bin_of[position] = target
        left = room - size
        if left > 0:
            if left not in bins_with_room or not bins_with_room[left]:
                bisect.insort(rooms, left)
                bins_with_room[left] = deque()
            bins_with_room[left].append(target)
    grouped = np.argsort(bin_of, kind="stable")  # by bin, keeping the order items went in
    counts = np.bincount(bin_of, minlength=opened)
    offsets = np.zeros(opened + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return by_size[grouped], offsets


def _wrapped(lengths: np.ndarray, capacity: int) -> PackingPlan:
    """All tokens end to end, cut at every multiple of capacity: a segment per (document, row) piece."""
    doc_start = np.cumsum(lengths) - lengths  # each document's first token in the stream
    doc_end = doc_start + lengths
    total = int(lengths.sum())
    cuts = np.arange(capacity, total, capacity, dtype=np.int64)  # row boundaries inside the stream
    # every boundary (document or row) starts a segment; segments of empty documents are dropped
    starts = np.union1d(doc_start[lengths > 0], cuts) if total else np.zeros(0, dtype=np.int64)
    ends = np.append(starts[1:], total)
    doc = np.searchsorted(doc_end, starts, side="right")
    start = starts - doc_start[doc]
    end = ends - doc_start[doc]
    row = starts // capacity
    row_offsets = np.zeros(int(row[-1]) + 2 if len(row) else 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=len(row_offsets) - 1), out=row_offsets[1:])
    return PackingPlan(doc.astype(np.int64), start.astype(np.int64), end.astype(np.int64), row_offsets)
