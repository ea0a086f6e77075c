"""Reading datasets from every supported place, and the errors that name file, row and field."""

from __future__ import annotations

import json

import pytest
from conftest import build_tokenizer, conversations, write_jsonl

from sftune import SFTConfig
from sftune.cli import main
from sftune.data.collate import next_token_targets, pad_batch
from sftune.data.prepare import prepare_train_data
from sftune.data.sources import load_source
from sftune.errors import DataError


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def prepare(path, tokenizer, **overrides):
    config = SFTConfig(model_name_or_path="tiny", dataset_name=str(path), **overrides)
    return prepare_train_data(config, tokenizer)


ROWS = [{"text": "hello world"}, {"text": "how are you"}, {"text": "fine thanks"}]


def test_jsonl_json_csv_parquet_and_arrow_read_alike(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "b.json").write_text(json.dumps(ROWS))
    (tmp_path / "c.json").write_text(json.dumps({"data": ROWS}))
    (tmp_path / "d.json").write_text("".join(json.dumps(r) + "\n" for r in ROWS))  # JSON lines named .json
    (tmp_path / "e.csv").write_text("text\nhello world\nhow are you\nfine thanks\n")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "f.parquet")
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    arrow_file = next((tmp_path / "saved").glob("*.arrow"))
    for name in ("a.jsonl", "b.json", "c.json", "d.json", "e.csv", "f.parquet", str(arrow_file), "saved"):
        assert load_source(str(tmp_path / name)).rows == ROWS, name


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    """Excel's "CSV UTF-8" and some editors' JSON start with a BOM: without care it joins the first key's name."""
    bom = "\ufeff"
    (tmp_path / "excel.csv").write_text(bom + "text\nhello world\nhow are you\nfine thanks\n", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text(bom + "".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    (tmp_path / "b.json").write_text(bom + json.dumps(ROWS), encoding="utf-8")
    for name in ("excel.csv", "a.jsonl", "b.json"):
        assert load_source(str(tmp_path / name)).rows == ROWS, name


def test_hidden_copies_in_a_dataset_folder_are_not_rows(tmp_path):
    write_jsonl(tmp_path / "d" / "chats.jsonl", ROWS)
    write_jsonl(tmp_path / "d" / ".ipynb_checkpoints" / "chats-checkpoint.jsonl", ROWS)  # Jupyter's copy
    write_jsonl(tmp_path / "d" / ".chats.jsonl", ROWS[:1])
    assert load_source(str(tmp_path / "d")).rows == ROWS


def test_folder_of_files_and_split_names(tmp_path):
    write_jsonl(tmp_path / "plain" / "part1.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "plain" / "part2.jsonl", ROWS[2:])
    assert load_source(str(tmp_path / "plain")).rows == ROWS

    write_jsonl(tmp_path / "split" / "train.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "split" / "test.jsonl", ROWS[2:])
    assert load_source(str(tmp_path / "split"), "train").rows == ROWS[:2]
    assert load_source(str(tmp_path / "split"), "test").rows == ROWS[2:]
    with pytest.raises(DataError, match="no files for split 'validation'"):
        load_source(str(tmp_path / "split"), "validation")


def test_row_origin_is_kept_per_file(tmp_path):
    write_jsonl(tmp_path / "d" / "a.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "d" / "b.jsonl", ROWS)
    source = load_source(str(tmp_path / "d"))
    assert source.where(3).endswith("b.jsonl row 2")


def test_chat_rows_render_through_the_template(tokenizer, tmp_path):
    rows = conversations(6)
    data = prepare(write_jsonl(tmp_path / "c.jsonl", rows), tokenizer)
    expected = tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False)
    assert tokenizer.decode(data.train_rows[0]["input_ids"]) == expected
    assert data.stats["format"] == "messages" and data.stats["rows"] == 6


def test_text_rows_get_exactly_one_eos(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}, {"text": "hello world<|im_end|>"}])
    data = prepare(path, tokenizer)
    for row in data.train_rows:
        ids = list(row["input_ids"])
        assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1


def test_dataset_text_field(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "hello world"}])
    assert prepare(path, tokenizer, dataset_text_field="body").stats["rows"] == 1


