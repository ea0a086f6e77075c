"""Writing prepared rows in bounded memory: tokenized documents are appended to a spill (two flat int32 files) as
each shard is tokenized; once the packing plan is made, the rows are copied from the spill into the store's .npy
files a few million tokens at a time. Only numpy arrays of a few bytes per document stay in memory, and the spill
is mapped for one chunk at a time (a mapping's touched pages count in the process's RSS until it is closed)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from sftune.data.pack import PackingPlan
from sftune.data.render import IGNORE_INDEX
from sftune.data.rows import offsets_of, save_flags

CHUNK_TOKENS = 1 << 21  # tokens copied at a time: about 50 MB of index and token arrays


class TokenSpill:
    """Documents' ids and labels, end to end in two files, in the order they were appended."""

    def __init__(self, folder: Path):
        self.ids_path, self.labels_path = folder / "spill.ids.bin", folder / "spill.labels.bin"
        self._ids: BinaryIO | None = self.ids_path.open("wb")
        self._labels: BinaryIO | None = self.labels_path.open("wb")
        self._lengths: list[np.ndarray] = []
        self.offsets = np.zeros(1, dtype=np.int64)  # filled by close(): document d is [offsets[d], offsets[d + 1])

    def append(self, ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> None:
        """Documents of `lengths` tokens, their ids and labels end to end."""
        assert self._ids is not None and self._labels is not None
        self._ids.write(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
        self._labels.write(np.ascontiguousarray(labels, dtype=np.int32).tobytes())
        self._lengths.append(np.asarray(lengths, dtype=np.int64))

    def close(self) -> None:
        if self._ids is not None:
            self._ids.close()
            self._labels.close()
            self._ids = self._labels = None
            self.offsets = offsets_of(np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64))
            self._lengths = []

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The spilled ids and labels, mapped (drop them after use: see the module's note)."""
        if int(self.offsets[-1]) == 0:
            return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int32)
        return (np.memmap(self.ids_path, dtype=np.int32, mode="r"),
                np.memmap(self.labels_path, dtype=np.int32, mode="r"))

    def remove(self) -> None:
        self.close()
        self.ids_path.unlink(missing_ok=True)
        self.labels_path.unlink(missing_ok=True)


def copy_segments(open_arrays: Callable[[], tuple[np.ndarray, np.ndarray]], doc_offsets: np.ndarray,
                  plan: PackingPlan) -> Iterator[tuple[np.ndarray, np.ndarray, slice]]:
    """The plan's tokens (ids, labels) in chunks of about CHUNK_TOKENS, each with the segments it covers.
    `open_arrays` gives the documents' ids and labels end to end (document d at doc_offsets[d]); it is called
    again for every chunk so that a mapping is closed in between."""
    lengths = plan.segment_lengths()
    ends = np.cumsum(lengths)
    first = 0
    while first < len(lengths):
        before = int(ends[first - 1]) if first else 0
        last = max(int(np.searchsorted(ends, before + CHUNK_TOKENS, side="right")), first + 1)
        part = slice(first, last)
        counts = lengths[part]
        total = int(counts.sum())
        source_starts = doc_offsets[plan.doc[part]] + plan.start[part]
        out_starts = np.cumsum(counts) - counts
        positions = np.repeat(source_starts - out_starts, counts) + np.arange(total, dtype=np.int64)
        ids, labels = open_arrays()
        chunk = (np.asarray(ids[positions], dtype=np.int32), np.asarray(labels[positions], dtype=np.int32))
        del ids, labels  # closes a mapping before the next chunk opens it
        yield chunk[0], chunk[1], part
        first = last


def segment_images(images: list[list], doc_lengths: np.ndarray, plan: PackingPlan) -> tuple[list, np.ndarray]:
    """The images of each segment, end to end, and where each segment's start. A document with images is never
    cut (prepare.refuse_packing), which is checked here."""
    cut = (plan.start != 0) | (plan.end != doc_lengths[plan.doc])
    if any(images[d] for d in plan.doc[cut].tolist()):
        raise ValueError("a document with images was cut by packing")
    refs = [ref for d in plan.doc.tolist() for ref in images[d]]
    counts = np.fromiter((len(images[d]) for d in plan.doc.tolist()), dtype=np.int64, count=len(plan.doc))
    return refs, offsets_of(counts)


@dataclass
class WrittenStore:
    """What writing a store counted: its tokens and trained targets, in total and per source."""

    rows: int
    tokens: int
    trained_tokens: int
    source_tokens: np.ndarray
    source_trained: np.ndarray
    packed: bool
    segment_lengths: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int64))


def write_store(folder: Path, prefix: str, final: Path, spill: TokenSpill, plan: PackingPlan, packed: bool,
                doc_source: np.ndarray, doc_index: np.ndarray, sources: int,
                images: list[list] | None = None, doc_lengths: np.ndarray | None = None) -> WrittenStore:
    """Write the rows of `plan` over the spilled documents as `prefix`.*.npy in `folder` (which becomes `final`),
    and count what they hold. `doc_source` and `doc_index` are per spilled document."""
    lengths = plan.segment_lengths()
    total = int(lengths.sum())
    seg_source = doc_source[plan.doc].astype(np.int32)
    source_tokens = np.bincount(seg_source, weights=lengths, minlength=sources).astype(np.int64)
    source_trained = np.zeros(sources, dtype=np.int64)
    with _npy_writer(folder / f"{prefix}.input_ids.npy", np.int32, total) as ids_out, \
            _npy_writer(folder / f"{prefix}.labels.npy", np.int32, total) as labels_out:
        for ids, labels, part in copy_segments(spill.arrays, spill.offsets, plan):
            ids_out.write(ids.tobytes())
            labels_out.write(labels.tobytes())
            trained = labels != IGNORE_INDEX
            counts = lengths[part]
            trained[(np.cumsum(counts) - counts)[counts > 0]] = False  # a document's first token is never predicted
            source_trained += np.bincount(np.repeat(seg_source[part], counts)[trained], minlength=sources)
    row_lengths = np.add.reduceat(lengths, plan.row_offsets[:-1]) if len(lengths) else np.zeros(0, np.int64)
    arrays = {"row_offsets": offsets_of(row_lengths), "doc_lengths": lengths.astype(np.int32),
              "doc_offsets": plan.row_offsets.astype(np.int64), "doc_source": seg_source,
              "doc_index": doc_index[plan.doc].astype(np.int64)}
    for name, array in arrays.items():
        np.save(folder / f"{prefix}.{name}.npy", array)
    refs = offsets = None
    if images is not None:
        assert doc_lengths is not None
        refs, offsets = segment_images(images, doc_lengths, plan)
    save_flags(folder, prefix, packed, refs, offsets, final)
    return WrittenStore(len(plan), total, int(source_trained.sum()), source_tokens, source_trained, packed, lengths)


class _npy_writer:
    """A .npy file of `count` values of `dtype`, written by appending raw bytes after its header."""

    def __init__(self, path: Path, dtype: Any, count: int):
        self.path, self.dtype, self.count = path, np.dtype(dtype), count

    def __enter__(self) -> BinaryIO:
        self.handle = self.path.open("wb")
        np.lib.format.write_array_header_1_0(self.handle, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                           "fortran_order": False, "shape": (self.count,)})
        return self.handle

    def __exit__(self, *exc: Any) -> None:
        self.handle.close()
