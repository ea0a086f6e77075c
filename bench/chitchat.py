"""BYU chit-chat conversations as `messages` rows: the first speaker is the user, the other the assistant.

The dataset has no roles, only sender ids; one speaker's consecutive utterances are joined with newlines into
one message. Used by the benchmarks and the tests; it is not part of the package.
"""

from __future__ import annotations

import json
from pathlib import Path


def chitchat_conversations(folder: str | Path) -> list[dict]:
    """All 7,168 conversations, in the file's order, as {"messages": [{"role", "content"}, ...]}."""
    data = json.loads((Path(folder) / "dataset.json").read_text(encoding="utf-8"))
    rows = []
    for conversation in data.values():
        utterances = [u for turn in conversation["messages"] for u in turn]
        first_sender = utterances[0]["sender"]
        messages: list[dict] = []
        for utterance in utterances:
            role = "user" if utterance["sender"] == first_sender else "assistant"
            if messages and messages[-1]["role"] == role:
                messages[-1]["content"] += "\n" + utterance["text"]
            else:
                messages.append({"role": role, "content": utterance["text"]})
        rows.append({"messages": messages})
    return rows
