"""How many tokens each image becomes, and which text they replace, decided at preparation from the image's size.

A processor replaces each image placeholder of the rendered text (such as <|image_pad|> or <image>) with the
image's tokens: a fixed number (LLaVA, Gemma 3), a number that follows the image's size (Qwen's dynamic
resolution), or a layout of crops (Idefics3 / SmolVLM's image splitting). The replacement depends on the image
only through its size, so preparation never needs the pixels: it reads each image's size from the file header.

How the replacement follows the size is learned from the processor itself, by running it on blank probe images
of a few sizes (small, large, wide, tall) and comparing with what it says about sizes:
- repeat: each replacement is one token repeated as many times as the processor's token count for the size
  (`_get_num_multimodal_tokens`, the size-only count transformers keeps for inference servers);
- fixed: every probe gave the same replacement (and the processor, where it can count, counts the same);
- per size: anything else; the processor is run once per distinct size on a blank image of that size.
Training checks the result again: the model refuses image features whose number does not match its tokens.
"""

from __future__ import annotations

import re
from typing import Any

# (height, width): small, square, large, tall, wide, very large
PROBE_SIZES = ((48, 64), (224, 224), (600, 420), (90, 900), (1100, 150), (1500, 1400))


def blank_image(height: int, width: int) -> Any:
    from PIL import Image

    return Image.new("RGB", (width, height), (127, 127, 127))


def image_size(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image or of an image file, read from its header."""
    from PIL import Image

    if hasattr(image, "getbands"):
        return image.height, image.width
    import io

    with Image.open(io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image) as opened:
        return opened.height, opened.width


class ImagePlaceholders:
    """The text each image's placeholder becomes, for one processor, from the image's size alone."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.placeholder = processor.image_token  # what the chat template writes and the processor replaces
        self._by_size: dict[tuple[int, int], str] = {}
        probes = {size: self._processed(size) for size in PROBE_SIZES}
        self._by_size.update(probes)
        counts = self._counts(list(PROBE_SIZES))
        self.mode, self.unit = "per_size", None
        if counts is not None:
            unit = _repeated_unit(probes[PROBE_SIZES[0]], counts[0])
            if unit is not None and all(probes[s] == unit * n for s, n in zip(PROBE_SIZES, counts)):
                self.mode, self.unit = "repeat", unit
        if self.mode == "per_size" and len(set(probes.values())) == 1 and len(set(counts or [0])) == 1:
            self.mode = "fixed"
        self.probe_texts = list(probes.values())

    def replacements(self, sizes: list[tuple[int, int]]) -> list[str]:
        """The replacement text of each image, given the images' (height, width)."""
        if self.mode == "fixed":
            return [self.probe_texts[0]] * len(sizes)
        if self.mode == "repeat":
            return [self.unit * n for n in self._counts(sizes) or ()]
        out = []
        for size in sizes:
            if size not in self._by_size:
                self._by_size[size] = self._processed(size)
            out.append(self._by_size[size])
        return out

    def expand(self, text: str, sizes: list[tuple[int, int]]) -> list[dict[str, Any]]:
        """Where each placeholder of `text` is and what it becomes, as the processor reports it
        (`get_text_with_replacements`): dicts with span, new_span and replacement. Raises ValueError when the
        text holds a different number of placeholders than there are images."""
        found = len(re.findall(re.escape(self.placeholder), text))
        if found != len(sizes):
            raise PlaceholderCountError(found, len(sizes), self.placeholder)
        _, offsets = self.processor.get_text_with_replacements([text], images_replacements=self.replacements(sizes))
        return offsets[0]

    def _processed(self, size: tuple[int, int]) -> str:
        """The processor's own replacement for a blank image of `size`."""
        out = self.processor(text=[self.placeholder], images=[[blank_image(*size)]],
                             return_text_replacement_offsets=True, add_special_tokens=False)
        if "text_replacement_offsets" not in out:
            from sftune.errors import UserError

            raise UserError(f"{type(self.processor).__name__} does not report where it puts the image tokens "
                            "(return_text_replacement_offsets): training on images needs a processor that does")
        return out["text_replacement_offsets"][0][0]["replacement"]

    def _counts(self, sizes: list[tuple[int, int]]) -> list[int] | None:
        count = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if count is None:
            return None
        try:
            data = count(image_sizes=[list(size) for size in sizes])
            return [int(n) for n in data["num_image_tokens"]]
        except (AttributeError, KeyError, TypeError, NotImplementedError):
            return None


class PlaceholderCountError(ValueError):
    def __init__(self, found: int, images: int, placeholder: str):
        super().__init__(f"the chat template wrote {found} image placeholder(s) ({placeholder!r}) for {images} "
                         "image(s)")


def _repeated_unit(text: str, count: int) -> str | None:
    if count <= 0 or len(text) % count:
        return None
    unit = text[: len(text) // count]
    return unit if unit * count == text else None


def vision_token_ids(tokenizer: Any, texts: list[str]) -> list[int]:
    """The added tokens that appear in `texts` (the template's image text, the processor's replacements): image
    tokens and vision delimiters, which the model reads and must never be taught to write."""
    added = tokenizer.added_tokens_encoder
    return sorted({added[token] for token in added for text in texts if token in text})
