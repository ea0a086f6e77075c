"""Recognise a dataset's format from its columns and normalise each row to one of the canonical examples:

- conversational: {"messages": [{"role": ..., "content": ...}, ...]}
- text:           {"text": "..."}
"""

from __future__ import annotations

import difflib
from typing import Any

from sftune.data.sources import SourceRows
from sftune.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


def detect_format(source: SourceRows, text_field: str) -> str:
    """'messages' or 'text', from the columns of the first row."""
    columns = list(source.rows[0])
    if "messages" in columns:
        return "messages"
    if text_field in columns:
        return "text"
    close = difflib.get_close_matches(text_field, columns, n=1) or difflib.get_close_matches("messages", columns, n=1)
    hint = f"; did you mean '{close[0]}'? rename it" if close else ""
    raise DataError(
        f"{source.where(0)}: cannot tell the dataset's format from its columns ({', '.join(columns)}): "
        f"expected 'messages' (conversations) or '{text_field}' (plain text; see dataset_text_field){hint}"
    )


def normalise(source: SourceRows, fmt: str, text_field: str) -> list[dict[str, Any]]:
    if fmt == "messages":
        return [{"messages": _check_messages(row.get("messages"), source, i)} for i, row in enumerate(source.rows)]
    return [{"text": _check_text(row.get(text_field), text_field, source, i)} for i, row in enumerate(source.rows)]


def _check_text(value: Any, field: str, source: SourceRows, index: int) -> str:
    if not isinstance(value, str):
        raise DataError(f"{source.where(index)}: field '{field}' must be text, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{source.where(index)}: field '{field}' is empty")
    return value


def _check_messages(messages: Any, source: SourceRows, index: int) -> list[dict[str, Any]]:
    where = source.where(index)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {number} must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            close = difflib.get_close_matches(str(role), ROLES, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise DataError(
                f"{where}: message {number} has role {role!r} (expected one of: {', '.join(ROLES)}){hint}"
            )
        content = message.get("content")
        if not isinstance(content, str):
            raise DataError(
                f"{where}: message {number} ({role}) has content of type {type(content).__name__}; expected text"
            )
        if not content.strip() and not message.get("tool_calls"):
            raise DataError(f"{where}: message {number} ({role}) has empty content")
    return messages
