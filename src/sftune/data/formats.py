"""Recognise each dataset's format from its columns and normalise every row to one of four canonical examples:

- text:               {"text": str}
- prompt/completion:  {"prompt": str, "completion": str}
- conversation:       {"messages": [...], "completion_start": int | None, "message_training": {index: bool} | None,
                       "tools": ..., "chat_template_kwargs": ...}
                      (conversational prompt/completion, ShareGPT and Alpaca rows all become conversations;
                      completion_start is the index of the first completion message, None for plain messages;
                      message_training holds the messages' own weight/train (message_fields.py));
                      a conversation with images also has "images": [reference, ...] (see images.py), and every
                      message's content is then a list of parts, {"type": "text", "text": ...} or
                      {"type": "image"}, the i-th image part standing for the i-th image
- tokenized:          {"input_ids": [...], "labels": [...] | None}
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from typing import Any

from sftune.data.images import check_image, row_images
from sftune.data.message_fields import TRAINING_FIELDS, normalised_tool_calls, training_flag
from sftune.data.sources import SourceRows
from sftune.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
TRAINED_KEY = "__trained"  # a message's own weight/train, carried until _conversation takes it off
FORMATS = ("text", "prompt_completion", "messages", "sharegpt", "alpaca", "tokenized")

# ShareGPT speaker names -> roles
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
    "chatgpt": "assistant", "model": "assistant", "system": "system", "tool": "tool", "function": "tool",
    "observation": "tool", "function_response": "tool", "function_call": "assistant",
}


def apply_formatting_func(source: SourceRows, formatting_func: Callable[[dict], Any] | None,
                          text_field: str = "text") -> None:
    """A user function from row to text (a text row) or to a dict (a row in any format), applied in place."""
    if formatting_func is None:
        return
    for i, row in enumerate(source.rows):
        out = formatting_func(row)
        if isinstance(out, str):
            source.rows[i] = {text_field: out}
        elif isinstance(out, dict):
            source.rows[i] = out
        else:
            raise DataError(f"{source.where(i)}: formatting_func returned {type(out).__name__}; expected text or a dict")


def rename_columns(source: SourceRows, columns: dict[str, str] | list[str] | None) -> None:
    """Rename ({their_name: our_name}) or select (a list) columns, in place."""
    if not columns:
        return
    present = set(source.rows[0])
    wanted = list(columns)
    missing = [c for c in wanted if c not in present]
    if missing:
        raise DataError(
            f"dataset '{source.name}': column '{missing[0]}' named in the config is not in the data "
            f"(columns: {', '.join(sorted(present))})"
        )
    if isinstance(columns, dict):
        source.rows = [{columns.get(k, k): v for k, v in row.items()} for row in source.rows]
    else:
        source.rows = [{k: row.get(k) for k in columns} for row in source.rows]


def detect_format(source: SourceRows, text_field: str, wanted: str = "auto") -> str:
    """One of FORMATS, from the columns of the first row (or `wanted` when the config names a format)."""
    columns = [k for k, v in source.rows[0].items() if v is not None]
    if wanted != "auto":
        return wanted
    if "input_ids" in columns:
        return "tokenized"
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "sharegpt"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    if text_field in columns:
        return "text"
    known = ["messages", "conversations", "prompt", "completion", "instruction", "output", "input_ids", text_field]
    close = difflib.get_close_matches(text_field, columns, n=1) or next(
        (difflib.get_close_matches(name, columns, n=1) for name in known if difflib.get_close_matches(name, columns, n=1)),
        [],
    )
    hint = f"; did you mean '{close[0]}'? rename it (dataset_columns)" if close else ""
    raise DataError(
        f"{source.where(0)}: cannot tell the dataset's format from its columns ({', '.join(columns)}): expected "
        f"'messages', 'conversations' (ShareGPT), 'prompt' + 'completion', 'instruction' + 'output' (Alpaca), "
        f"'input_ids', or '{text_field}' (plain text; see dataset_text_field){hint}"
    )


def normalise(source: SourceRows, fmt: str, text_field: str) -> list[dict[str, Any]]:
    """Every row of `source` as a canonical example; the first bad row raises, naming file, row and field."""
    convert = {
        "text": lambda row, i: {"text": _text(row, text_field, source, i)},
        "prompt_completion": lambda row, i: _prompt_completion(row, source, i),
        "messages": lambda row, i: _conversation(_messages(row.get("messages"), "messages", source, i), None, row, source, i),
        "sharegpt": lambda row, i: _conversation(_sharegpt(row.get("conversations"), source, i), None, row, source, i),
        "alpaca": lambda row, i: _alpaca(row, source, i),
        "tokenized": lambda row, i: _tokenized(row, source, i),
    }[fmt]
    examples = [convert(row, i) for i, row in enumerate(source.rows)]
    if fmt == "text" or fmt == "tokenized" or (fmt == "prompt_completion" and not is_conversation(examples[0])):
        for i, row in enumerate(source.rows):
            if row.get("images") or row.get("image"):
                field = "images" if row.get("images") else "image"
                raise DataError(f"{source.where(i)}: field '{field}': images need conversation rows ('messages', or "
                                f"'prompt' and 'completion' as lists of messages); this dataset has {fmt} rows")
    return examples


def is_conversation(example: dict[str, Any]) -> bool:
    return "messages" in example


# ---------------------------------------------------------------- one converter per format


def _text(row: dict, field: str, source: SourceRows, index: int) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise DataError(f"{source.where(index)}: field '{field}' must be text, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{source.where(index)}: field '{field}' is empty")
    return value


def _prompt_completion(row: dict, source: SourceRows, index: int) -> dict[str, Any]:
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):  # conversational prompt/completion
        prompt_messages = _messages(prompt, "prompt", source, index)
        completion_messages = _messages(completion, "completion", source, index, first_number=len(prompt_messages) + 1)
        return _conversation(prompt_messages + completion_messages, len(prompt_messages), row, source, index)
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str):
            raise DataError(f"{source.where(index)}: field '{name}' must be text (or a list of messages), "
                            f"got {type(value).__name__}")
    if not completion.strip():
        raise DataError(f"{source.where(index)}: field 'completion' is empty")
    return {"prompt": prompt, "completion": completion}


def _alpaca(row: dict, source: SourceRows, index: int) -> dict[str, Any]:
    """instruction (+ input) -> the user turn, output -> the assistant turn; an optional system column."""
    fields = {}
    for name in ("instruction", "input", "output", "system"):
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            raise DataError(f"{source.where(index)}: field '{name}' must be text, got {type(value).__name__}")
        fields[name] = value or ""
    if not fields["instruction"].strip() or not fields["output"].strip():
        empty = "instruction" if not fields["instruction"].strip() else "output"
        raise DataError(f"{source.where(index)}: field '{empty}' is empty")
    user = fields["instruction"] + ("\n\n" + fields["input"] if fields["input"].strip() else "")
    messages = [{"role": "system", "content": fields["system"]}] if fields["system"].strip() else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": fields["output"]}]
    return _conversation(messages, len(messages) - 1, row, source, index)


def _sharegpt(turns: Any, source: SourceRows, index: int) -> list[dict[str, Any]]:
    where = source.where(index)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list of {{from, value}} objects")
    if all(isinstance(t, dict) and "role" in t for t in turns):  # already role/content messages
        return _messages(turns, "conversations", source, index)
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: conversations turn {number} must be an object with 'from' and 'value'")
        speaker = str(turn["from"]).lower()
        if speaker not in SHAREGPT_ROLES:
            close = difflib.get_close_matches(speaker, SHAREGPT_ROLES, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise DataError(f"{where}: conversations turn {number} is from {turn['from']!r} "
                            f"(expected one of: {', '.join(SHAREGPT_ROLES)}){hint}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"],
                         **{k: turn[k] for k in TRAINING_FIELDS if turn.get(k) is not None}})
    return _messages(messages, "conversations", source, index)


def _messages(messages: Any, field: str, source: SourceRows, index: int, first_number: int = 1) -> list[dict]:
    where = source.where(index)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of {{role, content}} objects")
    clean = []
    for number, message in enumerate(messages, start=first_number):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {number} must be an object with 'role' and 'content'")
        # Arrow gives every message every key seen in the column, None where absent: templates expect them absent.
        message = {k: v for k, v in message.items() if v is not None}
        role = message.get("role")
        if role not in ROLES:
            close = difflib.get_close_matches(str(role), ROLES, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise DataError(
                f"{where}: message {number} has role {role!r} (expected one of: {', '.join(ROLES)}){hint}"
            )
        content = message.get("content", "")
        if isinstance(content, list):
            message["content"] = _parts(content, f"{where}: message {number} ({role})")
        elif not isinstance(content, str):
            raise DataError(
                f"{where}: message {number} ({role}) has content of type {type(content).__name__}; "
                "expected text or a list of parts"
            )
        if message.get("tool_calls") is not None:
            message["tool_calls"] = normalised_tool_calls(message["tool_calls"], f"{where}: message {number} ({role})")
        if "content" not in message:
            if not message.get("tool_calls"):
                raise DataError(f"{where}: message {number} ({role}) has no content")
            message["content"] = ""
        flag = training_flag(message, f"{where}: message {number} ({role})")
        if flag is not None:
            message[TRAINED_KEY] = flag
        clean.append(message)
    return clean


def _parts(content: list, where: str) -> list[dict[str, Any]]:
    """A message's content given as parts: {"type": "text", "text": ...} and {"type": "image"} (which may carry its
    own image under "image" or "path")."""
    parts = []
    for number, part in enumerate(content, start=1):
        part = {k: v for k, v in part.items() if v is not None} if isinstance(part, dict) else part
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image":
            if "url" in part:
                raise DataError(f"{where}, part {number}: image URLs are not fetched; save the image and give its "
                                "file path (in the row's 'images', or as the part's 'path')")
            parts.append(part)
        else:
            raise DataError(f"{where}, part {number}: expected {{\"type\": \"text\", \"text\": ...}} or "
                            f"{{\"type\": \"image\"}}, got {str(part)[:80]}")
    return parts


def _conversation(messages: list[dict], completion_start: int | None, row: dict, source: SourceRows,
                  index: int) -> dict[str, Any]:
    training = {i: m.pop(TRAINED_KEY) for i, m in enumerate(messages) if TRAINED_KEY in m}
    example = {
        "messages": messages,
        "completion_start": completion_start,
        "message_training": training or None,
        "tools": _json_field(row, "tools", list, source, index),
        "chat_template_kwargs": _json_field(row, "chat_template_kwargs", dict, source, index),
    }
    images = row_images(row, source.origins[index][0], source.where(index))
    if images or any(p["type"] == "image" for m in messages if isinstance(m["content"], list) for p in m["content"]):
        example["messages"], example["images"] = _with_image_parts(messages, images or [], source, index)
    else:  # parts without images: plain text, which every chat template renders
        example["messages"] = [{**m, "content": "".join(p["text"] for p in m["content"])}
                               if isinstance(m["content"], list) else m for m in messages]
    return example


def _with_image_parts(messages: list[dict], column: list, source: SourceRows, index: int) -> tuple[list[dict], list]:
    """Every content as a list of parts, and the row's images in the order of their image parts.

    Image parts take the row's `images` in order, or carry their own. Messages with text contents only get the
    images in front of the first user message's text (as TRL does)."""
    where, origin = source.where(index), source.origins[index][0]
    messages = [{**m, "content": m["content"] if isinstance(m["content"], list)
                 else [{"type": "text", "text": m["content"]}]} for m in messages]
    image_parts = [p for m in messages for p in m["content"] if p["type"] == "image"]
    if column and not image_parts:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise DataError(f"{where}: the row has images but no user message to show them in")
        first_user["content"] = [{"type": "image"} for _ in column] + first_user["content"]
        image_parts = first_user["content"][:len(column)]
    placeholders = sum(1 for p in image_parts if "image" not in p and "path" not in p)
    if placeholders != len(column):
        raise DataError(f"{where}: field 'images' has {len(column)} image(s), but the messages have {placeholders} "
                        "image part(s) ({\"type\": \"image\"}) without an image of their own: give one image per "
                        "image part")
    images, pending = [], iter(column)
    for number, message in enumerate(messages, start=1):
        for k, part in enumerate(message["content"]):
            if part["type"] != "image":
                continue
            own = part.get("image", part.get("path"))
            images.append(next(pending) if own is None else
                          check_image(own, origin, f"{where}: message {number} part {k + 1}"))
            message["content"][k] = {"type": "image"}
    return messages, images


