"""TRL keys sftune implements (issue 15): step ratios, sampling order, use_cpu, TRL's dataset entries and
test_split_size, skip_prepare_dataset. Each test fails when its behaviour is taken away."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import conversations, write_jsonl
from sftune import SFTConfig, train
from sftune.config.fields import steps_of
from sftune.data.order import epoch_order
from sftune.data.sources import dataset_specs, fraction_counts, local_files_of
from sftune.errors import DataError


def run_config(model_dir, data, out, **overrides) -> SFTConfig:
    settings = dict(model_name_or_path=str(model_dir), dataset_name=str(data), output_dir=str(out),
                    learning_rate=1e-3, max_steps=10, logging_steps=1, per_device_train_batch_size=4, max_length=96,
                    save_strategy="no")
    settings.update(overrides)
    return SFTConfig(**settings)


def test_steps_ratios_round_up_like_transformers():
    assert steps_of(0.25, 10) == 3 and steps_of(0.5, 10) == 5 and steps_of(20, 10) == 20
    assert steps_of(0.1, 30) == 3  # not 4: 0.1 * 30 is 3.0000000000000004 in floating point
    assert steps_of(0.001, 10) == 1
    assert SFTConfig(logging_steps="0.5").logging_steps == 0.5 and SFTConfig(save_steps=10.0).save_steps == 10
    with pytest.raises(Exception, match="'save_steps' = 1.5: expected a whole number of steps, or a ratio"):
        SFTConfig(save_steps=1.5)


def test_float_logging_eval_save_and_warmup_steps_are_ratios_of_the_run(tiny_model_dir, chat_jsonl, tmp_path):
    result = train(run_config(tiny_model_dir, chat_jsonl, tmp_path / "run", logging_steps=0.2, eval_steps=0.25,
                              eval_strategy="steps", eval_ratio=0.2, save_strategy="steps", save_steps=0.5,
                              warmup_steps=0.3, lr_scheduler_type="linear"))
    train_steps = [entry["step"] for entry in result.history if "loss" in entry]
    eval_steps = [entry["step"] for entry in result.history if "eval_loss" in entry]
    assert train_steps == [2, 4, 6, 8, 10]
    assert eval_steps == [3, 6, 9, 10]  # every ceil(2.5) = 3 steps, and the final model
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    rates = [entry["learning_rate"] for entry in result.history if "learning_rate" in entry]
    # 3 warm-up steps (ceil(0.3 * 10)): step 2 runs at 1/3 of the peak, step 4 at the peak, then it decays
    assert rates[0] == pytest.approx(1e-3 / 3) and rates[1] == pytest.approx(1e-3)


def rows_of_lengths(lengths):
    return [{"input_ids": list(range(n))} for n in lengths]


def test_train_sampling_strategy_orders_the_epoch():
    rows = rows_of_lengths(np.random.default_rng(0).integers(1, 200, size=64))
    sequential = SFTConfig(train_sampling_strategy="sequential", seed=3)
    assert list(epoch_order(rows, sequential, 0)) == list(range(64)) == list(epoch_order(rows, sequential, 1))
    random = SFTConfig(train_sampling_strategy="random", seed=3)
    shuffled = epoch_order(rows, random, 0)
    assert sorted(shuffled) == list(range(64)) and list(shuffled) != list(range(64))
    assert list(shuffled) != list(epoch_order(rows, random, 1))  # a new order each epoch
    grouped = epoch_order(rows, SFTConfig(train_sampling_strategy="group_by_length", seed=3,
                                          per_device_train_batch_size=4), 0)
    lengths = [len(rows[i]["input_ids"]) for i in grouped]
    assert lengths == sorted(lengths, reverse=True)  # one window of 50 micro-batches holds all 64 rows
    assert SFTConfig(group_by_length=True).train_sampling_strategy == "group_by_length"


def test_sequential_sampling_trains_the_rows_in_file_order(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", conversations(16))
    seen = []
    from sftune.training import loop

    original = loop.Trainer._micro_batches

    def spy(self, order, step_in_epoch):
        seen.append(list(order[step_in_epoch * 4:(step_in_epoch + 1) * 4]))
        return original(self, order, step_in_epoch)

    loop.Trainer._micro_batches = spy
    try:
        train(run_config(tiny_model_dir, data, tmp_path / "run", max_steps=4, train_sampling_strategy="sequential"))
    finally:
        loop.Trainer._micro_batches = original
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]


def test_use_cpu_keeps_training_off_the_gpu(monkeypatch):
    import accelerate
    import torch

    from sftune import run

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    monkeypatch.setattr(accelerate, "Accelerator", lambda cpu=False, **kwargs: asked.append(cpu))
    run.make_accelerator(SFTConfig(use_cpu=True))
    run.make_accelerator(SFTConfig())
    assert asked == [True, False]


# ---------------------------------------------------------------- TRL's datasets entries and test_split_size


def test_fractions_take_first_rows_without_oversampling():
    assert fraction_counts([10, 4], [0.5, 0.5]) == [4, 4]  # 4 rows is all the second source has
    assert fraction_counts([100, 100], [3, 1]) == [100, 33]  # normalised shares, largest mixture without repeats
    assert fraction_counts([10, 0], [1.0, None]) == [10, 0]  # an eval-only source has no share


def entry_config(tmp_path, entries, **overrides):
    return SFTConfig(datasets=entries, model_name_or_path="m", output_dir=str(tmp_path / "out"), **overrides)


def test_data_files_and_data_dir_read_local_files(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "a" / "train.jsonl", [{"text": "one"}])
    write_jsonl(tmp_path / "a" / "extra" / "more.jsonl", [{"text": "two"}])
    monkeypatch.chdir(tmp_path)
    config = entry_config(tmp_path, [{"path": "json", "data_files": "a/train.jsonl"},
                                     {"path": "json", "data_files": ["a/*.jsonl", "a/extra/more.jsonl"]},
                                     {"path": "a", "data_dir": "extra"},
                                     {"path": "json", "data_files": {"train": "a/train.jsonl"}}])
    specs = dataset_specs(config)
    found = [[p.name for p in local_files_of(spec, "train")] for spec in specs]
    assert found == [["train.jsonl"], ["train.jsonl", "more.jsonl"], ["more.jsonl"], ["train.jsonl"]]
    with pytest.raises(DataError, match="data_files 'a/missing.jsonl' matches no file"):
        local_files_of(dataset_specs(entry_config(tmp_path, [{"path": "json", "data_files": "a/missing.jsonl"}]))[0],
                       "train")
    with pytest.raises(DataError, match="no 'test' split"):
        local_files_of(specs[0], "test")


def test_hub_entries_pass_data_dir_and_data_files_only_when_set(monkeypatch):
    import datasets

    from sftune.data.sources import DatasetSpec, open_split

    calls = []

    class Loaded:
        _fingerprint = "f"

    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: calls.append((args, kwargs)) or Loaded())
    open_split(DatasetSpec("org/data", path="org/data"), "train")
    open_split(DatasetSpec("org/data", path="org/data", data_dir="en", data_files=["x.parquet"]), "train")
    assert calls == [(("org/data", None), {"split": "train"}),
                     (("org/data", None), {"split": "train", "data_dir": "en", "data_files": ["x.parquet"]})]


def test_a_trl_mixture_trains_with_fractions_columns_and_test_split_size(tiny_model_dir, tmp_path, monkeypatch):
    chats = conversations(20)
    write_jsonl(tmp_path / "chats.jsonl", [{**row, "id": i, "noise": "x"} for i, row in enumerate(chats)])
    write_jsonl(tmp_path / "more" / "train.jsonl", conversations(10, seed=5))
    monkeypatch.chdir(tmp_path)
    config = SFTConfig(
        model_name_or_path=str(tiny_model_dir), output_dir=str(tmp_path / "run"), max_steps=2, logging_steps=1,
        per_device_train_batch_size=4, max_length=96, save_strategy="no", learning_rate=1e-3,
        datasets=[{"path": "json", "data_files": "chats.jsonl", "columns": ["messages"], "fraction": 0.75},
                  {"path": "more", "fraction": 0.25}],
        test_split_size=0.2, eval_strategy="steps", eval_steps=2)
    result = train(config)
    sources = result.data_stats["sources"]
    # 16 and 8 rows stay for training after the 20% hold-out; 3:1 shares without repeats take 16 and 5
    assert [s["mixed_documents"] for s in sources] == [16, 5]
    assert any("eval_loss" in entry for entry in result.history)


def test_test_split_size_holds_out_rows_like_eval_ratio(tiny_model_dir, tmp_path):
    from sftune.data.prepare import prepare_train_data
    from sftune.model.load import load_tokenizer

    data = write_jsonl(tmp_path / "d.jsonl", conversations(20))
    config = run_config(tiny_model_dir, data, tmp_path / "run", test_split_size=0.25)
    prepared = prepare_train_data(config, load_tokenizer(config))
    assert (len(prepared.train_rows), len(prepared.eval_rows)) == (15, 5)
    with pytest.raises(Exception, match="'test_split_size' and 'eval_ratio' are both set"):
        SFTConfig(test_split_size=0.1, eval_ratio=0.1)


def test_skip_prepare_dataset_trains_pre_tokenized_rows_as_they_are(tiny_model_dir, tmp_path):
    from sftune.data.prepare import prepare_train_data
    from sftune.model.load import load_tokenizer

    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]} for _ in range(8)]
    data = write_jsonl(tmp_path / "tok.jsonl", rows)
    config = run_config(tiny_model_dir, data, tmp_path / "run", dataset_kwargs={"skip_prepare_dataset": True})
    assert config.dataset_format == "tokenized"
    prepared = prepare_train_data(config, load_tokenizer(config))
    assert [list(r["input_ids"]) for r in prepared.train_rows] == [[5, 6, 7, 8, 9]] * 8
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "not tokenized"}])
    config = run_config(tiny_model_dir, text, tmp_path / "run2", dataset_kwargs={"skip_prepare_dataset": True})
    with pytest.raises(DataError, match="input_ids"):  # without the key the text would be tokenized silently
        prepare_train_data(config, load_tokenizer(config))
    with pytest.raises(Exception, match="sftune takes only skip_prepare_dataset"):
        SFTConfig(dataset_kwargs={"add_special_tokens": False})


def test_saved_config_keeps_ratios_and_new_names(tmp_path):
    from sftune.config import load_config

    config = SFTConfig(warmup_ratio=0.1, gradient_checkpointing=True, logging_steps=0.05, do_train=True)
    config.save(tmp_path / "c.yaml")
    text = (tmp_path / "c.yaml").read_text()
    assert "warmup_steps: 0.1" in text and "activation_checkpointing: true" in text and "do_train" not in text
    assert json.dumps(load_config(tmp_path / "c.yaml").to_dict(), default=str) == \
        json.dumps(config.to_dict(), default=str)


@pytest.mark.parametrize("settings", [{"activation_checkpointing": True}, {"gradient_checkpointing": True}, {}])
def test_activation_checkpointing_turns_on_recomputation(settings):
    from conftest import build_model
    from sftune.model.adapters import prepare_for_training

    model = prepare_for_training(build_model(64), SFTConfig(**settings))
    recomputing = any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
    assert recomputing == bool(settings)
