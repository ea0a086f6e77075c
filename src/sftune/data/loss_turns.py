"""Which assistant turns of a conversation carry the loss, and splitting a conversation into one example per
trained turn.

The loss mask (loss_mask) gives the default; a message's own weight/train (message_fields.py) decides for that
message. Empty replies are never trained: an empty reply plus the end-of-turn token would teach the model to
answer nothing. The turn is left out of the loss rather than the row dropped, so the row's other turns still
train (the empty reply stays in their history, as the data has it); when every token of a row is trained, the
empty turn's span (its end-of-turn token) is masked. Counted, with example rows, in the data summary.

split_assistant_turns: one example per trained turn, the conversation up to that turn with only that turn
trained. Templates that render the reasoning of the latest turns only (Qwen3's) then render each trained turn
with its own reasoning, as inference does; the history is repeated in each example, which costs compute.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sftune.data.turn_checks import is_empty_reply


def trained_messages(example: dict, loss_mask: str, result: Any) -> list[int] | None:
    """Indices of the assistant messages that carry loss, or None when every token does. Empty replies are noted
    in `result.untrained` (never trained); a row that cannot be trained as asked gets `result.error`."""
    messages, completion_start = example["messages"], example["completion_start"]
    own = example.get("message_training") or {}
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    default = default_trained(assistants, completion_start, loss_mask)
    if default is None:  # every token is trained
        masked = next((i for i, flag in own.items() if not flag), None)
        if masked is not None:
            result.error = (f"message {masked + 1} has weight: 0 / train: false, but every token of this row is "
                            f"trained (loss_mask: {loss_mask}): set assistant_only_loss: true to train assistant "
                            "messages only, or remove the field")
        result.untrained = [i for i in assistants if is_empty_reply(messages[i])]  # render.py masks their spans
        return None
    trained = [i for i in assistants if own.get(i, i in default)]
    result.untrained = [i for i in trained if is_empty_reply(messages[i])]
    return [i for i in trained if i not in result.untrained]


def default_trained(assistants: list[int], completion_start: int | None, loss_mask: str) -> list[int] | None:
    if loss_mask == "last_assistant":
        return assistants[-1:]
    if loss_mask == "assistant":
        return assistants
    if completion_start is not None and loss_mask == "completion":
        return [i for i in assistants if i >= completion_start]
    return None


def split_assistant_turns(examples: list[dict], index: np.ndarray, loss_mask: str) -> tuple[list[dict], np.ndarray]:
    """Each conversation as one example per trained assistant turn (its history, that turn trained, every other
    turn not), and the source row of each new example. Other examples stay as they are."""
    out, rows = [], []
    for example, row in zip(examples, index):
        if "messages" not in example:
            out.append(example)
            rows.append(int(row))
            continue
        messages = example["messages"]
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        own = example.get("message_training") or {}
        default = default_trained(assistants, example["completion_start"], loss_mask) or []
        turns = [i for i in assistants if own.get(i, i in default)]
        if len(turns) <= 1:
            out.append(example)
            rows.append(int(row))
            continue
        for turn in turns:
            training = {i: i == turn for i in assistants if i <= turn}
            out.append({**example, "messages": messages[:turn + 1], "message_training": training})
            rows.append(int(row))
    return out, np.asarray(rows, dtype=np.int64)
