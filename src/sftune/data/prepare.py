"""Dataset name -> canonical training rows: {"input_ids", "labels", "index", "source"}.

Everything after this (collator, loop, loss) sees only these rows, never text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sftune.config import SFTConfig
from sftune.data.formats import detect_format, normalise
from sftune.data.render import IGNORE_INDEX, render_conversations, render_texts, require_chat_template
from sftune.data.sources import load_source
from sftune.errors import DataError

log = logging.getLogger("sftune")


@dataclass
class PreparedData:
    rows: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)


def trained_token_count(labels: np.ndarray) -> int:
    """Tokens that carry loss: position 0 is never predicted, so its label never counts."""
    return int((labels[1:] != IGNORE_INDEX).sum())


def prepare_train_data(config: SFTConfig, tokenizer: Any) -> PreparedData:
    source = load_source(config.dataset_name, config.dataset_train_split, config.dataset_config)
    fmt = detect_format(source, config.dataset_text_field)
    examples = normalise(source, fmt, config.dataset_text_field)
    if fmt == "messages":
        require_chat_template(tokenizer, config.model_name_or_path)
        tokenized = render_conversations(tokenizer, examples)
    else:
        tokenized = render_texts(tokenizer, examples)

    rows, truncated, dropped = [], 0, 0
    for index, (ids, labels) in enumerate(tokenized):
        if config.max_length is not None and len(ids) > config.max_length:
            ids, labels = ids[: config.max_length], labels[: config.max_length]
            truncated += 1
        label_array = np.asarray(labels, dtype=np.int32)
        if trained_token_count(label_array) == 0:
            dropped += 1
            continue
        rows.append({"input_ids": np.asarray(ids, dtype=np.int32), "labels": label_array, "index": index, "source": 0})
    if not rows:
        raise DataError(f"dataset '{config.dataset_name}': no row has a token to train on")

    stats = {
        "format": fmt,
        "rows": len(rows),
        "rows_truncated": truncated,
        "rows_dropped": dropped,
        "tokens": int(sum(len(r["input_ids"]) for r in rows)),
        "trained_tokens": int(sum(trained_token_count(r["labels"]) for r in rows)),
    }
    log.info(
        "data: %d %s rows, %d tokens (%d trained); %d truncated to max_length, %d dropped",
        stats["rows"], fmt, stats["tokens"], stats["trained_tokens"], truncated, dropped,
    )
    return PreparedData(rows, stats)
