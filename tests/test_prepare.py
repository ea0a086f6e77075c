"""The preparation pipeline: cache, several sources with weights, eval rows, parallel tokenization, the Python
API, and `sftune inspect`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import build_tokenizer, conversations, corpus, write_jsonl

from sftune import SFTConfig, train
from sftune.data import prepare as prepare_module
from sftune.data.prepare import prepare_train_data
from sftune.errors import ConfigError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("SFTUNE_DATA_CACHE", str(folder))
    return folder


def config_for(path, **settings) -> SFTConfig:
    return SFTConfig(**{"model_name_or_path": "tiny", "dataset_name": str(path), "max_length": 256, **settings})


def rows_of(data) -> list[tuple]:
    return [(r["input_ids"].tolist(), r["labels"].tolist(), np.asarray(r["index"]).tolist(),
             np.asarray(r["source"]).tolist()) for r in data.train_rows]


def test_second_run_uses_the_cache_and_any_change_prepares_again(tmp_path, cache, monkeypatch):
    path = write_jsonl(tmp_path / "chat.jsonl", conversations(12))
    first = prepare_train_data(config_for(path, assistant_only_loss=True), build_tokenizer())
    assert not first.stats.get("cached") and len(list(cache.iterdir())) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("prepared again")

    monkeypatch.setattr(prepare_module, "build", no_tokenizing)
    again = prepare_train_data(config_for(path, assistant_only_loss=True), build_tokenizer())
    assert again.stats["cached"] and rows_of(again) == rows_of(first)
    monkeypatch.undo()
    monkeypatch.setenv("SFTUNE_DATA_CACHE", str(cache))

    changed_template = build_tokenizer()
    changed_template.chat_template = changed_template.chat_template.replace("'\n'", "'\n\n'")
    write_jsonl(tmp_path / "other.jsonl", conversations(12)[:-1])
    variants = [
        (config_for(path, assistant_only_loss=True, max_length=64), build_tokenizer()),
        (config_for(path), build_tokenizer()),
        (config_for(path, assistant_only_loss=True), changed_template),
        (config_for(tmp_path / "other.jsonl", assistant_only_loss=True), build_tokenizer()),
    ]
    for config, tokenizer in variants:
        assert not prepare_train_data(config, tokenizer).stats.get("cached")
    assert len(list(cache.iterdir())) == 1 + len(variants)
    assert not list(cache.glob(".staging-*"))


def test_mixture_weights_share_out_rows(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in corpus(30, seed=1)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in corpus(10, seed=2)])
    tokenizer = build_tokenizer()
    plain = prepare_train_data(SFTConfig(model_name_or_path="tiny", datasets=[{"path": str(a)}, {"path": str(b)}]),
                               tokenizer)
    assert np.bincount([r["source"] for r in plain.train_rows]).tolist() == [30, 10]
    assert plain.source_names == ["a", "b"] and plain.stats["sources"][0]["name"] == str(a)

    weighted = prepare_train_data(SFTConfig(model_name_or_path="tiny", datasets=[
        {"path": str(a), "weight": 1}, {"path": str(b), "weight": 3}]), tokenizer)
    sources = [r["source"] for r in weighted.train_rows]
    assert np.bincount(sources).tolist() == [10, 30]  # 40 rows shared 1:3; b's 10 rows three times each
    b_rows = sorted(r["index"] for r in weighted.train_rows if r["source"] == 1)
    assert b_rows == sorted(list(range(10)) * 3)
    assert [s["mixed_documents"] for s in weighted.stats["sources"]] == [10, 30]

    with pytest.raises(ConfigError, match="give every dataset a 'weight', or none"):
        SFTConfig(datasets=[{"path": str(a), "weight": 1}, {"path": str(b)}])
    with pytest.raises(ConfigError, match="unknown key 'wieght' \\(did you mean 'weight'\\?\\)"):
        SFTConfig(datasets=[{"path": str(a), "wieght": 1}])


def test_documents_keep_their_source_and_row_through_packing(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", conversations(20, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": p, "completion": " " + c} for p, c in
                                           zip(corpus(15, seed=3), corpus(15, seed=4))])
    tokenizer = build_tokenizer()
    settings = dict(model_name_or_path="tiny", datasets=[{"path": str(a)}, {"path": str(b)}],
                    assistant_only_loss=False, max_length=128)
    unpacked = prepare_train_data(SFTConfig(**settings), tokenizer)
    packed = prepare_train_data(SFTConfig(**settings, packing=True), tokenizer)
    assert packed.stats["packing"]["efficiency"] > 0.8 and len(packed.train_rows) < len(unpacked.train_rows)
    documents = {(r["source"], r["index"]): (r["input_ids"].tolist(), r["labels"].tolist())
                 for r in unpacked.train_rows}
    found = {}
    for row in packed.train_rows:
        starts = np.concatenate([[0], np.cumsum(row["seq_lengths"])])
        for k, (source, index) in enumerate(zip(row["source"], row["index"])):
            piece = slice(starts[k], starts[k + 1])
            found[(int(source), int(index))] = (row["input_ids"][piece].tolist(), row["labels"][piece].tolist())
    assert found == documents
    assert {s for s, _ in found} == {0, 1}


def test_eval_split_and_eval_ratio(tmp_path):
    folder = tmp_path / "data"
    write_jsonl(folder / "train.jsonl", conversations(20, seed=1))
    write_jsonl(folder / "test.jsonl", conversations(5, seed=2))
    tokenizer = build_tokenizer()
    split = prepare_train_data(config_for(folder, dataset_test_split="test"), tokenizer)
    assert len(split.train_rows) == 20 and len(split.eval_rows) == 5

    held = prepare_train_data(config_for(folder, eval_ratio=0.25), tokenizer)
    train_index = {r["index"] for r in held.train_rows}
    eval_index = {r["index"] for r in held.eval_rows}
    assert len(eval_index) == 5 and not train_index & eval_index and train_index | eval_index == set(range(20))
    with pytest.raises(ConfigError, match="'dataset_test_split' and 'eval_ratio' are both set"):
        config_for(folder, eval_ratio=0.1, dataset_test_split="test")


def test_parallel_tokenization_gives_the_same_rows(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", conversations(40))
    tokenizer = build_tokenizer()
    one = prepare_train_data(config_for(path, assistant_only_loss=True, packing=True, dataset_num_proc=1), tokenizer)
    write_jsonl(tmp_path / "copy" / "chat.jsonl", conversations(40))  # another cache entry: same content, new name
    two = prepare_train_data(config_for(tmp_path / "copy", assistant_only_loss=True, packing=True, dataset_num_proc=2),
                             tokenizer)
    assert not two.stats.get("cached") and rows_of(one) == rows_of(two)


def test_column_renaming(tmp_path):
    rows = [{"dialog": c["messages"], "id": i} for i, c in enumerate(conversations(4))]
    data = prepare_train_data(config_for(write_jsonl(tmp_path / "d.jsonl", rows), dataset_columns={"dialog": "messages"}),
                              build_tokenizer())
    assert data.stats["format"] == "messages" and len(data.train_rows) == 4
    from sftune.errors import DataError

    with pytest.raises(DataError, match="column 'dialogue' named in the config is not in the data"):
        prepare_train_data(config_for(tmp_path / "d.jsonl", dataset_columns={"dialogue": "messages"}), build_tokenizer())


def test_python_api_takes_datasets_and_a_formatting_function(tiny_model_dir, tmp_path):
    from datasets import Dataset

    dataset = Dataset.from_list([{"question": q, "answer": a} for q, a in zip(corpus(24, seed=5), corpus(24, seed=6))])
    config = SFTConfig(model_name_or_path=str(tiny_model_dir), output_dir=str(tmp_path / "run"), max_steps=2,
                       per_device_train_batch_size=4, learning_rate=1e-3)
    result = train(config, train_dataset=dataset, eval_dataset=[{"question": "a", "answer": "b"}],
                   formatting_func=lambda row: {"prompt": row["question"] + "?", "completion": " " + row["answer"]})
    assert result.global_step == 2 and result.data_stats["format"] == "prompt_completion"
    assert result.data_stats["rows"] == 24 and result.data_stats["eval_rows"] == 1
    with pytest.raises(ConfigError, match="a train_dataset was passed to train\\(\\) and the config also names"):
        train(SFTConfig(model_name_or_path=str(tiny_model_dir), dataset_name="x.jsonl",
                        output_dir=str(tmp_path / "other")), train_dataset=dataset)


def test_packed_assistant_only_training_end_to_end(tiny_model_dir, chat_jsonl, tmp_path):
    config = SFTConfig(model_name_or_path=str(tiny_model_dir), dataset_name=str(chat_jsonl),
                       output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=2,
                       learning_rate=3e-3, max_length=128, packing=True, assistant_only_loss=True, logging_steps=1)
    result = train(config)
    losses = [entry["loss"] for entry in result.history]
    assert result.data_stats["packing"] and len(losses) == 6 and losses[-1] < losses[0]


def test_tokenizer_without_chat_tokens_gets_them_and_the_model_grows(tmp_path):
    """The ChatML default adds <|im_start|> and <|im_end|> to a tokenizer without them; the model is resized."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from conftest import build_model

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")
    folder = tmp_path / "base"
    tokenizer.save_pretrained(folder)
    build_model(len(tokenizer), pad_token_id=0, eos_token_id=0).save_pretrained(folder)
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(8))
    config = SFTConfig(model_name_or_path=str(folder), dataset_name=str(data), output_dir=str(tmp_path / "run"),
                       max_steps=1, assistant_only_loss=True)
    result = train(config)
    saved = AutoTokenizer.from_pretrained(result.output_dir)
    assert saved.eos_token == "<|im_end|>" and "<|im_start|>" in saved.chat_template
    assert result.model.get_input_embeddings().num_embeddings == len(saved) == len(tokenizer) + 2
    assert saved.convert_tokens_to_ids("<|im_end|>") in np.atleast_1d(result.model.generation_config.eos_token_id)