def _json_field(row: dict, name: str, kind: type, source: SourceRows, index: int) -> Any:
    """An optional column holding a list/dict, or the same as a JSON string (as CSV and some Hub datasets store it)."""
    value = row.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{source.where(index)}: field '{name}' is text but not valid JSON") from None
    if not isinstance(value, kind):
        raise DataError(f"{source.where(index)}: field '{name}' must be a {'list' if kind is list else 'mapping'}")
    if kind is dict:  # Arrow fills keys other rows had with None
        value = {k: v for k, v in value.items() if v is not None}
    return value or None


def _tokenized(row: dict, source: SourceRows, index: int) -> dict[str, Any]:
    ids = _int_list(row, "input_ids", source, index)
    if not ids:
        raise DataError(f"{source.where(index)}: field 'input_ids' is empty")
    labels = None
    if row.get("labels") is not None:
        labels = _int_list(row, "labels", source, index)
    else:
        for mask_name in ("assistant_masks", "completion_mask"):
            if row.get(mask_name) is not None:
                mask = _int_list(row, mask_name, source, index)
                if len(mask) != len(ids):
                    raise DataError(f"{source.where(index)}: field '{mask_name}' has {len(mask)} values for "
                                    f"{len(ids)} input_ids")
                labels = [t if m else -100 for t, m in zip(ids, mask)]
                break
    if labels is not None and len(labels) != len(ids):
        raise DataError(f"{source.where(index)}: field 'labels' has {len(labels)} values for {len(ids)} input_ids")
    return {"input_ids": ids, "labels": labels}


def _int_list(row: dict, name: str, source: SourceRows, index: int) -> list[int]:
    value = row.get(name)
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise DataError(f"{source.where(index)}: field '{name}' must be a list of whole numbers")
    return value
