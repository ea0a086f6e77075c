"""Loss masks from any chat template, the template checks, EOS/BOS handling and truncation.

The trained tokens of an assistant turn are its content as rendered plus the end-of-turn token that stops
generation; role headers, system, user and tool turns are never trained.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import build_tokenizer

from sftune import SFTConfig
from sftune.data.prepare import prepare_train_data
from sftune.tokenizer import stop_token_ids
from sftune.errors import DataError

U1, A1, U2, A2 = "hello how are you", "fine thanks", "what is your name", "my name is model"
CHAT = [{"role": "user", "content": U1}, {"role": "assistant", "content": A1},
        {"role": "user", "content": U2}, {"role": "assistant", "content": A2}]
SYSTEM = {"role": "system", "content": "you are a small model"}

LLAMA2_TEMPLATE = (  # folds the system prompt into the first user turn; no generation prompt of its own
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + ('<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' if loop.first and system else '') "
    "+ message['content'].strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def prepare(tokenizer, rows, **settings):
    config = SFTConfig(**{"model_name_or_path": "tiny", "max_length": 4096, **settings})
    return prepare_train_data(config, tokenizer, train_dataset=rows)


def trained_runs(tokenizer, row) -> list[str]:
    """The decoded text of each run of consecutive trained tokens."""
    ids, trained = row["input_ids"], row["labels"] != -100
    runs, start = [], None
    for i in range(len(ids) + 1):
        if i < len(ids) and trained[i]:
            start = i if start is None else start
        elif start is not None:
            runs.append(tokenizer.decode(ids[start:i].tolist(), skip_special_tokens=False))
            start = None
    return runs


def problems(data) -> dict[str, int]:
    return {name: check["rows"] for name, check in data.stats["template_checks"].items() if check["rows"]}


def test_chatml_trains_each_assistant_turn_with_its_end_token(tokenizer):
    data = prepare(tokenizer, [{"messages": [SYSTEM, *CHAT]}], assistant_only_loss=True)
    row = data.train_rows[0]
    assert trained_runs(tokenizer, row) == [A1 + "<|im_end|>", A2 + "<|im_end|>"]
    assert problems(data) == {} and data.stats["turns_checked"] == 2
    full = tokenizer.apply_chat_template([SYSTEM, *CHAT], tokenize=True, return_dict=True)["input_ids"]
    assert row["input_ids"].tolist() == list(full[: len(row["input_ids"])])

    last = prepare(tokenizer, [{"messages": [SYSTEM, *CHAT]}], last_assistant_only_loss=True).train_rows[0]
    assert trained_runs(tokenizer, last) == [A2 + "<|im_end|>"]
    everything = prepare(tokenizer, [{"messages": [SYSTEM, *CHAT]}]).train_rows[0]
    assert (everything["labels"] == everything["input_ids"]).all()
    assert everything["input_ids"].tolist() == list(full)


def test_turns_after_the_last_trained_one_are_left_out(tokenizer):
    rows = [{"messages": CHAT + [{"role": "user", "content": "bye"}]}, {"messages": CHAT[:1]}]
    data = prepare(tokenizer, rows, assistant_only_loss=True)
    assert len(data.train_rows) == 1 and data.stats["rows_dropped"] == {"no_assistant_turn": 1}
    assert tokenizer.decode(data.train_rows[0]["input_ids"].tolist()).endswith(A2 + "<|im_end|>\n")


def test_content_that_repeats_template_text_is_found_in_its_own_turn(tokenizer):
    """'a' and 'user' occur inside the role headers; the masks must still land on the contents."""
    messages = [{"role": "user", "content": "user"}, {"role": "assistant", "content": "a"},
                {"role": "user", "content": "assistant"}, {"role": "assistant", "content": "user"}]
    data = prepare(tokenizer, [{"messages": messages}], assistant_only_loss=True)
    assert trained_runs(tokenizer, data.train_rows[0]) == ["a<|im_end|>", "user<|im_end|>"]
    assert problems(data) == {}


def test_system_prompt_folded_into_the_user_turn(tokenizer):
    tokenizer = build_tokenizer(LLAMA2_TEMPLATE)
    data = prepare(tokenizer, [{"messages": [SYSTEM, *CHAT]}], assistant_only_loss=True)
    # inference's prompt ends with "[/INST]", so the model must produce the space, the answer and the EOS
    assert trained_runs(tokenizer, data.train_rows[0]) == [f" {A1} <|im_end|>", f" {A2} <|im_end|>"]
    assert problems(data) == {}


def test_generation_markers_are_honoured(tokenizer):
    marked = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}"
        "{% else %}{{ message['content'] }}{% endif %}{{ '<|im_end|>' + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    data = prepare(build_tokenizer(marked), [{"messages": CHAT}], assistant_only_loss=True)
    # the markers leave the end-of-turn token out: honoured, and reported
    assert trained_runs(tokenizer, data.train_rows[0]) == [A1, A2]
    assert problems(data) == {"stop_not_trained": 1}


def test_prompt_ending_inside_a_token_is_reported(tokenizer):
    template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token + '\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    data = prepare(build_tokenizer(template), [{"messages": CHAT}], assistant_only_loss=True)
    # "assistant: fine" tokenizes " fine" as one token: the prompt alone ends in a different token
    assert problems(data) == {"prompt_not_prefix": 1}
    assert trained_runs(tokenizer, data.train_rows[0]) == [f" {A1}<|im_end|>", f" {A2}<|im_end|>"]


def test_turn_end_that_is_not_the_eos_stops_generation(tokenizer):
    # The saved generation config stops at the template's end-of-turn token too (tests/test_export.py), so a
    # trained <|im_end|> is a trained stop even where the tokenizer's EOS is another token.
    other = build_tokenizer()
    other.eos_token = "<|endoftext|>"
    data = prepare(other, [{"messages": CHAT}], assistant_only_loss=True)
    assert trained_runs(tokenizer, data.train_rows[0]) == [A1 + "<|im_end|>", A2 + "<|im_end|>"]
    assert problems(data) == {}
    assert stop_token_ids(other, None) == {other.convert_tokens_to_ids("<|im_end|>"), other.eos_token_id}


def test_real_smollm2_template_with_its_default_system_prompt(smollm2_tokenizer):
    data = prepare(smollm2_tokenizer, [{"messages": CHAT}], assistant_only_loss=True)
    row = data.train_rows[0]
    assert "You are a helpful AI assistant named SmolLM" in smollm2_tokenizer.decode(row["input_ids"].tolist())
    assert trained_runs(smollm2_tokenizer, row) == [A1 + "<|im_end|>", A2 + "<|im_end|>"]
    assert problems(data) == {}
    expected = smollm2_tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert row["input_ids"].tolist() == list(expected[: len(row["input_ids"])])


def test_real_qwen3_trains_the_think_block_it_writes_into_the_last_turn(qwen3_tokenizer):
    data = prepare(qwen3_tokenizer, [{"messages": CHAT}], assistant_only_loss=True)
    assert trained_runs(qwen3_tokenizer, data.train_rows[0]) == [
        A1 + "<|im_end|>", "<think>\n\n</think>\n\n" + A2 + "<|im_end|>"]
    assert problems(data) == {}

    reasoning = CHAT[:3] + [{"role": "assistant", "content": A2, "reasoning_content": "they ask my name"}]
    data = prepare(qwen3_tokenizer, [{"messages": reasoning}], last_assistant_only_loss=True)
    assert trained_runs(qwen3_tokenizer, data.train_rows[0]) == [
        "<think>\nthey ask my name\n</think>\n\n" + A2 + "<|im_end|>"]


def test_real_qwen3_without_thinking_reports_rewritten_turns_and_keeps_masks(qwen3_tokenizer):
    """enable_thinking=False puts an empty think block in inference's prompt, but the template writes it only into
    the last turn: earlier turns are not what inference will see. Reported; masks still follow the text."""
    kwargs = {"chat_template_kwargs": {"enable_thinking": False}}
    data = prepare(qwen3_tokenizer, [{"messages": CHAT, **kwargs}, {"messages": CHAT[:2], **kwargs}],
                   assistant_only_loss=True)
    multi, single = data.train_rows
    assert trained_runs(qwen3_tokenizer, multi) == [A1 + "<|im_end|>", A2 + "<|im_end|>"]
    assert trained_runs(qwen3_tokenizer, single) == [A1 + "<|im_end|>"]
    assert problems(data) == {"prompt_not_prefix": 1}
    assert "train_dataset row 1: message 2" in data.stats["template_checks"]["prompt_not_prefix"]["examples"][0]


def test_real_qwen3_tools_reach_the_template(qwen3_tokenizer):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    messages = [{"role": "user", "content": "weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": calls},
                {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}]
    data = prepare(qwen3_tokenizer, [{"messages": messages, "tools": tools}], assistant_only_loss=True)
    row = data.train_rows[0]
    assert "get_weather" in qwen3_tokenizer.decode(row["input_ids"][:60].tolist())  # the tools' system prompt
    runs = trained_runs(qwen3_tokenizer, row)
    assert len(runs) == 2 and '"name": "get_weather"' in runs[0] and runs[0].endswith("</tool_call><|im_end|>")
    assert runs[1].endswith("It is sunny.<|im_end|>") and "sunny" not in runs[0]
    assert problems(data) == {}


def test_byte_length_bounds_equal_the_tokenizers_offsets(qwen3_tokenizer):
    """The fast path (token byte lengths) and the tokenizer's own offsets give the same masks, non-ASCII too."""
    from sftune.data.formats import normalise
    from sftune.data.render import ExampleTokenizer
    from sftune.data.sources import SourceRows

    texts = ["héllo wörld 你好 🤖", "naïve café", "plain ascii", "ｆｕｌｌ ｗｉｄｔｈ", "e\u0301"]  # the last one NFC-changes
    rows = [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": t[::-1]},
                          {"role": "user", "content": "again " + t}, {"role": "assistant", "content": t}]}
            for t in texts]
    examples = normalise(SourceRows("x", rows, [("x", i + 1) for i in range(len(rows))]), "messages", "text")
    fast = ExampleTokenizer(qwen3_tokenizer, SFTConfig(assistant_only_loss=True), {qwen3_tokenizer.eos_token_id})
    slow = ExampleTokenizer(qwen3_tokenizer, SFTConfig(assistant_only_loss=True), {qwen3_tokenizer.eos_token_id})
    slow.byte_lengths = None
    assert fast.byte_lengths is not None
    for a, b in zip(fast(examples), slow(examples)):
        assert a.ids.tolist() == b.ids.tolist() and a.labels.tolist() == b.labels.tolist()
        assert a.problems == b.problems == []


