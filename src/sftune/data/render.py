"""Canonical examples -> token ids and labels (-100 where no loss), with the template checks.

A conversation is rendered once with the chat template. Each assistant turn is then found in that text: its
trained span starts where inference's prompt ends (the generation prompt the template appends after the previous
message) and runs through the content to the token that ends the turn (for example <|im_end|>). Templates with
{% generation %} markers give the spans themselves. All texts of a batch are tokenized in one call; the spans map
to tokens through each token's byte length (byte-level vocabularies) or the tokenizer's character offsets.

Checks, per row, on every trained turn (every assistant turn when all tokens are trained):
- prompt_not_prefix: the prompt inference builds (add_generation_prompt=True over the messages before the turn)
  is not an exact token prefix of the training sequence there. Exact (rendered and tokenized) at the first such
  turn of each row; at later turns the generation prompt must sit where the turn starts and no token may straddle
  the prompt's end. The masks stay right either way: they follow the training text.
- stop_not_trained: the turn's trained tokens do not end with a token that stops generation.
- content_not_rendered: the rendering lacks a message's text or tool calls, or the tools' schema (the row is
  dropped: its turns would train as what is left).
- reasoning_dropped: a trained turn's reasoning is not in the rendering (reported; the turn trains without it).
Empty assistant replies are never trained (loss_turns.py): the turn is left out of the loss, and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sftune.config import SFTConfig
from sftune.data.image_tokens import ImagePlaceholders, PlaceholderCountError, image_size, vision_token_ids
from sftune.data.template import TemplateShape, analyse_template, content_text, render
from sftune.data.loss_turns import trained_messages
from sftune.data.turn_checks import missing_parts
from sftune.errors import UserError
from sftune.tokenizer import special_prefix_ids

IGNORE_INDEX = -100
CHARS_PER_TOKEN_BOUND = 8  # text this many characters per max_length token long surely holds max_length tokens
CHECKS = {
    "prompt_not_prefix": "the inference prompt is not a token prefix of the training sequence",
    "stop_not_trained": "a trained assistant turn does not end with a token that stops generation",
    "content_not_rendered": "the chat template leaves out part of the row (text, tool calls or the tools' schema), "
                            "so those rows are not trained: use a chat template that renders them (chat_template_path)",
    "reasoning_dropped": "the chat template leaves out the reasoning of a trained assistant turn (templates like "
                         "Qwen3's keep only the latest turns' reasoning): set split_assistant_turns: true to train "
                         "each turn with its own reasoning",
}


@dataclass
class Tokenized:
    """One example after tokenization; `drop` names why it cannot be trained (then ids is None)."""

    ids: np.ndarray | None = None
    labels: np.ndarray | None = None
    drop: str | None = None
    truncated: bool = False
    checked_turns: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (check name, what and where in the row)
    images: list | None = None  # image references, in the order of their tokens (rows with images)
    image_tokens: list[int] | None = None  # tokens each image takes, delimiters included
    error: str | None = None  # a problem with the row that stops preparation (the caller adds where it is)
    fingerprint: Any = None  # the data doctor's summary of the example (doctor.py)
    untrained: list[int] = field(default_factory=list)  # the empty assistant replies, never trained


@dataclass
class _Turn:
    message: int  # index of the assistant message
    start: int  # character span [start, end) that is trained
    end: int
    prompt_found: bool = True  # the generation prompt sits right before `start`
    stop_found: bool = True


@dataclass
class _Job:
    """One conversation between rendering and tokenizing."""

    result: Tokenized
    text: str
    turns: list[_Turn]
    train_all: bool
    prompt: str | None  # inference's prompt before the first checked turn
    shape: TemplateShape
    images: list | None = None
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # each image's tokens in `text`


class ExampleTokenizer:
    """Turns canonical examples into ids and labels for one tokenizer and one set of loss settings."""

    def __init__(self, tokenizer: Any, config: SFTConfig, stop_ids: set[int], processor: Any = None):
        self.tokenizer = tokenizer
        self.processor = processor  # a vision-language model's: expands each image into its tokens
        self._placeholders: ImagePlaceholders | None = None
        self._vision_id_sets: dict[str | None, list[int]] = {}
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        if self.backend is not None:
            self.backend.no_truncation()  # transformers sets these per call; we call the backend directly
            self.backend.no_padding()
        self.prefix_ids = special_prefix_ids(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.stop_ids = stop_ids
        self.loss_mask = config.loss_mask
        # rows longer than max_length are cut here (packing with bfd_split / wrapped splits them instead)
        splits = config.packing and config.packing_strategy != "bfd"
        self.max_length = None if splits else config.max_length
        self.keep_end = config.truncation_mode == "keep_end"
        self._shapes: dict[str, TemplateShape] = {}
        self.byte_lengths = byte_lengths(tokenizer)

    def shape(self, kwargs: dict[str, Any] | None, parts: bool = False) -> TemplateShape:
        key = (json.dumps(kwargs, sort_keys=True, default=str) if kwargs else "") + ("|parts" if parts else "")
        if key not in self._shapes:
            self._shapes[key] = analyse_template(self.tokenizer, kwargs, self.stop_ids, parts)
        return self._shapes[key]

    def __call__(self, examples: list[dict[str, Any]]) -> list[Tokenized]:
        out: list[Tokenized | None] = [None] * len(examples)
        groups: dict[str, list[int]] = {"messages": [], "text": [], "prompt": [], "input_ids": []}
        for i, example in enumerate(examples):
            groups[next(k for k in groups if k in example)].append(i)
        for kind, run in (("messages", self._conversations), ("text", self._texts),
                          ("prompt", self._prompt_completions), ("input_ids", self._pretokenized)):
            if groups[kind]:
                for i, result in zip(groups[kind], run([examples[i] for i in groups[kind]])):
                    out[i] = result if kind == "messages" else self._truncate(result)
        return out  # type: ignore[return-value]

    def _truncate(self, result: Tokenized) -> Tokenized:
        if self.max_length is not None and result.ids is not None and len(result.ids) > self.max_length:
            kept = self._kept_tokens(len(result.ids))
            result.ids, result.labels, result.truncated = result.ids[kept], result.labels[kept], True
        return result

    def _kept_tokens(self, count: int) -> slice:
        if self.max_length is None or count <= self.max_length:
            return slice(0, count)
        return slice(count - self.max_length, count) if self.keep_end else slice(0, self.max_length)

    # ------------------------------------------------------------ plain text and prompt/completion

    def _encode_ids(self, texts: list[str]) -> list[list[int]]:
        if self.backend is not None:
            encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _with_prefix(self, ids: list[int]) -> list[int]:
        """The tokenizer's own BOS in front, unless the text already starts with it (never a doubled BOS)."""
        if self.prefix_ids and ids[: len(self.prefix_ids)] != self.prefix_ids:
            return self.prefix_ids + ids
        return ids

    def _with_eos(self, ids: list[int]) -> list[int]:
        return ids + [self.eos_id] if self.eos_id is not None and (not ids or ids[-1] != self.eos_id) else ids

    def _texts(self, examples: list[dict]) -> list[Tokenized]:
        results = []
        for ids in self._encode_ids([e["text"] for e in examples]):
            ids = np.asarray(self._with_eos(self._with_prefix(ids)), dtype=np.int32)
            results.append(Tokenized(ids, ids.copy()))
        return results

    def _prompt_completions(self, examples: list[dict]) -> list[Tokenized]:
        """Prompt and completion are tokenized apart, so the prompt's tokens are exactly what inference feeds."""
        encoded = self._encode_ids([e["prompt"] for e in examples] + [e["completion"] for e in examples])
        prompts, completions = encoded[: len(examples)], encoded[len(examples):]
        train_prompt = self.loss_mask == "all"
        results = []
        for prompt, completion in zip(prompts, completions):
            prompt = self._with_prefix(prompt)
            completion = self._with_eos(completion)
            ids = np.asarray(prompt + completion, dtype=np.int32)
            labels = ids.copy()
            if not train_prompt:
                labels[: len(prompt)] = IGNORE_INDEX
            results.append(Tokenized(ids, labels))
        return results

    def _pretokenized(self, examples: list[dict]) -> list[Tokenized]:
        results = []
        vocabulary = len(self.tokenizer)
        for e in examples:
            ids = np.asarray(e["input_ids"], dtype=np.int64)
            labels = ids.copy() if e["labels"] is None else np.asarray(e["labels"], dtype=np.int64)
            result = Tokenized(ids.astype(np.int32), labels.astype(np.int32))
            # an id outside the vocabulary would fail deep inside the embedding, at step 1, with no row named
            bad_ids = np.flatnonzero((ids < 0) | (ids >= vocabulary))
            bad_labels = np.flatnonzero(((labels < 0) & (labels != IGNORE_INDEX)) | (labels >= vocabulary))
            if len(bad_ids) or len(bad_labels):
                name, values, where = ("input_ids", ids, bad_ids) if len(bad_ids) else ("labels", labels, bad_labels)
                result.error = (f"field '{name}' holds {int(values[where[0]])} at position {int(where[0])}, outside "
                                f"the tokenizer's vocabulary (0..{vocabulary - 1}{', or -100' if name == 'labels' else ''}"
                                "): tokenize the data with this model's tokenizer")
            results.append(result)
        return results

    # ------------------------------------------------------------ conversations

    def _conversations(self, examples: list[dict]) -> list[Tokenized]:
        if self.backend is None:
            raise UserError("conversations need a fast tokenizer (with character offsets); this one is a slow one")
        results = [Tokenized() for _ in examples]
        jobs: list[_Job] = []
        for example, result in zip(examples, results):
            trained = trained_messages(example, self.loss_mask, result)
            messages = example["messages"]
            if result.error or result.drop:
                continue
            if trained is not None:
                if not trained:
                    result.drop = ("empty_reply" if result.untrained else "all_turns_masked"
                                   if example.get("message_training") else "no_assistant_turn")
                    continue
                messages = messages[: trained[-1] + 1]  # later turns would cost compute and train nothing
            images = example.get("images")
            shape = self.shape(example["chat_template_kwargs"], parts=images is not None)
            text, marked = render(shape, messages, example["tools"], with_spans=shape.has_generation_markers)
            if self._misses_content(result, text, messages, example["tools"], trained):
                continue
            turns = _turns_from_markers(messages, marked) if marked else None
            if turns is None:
                turns = _locate_turns(text, messages, shape)
            checked = [t for t in turns if trained is None or t.message in trained]
            if trained is not None and any(t.start < 0 for t in checked):
                result.drop = "unlocated_turn"
                continue
            checked = [t for t in checked if t.start >= 0]
            prompt = None
            if checked and checked[0].message > 0:
                prompt = _try_render(shape, messages[: checked[0].message], example["tools"])
            job = _Job(result, text, checked, trained is None, prompt, shape)
            if images is not None:
                shown = sum(p["type"] == "image" for m in messages for p in m["content"])
                job.images = images[:shown]  # the images of the turns kept
                if job.images and not self._expand_images(job):
                    continue
            jobs.append(job)

        texts = [job.text if job.images is not None else self._tokenized_part(job.text, job.shape) for job in jobs]
        encodings = self._encode(texts)
        for i, (text, encoding) in enumerate(zip(texts, encodings)):
            if len(text) < len(jobs[i].text) and len(encoding.ids) < (self.max_length or 0):  # cut too short
                texts[i], encodings[i] = jobs[i].text, self._encode([jobs[i].text])[0]
        prompts = [job.prompt for job in jobs if job.prompt is not None]
        encoded_prompts = iter(self._encode_ids(prompts) if prompts else [])
        for job, text, encoding in zip(jobs, texts, encodings):
            prompt_ids = next(encoded_prompts) if job.prompt is not None else None
            self._finish(job, text, encoding, prompt_ids)
        return results

    def _misses_content(self, result: Tokenized, text: str, messages: list[dict], tools: list | None,
                        trained: list[int] | None) -> bool:
        """Record what the rendering leaves out (turn_checks.py); True when the row cannot be trained as it is: a
        message's text or tool calls, or the tools' schema, are not written. Reasoning left out of a trained turn
        is reported; the turn trains without it."""
        trained_set = set(trained) if trained is not None else {i for i, m in enumerate(messages)
                                                                if m["role"] == "assistant"}
        missing = missing_parts(text, messages, tools, trained_set)
        for part in missing:
            check = "reasoning_dropped" if part.what == "reasoning" else "content_not_rendered"
            result.problems.append((check, f"{part.where(messages)} is not in the template's rendering"))
        if any(part.what != "reasoning" for part in missing):
            result.drop = "content_not_rendered"
            return True
        return False

    @property
    def placeholders(self) -> ImagePlaceholders:
        """What each image placeholder becomes (learned from the processor once, when a row first has images)."""
        if self._placeholders is None:
            self._placeholders = ImagePlaceholders(self.processor)
        return self._placeholders

    def _vision_ids(self, shape: TemplateShape) -> list[int]:
        """Image tokens and vision delimiters (of the template's image text and the processor's replacements)."""
        if shape.image_text not in self._vision_id_sets:
            texts = [shape.image_text or ""] + self.placeholders.probe_texts
            self._vision_id_sets[shape.image_text] = vision_token_ids(self.tokenizer, texts)
        return self._vision_id_sets[shape.image_text]

    def _expand_images(self, job: _Job) -> bool:
        """Expand each image's placeholder into the model's image tokens, as the processor would, from the image's
        size alone (image_tokens.py: no pixels are made); the turns and the inference prompt follow. False: the
        row has an error."""
        if self.processor is None:
            job.result.error = ("the row has images, but the model is not a vision-language model (it has no "
                                "processor): use an image-text-to-text model, or drop the images")
            return False
        if job.shape.image_text is None:
            job.result.error = ("the chat template writes nothing for an image part ({\"type\": \"image\"}): "
                                "use the processor's chat template (check chat_template_path)")
            return False
        try:
            replacements = self.placeholders.expand(job.text, [image_size(ref) for ref in job.images])
        except PlaceholderCountError as err:
            job.result.error = str(err)
            return False
        except ValueError as err:
            job.result.error = f"the processor refused the row ({_first_line(err)})"
            return False
        original = job.text
        job.text = _replaced(original, replacements)
        job.image_spans = [_image_span(original, r, job.shape.image_text, self.placeholders.placeholder)
                           for r in replacements]
        job.turns = [_Turn(t.message, _moved(t.start, replacements), _moved(t.end, replacements), t.prompt_found,
                           t.stop_found) for t in job.turns]
        if job.prompt is not None and original.startswith(job.prompt):
            job.prompt = _replaced(job.prompt, [r for r in replacements if r["span"][1] <= len(job.prompt)])
        return True

    def _finish(self, job: _Job, text: str, encoding: Any, prompt_ids: list[int] | None) -> None:
        """Labels from the turns' spans, image tokens never trained, truncation, and the checks of one row."""
        result, full_text, prompt = job.result, job.text, job.prompt
        ids = np.asarray(encoding.ids, dtype=np.int32)
        labels = ids.copy() if job.train_all else np.full_like(ids, IGNORE_INDEX)
        turns = [_Turn(t.message, t.start, min(t.end, len(text)), t.prompt_found, t.stop_found and t.end <= len(text))
                 for t in job.turns if t.start < len(text)]
        spans = [(t.start, t.end) for t in turns] + job.image_spans
        first = last = token_starts = np.zeros(0, dtype=np.int64)
        span_starts = np.zeros(0, dtype=np.int64)
        if spans:
            token_starts, token_ends, positions = self._token_bounds(text, ids, encoding, spans)
            span_starts, span_ends = positions[0::2], positions[1::2]
            first = np.searchsorted(token_ends, span_starts, side="right")  # first token ending after the start
            last = np.searchsorted(token_starts, span_ends, side="left") - 1  # last token starting before the end
        has_tokens = first <= last
        n = len(turns)
        if not job.train_all and n:
            depth = np.zeros(len(ids) + 1, dtype=np.int32)  # +1 where a span opens, -1 after it closes
            np.add.at(depth, first[:n][has_tokens[:n]], 1)
            np.add.at(depth, last[:n][has_tokens[:n]] + 1, -1)
            trained = np.cumsum(depth[:-1]) > 0
            labels[trained] = ids[trained]
        for number, turn in enumerate(turns if job.train_all else ()):  # empty replies: never trained
            if turn.message in result.untrained and has_tokens[number]:
                labels[first[number]:last[number] + 1] = IGNORE_INDEX
        image_ranges = [(int(a), int(b) + 1) for a, b in zip(first[n:], last[n:])]
        for a, b in image_ranges:
            labels[a:b] = IGNORE_INDEX
        if job.images:  # image tokens and vision delimiters are read, never written: never trained anywhere
            labels[np.isin(ids, self._vision_ids(job.shape))] = IGNORE_INDEX
        kept = self._kept_tokens(len(ids))
        if any(a < kept.start or b > kept.stop for a, b in image_ranges):
            result.drop = "image_beyond_max_length"  # a cut image (or one cut off) would not match its tokens
            return
        cut = len(text) < len(full_text) or kept != slice(0, len(ids))
        result.ids, result.labels, result.truncated = ids[kept], labels[kept], cut
        result.images = job.images
        if job.images is not None:
            result.image_tokens = [b - a for a, b in image_ranges]
        for number, turn in enumerate(turns):
            where = f"message {turn.message + 1}"
            if not has_tokens[number]:
                result.problems.append(("stop_not_trained", f"{where}: the turn has no tokens"))
                continue
            start_token, end_token = int(first[number]), int(last[number])
            if start_token < kept.start or end_token >= kept.stop:
                continue  # truncation cuts this turn: nothing to check
            result.checked_turns += 1
            if number == 0 and prompt_ids is not None and kept.start == 0:
                if not full_text.startswith(prompt):
                    result.problems.append(("prompt_not_prefix", f"{where}: the inference prompt differs from "
                                            f"the training text at {_difference(prompt, full_text)}"))
                elif ids[:start_token].tolist() != list(prompt_ids):
                    result.problems.append(("prompt_not_prefix", f"{where}: the inference prompt tokenizes "
                                            "differently from the training text"))
            elif not turn.prompt_found:
                result.problems.append(("prompt_not_prefix", f"{where}: the training text lacks the "
                                        "generation prompt that inference puts before this turn"))
            elif token_starts[start_token] < span_starts[number]:
                result.problems.append(("prompt_not_prefix", f"{where}: a token spans the end of the prompt, "
                                        "so the prompt alone tokenizes differently"))
            if not turn.stop_found or int(ids[end_token]) not in self.stop_ids:
                ending = self.tokenizer.convert_ids_to_tokens(int(ids[end_token]))
                result.problems.append(("stop_not_trained", f"{where} ends with {ending!r}"))

    def _encode(self, texts: list[str]) -> list[Any]:
        if self.byte_lengths is not None and hasattr(self.backend, "encode_batch_fast"):
            return self.backend.encode_batch_fast(texts, add_special_tokens=False)  # ids only: faster
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def _tokenized_part(self, text: str, shape: TemplateShape) -> str:
        """The start of `text` that keep_start truncation can keep, cut just before an end-of-turn token far enough
        in: text before an added token tokenizes the same whatever follows it, so the first tokens are exact.
        (Too short a cut, with fewer than max_length tokens, is detected after encoding and undone.)"""
        reach = self.max_length * CHARS_PER_TOKEN_BOUND if self.max_length else None
        if reach is None or self.keep_end or len(text) <= reach or not shape.cut_before:
            return text
        cut = text.find(shape.cut_before, reach)
        return text if cut < 0 else text[:cut]

    def _token_bounds(self, text: str, ids: np.ndarray, encoding: Any,
                      spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Token start and end positions, and the spans' starts and ends interleaved, in one unit.

        Byte-level vocabularies give each token's byte length, so cumulative sums place every token in the UTF-8
        text without asking the tokenizer for offsets (slow to fetch from Python); the total must match the text's
        bytes exactly (a normalizer may have changed it), else the tokenizer's own character offsets are used.
        """
        chars = [position for span in spans for position in span]
        if self.byte_lengths is not None:
            lengths = self.byte_lengths[ids]
            ends = np.cumsum(lengths)
            if text.isascii():
                total, positions = len(text), chars
            else:
                total, positions = len(text.encode("utf-8")), _char_to_byte(text, chars)
            if len(ends) and ends[-1] == total:
                return ends - lengths, ends, np.asarray(positions, dtype=np.int64)
        # the batch was encoded without offsets (encode_batch_fast) when byte lengths were expected to do
        encoding = self.backend.encode(text, add_special_tokens=False) if self.byte_lengths is not None else encoding
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        return offsets[:, 0], offsets[:, 1], np.asarray(chars, dtype=np.int64)


def byte_lengths(tokenizer: Any) -> np.ndarray | None:
    """Bytes of text behind each token id, for byte-level BPE vocabularies (None for any other kind)."""
    from tokenizers import decoders

    if not isinstance(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None), decoders.ByteLevel):
        return None
    alphabet = set(_byte_alphabet())
    added = tokenizer.added_tokens_encoder
    vocab = tokenizer.get_vocab()
    table = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    for token, token_id in vocab.items():
        if token in added:
            table[token_id] = len(token.encode("utf-8"))
        elif alphabet.issuperset(token):
            table[token_id] = len(token)  # each character stands for one byte
        else:
            return None
    return table


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0-255 (as in GPT-2)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def _char_to_byte(text: str, chars: list[int]) -> list[int]:
    order = sorted(range(len(chars)), key=chars.__getitem__)
    out = [0] * len(chars)
    position = total = 0
    for i in order:
        total += len(text[position:chars[i]].encode("utf-8"))
        position = chars[i]
        out[i] = total
    return out


def _replaced(text: str, replacements: list[dict[str, Any]]) -> str:
    """`text` with the processor's replacements (original span -> replacement text) made."""
    pieces, position = [], 0
    for r in replacements:
        start, end = r["span"]
        pieces += [text[position:start], r["replacement"]]
        position = end
    return "".join(pieces) + text[position:]


def _image_span(original: str, replacement: dict[str, Any], image_text: str | None,
                placeholder: str) -> tuple[int, int]:
    """The text an image takes after expansion: the processor's replacement, widened to the template's whole image
    text around the placeholder (as Qwen's <|vision_start|> and <|vision_end|> around <|image_pad|>)."""
    start, end = replacement["new_span"]
    before = image_text.find(placeholder) if image_text else -1
    at = replacement["span"][0] - before
    if before >= 0 and at >= 0 and original.startswith(image_text, at):
        return start - before, end + len(image_text) - before - len(placeholder)
    return start, end


def _moved(position: int, replacements: list[dict[str, Any]]) -> int:
    """Where a position of the original text lands after the replacements."""
    shift = 0
    for r in replacements:
        start, end = r["span"]
        if position >= end:
            shift += len(r["replacement"]) - (end - start)
        elif position > start:  # inside a placeholder: its expansion's end
            return r["new_span"][1]
    return position + shift


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _try_render(shape: TemplateShape, messages: list[dict], tools: list | None) -> str | None:
    try:
        return render(shape, messages, tools, add_generation_prompt=True)[0]
    except Exception:  # the template refuses this prefix on its own; the other checks still run
        return None


def _difference(prompt: str, text: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(prompt, text)) if a != b), min(len(prompt), len(text)))
    return f"character {at}: prompt has {prompt[at:at + 30]!r}, training text has {text[at:at + 30]!r}"


