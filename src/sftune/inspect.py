"""`sftune inspect CONFIG`: what training will see. Dataset statistics, template checks, and examples with the
trained tokens highlighted (colour on a terminal, [[brackets]] when piped)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from sftune.config import SFTConfig
from sftune.data.order import epoch_order
from sftune.data.render import CHECKS, IGNORE_INDEX

TRAINED_ON, TRAINED_OFF = "\033[1;32m", "\033[0m"


def inspect_data(config: SFTConfig, jsonl: str | None = None, num_examples: int = 3, out: TextIO = sys.stdout) -> None:
    import torch

    from sftune.data.collate import use_padding_free
    from sftune.data.prepare import prepare_documents, prepare_train_data
    from sftune.model.load import load_processor, load_tokenizer
    from sftune.run import setup_logging

    config.check_ready_to_train()
    setup_logging()
    processor = load_processor(config)  # None for text-only models
    tokenizer = processor.tokenizer if processor is not None else load_tokenizer(config)
    data = prepare_train_data(config, tokenizer, processor=processor)
    # as a single-process `sftune train` on this machine would batch the rows
    padding_free = use_padding_free(config, processor, on_gpu=torch.cuda.is_available(), sharded=False)
    for line in describe(data.stats, data.train_rows, config, padding_free):
        print(line, file=out)
    if num_examples <= 0 and not jsonl:
        return
    documents, sources = prepare_documents(config, tokenizer, limit=None if jsonl else num_examples,
                                           processor=processor)
    colour = out.isatty()
    shown = 0
    for docs, source in zip(documents, sources):
        for number, (ids, labels, index) in enumerate(zip(docs.ids, docs.labels, docs.index)):
            if shown >= num_examples:
                break
            images = image_note(docs.image_tokens[number]) if docs.image_tokens is not None else ""
            print(f"\n--- example {shown + 1}: {source.where(int(index))}{images} ---", file=out)
            print(highlight(tokenizer, ids, labels, colour), file=out)
            shown += 1
    if jsonl:
        write_jsonl(Path(jsonl), documents)
        print(f"\nwrote {sum(len(d) for d in documents)} prepared examples (before packing) to {jsonl}", file=out)


def describe(stats: dict[str, Any], rows: list[dict[str, Any]], config: SFTConfig, padding_free: bool) -> list[str]:
    dropped = stats["rows_dropped"]
    lines = [
        f"rows: {stats['rows']} for training, {stats['eval_rows']} for evaluation; "
        f"{stats['rows_truncated']} truncated to max_length {config.max_length}; {sum(dropped.values())} dropped"
        + (" (" + ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in dropped.items()) + ")" if dropped else ""),
        f"tokens: {stats['tokens']:,} ({stats['trained_tokens']:,} trained: {100 * stats['trained_fraction']:.1f}%)",
        "document length in tokens: " + ", ".join(f"{k} {v}" for k, v in stats["length_percentiles"].items()),
    ]
    if stats.get("images"):
        image_tokens = stats.get("image_tokens", 0)
        lines.append(f"images: {stats['images']} in the kept rows, {image_tokens:,} image tokens "
                     f"({image_tokens / stats['images']:.1f} per image)")
    if stats["packing"]:
        packing = stats["packing"]
        lines.append(f"packing: {packing['strategy']}, {stats['documents']} documents in {stats['rows']} rows of "
                     f"{packing['length']} tokens, {100 * packing['efficiency']:.1f}% full")
    elif padding_free:
        lines.append("padding: none (padding_free)")
    else:
        lines.append(f"padding: {100 * padding_waste(rows, config):.1f}% of batch tokens are padding "
                     f"(batches of {config.per_device_train_batch_size}, first epoch's order)")
    step_rows = config.per_device_train_batch_size * config.gradient_accumulation_steps
    lines.append(f"steps per epoch: {math.ceil(stats['rows'] / step_rows)} ({config.per_device_train_batch_size} rows x "
                 f"{config.gradient_accumulation_steps} accumulation, one process)")
    if stats["rows_checked"]:
        failed = {name: c for name, c in stats["template_checks"].items() if c["rows"]}
        lines.append(f"template checks: {stats['rows_checked']} rows, {stats['turns_checked']} assistant turns: "
                     + ("all pass" if not failed else f"{len(failed)} kinds of problem"))
        for name, check in failed.items():
            lines.append(f"  {check['rows']} rows: {CHECKS[name]}")
            lines.extend(f"    e.g. {example}" for example in check["examples"])
    if len(stats["sources"]) > 1 or stats["sources"][0]["name"] != config.dataset_name:
        for source in stats["sources"]:
            lines.append(f"source {source['name']} ({source['format']}): {source['rows_read']} rows read, "
                         f"{source['train_documents']} kept, {source['mixed_documents']} in the mixture, "
                         f"{source['tokens']:,} tokens, {source['eval_documents']} for evaluation")
    else:
        lines.insert(0, f"dataset: {config.dataset_name} ({stats['format']}, {stats['sources'][0]['rows_read']} rows)")
    return lines


def image_note(tokens: list[int]) -> str:
    """How many tokens each of a row's images takes (vision-language data)."""
    if not tokens:
        return ", no images"
    counts = " + ".join(str(n) for n in tokens)
    return f", {len(tokens)} image{'s' if len(tokens) > 1 else ''}: {counts} image tokens"


def padding_waste(rows: list[dict[str, Any]], config: SFTConfig) -> float:
    """The share of padded batch positions that are padding, over one epoch in the loop's order."""
    if not rows:
        return 0.0
    order = epoch_order(rows, config, 0)
    lengths = np.fromiter((len(rows[i]["input_ids"]) for i in order), dtype=np.int64, count=len(order))
    size = config.per_device_train_batch_size
    padded = sum(int(lengths[i:i + size].max()) * len(lengths[i:i + size]) for i in range(0, len(lengths), size))
    return 1.0 - lengths.sum() / padded


def highlight(tokenizer: Any, ids: np.ndarray, labels: np.ndarray, colour: bool) -> str:
    """The text of `ids`, with each run of trained tokens marked."""
    trained = labels != IGNORE_INDEX
    parts, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or trained[end] != trained[start]:
            text = tokenizer.decode([int(t) for t in ids[start:end]], skip_special_tokens=False)
            if trained[start]:
                text = f"{TRAINED_ON}{text}{TRAINED_OFF}" if colour else f"[[{text}]]"
            parts.append(text)
            start = end
    return "".join(parts)


def write_jsonl(path: Path, documents: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for docs in documents:
            for ids, labels, index in zip(docs.ids, docs.labels, docs.index):
                handle.write(json.dumps({"index": int(index), "input_ids": ids.tolist(), "labels": labels.tolist()})
                             + "\n")
    tmp.replace(path)
