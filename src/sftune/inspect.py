"""`sftune inspect CONFIG`: what training will see. Dataset statistics, template checks, the data doctor's findings
(data/doctor.py), and examples with the trained tokens highlighted (colour on a terminal, [[brackets]] when piped);
`--json` prints the statistics as one JSON object, `--html FILE` writes them as a page (report_html.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from sftune.batching import BatchingPlan, plan_batching
from sftune.config import SFTConfig
from sftune.data.doctor_report import inspect_lines
from sftune.data.order import epoch_order
from sftune.data.render import CHECKS, IGNORE_INDEX
from sftune.errors import UserError

TRAINED_ON, TRAINED_OFF = "\033[1;32m", "\033[0m"
HTML_EXAMPLES = 5  # examples on the --html page, at least


def inspect_data(config: SFTConfig, jsonl: str | None = None, num_examples: int = 3, out: TextIO | None = None,
                 as_json: bool = False, html: str | None = None) -> None:
    config.check_ready_to_train()
    check_report_paths(config, jsonl, html)  # before any work: never over the user's data
    import torch

    from sftune.data.prepare import prepare_documents, prepare_train_data
    from sftune.model.load import load_processor, load_tokenizer
    from sftune.run import setup_logging

    out = out or sys.stdout  # the current one (a default argument would keep the one at import)
    setup_logging()
    # as a single-process `sftune train` on this machine would batch the rows
    plan = plan_batching(config, device_type="cuda" if torch.cuda.is_available() and not config.use_cpu else "cpu")
    processor = load_processor(config)  # None for text-only models
    tokenizer = processor.tokenizer if processor is not None else load_tokenizer(config)
    data = prepare_train_data(config, tokenizer, processor=processor)
    tokenizer = data.tokenizer  # as training shapes it (template, EOS)
    summary = describe(data.stats, data.train_rows, config, plan)
    notes = sys.stderr if as_json else out  # with --json, stdout holds the JSON object alone
    if as_json:
        print(json.dumps(data.stats, indent=1, default=str), file=out)
    else:
        print("\n".join(summary), file=out)
    shown_here = 0 if as_json else num_examples
    wanted = max(shown_here, HTML_EXAMPLES if html else 0)
    if wanted <= 0 and not jsonl:
        return
    documents, sources = prepare_documents(config, tokenizer, limit=None if jsonl else wanted, processor=processor)
    examples = [(source.where(int(index)), ids, labels) for docs, source in zip(documents, sources)
                for ids, labels, index in zip(docs.ids, docs.labels, docs.index)][:wanted]
    notes_of = [image_note(tokens) if docs.image_tokens is not None else "" for docs in documents
                for tokens in (docs.image_tokens or [None] * len(docs))][:wanted]
    colour = out.isatty()
    for number, (where, ids, labels) in enumerate(examples[:shown_here], start=1):
        print(f"\n--- example {number}: {where}{notes_of[number - 1]} ---", file=out)
        print(highlight(tokenizer, ids, labels, colour), file=out)
    if html:
        from sftune.report_html import Example, write_html_report

        pages = [Example(where, trained_runs(tokenizer, ids, labels), len(ids), int((labels[1:] != IGNORE_INDEX).sum()))
                 for where, ids, labels in examples]
        title = f"{config.dataset_name or ', '.join(s['name'] for s in data.stats['sources'])}: sftune inspect"
        write_html_report(Path(html), data.stats, summary, pages, title)
        print(f"\nwrote the report to {html}", file=notes)
    if jsonl:
        write_jsonl(Path(jsonl), documents)
        print(f"\nwrote {sum(len(d) for d in documents)} prepared examples (before packing) to {jsonl}", file=notes)


def describe(stats: dict[str, Any], rows: list[dict[str, Any]], config: SFTConfig, plan: BatchingPlan) -> list[str]:
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
    empty = stats.get("empty_replies") or {}
    if empty.get("turns"):
        lines.append(f"empty replies: {empty['turns']} assistant turns in {empty['rows']} rows, never trained")
        lines.extend(f"    e.g. {example}" for example in empty["examples"])
    if len(stats["sources"]) > 1 or stats["sources"][0]["name"] != config.dataset_name:
        for source in stats["sources"]:
            lines.append(f"source {source['name']} ({source['format']}): {source['rows_read']} rows read, "
                         f"{source['train_documents']} kept, {source['mixed_documents']} in the mixture, "
                         f"{source['tokens']:,} tokens, {source['eval_documents']} for evaluation")
    else:
        lines.insert(0, f"dataset: {config.dataset_name} ({stats['format']}, {stats['sources'][0]['rows_read']} rows)")
    return lines + inspect_lines(stats)


def image_note(tokens: list[int]) -> str:
    """How many tokens each of a row's images takes (vision-language data)."""
    if not tokens:
        return ", no images"
    counts = " + ".join(str(n) for n in tokens)
    return f", {len(tokens)} image{'s' if len(tokens) > 1 else ''}: {counts} image tokens"


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
    return "".join((f"{TRAINED_ON}{text}{TRAINED_OFF}" if colour else f"[[{text}]]") if trained else text
                   for text, trained in trained_runs(tokenizer, ids, labels))


def trained_runs(tokenizer: Any, ids: np.ndarray, labels: np.ndarray) -> list[tuple[str, bool]]:
    """The text of `ids` in runs of tokens that are all trained or all not: (text, trained)."""
    trained = labels != IGNORE_INDEX
    runs, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or trained[end] != trained[start]:
            runs.append((tokenizer.decode([int(t) for t in ids[start:end]], skip_special_tokens=False),
                         bool(trained[start])))
            start = end
    return runs


def check_report_paths(config: SFTConfig, jsonl: str | None, html: str | None) -> None:
    from sftune.output_guard import check_jsonl_output, config_inputs, refuse_overlap

    if jsonl:
        check_jsonl_output(Path(jsonl), config)
    if html:
        refuse_overlap(html, config_inputs(config), "--html")
        if Path(html).is_dir():
            raise UserError(f"--html '{html}' is a folder: give a file name, for example {Path(html) / 'report.html'}")


def write_jsonl(path: Path, documents: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for docs in documents:
            for ids, labels, index in zip(docs.ids, docs.labels, docs.index):
                handle.write(json.dumps({"index": int(index), "input_ids": ids.tolist(), "labels": labels.tolist()})
                             + "\n")
    tmp.replace(path)