def _turns_from_markers(messages: list[dict], spans: list[tuple[int, int]]) -> list[_Turn] | None:
    """{% generation %} spans, one per assistant message in order; None if they do not pair up."""
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = [s for s in spans if s[1] > s[0]]
    if len(spans) != len(assistants):
        return None
    return [_Turn(i, start, end) for i, (start, end) in zip(assistants, spans)]


def _locate_turns(text: str, messages: list[dict], shape: TemplateShape) -> list[_Turn]:
    """Every assistant turn's trained span in the rendered text (start -1 when it cannot be found).

    Messages are found in order, each after the previous one. A content is expected right after the text the
    probes saw the template write there; failing that it is searched for (the template may have trimmed it).
    An assistant turn starts where the generation prompt after the previous message ends, and ends with the
    first stop string after its content, before the next message.
    """
    turns: list[_Turn] = []
    content_ends: list[int] = []
    content_starts: list[int] = []
    position, previous_role, previous_end = 0, None, None
    for index, message in enumerate(messages):
        role, content = message["role"], content_text(message, shape.image_text)
        found, length = _find_content(text, content, position, shape.gaps.get((previous_role, role), []))
        if role == "assistant":
            suffix = shape.generation_suffix.get(previous_role) if previous_role is not None else None
            turn = _Turn(index, -1, -1, prompt_found=suffix is None)
            if suffix is not None and previous_end is not None and text.startswith(suffix, previous_end):
                turn.start, turn.prompt_found = previous_end + len(suffix), True
                if found is None or found < turn.start:  # the content lies after the prompt, whatever came first
                    found, length = _find_content(text, content, turn.start, [])
            elif found is not None:
                turn.start = found
            turns.append(turn)
        if found is not None:
            position = previous_end = found + length
        content_starts.append(-1 if found is None else found)
        content_ends.append(position)
        previous_role = role
    next_start = [len(text)] * (len(messages) + 1)  # where the next located message begins, for each message
    for index in range(len(messages) - 1, -1, -1):
        following = content_starts[index + 1] if index + 1 < len(messages) else -1
        next_start[index] = following if following >= 0 else next_start[index + 1]
    for turn in turns:
        if turn.start < 0:
            continue
        content_end = max(content_ends[turn.message], turn.start)
        bound = max(next_start[turn.message], content_end)
        stop_at, stop = _first_stop(text, shape.stop_strings, content_end, bound)
        if stop is None:
            turn.end, turn.stop_found = content_end, False
        else:
            turn.end = stop_at + len(stop)
    return turns


def _find_content(text: str, content: str, position: int, gaps: list[str]) -> tuple[int | None, int]:
    for gap in gaps:
        at = position + len(gap)
        if text.startswith(gap, position) and text.startswith(content, at):
            return at, len(content)
    for candidate in (content, content.strip()):
        found = text.find(candidate, position)
        if found >= 0:
            return found, len(candidate)
    return None, 0


def _first_stop(text: str, stops: tuple[str, ...], start: int, bound: int) -> tuple[int, str | None]:
    best, best_stop = bound, None
    for stop in stops:
        found = text.find(stop, start, bound)
        if 0 <= found < best:
            best, best_stop = found, stop
    return best, best_stop


