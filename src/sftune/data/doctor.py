"""The data doctor: what quietly ruins a fine-tune, found on the preparation pass and reported with example rows.

Checks over the training rows (eval rows are compared with them):
- exact duplicates: the same row (roles, contents, tool calls, tools, images) once whitespace is ignored;
- near duplicates: the same text up to case, whitespace and punctuation, or close paraphrases: an estimated
  Jaccard similarity of word 3-grams of at least NEAR_SIMILARITY (MinHash);
- train/eval overlap: eval rows that are exact or near duplicates of a training row;
- empty replies: assistant replies that are empty or whitespace only (formats.py refuses empty completions);
- repetitive replies: a reply (or a text row) stuck in a loop, a run of at most MAX_PERIOD words repeated back to
  back at least MIN_REPEATS times over at least MIN_LOOP_WORDS words;
- per source: lengths in tokens (naming rows LENGTH_FACTOR times longer or shorter than the median) and truncated
  rows; prepare.py adds each source's share of the trained tokens after mixing.
A row is a duplicate of an earlier row, so the first of each group is never one. Nothing is removed unless the
`dedupe` setting asks for it (prepare.py removes what `examine` marks).

Speed: `fingerprints` runs in the tokenizer's worker processes on the same examples and reduces each row to two
64-bit hashes, a 64-value MinHash signature and its reply findings; `examine`, in the main process, only compares
these, with numpy (PrintTable: about 290 bytes a row). The report goes into the prepared data's stats and is cached
with the rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

NEAR_SIMILARITY = 0.8  # estimated Jaccard similarity of word 3-grams from which two rows are near duplicates
SIGNATURE_BINS = 64  # MinHash values per row (one-permutation hashing: one bin per value)
BANDS = 16  # locality-sensitive hashing: rows agreeing on all bins of one band are compared
MIN_SHINGLES = 8  # rows with fewer word 3-grams get no signature (their similarity says little)
MAX_PERIOD = 16  # longest repeated run of words looked for, in words
MIN_REPEATS = 4
MIN_LOOP_WORDS = 16
LENGTH_FACTOR = 8  # rows this many times longer (or shorter) than their source's median are named
EXAMPLES = 3
HISTOGRAM_BINS = 32
COUNTS = ("exact_duplicates", "near_duplicates", "train_eval_overlap", "empty_replies", "repetitive_replies")

# Each message becomes a mark (a control character, its own word) and its text; replies are marked 3 or 5.
MARKS = {"system": "\x01", "user": "\x02", "prompt": "\x02", "assistant": "\x03", "completion": "\x03",
         "tool": "\x04", "text": "\x05"}
_REPLY_MARKS = (3, 5)
_MARK_BYTES = bytes(range(1, 6))
_DROPPED = bytes(b for b in range(128) if not chr(b).isalnum() and b not in _MARK_BYTES)  # whitespace, punctuation
_TO_SPACE = bytes.maketrans(_DROPPED, b" " * len(_DROPPED))
_WHITESPACE = b" \t\n\r\x0b\x0c"
_UNICODE_PUNCTUATION = str.maketrans({c: " " for c in "\u00a0\u2018\u2019\u201a\u201b\u201c\u201d\u201e\u201f"
                                      "\u2013\u2014\u2026\u00ab\u00bb\u2022\u00b7"})
_WORD_BYTES = 16  # a word hashes by its first 16 bytes
_MASK64 = (1 << 64) - 1


@dataclass(slots=True)
class RowPrint:
    """What the doctor keeps of one row (small: it travels from the worker processes)."""

    exact: int  # 64-bit hash of the row without whitespace
    near: int  # ... lowercase, without whitespace and punctuation
    signature: bytes | None  # SIGNATURE_BINS uint32 MinHash values of the word 3-grams; None for short rows
    empty_reply: str | None = None  # where the first empty reply is, e.g. "message 4 (assistant)"
    repetition: str | None = None  # the longest loop, e.g. "message 2 repeats 'i am sorry' 9 times"


@dataclass
class PrintTable:
    """RowPrints of many rows as arrays: what the doctor keeps per row while preparing a large dataset, about 290
    bytes a row (two 64-bit hashes, a 256-byte signature, two flags), plus the finding's words for each row that
    has an empty or looping reply."""

    exact: np.ndarray  # uint64 per row
    near: np.ndarray  # uint64 per row
    signatures: np.ndarray  # uint32 [rows, SIGNATURE_BINS]; a row without a signature holds zeros
    signed: np.ndarray  # bool per row: has a signature
    empty_replies: dict[int, str]  # row -> RowPrint.empty_reply, for the rows that have one
    repetitions: dict[int, str]  # row -> RowPrint.repetition
    signature_rows: np.ndarray | None = None  # row r's signature is signatures[signature_rows[r]] (after take)

    def __len__(self) -> int:
        return len(self.exact)

    @classmethod
    def of(cls, prints: list[RowPrint]) -> PrintTable:
        n = len(prints)
        signatures = np.zeros((n, SIGNATURE_BINS), dtype=np.uint32)
        signed = np.zeros(n, dtype=bool)
        for i, p in enumerate(prints):
            if p.signature is not None:
                signatures[i] = np.frombuffer(p.signature, dtype=np.uint32)
                signed[i] = True
        return cls(np.fromiter((p.exact for p in prints), dtype=np.uint64, count=n),
                   np.fromiter((p.near for p in prints), dtype=np.uint64, count=n), signatures, signed,
                   {i: p.empty_reply for i, p in enumerate(prints) if p.empty_reply is not None},
                   {i: p.repetition for i, p in enumerate(prints) if p.repetition is not None})

    @classmethod
    def joined(cls, tables: list[PrintTable]) -> PrintTable:
        starts = np.cumsum([0] + [len(t) for t in tables])
        return cls(np.concatenate([t.exact for t in tables]) if tables else np.zeros(0, np.uint64),
                   np.concatenate([t.near for t in tables]) if tables else np.zeros(0, np.uint64),
                   np.concatenate([t.signatures for t in tables]) if tables else
                   np.zeros((0, SIGNATURE_BINS), np.uint32),
                   np.concatenate([t.signed for t in tables]) if tables else np.zeros(0, bool),
                   {int(s) + i: d for t, s in zip(tables, starts) for i, d in t.empty_replies.items()},
                   {int(s) + i: d for t, s in zip(tables, starts) for i, d in t.repetitions.items()})

    def take(self, order: np.ndarray) -> PrintTable:
        """The rows in `order`; the signatures are not copied (they are most of the table)."""
        new_of = {int(old): new for new, old in enumerate(order.tolist())}
        rows = self.signature_rows[order] if self.signature_rows is not None else np.asarray(order, dtype=np.int64)
        return PrintTable(self.exact[order], self.near[order], self.signatures, self.signed[order],
                          {new_of[i]: d for i, d in self.empty_replies.items() if i in new_of},
                          {new_of[i]: d for i, d in self.repetitions.items() if i in new_of}, rows)

    def signatures_of(self, rows: np.ndarray, columns: slice | int = slice(None)) -> np.ndarray:
        return self.signatures[rows if self.signature_rows is None else self.signature_rows[rows], columns]


# ---------------------------------------------------------------- per row, in the worker processes


def fingerprints(examples: list[dict[str, Any]], max_words: int | None = None, batch: int = 256) -> list[RowPrint]:
    """One RowPrint per canonical example (see formats.py), computed in batches (numpy over a batch's words).

    With `max_words`, similarity and loops look at a row's first max_words words only: truncated to max_length
    tokens from its start, a row shows training no more words than that, since a word is at least one token."""
    out: list[RowPrint] = []
    for start in range(0, len(examples), batch):
        out += _batch_prints(examples[start:start + batch], max_words)
    return out


def _batch_prints(examples: list[dict[str, Any]], max_words: int | None) -> list[RowPrint]:
    prints, words, counts = [], [], []
    for example in examples:
        if "input_ids" in example:  # pre-tokenized: compared by ids and labels only
            ids = np.asarray(example["input_ids"], dtype=np.int64).tobytes()
            labels = b"" if example["labels"] is None else np.asarray(example["labels"], dtype=np.int64).tobytes()
            key = _hash(ids + b"\x00" + labels)
            prints.append(RowPrint(key, key, None))
            counts.append(0)
            continue
        text, extras, empty_reply = _row_text(example)
        low = (text if text.isascii() else text.translate(_UNICODE_PUNCTUATION)).lower().encode()
        row_words = low.translate(_TO_SPACE).split()  # the marks stay, each its own word
        if max_words is not None and len(row_words) > max_words:
            row_words = row_words[:max_words]
        prints.append(RowPrint(_hash(text.encode().translate(None, _WHITESPACE) + extras),
                               _hash(low.translate(None, _DROPPED) + extras), None, empty_reply))
        words += row_words
        counts.append(len(row_words))
    if words:
        _add_word_findings(prints, examples, np.array(words, dtype=f"S{_WORD_BYTES}"), np.asarray(counts))
    return prints


def _row_text(example: dict[str, Any]) -> tuple[str, bytes, str | None]:
    """The row's text (a mark before each message), what else makes it what it is (as bytes), and where its first
    empty reply is."""
    extras: list[Any] = []
    empty = None
    if "messages" in example:
        parts = []
        for number, message in enumerate(example["messages"], start=1):
            content, role = message["content"], message["role"]
            if not isinstance(content, str):
                content = " ".join(p["text"] if p["type"] == "text" else "<image>" for p in content)
            parts.append(MARKS[role])
            parts.append(content)
            if len(message) > 2:  # tool calls, reasoning, names
                extras.append({k: v for k, v in message.items() if k not in ("role", "content")})
            if role == "assistant" and empty is None and not content.strip() and not message.get("tool_calls"):
                empty = f"message {number} (assistant)"
        extras += [example.get("tools"), example.get("chat_template_kwargs"),
                   [_image_key(ref) for ref in example.get("images") or ()]]
        text = " " + " ".join(parts)
    elif "prompt" in example:
        text = f" {MARKS['prompt']} {example['prompt']} {MARKS['completion']} {example['completion']}"
    else:
        text = f" {MARKS['text']} {example['text']}"
    useful = [e for e in extras if e]
    return text, json.dumps(useful, sort_keys=True, default=str).encode() if useful else b"", empty


def _image_key(ref: Any) -> str:
    if isinstance(ref, str):
        return ref
    data = ref if isinstance(ref, (bytes, bytearray)) else ref.tobytes()  # bytes, or a PIL image
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's finaliser: spreads every input bit over the whole 64-bit word."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _add_word_findings(prints: list[RowPrint], examples: list[dict], words: np.ndarray, counts: np.ndarray) -> None:
    """MinHash signatures and loops, from the words of a batch of rows (`counts` words per row, in order)."""
    pairs = words.view(np.uint64).reshape(-1, 2)
    word_hash = _fmix64(pairs[:, 0] ^ _fmix64(pairs[:, 1] + np.uint64(0x9E3779B97F4A7C15)))
    first_bytes = words.view(np.uint8).reshape(-1, _WORD_BYTES)[:, :2]
    is_mark = (first_bytes[:, 0] < 8) & (first_bytes[:, 1] == 0)
    row_of_word = np.repeat(np.arange(len(counts)), counts)
    signatures = _signatures(word_hash, row_of_word, len(counts))
    for row, signature in signatures.items():
        prints[row].signature = signature
    for row, detail in _loops(words, word_hash, is_mark, first_bytes[:, 0], row_of_word, examples).items():
        prints[row].repetition = detail


def _signatures(word_hash: np.ndarray, row_of_word: np.ndarray, rows: int) -> dict[int, bytes]:
    """MinHash by one-permutation hashing: each word 3-gram's hash picks one of SIGNATURE_BINS bins by its top bits
    and the bin keeps the smallest value; empty bins borrow the next filled bin's value (rotation densification,
    Shrivastava and Li 2014), so that two rows agree on a bin with probability equal to their Jaccard similarity."""
    shingle = _fmix64(word_hash[:-2] * np.uint64(0x9E3779B97F4A7C15) ^ word_hash[1:-1] * np.uint64(0xBF58476D1CE4E5B9)
                      ^ word_hash[2:])
    inside = row_of_word[:-2] == row_of_word[2:]
    shingle, row = shingle[inside], row_of_word[:-2][inside]
    sizes = np.bincount(row, minlength=rows)
    keep = sizes[row] >= MIN_SHINGLES
    shingle, row = shingle[keep], row[keep]
    if not len(row):
        return {}
    empty = np.uint64(_MASK64)
    bins = np.full(rows * SIGNATURE_BINS, empty, dtype=np.uint64)
    np.minimum.at(bins, row * SIGNATURE_BINS + (shingle >> np.uint64(58)).astype(np.int64),
                  (shingle >> np.uint64(26)) & np.uint64(0xFFFFFFFF))
    bins = bins.reshape(rows, SIGNATURE_BINS)
    signed = np.flatnonzero(sizes >= MIN_SHINGLES)
    filled = bins[signed]
    values = filled.copy()
    missing = values == empty
    for shift in range(1, SIGNATURE_BINS):
        if not missing.any():
            break
        borrowed = np.roll(filled, -shift, axis=1)
        take = missing & (borrowed != empty)
        values[take] = (borrowed[take] + np.uint64(shift * 0x9E3779B9)) & np.uint64(0xFFFFFFFF)
        missing &= ~take
    values = values.astype(np.uint32)
    return {int(r): values[i].tobytes() for i, r in enumerate(signed)}


def _loops(words: np.ndarray, word_hash: np.ndarray, is_mark: np.ndarray, mark: np.ndarray, row_of_word: np.ndarray,
           examples: list[dict]) -> dict[int, str]:
    """Per row, the reply words covered by the longest loop: a run of `period` words that repeats back to back."""
    message = np.cumsum(is_mark)  # each mark opens a message
    opener = np.flatnonzero(is_mark)
    reply = np.flatnonzero(np.isin(mark[opener], _REPLY_MARKS)[message - 1] & ~is_mark)  # a reply's words
    hashes, reply_message = word_hash[reply], message[reply]
    best: dict[int, tuple[int, int, int]] = {}  # row -> (words covered, period, first word)
    for period in range(1, MAX_PERIOD + 1):
        same = (hashes[period:] == hashes[:-period]) & (reply_message[period:] == reply_message[:-period])
        if not same.any():
            continue
        edges = np.diff(np.concatenate(([0], same.view(np.int8), [0])))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        covered = ends - starts + period
        long_enough = (covered >= MIN_LOOP_WORDS) & (covered >= MIN_REPEATS * period)
        for start, words_covered in zip(reply[starts[long_enough]], covered[long_enough]):
            row = int(row_of_word[start])
            if words_covered > best.get(row, (0,))[0]:
                best[row] = (int(words_covered), period, int(start))
    out = {}
    for row, (covered, period, start) in best.items():
        unit = b" ".join(words[start:start + period]).decode("utf-8", "replace")
        number = int(message[start] - message[np.searchsorted(row_of_word, row)]) + 1
        where = "the text" if "text" in examples[row] else "the completion" if "prompt" in examples[row] \
            else f"message {number} (assistant)"
        unit = unit if len(unit) <= 60 else unit[:57] + "..."
        out[row] = f"{where} repeats {unit!r} {covered // period} times in a row"
    return out


# ---------------------------------------------------------------- over all rows, in the main process


def examine(prints: list[RowPrint] | PrintTable, is_eval: np.ndarray, source: np.ndarray, lengths: np.ndarray,
            truncated: np.ndarray, where: Callable[[int], str], source_names: list[str],
            dedupe: str | None) -> tuple[dict[str, Any], np.ndarray]:
    """The report (for the stats) and, with `dedupe` ('exact' or 'near'), which rows to remove.

    Rows are in one order: all training rows first, then all eval rows, so a duplicate's earlier row is a
    training row whenever one exists, and removing duplicates never takes a training row in favour of an eval row.
    """
    table = prints if isinstance(prints, PrintTable) else PrintTable.of(prints)
    n = len(table)
    index = np.arange(n)
    partner, kind, similarity = _duplicates(table, index)
    train = ~is_eval
    has_partner = partner >= 0
    partner_is_train = has_partner & ~is_eval[np.maximum(partner, 0)]
    overlap = is_eval & partner_is_train
    empty, loops = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    empty[list(table.empty_replies)], loops[list(table.repetitions)] = True, True

    def pair(i: int) -> str:
        j = int(partner[i])
        how = {1: "repeats", 2: "is the same up to case, whitespace and punctuation as",
               3: f"is close to (similarity {similarity[i]:.2f})"}[int(kind[i])]
        return f"{'eval ' if is_eval[i] else ''}{where(i)} {how} {'eval ' if is_eval[j] else ''}{where(j)}"

    def examples(mask: np.ndarray, describe: Callable[[int], str]) -> list[str]:
        return [describe(int(i)) for i in np.flatnonzero(mask)[:EXAMPLES]]

    report: dict[str, Any] = {
        "exact_duplicates": int((train & (kind == 1)).sum()),
        "near_duplicates": int((train & (kind >= 2)).sum()),
        "train_eval_overlap": int(overlap.sum()),
        "empty_replies": int((train & empty).sum()),
        "repetitive_replies": int((train & loops).sum()),
        "near_same_text": int((train & (kind == 2)).sum()),
        "near_similar": int((train & (kind == 3)).sum()),
        "overlap_exact": int((overlap & (kind == 1)).sum()),
        "eval_duplicates": int((is_eval & has_partner & ~partner_is_train).sum()),
        "rows_checked": {"train": int(train.sum()), "eval": int(is_eval.sum())},
        "near_rule": {"method": f"MinHash of word 3-grams, {SIGNATURE_BINS} values", "threshold": NEAR_SIMILARITY},
        "loop_rule": {"max_period_words": MAX_PERIOD, "min_repeats": MIN_REPEATS, "min_words": MIN_LOOP_WORDS},
        "examples": {
            "exact_duplicates": examples(train & (kind == 1), pair),
            "near_duplicates": examples(train & (kind >= 2), pair),
            "train_eval_overlap": examples(overlap, pair),
            "empty_replies": examples(train & empty, lambda i: f"{where(i)}: {table.empty_replies[i]} is empty"),
            "repetitive_replies": examples(train & loops, lambda i: f"{where(i)}: {table.repetitions[i]}"),
        },
        "most_repeated": _most_repeated(partner, kind, train, where),
        "sources": [_source_report(name, np.flatnonzero(train & (source == s)), lengths, truncated, where)
                    for s, name in enumerate(source_names)],
        "dedupe": None,
    }
    edges = _histogram_edges(lengths[train])
    for entry, s in zip(report["sources"], range(len(source_names))):
        entry["histogram"] = {"edges": edges.tolist(),
                              "counts": np.histogram(lengths[train & (source == s)], edges)[0].tolist()}
    remove = np.zeros(n, dtype=bool)
    if dedupe is not None:
        remove = (kind == 1) if dedupe == "exact" else (kind >= 1)
        report["dedupe"] = {"mode": dedupe, "train_removed": int((remove & train).sum()),
                            "eval_removed": int((remove & is_eval).sum())}
    return report, remove


def _duplicates(prints: PrintTable, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row, an earlier row it duplicates (-1: none), how (1 exact, 2 same text, 3 similar) and the
    estimated similarity (for 3)."""
    n = len(index)
    exact_first = _first_equal(prints.exact)
    near_first = _first_equal(prints.near)
    partner = np.full(n, -1, dtype=np.int64)
    kind = np.zeros(n, dtype=np.int8)
    similarity = np.zeros(n, dtype=np.float32)
    for first, how in ((exact_first, 1), (near_first, 2)):
        found = (first != index) & (kind == 0)
        partner[found], kind[found] = first[found], how
    # close paraphrases, among the rows that are the first of their text: candidates share one band of the
    # signature, then the whole signature's agreement estimates their similarity
    rows = np.flatnonzero((near_first == index) & prints.signed)
    if len(rows) < 2:
        return partner, kind, similarity
    width = SIGNATURE_BINS // BANDS  # the signatures are indexed, never copied whole: they are most of the state
    for band in range(BANDS):
        key = np.zeros(len(rows), dtype=np.uint64)
        for column in range(band * width, (band + 1) * width):
            key = _fmix64(key ^ prints.signatures_of(rows, column).astype(np.uint64))
        first = _first_equal(key)
        later = np.flatnonzero(first != np.arange(len(rows)))
        later = later[kind[rows[later]] == 0]
        if not len(later):
            continue
        agree = (prints.signatures_of(rows[later]) == prints.signatures_of(rows[first[later]])).mean(axis=1)
        close = agree >= NEAR_SIMILARITY
        found, earlier = rows[later[close]], rows[first[later[close]]]
        partner[found], kind[found], similarity[found] = earlier, 3, agree[close]
    return partner, kind, similarity


