"""Packing plans: which pieces of which documents fill each packed sequence of `capacity` tokens.

A plan is a list of packed rows, each a list of segments (document, start, end). Rows are built from it
elsewhere; every segment stays a document of its own (its own positions, no attention across segments).

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

import numpy as np

Segment = tuple[int, int, int]  # (document index, start, end)
STRATEGIES = ("bfd", "bfd_split", "wrapped")


def plan_packing(lengths: np.ndarray | list[int], capacity: int, strategy: str = "bfd") -> list[list[Segment]]:
    lengths = np.asarray(lengths, dtype=np.int64)
    if strategy == "wrapped":
        return _wrapped(lengths, capacity)
    if strategy == "bfd":
        pieces = [(d, 0, int(min(n, capacity))) for d, n in enumerate(lengths) if n > 0]
    elif strategy == "bfd_split":
        pieces = [(d, s, int(min(s + capacity, n))) for d, n in enumerate(lengths) for s in range(0, int(n), capacity)]
    else:
        raise ValueError(f"unknown packing strategy {strategy!r} (expected one of {', '.join(STRATEGIES)})")
    sizes = np.array([e - s for _, s, e in pieces], dtype=np.int64)
    return [[pieces[i] for i in row] for row in best_fit_decreasing(sizes, capacity)]


def best_fit_decreasing(sizes: np.ndarray, capacity: int) -> list[list[int]]:
    """Item indices per bin. Items go in by decreasing size (stable), each into the bin with the least room left
    that still fits it (the oldest such bin on a tie), else into a new bin; bins are returned in opening order."""
    bins: list[list[int]] = []
    rooms: list[int] = []  # sorted room values that some open bin has, below capacity
    bins_with_room: dict[int, deque[int]] = {}
    for item in np.argsort(-sizes, kind="stable"):
        size = int(sizes[item])
        at = bisect.bisect_left(rooms, size)
        if at < len(rooms):
            room = rooms[at]
            waiting = bins_with_room[room]
            target = waiting.popleft()
            if not waiting:
                rooms.pop(at)
        else:
            room, target = capacity, len(bins)
            bins.append([])
        bins[target].append(int(item))
        left = room - size
        if left > 0:
            if left not in bins_with_room or not bins_with_room[left]:
                bisect.insort(rooms, left)
                bins_with_room[left] = deque()
            bins_with_room[left].append(target)
    return bins


def _wrapped(lengths: np.ndarray, capacity: int) -> list[list[Segment]]:
    rows: list[list[Segment]] = [[]]
    room = capacity
    for d, n in enumerate(lengths):
        start = 0
        while start < n:
            if room == 0:
                rows.append([])
                room = capacity
            take = int(min(room, n - start))
            rows[-1].append((d, start, start + take))
            start += take
            room -= take
    return [row for row in rows if row]