def test_targets_are_next_tokens_within_each_document():
    import numpy as np

    labels = np.array([10, 11, 12, 20, 21], dtype=np.int32)
    assert next_token_targets(labels).tolist() == [11, 12, 20, 21, -100]
    assert next_token_targets(labels, np.array([3, 2])).tolist() == [11, 12, -100, 21, -100]


def test_padding_carries_no_target(tokenizer):
    import numpy as np

    rows = [{"input_ids": np.array([5, 6, 7]), "labels": np.array([5, 6, 7])},
            {"input_ids": np.array([8]), "labels": np.array([8])}]
    batch = pad_batch(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["targets"].tolist() == [[6, 7, -100], [-100, -100, -100]]


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [oops\n',
         "c.jsonl line 2: malformed JSON"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assitant", "content": "yo"}]}\n',
         "c.jsonl row 1: message 2 has role 'assitant' (expected one of: system, user, assistant, tool); "
         "did you mean 'assistant'?"),
        ('{"messages": [{"role": "user", "content": 5}]}\n', "row 1: message 1 (user) has content of type int"),
        ('{"messages": [{"role": "user"}]}\n', "row 1: message 1 (user) has no content"),
        ('{"messages": []}\n', "row 1: field 'messages' must be a non-empty list"),
        ('{"messages": ["hi"]}\n', "row 1: message 1 must be an object"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": "hi"}\n',
         "c.jsonl row 2: field 'messages' must be a non-empty list"),
        ('{"mesages": []}\n', "cannot tell the dataset's format from its columns (mesages)"),
        ('{"txt": "a"}\n', "did you mean 'txt'? rename it (dataset_columns)"),
        ('{"conversations": [{"from": "humann", "value": "hi"}]}\n',
         "row 1: conversations turn 1 is from 'humann' (expected one of: human, "),
        ('{"prompt": "a", "completion": 3}\n', "row 1: field 'completion' must be text (or a list of messages)"),
        ('{"instruction": "a", "output": ""}\n', "row 1: field 'output' is empty"),
        ('{"input_ids": [1, "x"]}\n', "row 1: field 'input_ids' must be a list of whole numbers"),
        ('{"input_ids": [1, 2], "labels": [1]}\n', "row 1: field 'labels' has 1 values for 2 input_ids"),
        ('{"messages": [{"role": "user", "content": "hi"}], "tools": "not json"}\n',
         "row 1: field 'tools' is text but not valid JSON"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": '
         '[{"function": {"name": "f", "arguments": "[{\\"x\\": 1}]"}}]}]}\n',
         "row 1: message 2 (assistant), tool call 1 (f): 'arguments' holds a list, not an object"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": '
         '"[{\\"function\\": {\\"name\\": \\"f\\", \\"arguments\\": 3}}]"}]}\n',
         "row 1: message 2 (assistant), tool call 1 (f): 'arguments' must be an object, got int"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": "f(x)"}]}\n',
         "row 1: message 2 (assistant): field 'tool_calls' is text but not valid JSON"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 2}]}\n',
         "row 1: message 2 (assistant): field 'weight' = 2: expected 0 (not trained) or 1 (trained)"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 1, '
         '"train": true}]}\n', "row 1: message 2 (assistant) has both 'weight' and 'train': keep one of them"),
        ('{"text": 3}\n', "row 1: field 'text' must be text, got int"),
        ("", "is empty: no rows"),
        ("[1, 2]", "c.jsonl line 1: expected a JSON object, got list"),
    ],
)
def test_bad_rows_name_file_row_and_field(tokenizer, tmp_path, content, message):
    path = tmp_path / "c.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as caught:
        prepare(path, tokenizer)
    assert message in str(caught.value)


