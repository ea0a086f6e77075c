"""How a run shapes its tokenizer: the chat template, the EOS and the tokens that stop generation.

This one module decides them for data preparation, the model and the saved run alike. Nothing here changes a
tokenizer it is given: where the run's settings change something (chat_template_path, eos_token, a
vision-language processor's template, the ChatML default for conversations on a tokenizer without a template),
the functions return a changed copy. That copy is the tokenizer the rows are made with, and the one saved with
the model (see PreparedData.tokenizer).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from sftune.config import SFTConfig
from sftune.errors import ConfigError, UserError

log = logging.getLogger("sftune")

# The default for tokenizers without a chat template; its end-of-turn token becomes the EOS. Tools follow the
# Hermes/Qwen convention: the tools' schemas as JSON lines in a system turn, each call as a JSON object inside
# <tool_call> tags after the assistant's text, each tool result inside <tool_response> tags in a `tool` turn.
# A conversation without tools renders as plain ChatML.
CHATML_TEMPLATE = (
    "{% if tools %}"
    "{{ '<|im_start|>system\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ 'You can call the functions below. To call one, write a JSON object with its name and arguments inside "
    "<tool_call></tool_call> tags:\\n<tool_call>\\n{\\\"name\\\": <function name>, \\\"arguments\\\": <an object>}"
    "\\n</tool_call>\\n\\n<tools>\\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}"
    "{{ '</tools><|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if not (tools and loop.first and message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'tool' %}{{ '<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% set function = call['function'] if call['function'] is defined else call %}"
    "{% if not loop.first or message['content'] %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>\\n{\\\"name\\\": ' + function['name'] | tojson + ', \\\"arguments\\\": ' }}"
    "{{ (function['arguments'] if function['arguments'] is defined else {}) | tojson }}{{ '}\\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def template_file(path_text: str) -> Path:
    """The file chat_template_path names (a folder means its chat_template.jinja); it must exist."""
    path = Path(path_text).expanduser()
    if path.is_dir():
        path = path / "chat_template.jinja"
    if not path.is_file():
        raise ConfigError(f"config key 'chat_template_path' = {path_text!r}: no such file (expected a .jinja file)")
    return path


def read_template_file(path_text: str) -> str:
    path = template_file(path_text)
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ConfigError(f"config key 'chat_template_path' = {path_text!r}: the file is empty")
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:  # with the extensions transformers renders with ({% generation %}, loop controls)
        _compile_jinja_template(text)
    except TemplateSyntaxError as err:
        raise ConfigError(
            f"config key 'chat_template_path' = {path_text!r}: line {err.lineno} of {path} is not valid Jinja "
            f"({err.message}): fix the template"
        ) from None
    return text


def with_default_template(tokenizer: Any, keep_eos: bool) -> tuple[Any, list[str]]:
    """A copy of a tokenizer without a chat template, given the ChatML default: its tokens are added when missing
    (the model's embeddings then grow: see `fit_model_to_tokenizer`), and <|im_end|> becomes the EOS unless
    `keep_eos` (eos_token is set). Returns (the copy, the tokens added)."""
    tokenizer = copy.deepcopy(tokenizer)
    vocab = tokenizer.get_vocab()
    added = [t for t in CHATML_TOKENS if t not in vocab]
    if added:
        tokenizer.add_tokens(added, special_tokens=True)
    bos = special_prefix_ids(tokenizer)
    tokenizer.chat_template = ("{{ bos_token }}" if bos else "") + CHATML_TEMPLATE
    if not keep_eos:
        tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, added


def special_prefix_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts in front of every text by itself (a BOS), found by encoding a probe."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def fit_model_to_tokenizer(model: Any, tokenizer: Any) -> None:
    """Grow the embeddings for added tokens, and make generation stop where training taught the model to stop."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
        log.info("model: embeddings resized to %d tokens for the tokens added to the tokenizer", len(tokenizer))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        set_generation_stops(generation, tokenizer)


def set_generation_stops(generation: Any, tokenizer: Any) -> None:
    """Make a GenerationConfig stop at the template's end-of-turn token and at the EOS, keeping its own stops.

    generate() reads only the generation config, never the tokenizer, so a model whose template ends each turn with
    <|im_end|> but whose EOS is another token would otherwise write past the end of its reply. A pad id is set too,
    so generate() need not guess one.
    """
    eos = generation.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    stops = list(dict.fromkeys([*generation_stop_ids(tokenizer), *eos]))
    if stops:
        generation.eos_token_id = stops[0] if len(stops) == 1 else stops
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [None])[0]


def generation_stop_ids(tokenizer: Any) -> list[int]:
    """The ids a reply ends with: the chat template's end-of-turn token (the one training teaches an assistant turn
    to end with, see `analyse_template`), then the tokenizer's EOS."""
    from sftune.data.template import analyse_template  # the template's own layout (it imports this module)

    ids = []
    if getattr(tokenizer, "chat_template", None):
        try:
            turn_end = analyse_template(tokenizer, None, set()).turn_end
        except UserError:  # a template that cannot render a plain conversation: the data checks report it
            turn_end = None
        if turn_end is not None:
            ids.append(tokenizer.convert_tokens_to_ids(turn_end))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def stop_token_ids(tokenizer: Any, model_name: str | None) -> set[int]:
    """Token ids that stop generation: the tokenizer's EOS and the template's end-of-turn token (sftune saves both in
    the trained model's generation config), plus the model's own generation_config eos_token_id."""
    ids = set(generation_stop_ids(tokenizer))
    folder = Path(model_name).expanduser() if model_name else None
    if folder is not None and (folder / "generation_config.json").is_file():
        try:
            eos = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
        except (OSError, json.JSONDecodeError):
            eos = None
        ids |= {eos} if isinstance(eos, int) else set(eos or [])
    return ids


def shaped_tokenizer(tokenizer: Any, config: SFTConfig, processor: Any = None) -> tuple[Any, dict[str, Any]]:
    """The tokenizer as this run uses it: the template of chat_template_path (else a vision-language processor's
    own, which renders images), and eos_token. Returns (the tokenizer, or a changed copy of it; what changed)."""
    changes: dict[str, Any] = {}
    template = None
    if config.chat_template_path:
        template = read_template_file(config.chat_template_path)
        changes["chat_template"] = config.chat_template_path
    elif processor is not None and getattr(processor, "chat_template", None) \
            and processor.chat_template != tokenizer.chat_template:
        template = processor.chat_template  # the template that renders images
        changes["chat_template"] = "processor"
    if config.eos_token:
        if config.eos_token not in tokenizer.get_vocab():
            raise ConfigError(
                f"config key 'eos_token' = {config.eos_token!r}: not a token of the tokenizer of "
                f"'{config.model_name_or_path}'"
            )
        if config.eos_token != tokenizer.eos_token:
            changes["eos_token"] = config.eos_token
    if not changes:
        return tokenizer, changes
    tokenizer = copy.deepcopy(tokenizer)
    if template is not None:
        tokenizer.chat_template = template
    if "eos_token" in changes:
        tokenizer.eos_token = config.eos_token
    return tokenizer, changes


def attach_to_processor(processor: Any, tokenizer: Any) -> None:
    """Make a vision-language processor (which the run saves with the model) carry the run's shaped tokenizer and
    the template used in training."""
    processor.tokenizer = tokenizer
    if tokenizer.chat_template:
        processor.chat_template = tokenizer.chat_template