def test_text_rows_get_one_bos_and_one_eos():
    from tokenizers import processors

    with_bos = build_tokenizer()
    with_bos.bos_token = "<|endoftext|>"
    bos = with_bos.bos_token_id
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    data = prepare(with_bos, [{"text": "hello world"}, {"text": "<|endoftext|>hello world<|im_end|>"}])
    for row in data.train_rows:
        ids = row["input_ids"].tolist()
        assert ids[0] == bos and ids.count(bos) == 1
        assert ids[-1] == with_bos.eos_token_id and ids.count(with_bos.eos_token_id) == 1


def test_eos_token_setting(tokenizer):
    data = prepare(build_tokenizer(), [{"text": "hello world"}], eos_token="<|endoftext|>")
    assert data.train_rows[0]["input_ids"][-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    from sftune.errors import ConfigError

    with pytest.raises(ConfigError, match="'eos_token' = '<eos>': not a token"):
        prepare(build_tokenizer(), [{"text": "hello world"}], eos_token="<eos>")


def test_prompt_completion_text_trains_the_completion_and_keeps_the_prompts_tokens(tokenizer):
    rows = [{"prompt": "the cat sat on", "completion": " the mat"}]
    data = prepare(tokenizer, rows)
    row = data.train_rows[0]
    prompt_ids = tokenizer("the cat sat on", add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(" the mat", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert row["input_ids"].tolist() == prompt_ids + completion_ids
    assert row["labels"].tolist() == [-100] * len(prompt_ids) + completion_ids
    everything = prepare(tokenizer, rows, completion_only_loss=False).train_rows[0]
    assert everything["labels"].tolist() == everything["input_ids"].tolist()


def test_real_humaneval_prompts_stay_exact_prefixes(smollm2_tokenizer):
    """HumanEval prompts end with a newline and completions start indented: SmolLM2's tokenizer merges them when
    they are tokenized together, so the prompt inference feeds would not be a prefix of the training row."""
    import gzip
    import json

    from conftest import asset_folder

    with gzip.open(asset_folder("humaneval") / "HumanEval.jsonl.gz", "rt") as handle:
        rows = [{"prompt": r["prompt"], "completion": r["canonical_solution"]} for r in map(json.loads, handle)][:20]
    data = prepare(smollm2_tokenizer, rows)
    merged = 0
    for row, source in zip(data.train_rows, rows):
        prompt_ids = smollm2_tokenizer(source["prompt"], add_special_tokens=False)["input_ids"]
        n = len(prompt_ids)
        assert row["input_ids"][:n].tolist() == prompt_ids and (row["labels"][:n] == -100).all()
        assert (row["labels"][n:] == row["input_ids"][n:]).all() and row["input_ids"][-1] == smollm2_tokenizer.eos_token_id
        joint = smollm2_tokenizer(source["prompt"] + source["completion"], add_special_tokens=False)["input_ids"]
        merged += joint[:n] != prompt_ids
    assert merged > 0  # the joint tokenization would have moved the boundary


def test_conversational_prompt_completion_and_alpaca(tokenizer):
    rows = [{"prompt": [SYSTEM, *CHAT[:3]], "completion": [CHAT[3]]}]
    data = prepare(tokenizer, rows)
    assert trained_runs(tokenizer, data.train_rows[0]) == [A2 + "<|im_end|>"]
    both = prepare(tokenizer, rows, assistant_only_loss=True)
    assert trained_runs(tokenizer, both.train_rows[0]) == [A1 + "<|im_end|>", A2 + "<|im_end|>"]

    alpaca = prepare(tokenizer, [{"instruction": "name a color", "input": "not red", "output": "blue"}])
    row = alpaca.train_rows[0]
    assert trained_runs(tokenizer, row) == ["blue<|im_end|>"]
    assert "name a color\n\nnot red" in tokenizer.decode(row["input_ids"].tolist())


def test_sharegpt_rows_become_messages(tokenizer):
    rows = [{"conversations": [{"from": "system", "value": SYSTEM["content"]}, {"from": "human", "value": U1},
                               {"from": "gpt", "value": A1}]}]
    data = prepare(tokenizer, rows, assistant_only_loss=True)
    expected = prepare(tokenizer, [{"messages": [SYSTEM, *CHAT[:2]]}], assistant_only_loss=True)
    assert data.train_rows[0]["input_ids"].tolist() == expected.train_rows[0]["input_ids"].tolist()
    assert data.stats["format"] == "sharegpt"


def test_pretokenized_rows_and_masks(tokenizer):
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, {"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]},
            {"input_ids": [9, 10]}]
    data = prepare(tokenizer, rows)
    assert [r["labels"].tolist() for r in data.train_rows] == [[-100, -100, 7, 8], [-100, 6, 7], [9, 10]]


def test_truncation_keeps_the_start_or_the_end(tokenizer):
    rows = [{"prompt": "one two three four five six seven", "completion": " eight nine ten"}]
    start = prepare(tokenizer, rows, completion_only_loss=False, max_length=4).train_rows[0]
    end = prepare(tokenizer, rows, completion_only_loss=False, max_length=4, truncation_mode="keep_end").train_rows[0]
    full = prepare(tokenizer, rows, completion_only_loss=False).train_rows[0]["input_ids"].tolist()
    assert start["input_ids"].tolist() == full[:4] and end["input_ids"].tolist() == full[-4:]


def test_rows_truncated_to_nothing_are_dropped_and_counted(tokenizer):
    rows = [{"prompt": "one two three four five six seven", "completion": " eight"},
            {"prompt": "one", "completion": " two three"}]
    data = prepare(tokenizer, rows, max_length=4)
    assert data.stats["rows_dropped"] == {"truncated_to_nothing": 1} and len(data.train_rows) == 1
    with pytest.raises(DataError, match=r"no training row is left: of 1 rows, 1 keep no trained token after "
                                        r"truncation to max_length=4 \(truncation_mode=keep_start\): raise max_length"):
        prepare(tokenizer, rows[:1], max_length=4)


def test_assistant_only_loss_needs_conversations(tokenizer):
    with pytest.raises(DataError, match=r"assistant_only_loss is set \(loss_mask: assistant\), but dataset 'train_dataset' has text rows"):
        prepare(tokenizer, [{"text": "hello"}], assistant_only_loss=True)


def test_trained_token_fraction_is_reported(tokenizer):
    data = prepare(tokenizer, [{"messages": CHAT}], assistant_only_loss=True)
    labels = data.train_rows[0]["labels"]
    assert data.stats["trained_tokens"] == int((labels[1:] != -100).sum())
    assert data.stats["trained_fraction"] == pytest.approx(data.stats["trained_tokens"] / len(labels), abs=1e-4)
    assert np.isclose(data.stats["tokens"], len(labels))


@pytest.mark.parametrize("chars_per_token", [8, 1])  # 1: the cut is too short and is undone
def test_long_conversations_tokenize_only_what_truncation_keeps(qwen3_tokenizer, monkeypatch, chars_per_token):
    from sftune.data import render as render_module
    from sftune.data.formats import normalise
    from sftune.data.render import ExampleTokenizer
    from sftune.data.sources import SourceRows

    monkeypatch.setattr(render_module, "CHARS_PER_TOKEN_BOUND", chars_per_token)
    rows = [{"messages": CHAT * 30}, {"messages": CHAT}, {"messages": [{"role": "user", "content": "x " * 400}, *CHAT]}]
    examples = normalise(SourceRows("x", rows, [("x", i + 1) for i in range(len(rows))]), "messages", "text")
    cut = ExampleTokenizer(qwen3_tokenizer, SFTConfig(assistant_only_loss=True, max_length=64), {qwen3_tokenizer.eos_token_id})
    whole = ExampleTokenizer(qwen3_tokenizer, SFTConfig(assistant_only_loss=True, max_length=None), {qwen3_tokenizer.eos_token_id})
    for short, full in zip(cut(examples), whole(examples)):
        assert short.ids.tolist() == full.ids[:64].tolist() and short.labels.tolist() == full.labels[:64].tolist()
        assert short.truncated == (len(full.ids) > 64) and not short.problems
        trained = np.flatnonzero(full.labels != -100)
        run_ends = trained[np.append(np.diff(trained) > 1, True)] if len(trained) else trained
        assert short.checked_turns == int((run_ends < 64).sum())  # turns cut by truncation are not checked


def test_fast_rendering_equals_apply_chat_template(qwen3_tokenizer, smollm2_tokenizer):
    from sftune.data.template import _fast_template, analyse_template, render

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    conversations = [
        [SYSTEM, *CHAT],
        [*CHAT[:3], {"role": "assistant", "content": A2, "reasoning": "why not"}],
        [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "", "tool_calls": calls},
         {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nSunny."}],
    ]
    for tok in (qwen3_tokenizer, smollm2_tokenizer, build_tokenizer(), build_tokenizer(LLAMA2_TEMPLATE)):
        for kwargs in (None, {"enable_thinking": False}):
            shape = analyse_template(tok, kwargs, {tok.eos_token_id})
            assert _fast_template(shape.template) is not None
            for messages in conversations:
                for generation_prompt in (False, True):
                    expected = tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                                       add_generation_prompt=generation_prompt, **(kwargs or {}))
                    assert render(shape, messages, tools, add_generation_prompt=generation_prompt)[0] == expected


# ---- what a rendering leaves out, tool calls, per-message weights, empty replies (issue 21)

WEATHER_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def tool_chat(arguments) -> list[dict]:
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": arguments}}]
    return [{"role": "user", "content": "weather in Paris?"}, {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}]


def test_a_template_that_drops_tool_calls_is_caught_and_the_row_is_not_trained(tokenizer):
    """The tests' plain ChatML writes only each message's content: the call would be trained as an empty reply."""
    rows = [{"messages": tool_chat({"city": "Paris"})}, {"messages": CHAT}]
    data = prepare(tokenizer, rows, assistant_only_loss=True)
    assert data.stats["rows_dropped"] == {"content_not_rendered": 1} and len(data.train_rows) == 1
    assert trained_runs(tokenizer, data.train_rows[0]) == [A1 + "<|im_end|>", A2 + "<|im_end|>"]
    assert data.stats["template_checks"]["content_not_rendered"]["examples"] == [
        "train_dataset row 1: message 2 (assistant): its tool call 'get_weather' is not in the template's rendering"]
    with_tools = prepare(tokenizer, [{"messages": CHAT, "tools": WEATHER_TOOLS}, {"messages": CHAT}])
    assert with_tools.stats["template_checks"]["content_not_rendered"]["examples"] == [
        "train_dataset row 1: the tools' schema (field 'tools') is not in the template's rendering"]
    dropped_user = "{% for m in messages %}{% if m['role'] != 'user' or loop.first %}<|im_start|>{{ m['role'] }}\n" \
                   "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}" \
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    with pytest.raises(DataError, match="1 hold text, tool calls or tools the chat template leaves out"):
        prepare(build_tokenizer(dropped_user), [{"messages": CHAT}], assistant_only_loss=True)


def test_default_chatml_renders_tools_tool_calls_and_tool_results():
    tokenizer = build_tokenizer(chat_template=None)  # no template: sftune's ChatML default
    as_object = prepare(tokenizer, [{"messages": tool_chat({"city": "Paris"}), "tools": WEATHER_TOOLS}],
                        assistant_only_loss=True)
    as_text = prepare(tokenizer, [{"messages": tool_chat('{"city": "Paris"}'), "tools": WEATHER_TOOLS}],
                      assistant_only_loss=True)
    row = as_object.train_rows[0]
    assert trained_runs(tokenizer, row) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is sunny.<|im_end|>"]
    text = tokenizer.decode(row["input_ids"].tolist())
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text  # the schema, in a system turn
    assert "<|im_start|>tool\n<tool_response>\nsunny\n</tool_response><|im_end|>" in text  # the result, not trained
    assert problems(as_object) == {} and as_object.stats["rows_dropped"] == {}
    # arguments given as JSON text (as OpenAI's API returns them) train the same tokens as the object
    assert as_text.train_rows[0]["input_ids"].tolist() == row["input_ids"].tolist()
    assert as_text.train_rows[0]["labels"].tolist() == row["labels"].tolist()
    plain = prepare(tokenizer, [{"messages": CHAT}], assistant_only_loss=True)  # without tools: plain ChatML
    assert tokenizer.decode(plain.train_rows[0]["input_ids"].tolist()) == "".join(
        f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CHAT)


def test_per_message_weight_and_train_decide_for_their_message(tokenizer):
    three = CHAT + [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "bye now"}]
    masked = [dict(m) for m in three]
    masked[1]["weight"], masked[3]["train"] = 0, False
    data = prepare(tokenizer, [{"messages": masked}], assistant_only_loss=True)
    assert trained_runs(tokenizer, data.train_rows[0]) == ["bye now<|im_end|>"]
    chosen = [dict(m) for m in three]
    chosen[1]["weight"], chosen[3]["train"] = 1, True  # trained although not the last turn
    data = prepare(tokenizer, [{"messages": chosen}], last_assistant_only_loss=True)
    assert trained_runs(tokenizer, data.train_rows[0]) == [A1 + "<|im_end|>", A2 + "<|im_end|>", "bye now<|im_end|>"]
    sharegpt = [{"from": "human", "value": U1}, {"from": "gpt", "value": A1, "weight": 0},
                {"from": "human", "value": U2}, {"from": "gpt", "value": A2}]
    data = prepare(tokenizer, [{"conversations": sharegpt}], assistant_only_loss=True)
    assert trained_runs(tokenizer, data.train_rows[0]) == [A2 + "<|im_end|>"]
    with pytest.raises(DataError, match=r"train_dataset row 1: message 2 has weight: 0 / train: false, but every "
                                        r"token of this row is trained \(loss_mask: completion\)"):
        prepare(tokenizer, [{"messages": masked}])


def test_empty_replies_are_never_trained_and_counted(tokenizer):
    empty_first = [CHAT[0], {"role": "assistant", "content": " \n"}, *CHAT[2:]]
    data = prepare(tokenizer, [{"messages": empty_first}, {"messages": CHAT}], assistant_only_loss=True)
    assert trained_runs(tokenizer, data.train_rows[0]) == [A2 + "<|im_end|>"]
    assert trained_runs(tokenizer, data.train_rows[1]) == [A1 + "<|im_end|>", A2 + "<|im_end|>"]
    assert data.stats["empty_replies"] == {"turns": 1, "rows": 1, "examples": ["train_dataset row 1: message 2"]}
    every_token = prepare(tokenizer, [{"messages": empty_first}]).train_rows[0]  # all but the empty reply
    untrained = every_token["input_ids"][every_token["labels"] == -100].tolist()
    assert tokenizer.decode(untrained) == " \n<|im_end|>"
    with pytest.raises(DataError, match="1 have only empty assistant replies"):
        prepare(tokenizer, [{"messages": [CHAT[0], {"role": "assistant", "content": ""}]}], assistant_only_loss=True)


def test_completion_only_loss_on_plain_conversations_is_refused(tokenizer):
    with pytest.raises(DataError, match="completion_only_loss: true means nothing for dataset 'train_dataset'"):
        prepare(tokenizer, [{"messages": CHAT}], completion_only_loss=True)
    split = {"prompt": CHAT[:1], "completion": CHAT[1:2]}  # conversational prompt/completion: it means something
    data = prepare(tokenizer, [split], completion_only_loss=True)
    assert trained_runs(tokenizer, data.train_rows[0]) == [A1 + "<|im_end|>"]


REASONED = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "two and two"},
            {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "<think>three and three</think>6"}]


