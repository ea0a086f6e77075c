"""Batches of a vision-language model's rows, in the same layouts as text rows (see collate.py).

Each layout is the text layout of the rows' tokens plus the model's other inputs (vision_inputs.py): the pixels
of the images the batch's rows hold, in the order of their image tokens, and the text inputs made from the token
ids. Rows without images are batched the same way, with no pixels: a vision-language checkpoint trains on text
alone with packing and padding-free like any text model.
- padded: rows right-padded, with an attention_mask; the model computes its own multimodal positions.
- by positions: packed rows or padding-free, position_ids restarting at each document. Each document keeps its
  own images; the loss model turns the positions into each document's own multimodal positions where the model
  uses them (Qwen's M-RoPE), so no document sees another's positions or tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sftune.batching import Layout
from sftune.data.collate import pad_batch, position_batch
from sftune.data.images import load_image
from sftune.data.vision_inputs import VisionInputs

Batch = dict[str, torch.Tensor]
Rows = list[dict[str, Any]]


def _with_vision(batch: Batch, image_groups: list[list[Any]], vision: VisionInputs) -> Batch:
    batch.update(vision.text_arrays(batch["input_ids"].numpy()))
    batch.update(vision.image_arrays([[load_image(ref) for ref in group] for group in image_groups]))
    return batch


def image_pad_batch(rows: list[dict[str, Any]], pad_token_id: int, vision: VisionInputs,
                    multiple: int | None = None) -> Batch:
    """Padded rows with their images (one group of images per row); `multiple`: pad_to_multiple_of."""
    return _with_vision(pad_batch(rows, pad_token_id, multiple), [row.get("images") or [] for row in rows], vision)


def image_position_batch(rows: list[dict[str, Any]], pad_token_id: int, join: bool, vision: VisionInputs,
                         multiple: int | None = None) -> Batch:
    """Rows laid out by position_ids (`join`: the batch as one row), each document with its own images."""
    groups = [row.get("images") or [] for row in rows]
    if join:
        groups = [[ref for group in groups for ref in group]]
    return _with_vision(position_batch(rows, pad_token_id, join=join, multiple=multiple), groups, vision)


def image_row_batches(rows: list[dict[str, Any]], pad_token_id: int, vision: VisionInputs,
                      multiple: int | None = None) -> list[Batch]:
    """One batch per row, nothing padded (but up to `multiple`), run one after another as parts of one
    micro-batch."""
    return [image_position_batch([row], pad_token_id, join=True, vision=vision, multiple=multiple) for row in rows]


def vision_collator(vision: VisionInputs, pad_token_id: int, layout: Layout,
                    multiple: int | None = None) -> Callable[[Rows], list[Batch]]:
    """The batching plan's layout for a vision-language model's rows, as collate.make_collator does for text."""
    if layout == "rows":
        return lambda rows: image_row_batches(rows, pad_token_id, vision, multiple)
    if layout in ("packed", "joined"):
        join = layout == "joined"
        return lambda rows: [image_position_batch(rows, pad_token_id, join, vision, multiple)]
    return lambda rows: [image_pad_batch(rows, pad_token_id, vision, multiple)]
