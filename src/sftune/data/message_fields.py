"""The fields of a message beyond role and content: tool calls, and whether the message is trained.

- tool_calls: a list of {"type": "function", "function": {"name", "arguments"}} (or the flat {"name",
  "arguments"}). Chat templates write `arguments` with `tojson`, so arguments given as a JSON string (as OpenAI's
  API returns them, and as CSV or some Hub datasets store them) would be written as a quoted string: they are
  parsed here into the object they hold. The whole list given as a JSON string is parsed the same way. Arguments
  that are null are left out: Arrow (parquet, Hub datasets) gives each call every argument any row's call had.
- weight (Axolotl's convention, 0 or 1) and train (true or false): the message is trained or not, whatever
  the loss mask says of its role. Popped from the message (templates never see it) into the example's
  "message_training": {message index: bool}.
"""

from __future__ import annotations

import json
from typing import Any

from sftune.errors import DataError

TRAINING_FIELDS = ("weight", "train")


def normalised_tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """The message's tool calls with every `arguments` an object; one line naming the message otherwise."""
    if isinstance(calls, str):
        calls = _parsed(calls, f"{where}: field 'tool_calls' is text but not valid JSON: give a list of "
                               "{\"type\": \"function\", \"function\": {\"name\": ..., \"arguments\": {...}}}")
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list):
        raise DataError(f"{where}: field 'tool_calls' must be a list of calls, got {type(calls).__name__}")
    out = []
    for number, call in enumerate(calls, start=1):
        here = f"{where}, tool call {number}"
        if isinstance(call, str):
            call = _parsed(call, f"{here} is text but not valid JSON: give an object with 'function'")
        function = call.get("function", call) if isinstance(call, dict) else None
        if function is call:  # the flat form {"name", "arguments"}
            function = {k: v for k, v in call.items() if k not in ("type", "id")}
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise DataError(f"{here}: expected {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                            f"\"arguments\": {{...}}}}}}, got {str(call)[:80]}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            arguments = _parsed(arguments, f"{here} ({function['name']}): 'arguments' is text but not valid JSON: "
                                           "give the arguments as an object")
        if isinstance(arguments, list):
            raise DataError(f"{here} ({function['name']}): 'arguments' holds a list, not an object: give one "
                            "object of arguments per call (several calls are several entries of 'tool_calls')")
        if not isinstance(arguments, dict):
            raise DataError(f"{here} ({function['name']}): 'arguments' must be an object, got "
                            f"{type(arguments).__name__}")
        # Parquet/Arrow stores arguments as one struct for the whole column: every call gets every key any call
        # had, None where it had none ({"city": "Paris", "x": None}); an argument of null is taken as absent
        arguments = {k: v for k, v in arguments.items() if v is not None}
        function = {**function, "arguments": arguments}
        out.append({**call, "function": function} if "function" in call else {"type": "function",
                                                                             "function": function})
    return out


def training_flag(message: dict[str, Any], where: str) -> bool | None:
    """True or False when the message says whether it is trained (popping the field), None when it does not."""
    given = [name for name in TRAINING_FIELDS if name in message]
    if not given:
        return None
    if len(given) > 1:
        raise DataError(f"{where} has both 'weight' and 'train': keep one of them")
    name = given[0]
    value = message.pop(name)
    if name == "train":
        if not isinstance(value, bool):
            raise DataError(f"{where}: field 'train' = {value!r}: expected true or false")
        flag = value
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in (0, 1):
            raise DataError(f"{where}: field 'weight' = {value!r}: expected 0 (not trained) or 1 (trained); "
                            "other weights are not supported")
        flag = value == 1
    if flag and message.get("role") != "assistant":
        raise DataError(f"{where}: field '{name}' asks to train a {message.get('role')} message: only assistant "
                        "messages are trained (remove the field)")
    return flag


def _parsed(text: str, message: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise DataError(message) from None
