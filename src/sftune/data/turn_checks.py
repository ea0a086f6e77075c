"""Checks that a rendering holds what the row says: every message's text, tool calls, the tools' schema and the
reasoning of trained turns; and which assistant replies are empty.

A template that ignores a field (a plain ChatML template never writes `tool_calls`; Qwen3's writes the reasoning
of the turns after the last user message only) renders without error, and the turn would be trained as what is
left: an empty reply, or an answer without its reasoning. The rendered text is scanned once, message by message
in order, as render.py finds turns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sftune.data.template import REASONING_FIELDS

THINK_END = "</think>"


@dataclass
class Missing:
    message: int | None  # index of the message, None for the tools' schema
    what: str  # "content", "tool call 'name'", "reasoning", "tools"

    def where(self, messages: list[dict]) -> str:
        if self.message is None:
            return "the tools' schema (field 'tools')"
        return f"message {self.message + 1} ({messages[self.message]['role']}): its {self.what}"


def reasoning_and_answer(message: dict[str, Any]) -> tuple[str, str]:
    """(reasoning, answer) of a message: the reasoning field, or a <think> block at the start of the content."""
    content = message["content"] if isinstance(message["content"], str) else ""
    reasoning = next((message[k] for k in REASONING_FIELDS if isinstance(message.get(k), str)), "")
    if not reasoning and message["role"] == "assistant" and THINK_END in content:
        reasoning, content = content.split(THINK_END, 1)
        reasoning = reasoning.replace("<think>", "")
    return reasoning.strip(), content


def is_empty_reply(message: dict[str, Any]) -> bool:
    """An assistant message with nothing to train: no text, no tool call, no reasoning."""
    if message.get("tool_calls"):
        return False
    reasoning, answer = reasoning_and_answer(message)
    if isinstance(message["content"], list):
        answer = "".join(p.get("text", "") for p in message["content"] if p["type"] == "text")
    return not answer.strip() and not reasoning


def missing_parts(text: str, messages: list[dict], tools: list | None, reasoning_of: set[int]) -> list[Missing]:
    """What of the row the rendered `text` does not hold: any message's text or tool calls, the tools' names, and
    the reasoning of the messages in `reasoning_of` (the trained turns: earlier turns' reasoning may go, as at
    inference)."""
    missing: list[Missing] = []
    bounds: list[tuple[int, int] | None] = []  # each message's text in `text`
    position = 0
    for index, message in enumerate(messages):
        start = end = None if _texts(message) else position  # a message without text: found where it starts
        for piece in _texts(message):
            found = text.find(piece, position)
            if found < 0:
                stripped = piece.strip()
                found = text.find(stripped, position) if stripped else position
                piece = stripped
            if found < 0:
                missing.append(Missing(index, "content"))
                start = None
                break
            start = found if start is None else start
            position = end = found + len(piece)
        bounds.append(None if start is None else (start, end))
    ends_before, end = [], 0  # where the previous found message ends, for each message
    for bound in bounds:
        ends_before.append(end)
        end = bound[1] if bound is not None else end
    starts_after, start = [0] * len(bounds), len(text)  # where the next found message starts
    for index in range(len(bounds) - 1, -1, -1):
        starts_after[index] = start
        start = bounds[index][0] if bounds[index] is not None else start
    for index, message in enumerate(messages):
        if bounds[index] is None:
            continue
        region = text[ends_before[index]:max(starts_after[index], bounds[index][1])]
        for call in message.get("tool_calls") or ():
            function = call["function"]
            if function["name"] not in region or any(str(key) not in region for key in function["arguments"]):
                missing.append(Missing(index, f"tool call '{function['name']}'"))
        if index in reasoning_of:
            reasoning = reasoning_and_answer(message)[0]
            if reasoning and reasoning not in region:
                missing.append(Missing(index, "reasoning"))
    for tool in tools or ():
        name = (tool.get("function") or tool).get("name") if isinstance(tool, dict) else None
        if isinstance(name, str) and name not in text:
            missing.append(Missing(None, "tools"))
            break
    return missing


def _texts(message: dict[str, Any]) -> list[str]:
    """The texts of a message that a rendering must hold, in order (the answer of a <think> content)."""
    content = message["content"]
    if isinstance(content, list):
        return [p["text"] for p in content if p["type"] == "text" and p["text"].strip()]
    answer = reasoning_and_answer(message)[1] if THINK_END in content else content
    return [answer] if answer.strip() else []