@pytest.mark.slow  # runs in a subprocess
def test_inspect_prints_statistics_examples_and_writes_jsonl(tiny_model_dir, tmp_path):
    rows = conversations(10)
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "prepared.jsonl"
    command = [sys.executable, "-m", "sftune", "inspect", "--model_name_or_path", str(tiny_model_dir),
               "--dataset_name", str(data), "--assistant_only_loss", "--num_examples", "2", "--jsonl", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for expected in ("rows: 10 for training", "tokens:", "trained:", "document length in tokens: p50",
                     "padding:", "steps per epoch: 2", "template checks: 10 rows", "all pass",
                     "--- example 1:", "--- example 2:", "chat.jsonl row 2 ---"):
        assert expected in text, expected
    assert "--- example 3:" not in text
    assert f"[[{rows[0]['messages'][-1]['content']}<|im_end|>]]" in text  # piped: brackets, not colour
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["index"] for w in written] == list(range(10))
    assert all(set(w) == {"index", "input_ids", "labels"} and len(w["input_ids"]) == len(w["labels"]) for w in written)

    again = subprocess.run(command[:-2], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "using the prepared data cached in" in again.stderr


def test_chat_template_path_is_used_and_saved_with_the_model(tiny_model_dir, chat_jsonl, tmp_path):
    from transformers import AutoTokenizer

    from test_masks import LLAMA2_TEMPLATE

    template = tmp_path / "llama2.jinja"
    template.write_text(LLAMA2_TEMPLATE)
    config = SFTConfig(model_name_or_path=str(tiny_model_dir), dataset_name=str(chat_jsonl),
                       output_dir=str(tmp_path / "run"), max_steps=1, assistant_only_loss=True,
                       chat_template_path=str(template))
    result = train(config)
    assert AutoTokenizer.from_pretrained(result.output_dir).chat_template == LLAMA2_TEMPLATE
    assert result.data_stats["rows_checked"] == 32
    with pytest.raises(ConfigError, match="'chat_template_path' = .*no such file"):
        prepare_train_data(config_for(chat_jsonl, chat_template_path=str(tmp_path / "missing.jinja")), build_tokenizer())


def test_a_template_that_writes_the_bos_gets_no_second_one(tmp_path):
    from tokenizers import processors

    tokenizer = build_tokenizer("{{ bos_token }}" + build_tokenizer().chat_template)
    tokenizer.bos_token = "<|endoftext|>"
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    data = prepare_train_data(config_for(write_jsonl(tmp_path / "c.jsonl", conversations(4))), tokenizer)
    for row in data.train_rows:
        assert row["input_ids"][0] == bos and row["input_ids"].tolist().count(bos) == 1


def test_highlighting_in_colour_and_in_brackets():
    from sftune.inspect import TRAINED_OFF, TRAINED_ON, highlight

    tokenizer = build_tokenizer()
    ids = np.array(tokenizer("hello world how are you", add_special_tokens=False)["input_ids"])
    labels = np.full_like(ids, -100)
    labels[-2:] = ids[-2:]
    tail = tokenizer.decode(ids[-2:].tolist())
    assert highlight(tokenizer, ids, labels, colour=False).endswith(f"[[{tail}]]")
    assert highlight(tokenizer, ids, labels, colour=True).endswith(f"{TRAINED_ON}{tail}{TRAINED_OFF}")


def test_hub_datasets_are_fingerprinted_by_datasets(monkeypatch):
    """The Hub is out of reach here: stand a local Dataset in for load_dataset and check the path around it."""
    import datasets

    from sftune.data.sources import DatasetSpec, open_split

    served = datasets.Dataset.from_list([{"text": t} for t in corpus(5)])
    calls = []

    def load_dataset(name, subset, split):
        calls.append((name, subset, split))
        return served

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    opened = open_split(DatasetSpec("org/data", path="org/data", subset="en"), "train")
    assert calls == [("org/data", "en", "train")] and opened.fingerprint == "hub:" + served._fingerprint
    rows = opened.load()
    assert rows.rows == served.to_list() and rows.where(2) == "org/data[train] row 3"


def test_eval_rows_and_source_names_reach_evaluation(tmp_path, tiny_model_dir):
    a = write_jsonl(tmp_path / "chat.jsonl", conversations(24, seed=1))
    b = write_jsonl(tmp_path / "more" / "chat.jsonl", conversations(24, seed=2))
    config = SFTConfig(model_name_or_path=str(tiny_model_dir), output_dir=str(tmp_path / "run"), max_steps=2,
                       datasets=[{"path": str(a)}, {"path": str(b)}], eval_ratio=0.25, eval_strategy="steps",
                       eval_steps=2, per_device_train_batch_size=4, assistant_only_loss=True, packing=True,
                       max_length=128)
    result = train(config)
    assert result.data_stats["eval_rows"] > 0
    evaluation = next(entry for entry in result.history if "eval_loss" in entry)
    assert {"eval_loss/chat", "eval_loss/chat#2"} <= set(evaluation)
