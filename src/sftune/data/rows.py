"""Prepared rows, stored compactly: every row's tokens in one array plus offsets, saved as .npy files.

A row as the rest of sftune sees it is a dict of views into these arrays:
  unpacked: {"input_ids", "labels", "index": int, "source": int}, and "images": [reference, ...] when the data
            has images (the images of the row's image tokens, in order; see images.py)
  packed:   {"input_ids", "labels", "seq_lengths", "index": array, "source": array}  (one entry per document),
            and "images": the images of its documents, in order, when the data has images
`index` is the document's row in its source dataset and `source` the dataset's position in the config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sftune.data.images import file_stamps, store_images
from sftune.data.pack import Segment

ARRAYS = ("input_ids", "labels", "row_offsets", "doc_lengths", "doc_offsets", "doc_source", "doc_index")


@dataclass
class Documents:
    """Tokenized documents before packing, in one list per field."""

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

    def take(self, order: np.ndarray) -> Documents:
        return Documents([self.ids[i] for i in order], [self.labels[i] for i in order],
                         self.source[order], self.index[order],
                         None if self.images is None else [self.images[i] for i in order],
                         None if self.image_tokens is None else [self.image_tokens[i] for i in order])


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
    def unpacked(cls, docs: Documents) -> RowStore:
        lengths = docs.lengths()
        images = image_offsets = None
        if docs.images is not None:
            images = [ref for refs in docs.images for ref in refs]
            image_offsets = _offsets(np.fromiter((len(r) for r in docs.images), dtype=np.int64, count=len(docs)))
        return cls(
            input_ids=_concat(docs.ids), labels=_concat(docs.labels), row_offsets=_offsets(lengths),
            doc_lengths=lengths.astype(np.int32), doc_offsets=np.arange(len(docs) + 1, dtype=np.int64),
            doc_source=docs.source.astype(np.int32), doc_index=docs.index.astype(np.int64), packed=False,
            images=images, image_offsets=image_offsets,
        )

    @classmethod
    def from_plan(cls, docs: Documents, plan: list[list[Segment]]) -> RowStore:
        segments = [segment for row in plan for segment in row]
        which = np.fromiter((d for d, _, _ in segments), dtype=np.int64, count=len(segments))
        seg_lengths = np.fromiter((e - s for _, s, e in segments), dtype=np.int64, count=len(segments))
        row_lengths = np.fromiter((sum(e - s for _, s, e in row) for row in plan), dtype=np.int64, count=len(plan))
        images = image_offsets = None
        if docs.images is not None:  # each document whole, with its images (prepare.refuse_packing)
            if any(docs.images[d] and (s != 0 or e != len(docs.ids[d])) for d, s, e in segments):
                raise ValueError("a document with images was cut by packing")
            images = [ref for d, _, _ in segments for ref in docs.images[d]]
            image_offsets = _offsets(np.fromiter((len(docs.images[d]) for d, _, _ in segments), dtype=np.int64,
                                                 count=len(segments)))
        return cls(
            input_ids=_concat([docs.ids[d][s:e] for d, s, e in segments]),
            labels=_concat([docs.labels[d][s:e] for d, s, e in segments]),
            row_offsets=_offsets(row_lengths), doc_lengths=seg_lengths.astype(np.int32),
            doc_offsets=_offsets(np.fromiter((len(row) for row in plan), dtype=np.int64, count=len(plan))),
            doc_source=docs.source[which].astype(np.int32), doc_index=docs.index[which].astype(np.int64),
            packed=True, images=images, image_offsets=image_offsets,
        )

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def rows(self) -> list[dict[str, Any]]:
        starts, ends = self.row_offsets[:-1].tolist(), self.row_offsets[1:].tolist()
        if not self.packed:
            rows = [
                {"input_ids": self.input_ids[a:b], "labels": self.labels[a:b], "index": i, "source": s}
                for a, b, i, s in zip(starts, ends, self.doc_index.tolist(), self.doc_source.tolist())
            ]
            if self.images is not None:
                bounds = self.image_offsets.tolist()
                for row, a, b in zip(rows, bounds[:-1], bounds[1:]):
                    row["images"] = self.images[a:b]
            return rows
        doc_starts, doc_ends = self.doc_offsets[:-1].tolist(), self.doc_offsets[1:].tolist()
        rows = [
            {"input_ids": self.input_ids[a:b], "labels": self.labels[a:b], "seq_lengths": self.doc_lengths[c:d],
             "index": self.doc_index[c:d], "source": self.doc_source[c:d]}
            for a, b, c, d in zip(starts, ends, doc_starts, doc_ends)
        ]
        if self.images is not None:
            bounds = self.image_offsets.tolist()
            for row, c, d in zip(rows, doc_starts, doc_ends):
                row["images"] = self.images[bounds[c]:bounds[d]]
        return rows

    def save(self, folder: Path, prefix: str, final: Path) -> None:
        """Into `folder`, which becomes `final` (images that are not files are stored there)."""
        for name in ARRAYS:
            np.save(folder / f"{prefix}.{name}.npy", getattr(self, name))
        np.save(folder / f"{prefix}.packed.npy", np.array(self.packed))
        if self.images is not None:
            np.save(folder / f"{prefix}.image_offsets.npy", self.image_offsets)
            stamps = file_stamps([ref for ref in self.images if isinstance(ref, str)])
            paths = store_images(self.images, folder, final)
            (folder / f"{prefix}.images.json").write_text(json.dumps({"paths": paths, "stamps": stamps}),
                                                           encoding="utf-8")

    @classmethod
    def load(cls, folder: Path, prefix: str) -> RowStore | None:
        """The saved rows; None when image files they refer to changed since (or are gone)."""
        arrays = {name: np.load(folder / f"{prefix}.{name}.npy", mmap_mode="r") for name in ARRAYS}
        store = cls(**arrays, packed=bool(np.load(folder / f"{prefix}.packed.npy")))
        images = folder / f"{prefix}.images.json"
        if images.is_file():
            saved = json.loads(images.read_text(encoding="utf-8"))
            if file_stamps(list(saved["stamps"])) != saved["stamps"]:
                return None
            store.images, store.image_offsets = saved["paths"], np.load(folder / f"{prefix}.image_offsets.npy")
        return store


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int32, copy=False) if parts else np.zeros(0, dtype=np.int32)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets
