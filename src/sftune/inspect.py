"""`sftune inspect CONFIG`: what training will see. Dataset statistics, template checks, and examples with the
trained tokens highlighted (colour on a terminal, [[brackets]] when piped)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from sftune.batching import BatchingPlan, plan_batching
from sftune.config import SFTConfig
from sftune.data.order import epoch_order
from sftune.data.render import CHECKS, IGNORE_INDEX

TRAINED_ON, TRAINED_OFF = "\033[1;32m", "\033[0m"


def inspect_data(config: SFTConfig, jsonl: str | None = None, num_examples: int = 3, out: TextIO = sys.stdout) -> None:
    import torch

    from sftune.data.prepare import prepare_documents, prepare_train_data
    from sftune.model.load import IMAGE_TEXT_TO_TEXT, load_processor, load_tokenizer, model_class_of
    from sftune.run import setup_logging

    config.check_ready_to_train()
    setup_logging()
    # as a single-process `sftune train` on this machine would batch the rows
    plan = plan_batching(config, vision=model_class_of(config) == IMAGE_TEXT_TO_TEXT,
                         device_type="cuda" if torch.cuda.is_available() else "cpu")
    processor = load_processor(config)  # None for text-only models
    tokenizer = processor.tokenizer if processor is not None else load_tokenizer(config)
    data = prepare_train_data(config, tokenizer, processor=processor)
    tokenizer = data.tokenizer  # as training shapes it (template, EOS)
    for line in describe(data.stats, data.train_rows, config, plan):
        print(line, file=out)
    if num_examples <= 0 and not jsonl:
        return
    documents, sources = prepare_documents(config, tokenizer, limit=None if jsonl else num_examples,
                                           processor=processor)
    colour = out.isatty()
    shown = 0
    for docs, source in zip(documents, sources):
        for ids, labels, index in zip(docs.ids, docs.labels, docs.index):
            if shown >= num_examples:
                break
            print(f"\n--- example {shown + 1}: {source.where(int(index))} ---", file=out)
            print(highlight(tokenizer, ids, labels, colour), file=out)
            shown += 1
    if jsonl:
        write_jsonl(Path(jsonl), documents)
        print(f"\nwrote {sum(len(d) for d in documents)} prepared examples (before packing) to {jsonl}", file=out)


def describe(stats: dict[str, Any], rows: list[dict[str, Any]], config: SFTConfig, plan: BatchingPlan) -> list[str]:
    dropped = stats["rows_dropped"]
    lines = [
        f"rows: {stats['rows']} for training, {stats['eval_rows']} for evaluation; "
        f"{stats['rows_truncated']} truncated to max_length {config.max_length}; {sum(dropped.values())} dropped"
        + (" (" + ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in dropped.items()) + ")" if dropped else ""),
        f"tokens: {stats['tokens']:,} ({stats['trained_tokens']:,} trained: {100 * stats['trained_fraction']:.1f}%)",
        "document length in tokens: " + ", ".join(f"{k} {v}" for k, v in stats["length_percentiles"].items()),
    ]
    if stats["packing"]:
        packing = stats["packing"]
        lines.append(f"packing: {packing['strategy']}, {stats['documents']} documents in {stats['rows']} rows of "
                     f"{packing['length']} tokens, {100 * packing['efficiency']:.1f}% full")
    elif plan.layout == "padded":
        lines.append(f"padding: {100 * padding_waste(rows, config, plan):.1f}% of batch tokens are padding "
                     f"(batches of {plan.micro_batch_rows}, first epoch's order)")
    else:
        lines.append(f"padding: none ({plan.describe_layout()})")
    lines.append(f"steps per epoch: {plan.steps_per_epoch(stats['rows'])} ({plan.describe_step()})")
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


def padding_waste(rows: list[dict[str, Any]], config: SFTConfig, plan: BatchingPlan) -> float:
    """The share of padded batch positions that are padding, over one epoch in the loop's order."""
    if not rows:
        return 0.0
    order = epoch_order(rows, config, 0)
    lengths = np.fromiter((len(rows[i]["input_ids"]) for i in order), dtype=np.int64, count=len(order))
    size = plan.micro_batch_rows
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