def test_real_qwen3_reasoning_of_earlier_turns_is_reported_and_can_be_trained_per_turn(qwen3_tokenizer):
    """Qwen3's template writes the reasoning of the turns after the last user message only."""
    data = prepare(qwen3_tokenizer, [{"messages": REASONED}, {"messages": CHAT}], assistant_only_loss=True)
    assert trained_runs(qwen3_tokenizer, data.train_rows[0]) == [
        "4<|im_end|>", "<think>\nthree and three\n</think>\n\n6<|im_end|>"]
    assert problems(data) == {"reasoning_dropped": 1}
    assert data.stats["template_checks"]["reasoning_dropped"]["examples"] == [
        "train_dataset row 1: message 2 (assistant): its reasoning is not in the template's rendering"]

    split = prepare(qwen3_tokenizer, [{"messages": REASONED}, {"messages": CHAT}], assistant_only_loss=True,
                    split_assistant_turns=True)
    assert problems(split) == {}
    assert [row["index"] for row in split.train_rows] == [0, 0, 1, 1]
    first, second = split.train_rows[:2]
    assert trained_runs(qwen3_tokenizer, first) == ["<think>\ntwo and two\n</think>\n\n4<|im_end|>"]
    assert trained_runs(qwen3_tokenizer, second) == ["<think>\nthree and three\n</think>\n\n6<|im_end|>"]
    # each example is what inference renders: the history as the template writes it, then the trained turn
    for row, end in ((first, 2), (second, 4)):
        expected = qwen3_tokenizer.apply_chat_template(REASONED[:end], tokenize=False)
        assert qwen3_tokenizer.decode(row["input_ids"].tolist()) == expected
