"""The inputs a vision-language model takes besides the tokens, built by sftune exactly as its processor would.

Prepared rows hold token ids and image references only; each batch gets, next to its tokens:
- image inputs: what the processor makes of the batch's images (pixel_values, and e.g. Qwen's image_grid_thw,
  Idefics3's pixel_attention_mask), made through the processor itself so its own image settings apply;
- text inputs: what the processor derives from the token ids: the modality of each token, as Qwen's
  mm_token_type_ids (1 at image tokens) and Gemma 3's token_type_ids (which turn on bidirectional attention
  within each image) are. Without them Qwen2.5-VL silently falls back to 1-D positions.

Which inputs these are is learned from the processor: it is run once on a probe text with a blank image and once
on text alone, and every input it returns is either made by its image processor, or one of the text inputs
sftune builds, checked against the processor's own output on both probes. Anything else is refused by name
before training, never dropped silently. Inputs a processor declares but does not return for images (video
inputs such as second_per_grid_ts) are not needed for image rows.

Multimodal positions (M-RoPE, Qwen): a padded batch leaves them to the model, which computes them from
mm_token_type_ids and image_grid_thw. A batch laid out by position_ids (packed rows, padding-free) gets them
from `multimodal_position_ids`: each document's own, computed by the model's `get_rope_index` on that document
alone, so a packed document sees exactly the positions it would see by itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sftune.data.image_tokens import blank_image
from sftune.errors import UserError

TOKEN_INPUTS = ("input_ids", "attention_mask")
PROBE_TEXT = "a b"


@dataclass(frozen=True)
class VisionInputs:
    """What one processor's model takes besides the tokens, and how to build it."""

    processor: Any
    image_inputs: tuple[str, ...]  # made from the batch's images, through the processor
    text_inputs: tuple[str, ...]  # each token's modality (0 text, 1 image, 2 video, 3 audio), from input_ids
    modality_ids: tuple[tuple[int, ...], ...]  # token ids of image, video, audio (types 1, 2, 3)

    def text_arrays(self, input_ids: np.ndarray) -> dict[str, torch.Tensor]:
        """The text inputs of a batch of token ids (padding is text: 0, as the processor gives it)."""
        if not self.text_inputs:
            return {}
        types = np.zeros(input_ids.shape, dtype=np.int64)
        for kind, ids in enumerate(self.modality_ids, start=1):
            if ids:
                types[np.isin(input_ids, ids)] = kind
        return {name: torch.from_numpy(types.copy()) for name in self.text_inputs}

    def image_arrays(self, images: list[list[Any]]) -> dict[str, torch.Tensor]:
        """The image inputs for PIL images grouped as the batch's rows hold them (one list per output row)."""
        images = [group for group in images if group]
        if not images:
            return {}
        placeholder = self.processor.image_token
        out = self.processor(text=[placeholder * len(group) for group in images], images=images,
                             return_tensors="pt", padding=True, add_special_tokens=False)
        return {name: out[name] for name in self.image_inputs if name in out}


def vision_inputs_of(processor: Any) -> VisionInputs:
    """The inputs `processor`'s model takes, learned from two probes; refuses inputs sftune cannot build."""
    placeholder = processor.image_token
    with_image = processor(text=[f"{PROBE_TEXT} {placeholder} {PROBE_TEXT}"], images=[[blank_image(48, 64)]],
                           return_tensors="np", add_special_tokens=False)
    text_only = processor(text=[PROBE_TEXT], return_tensors="np", add_special_tokens=False)
    image_made = set(processor.image_processor(images=[blank_image(48, 64)]).keys())
    image_inputs = tuple(name for name in with_image if name in image_made and name not in TOKEN_INPUTS)
    others = [name for name in dict.fromkeys([*with_image.keys(), *text_only.keys()])
              if name not in TOKEN_INPUTS and name not in image_inputs]
    modality_ids = tuple(tuple(int(i) for i in (getattr(processor, f"{kind}_token_ids", None) or ()) if i is not None)
                         for kind in ("image", "video", "audio"))
    spec = VisionInputs(processor, image_inputs, tuple(others), modality_ids)
    unbuildable = [name for name in others if not all(
        np.array_equal(spec.text_arrays(probe["input_ids"])[name].numpy(), np.asarray(probe[name]))
        for probe in (with_image, text_only) if name in probe)]
    if unbuildable:
        raise UserError(
            f"training on images with {type(processor).__name__} needs the model input(s) {', '.join(unbuildable)}, "
            "which sftune cannot build exactly as the processor does: please report this model family to sftune"
        )
    return spec


# ---------------------------------------------------------------- multimodal positions


def uses_multimodal_positions(backbone: Any) -> bool:
    """The model places tokens by multimodal rotary positions (M-RoPE: Qwen2-VL, Qwen2.5-VL, Qwen3-VL)."""
    return callable(getattr(backbone, "get_rope_index", None))


def multimodal_position_ids(backbone: Any, input_ids: torch.Tensor, position_ids: torch.Tensor,
                            mm_token_type_ids: torch.Tensor | None,
                            image_grid_thw: torch.Tensor | None) -> torch.Tensor:
    """[4, rows, length] positions for a batch laid out by `position_ids` (each document restarting at 0): row 0
    the text positions (which keep documents apart in attention), rows 1-3 each document's own M-RoPE positions,
    from the model's get_rope_index on that document alone. The batch's images are in document order."""
    out = position_ids.new_zeros((4, *position_ids.shape))
    out[0] = position_ids
    grids = iter(image_grid_thw if image_grid_thw is not None else ())
    for row in range(position_ids.shape[0]):
        starts = torch.nonzero(position_ids[row] == 0).flatten().tolist() + [position_ids.shape[1]]
        for start, end in zip(starts[:-1], starts[1:]):
            types = mm_token_type_ids[row, start:end] if mm_token_type_ids is not None else None
            if types is None or not bool((types != 0).any()):
                out[1:, row, start:end] = position_ids[row, start:end]  # text only: every axis the same
                continue
            image_count = int(((types[1:] == 1) & (types[:-1] != 1)).sum() + (types[0] == 1))
            document_grids = torch.stack([next(grids) for _ in range(image_count)])
            positions, _ = backbone.get_rope_index(input_ids[row:row + 1, start:end], types[None],
                                                   image_grid_thw=document_grids)
            out[1:, row, start:end] = positions[:, 0]
    return out