def _first_equal(values: np.ndarray) -> np.ndarray:
    """For each position, the first position holding the same value."""
    _, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)]


def _most_repeated(partner: np.ndarray, kind: np.ndarray, train: np.ndarray,
                   where: Callable[[int], str]) -> dict[str, Any] | None:
    repeats = partner[train & (kind == 1)]
    if not len(repeats):
        return None
    rows, times = np.unique(repeats, return_counts=True)
    top = int(np.argmax(times))
    return {"row": where(int(rows[top])), "times": int(times[top]) + 1}


def _source_report(name: str, rows: np.ndarray, lengths: np.ndarray, truncated: np.ndarray,
                   where: Callable[[int], str]) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "rows": int(len(rows)), "truncated": int(truncated[rows].sum()),
                             "truncated_examples": [where(int(i)) for i in rows[truncated[rows]][:EXAMPLES]],
                             "lengths": None, "long_rows": 0, "long_examples": [], "short_rows": 0,
                             "short_examples": []}
    if not len(rows):
        return entry
    own = lengths[rows]
    entry["lengths"] = {"min": int(own.min()), "p50": int(np.percentile(own, 50)),
                        "p99": int(np.percentile(own, 99)), "max": int(own.max())}
    median = float(np.median(own))
    order = np.argsort(own, kind="stable")
    long_rows = order[own[order] > LENGTH_FACTOR * median][::-1]
    short_rows = order[own[order] * LENGTH_FACTOR < median]
    entry.update(long_rows=int(len(long_rows)), short_rows=int(len(short_rows)),
                 long_examples=[f"{where(int(rows[i]))} ({int(own[i]):,} tokens)" for i in long_rows[:EXAMPLES]],
                 short_examples=[f"{where(int(rows[i]))} ({int(own[i]):,} tokens)" for i in short_rows[:EXAMPLES]])
    return entry


def _histogram_edges(lengths: np.ndarray) -> np.ndarray:
    top = int(lengths.max()) if len(lengths) else 1
    return np.unique(np.linspace(0, max(top, 1), HISTOGRAM_BINS + 1).round().astype(np.int64))
