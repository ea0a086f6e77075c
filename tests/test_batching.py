"""The batching plan: every layout and refusal decided once, from the config and the machine, before any work."""

from __future__ import annotations

import pytest

from sftune import SFTConfig, train
from sftune.batching import plan_batching
from sftune.errors import ConfigError


def plan(device_type: str = "cpu", engine: str = "single", processes: int = 1, **settings):
    return plan_batching(SFTConfig(**settings), device_type=device_type, engine=engine,
                         num_processes=processes)


FLASH = {"attn_implementation": "flash_attention_2"}


@pytest.mark.parametrize(("settings", "device", "engine", "layout", "padding_free"), [
    ({}, "cpu", "single", "rows", True),  # unset padding_free: on for CPU
    ({}, "cpu", "ddp", "rows", True),
    ({}, "cuda", "single", "padded", False),  # sdpa on a GPU: rows one at a time would underfeed it
    ({}, "cuda", "fsdp", "padded", False),
    (FLASH, "cuda", "single", "joined", True),
    (FLASH, "cuda", "deepspeed", "joined", True),
    ({"padding_free": False}, "cpu", "single", "padded", False),
    ({"padding_free": True}, "cuda", "single", "rows", True),
    ({"packing": True}, "cpu", "single", "packed", False),
    ({"packing": True}, "cuda", "fsdp", "packed", False),
    ({"packing": True, **FLASH}, "cuda", "single", "joined", False),
    ({"packing": True, "padding_free": True}, "cpu", "single", "rows", True),
])
def test_layouts(settings, device, engine, layout, padding_free):
    chosen = plan(device, engine, 2 if engine != "single" else 1, **settings)
    assert (chosen.layout, chosen.padding_free) == (layout, padding_free)
    assert chosen.padding_free_chosen == ("padding_free" not in settings)


def test_rows_per_step_counts_every_process_and_micro_batch():
    chosen = plan("cpu", "ddp", 3, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert (chosen.micro_batch_rows, chosen.rows_per_micro_step, chosen.rows_per_step) == (4, 12, 24)
    assert chosen.steps_per_epoch(25) == 2 and chosen.steps_per_epoch(24) == 1 and chosen.steps_per_epoch(0) == 1
    assert chosen.describe_step() == "24 rows per step (4 x 2 accumulation x 3 processes)"


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_padding_free_rows_under_a_sharded_engine_are_refused(engine):
    with pytest.raises(ConfigError, match=f"padding_free on sdpa attention .* under {engine.upper()} every process"):
        plan("cuda", engine, 2, padding_free=True)
    assert plan("cuda", engine, 2, padding_free=True, attn_implementation="flash_attention_2").layout == "joined"


def test_group_by_length_with_packing_is_refused():
    with pytest.raises(ConfigError, match="'group_by_length' and 'packing' are both set"):
        plan(packing=True, group_by_length=True, max_length=64)


def test_train_refuses_before_loading_the_model_or_the_data(tiny_model_dir, chat_jsonl, tmp_path, monkeypatch):
    from sftune.data import prepare
    from sftune.model import load

    def must_not_run(*args, **kwargs):
        raise AssertionError("the refusal must come first")

    monkeypatch.setattr(load, "load_model", must_not_run)
    monkeypatch.setattr(prepare, "prepare_train_data", must_not_run)
    config = SFTConfig(model_name_or_path=str(tiny_model_dir), dataset_name=str(chat_jsonl),
                       output_dir=str(tmp_path / "run"), packing=True, group_by_length=True, max_steps=1)
    with pytest.raises(ConfigError, match="'group_by_length' and 'packing'"):
        train(config)
