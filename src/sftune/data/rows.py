"""Prepared rows, stored compactly: every row's tokens in one array plus offsets, saved as .npy files and read back
memory-mapped, so that a run holds in memory only the rows it is batching.

A row as the rest of sftune sees it is a dict of views into these arrays (made when the row is asked for):
  unpacked: {"input_ids", "labels", "index": int, "source": int}, and "images": [reference, ...] when the data
            has images (the images of the row's image tokens, in order; see images.py)
  packed:   {"input_ids", "labels", "seq_lengths", "index": array, "source": array}  (one entry per document),
            and "images": the images of its documents, in order, when the data has images
`index` is the document's row in its source dataset and `source` the dataset's position in the config.
Preparation writes the stores in bounded memory (row_writer.py); `RowStore.from_plan` builds a small one in memory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sftune.data.images import file_stamps, store_images
from sftune.data.pack import PackingPlan

ARRAYS = ("input_ids", "labels", "row_offsets", "doc_lengths", "doc_offsets", "doc_source", "doc_index")


@dataclass
class Documents:
    """Tokenized documents before packing, in one list per field (small sets: `sftune inspect`, tests)."""

    ids: list[np.ndarray]
    labels: list[np.ndarray]
    source: np.ndarray  # int32 per document
    index: np.ndarray  # int64 per document
    images: list[list] | None = None  # image references per document; None when no document has images
    image_tokens: list[list[int]] | None = None  # tokens each of those images takes (with images only)

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))


@dataclass
class RowStore:
    input_ids: np.ndarray  # int32, all rows end to end
    labels: np.ndarray  # int32, aligned with input_ids
    row_offsets: np.ndarray  # int64, row r is [row_offsets[r], row_offsets[r + 1])
    doc_lengths: np.ndarray  # int32, the documents (segments) of all rows end to end
    doc_offsets: np.ndarray  # int64, row r holds documents [doc_offsets[r], doc_offsets[r + 1])
    doc_source: np.ndarray  # int32 per document
    doc_index: np.ndarray  # int64 per document
    packed: bool
    images: list | None = None  # image references of all documents end to end
    image_offsets: np.ndarray | None = None  # int64, document d has images [image_offsets[d], image_offsets[d + 1])

    @classmethod
    def from_plan(cls, docs: Documents, plan: PackingPlan, packed: bool = True) -> RowStore:
        """The rows of `plan` over `docs`, in memory, by the same segment copy preparation writes with."""
        from sftune.data.row_writer import copy_segments, segment_images

        lengths = docs.lengths()
        offsets = offsets_of(lengths)
        flat_ids = np.concatenate(docs.ids).astype(np.int32) if len(docs) else np.zeros(0, dtype=np.int32)
        flat_labels = np.concatenate(docs.labels).astype(np.int32) if len(docs) else np.zeros(0, dtype=np.int32)
        ids, labels = [], []
        for chunk_ids, chunk_labels, _ in copy_segments(lambda: (flat_ids, flat_labels), offsets, plan):
            ids.append(chunk_ids)
            labels.append(chunk_labels)
        images, image_offsets = segment_images(docs.images, lengths, plan) if docs.images is not None else (None, None)
        seg_lengths = plan.segment_lengths()
        return cls(
            input_ids=_concat(ids), labels=_concat(labels),
            row_offsets=offsets_of(np.add.reduceat(seg_lengths, plan.row_offsets[:-1]) if len(seg_lengths) else
                                   np.zeros(len(plan), dtype=np.int64)),
            doc_lengths=seg_lengths.astype(np.int32), doc_offsets=plan.row_offsets.astype(np.int64),
            doc_source=docs.source[plan.doc].astype(np.int32), doc_index=docs.index[plan.doc].astype(np.int64),
            packed=packed, images=images, image_offsets=image_offsets,
        )

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def rows(self) -> RowList:
        return RowList(self)

    def save(self, folder: Path, prefix: str, final: Path) -> None:
        """Into `folder`, which becomes `final` (images that are not files are stored there)."""
        for name in ARRAYS:
            np.save(folder / f"{prefix}.{name}.npy", getattr(self, name))
        save_flags(folder, prefix, self.packed, self.images, self.image_offsets, final)

    @classmethod
    def load(cls, folder: Path, prefix: str) -> RowStore | None:
        """The saved rows, memory-mapped; None when image files they refer to changed since (or are gone)."""
        arrays = {name: np.load(folder / f"{prefix}.{name}.npy", mmap_mode="r") for name in ARRAYS}
        store = cls(**arrays, packed=bool(np.load(folder / f"{prefix}.packed.npy")))
        images = folder / f"{prefix}.images.json"
        if images.is_file():
            saved = json.loads(images.read_text(encoding="utf-8"))
            if file_stamps(list(saved["stamps"])) != saved["stamps"]:
                return None
            store.images, store.image_offsets = saved["paths"], np.load(folder / f"{prefix}.image_offsets.npy")
        return store


class RowList(Sequence):
    """The rows of a store as a read-only list whose items are made when asked for (views, no copies)."""

    def __init__(self, store: RowStore):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [self._row(i) for i in range(*key.indices(len(self)))]
        if key < 0:
            key += len(self)
        if not 0 <= key < len(self):
            raise IndexError(f"row {key} of {len(self)}")
        return self._row(int(key))

    def _row(self, i: int) -> dict[str, Any]:
        s = self.store
        a, b = int(s.row_offsets[i]), int(s.row_offsets[i + 1])
        c, d = int(s.doc_offsets[i]), int(s.doc_offsets[i + 1])
        if s.packed:
            row = {"input_ids": s.input_ids[a:b], "labels": s.labels[a:b], "seq_lengths": s.doc_lengths[c:d],
                   "index": s.doc_index[c:d], "source": s.doc_source[c:d]}
        else:
            row = {"input_ids": s.input_ids[a:b], "labels": s.labels[a:b], "index": int(s.doc_index[c]),
                   "source": int(s.doc_source[c])}
        if s.images is not None:
            row["images"] = s.images[int(s.image_offsets[c]):int(s.image_offsets[d])]
        return row


def save_flags(folder: Path, prefix: str, packed: bool, images: list | None, image_offsets: np.ndarray | None,
               final: Path) -> None:
    """What a store has beside its arrays: whether it is packed, and its images (stored in `final` when they
    are not files)."""
    np.save(folder / f"{prefix}.packed.npy", np.array(packed))
    if images is not None:
        np.save(folder / f"{prefix}.image_offsets.npy", image_offsets)
        stamps = file_stamps([ref for ref in images if isinstance(ref, str)])
        paths = store_images(images, folder, final)
        (folder / f"{prefix}.images.json").write_text(json.dumps({"paths": paths, "stamps": stamps}),
                                                       encoding="utf-8")


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int32, copy=False) if parts else np.zeros(0, dtype=np.int32)


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets
