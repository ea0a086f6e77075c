"""Examples -> token ids and labels (-100 where no loss), through the tokenizer's own chat template."""

from __future__ import annotations

from typing import Any

from sftune.errors import UserError

IGNORE_INDEX = -100


def require_chat_template(tokenizer: Any, model_name: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"the tokenizer of '{model_name}' has no chat template, and conversational data needs one: "
            "use a chat (instruct) model's tokenizer, or plain text rows"
        )


def render_conversations(tokenizer: Any, examples: list[dict[str, Any]]) -> list[tuple[list[int], list[int]]]:
    """Render each conversation with the chat template once, then tokenize all of them in one batch call.

    The template writes any BOS itself, so the tokenizer must not add special tokens again.
    """
    texts = [tokenizer.apply_chat_template(e["messages"], tokenize=False) for e in examples]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [(ids, list(ids)) for ids in encoded]


def render_texts(tokenizer: Any, examples: list[dict[str, Any]]) -> list[tuple[list[int], list[int]]]:
    """Plain text: the tokenizer's own special tokens (BOS where it uses one), and EOS appended once."""
    encoded = tokenizer([e["text"] for e in examples], add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    rows = []
    for ids in encoded:
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        rows.append((ids, list(ids)))
    return rows