def test_missing_dataset_file(tokenizer, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare(tmp_path / "nope.jsonl", tokenizer)


def test_empty_folder(tokenizer, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        prepare(tmp_path / "empty", tokenizer)


def test_hub_dataset_path_fails_clearly_offline(tokenizer):
    with pytest.raises(DataError, match="not a local file or folder, and loading it from the Hugging Face Hub failed"):
        load_source("someone/some-dataset-that-is-not-here")


def test_tokenizer_without_template_gets_chatml_and_its_end_token_as_eos(chat_jsonl):
    given = build_tokenizer(chat_template=None)
    given.eos_token = "<|endoftext|>"
    data = prepare(chat_jsonl, given, assistant_only_loss=True)
    tokenizer = data.tokenizer  # the run's tokenizer is a shaped copy; the one given is left as it was
    assert given.chat_template is None and given.eos_token == "<|endoftext|>" and tokenizer is not given
    assert data.stats["default_template"] and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    row = data.train_rows[0]
    trained = row["input_ids"][row["labels"] != -100]
    assert trained[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize(
    "model_arg,message",
    [
        ("./no/such/model", "model './no/such/model' does not exist"),
        ("someone/not-a-real-model-xyz", "could not load the tokenizer of 'someone/not-a-real-model-xyz' from the Hugging Face Hub"),
    ],
)
def test_bad_models_fail_clearly(capsys, chat_jsonl, tmp_path, model_arg, message):
    code = main(["train", "--model_name_or_path", model_arg, "--dataset_name", str(chat_jsonl),
                 "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_model_folder_without_weights(capsys, chat_jsonl, tmp_path, tiny_model_dir):
    import shutil

    folder = tmp_path / "noweights"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    code = main(["train", "--model_name_or_path", str(folder), "--dataset_name", str(chat_jsonl),
                 "--output_dir", str(tmp_path / "o")])
    assert code == 2 and "holds no weights" in capsys.readouterr().err


def test_missing_dataset_is_a_one_line_cli_error(capsys, tiny_model_dir, tmp_path):
    code = main(["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", "data/missing.jsonl",
                 "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "dataset 'data/missing.jsonl' does not exist" in err and err.count("\n") == 1


def test_tool_calls_given_as_json_text_are_parsed(tmp_path):
    """OpenAI's API gives `arguments` as JSON text, and CSV files the whole list: templates expect objects."""
    from sftune.data.formats import normalise
    from sftune.data.sources import SourceRows

    calls = [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": given}]}
            for given in (calls, json.dumps(calls), [{"type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}],
                          [{"name": "f", "arguments": '{"x": 1}'}])]
    source = SourceRows("d", rows, [("d", i + 1) for i in range(len(rows))])
    assert [e["messages"][1]["tool_calls"] for e in normalise(source, "messages", "text")] == [calls] * 4


def test_tool_call_arguments_from_parquet_keep_only_their_own_keys(tmp_path):
    """Arrow gives every call every argument name of the column, None where the call had none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sftune.data.formats import normalise

    def row(name, arguments):
        return {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": name, "arguments": arguments}}]}]}

    pq.write_table(pa.Table.from_pylist([row("f", {"city": "Paris"}), row("g", {"x": 1})]), tmp_path / "t.parquet")
    source = load_source(str(tmp_path / "t.parquet"))
    assert source.rows[0]["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "x": None}
    examples = normalise(source, "messages", "text")
    assert [e["messages"][1]["tool_calls"][0]["function"]["arguments"] for e in examples] == [{"city": "Paris"}, {"x": 1}]


@pytest.mark.parametrize("data, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "train_dataset: expected a datasets.Dataset or a list of "
                                                        "dicts (one per row), got a dict: wrap one row in a list"),
    ([], "train_dataset: the list of rows is empty: give at least one row"),
])
def test_python_api_train_refuses_data_that_is_not_rows(tiny_model_dir, tmp_path, data, message):
    from sftune import train

    config = SFTConfig(model_name_or_path=str(tiny_model_dir), output_dir=str(tmp_path / "out"), max_steps=1)
    with pytest.raises(DataError) as caught:
        train(config, train_dataset=data)
    assert str(caught.value).startswith(message)
    assert not (tmp_path / "out").exists()
