"""Prepared rows, stored compactly: every row's tokens in one array plus offsets, saved as .npy files.

A row as the rest of sftune sees it is a dict of views into these arrays:
  unpacked: {"input_ids", "labels", "index": int, "source": int}
  packed:   {"input_ids", "labels", "seq_lengths", "index": array, "source": array}  (one entry per document)
`index` is the document's row in its source dataset and `source` the dataset's position in the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sftune.data.pack import Segment

ARRAYS = ("input_ids", "labels", "row_offsets", "doc_lengths", "doc_offsets", "doc_source", "doc_index")


@dataclass
class Documents:
    """Tokenized documents before packing, in one list per field."""

    ids: list[np.ndarray]
    labels: list[np.ndarray]
    source: np.ndarray  # int32 per document
    index: np.ndarray  # int64 per document

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))

    def take(self, order: np.ndarray) -> Documents:
        return Documents([self.ids[i] for i in order], [self.labels[i] for i in order],
                         self.source[order], self.index[order])


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

    @classmethod
    def unpacked(cls, docs: Documents) -> RowStore:
        lengths = docs.lengths()
        return cls(
            input_ids=_concat(docs.ids), labels=_concat(docs.labels), row_offsets=_offsets(lengths),
            doc_lengths=lengths.astype(np.int32), doc_offsets=np.arange(len(docs) + 1, dtype=np.int64),
            doc_source=docs.source.astype(np.int32), doc_index=docs.index.astype(np.int64), packed=False,
        )

    @classmethod
    def from_plan(cls, docs: Documents, plan: list[list[Segment]]) -> RowStore:
        segments = [segment for row in plan for segment in row]
        which = np.fromiter((d for d, _, _ in segments), dtype=np.int64, count=len(segments))
        seg_lengths = np.fromiter((e - s for _, s, e in segments), dtype=np.int64, count=len(segments))
        row_lengths = np.fromiter((sum(e - s for _, s, e in row) for row in plan), dtype=np.int64, count=len(plan))
        return cls(
            input_ids=_concat([docs.ids[d][s:e] for d, s, e in segments]),
            labels=_concat([docs.labels[d][s:e] for d, s, e in segments]),
            row_offsets=_offsets(row_lengths), doc_lengths=seg_lengths.astype(np.int32),
            doc_offsets=_offsets(np.fromiter((len(row) for row in plan), dtype=np.int64, count=len(plan))),
            doc_source=docs.source[which].astype(np.int32), doc_index=docs.index[which].astype(np.int64),
            packed=True,
        )

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def rows(self) -> list[dict[str, Any]]:
        starts, ends = self.row_offsets[:-1].tolist(), self.row_offsets[1:].tolist()
        if not self.packed:
            return [
                {"input_ids": self.input_ids[a:b], "labels": self.labels[a:b], "index": i, "source": s}
                for a, b, i, s in zip(starts, ends, self.doc_index.tolist(), self.doc_source.tolist())
            ]
        doc_starts, doc_ends = self.doc_offsets[:-1].tolist(), self.doc_offsets[1:].tolist()
        return [
            {"input_ids": self.input_ids[a:b], "labels": self.labels[a:b], "seq_lengths": self.doc_lengths[c:d],
             "index": self.doc_index[c:d], "source": self.doc_source[c:d]}
            for a, b, c, d in zip(starts, ends, doc_starts, doc_ends)
        ]

    def save(self, folder: Path, prefix: str) -> None:
        for name in ARRAYS:
            np.save(folder / f"{prefix}.{name}.npy", getattr(self, name))
        np.save(folder / f"{prefix}.packed.npy", np.array(self.packed))

    @classmethod
    def load(cls, folder: Path, prefix: str) -> RowStore:
        arrays = {name: np.load(folder / f"{prefix}.{name}.npy", mmap_mode="r") for name in ARRAYS}
        return cls(**arrays, packed=bool(np.load(folder / f"{prefix}.packed.npy")))


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int32, copy=False) if parts else np.zeros(0, dtype=np.int32)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets
