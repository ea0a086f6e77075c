"""Large datasets (issue 17): preparation streamed in shards gives the same rows and stats whatever the shard,
chunk and copy sizes and the number of worker processes; several processes prepare an entry once (the others wait
on its lock and read it); a preparation killed part way leaves no entry that looks complete; rows are read
lazily from the memory-mapped entry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import build_tokenizer, conversations, write_jsonl

import sftune
from sftune import SFTConfig
from sftune.data import build as build_module
from sftune.data import row_writer, sources
from sftune.data.prepare import prepare_train_data


def rows_of(rows) -> list[tuple]:
    return [tuple(np.asarray(r[k]).tolist() for k in sorted(r)) for r in rows]


def mixed_data(tmp_path: Path) -> list[dict]:
    """Two sources with weights, duplicates, rows without a reply, a test split: every stage has work to do."""
    first = conversations(90, seed=3)
    first += first[:12]  # exact duplicates
    first.append({"messages": [{"role": "user", "content": "no answer here"}]})
    write_jsonl(tmp_path / "a.jsonl", first)
    write_jsonl(tmp_path / "b" / "train.jsonl", conversations(40, seed=4))
    write_jsonl(tmp_path / "b" / "test.jsonl", conversations(9, seed=5))
    return [{"path": str(tmp_path / "a.jsonl"), "weight": 2},
            {"path": str(tmp_path / "b"), "weight": 1, "test_split": "test"}]


@pytest.mark.parametrize("packing_strategy", ["bfd", "wrapped"])
def test_shard_chunk_and_copy_sizes_and_processes_change_nothing(tmp_path, monkeypatch, packing_strategy):
    datasets = mixed_data(tmp_path)
    config = SFTConfig(model_name_or_path="tiny", datasets=datasets, max_length=48, packing=True,
                       packing_strategy=packing_strategy, assistant_only_loss=True, eval_ratio=0.1,
                       dedupe="exact", dataset_num_proc=1)
    tokenizer = build_tokenizer()
    monkeypatch.setenv("SFTUNE_DATA_CACHE", str(tmp_path / "one"))
    whole = prepare_train_data(config, tokenizer)

    # shards of 7 rows read 3 at a time, 5-row chunks over 2 worker processes, copies of 50 tokens at a time
    monkeypatch.setattr(build_module, "SHARD_ROWS", 7)
    monkeypatch.setattr(build_module, "CHUNK_ROWS", 5)
    monkeypatch.setattr(sources, "READ_BATCH", 3)
    monkeypatch.setattr(row_writer, "CHUNK_TOKENS", 50)
    monkeypatch.setenv("SFTUNE_DATA_CACHE", str(tmp_path / "two"))
    config.dataset_num_proc = 2
    small = prepare_train_data(config, tokenizer)

    assert len(whole.train_rows) > 10 and len(whole.eval_rows) > 5
    assert rows_of(small.train_rows) == rows_of(whole.train_rows)
    assert rows_of(small.eval_rows) == rows_of(whole.eval_rows)
    assert {k: v for k, v in small.stats.items() if k != "seconds"} == \
        {k: v for k, v in whole.stats.items() if k != "seconds"}
    # the counts made while copying the rows, against the rows themselves
    for rows, prefix in ((whole.train_rows, ""), (whole.eval_rows, "eval_")):
        firsts = [np.cumsum(np.concatenate([[0], r["seq_lengths"][:-1]])) for r in rows]
        trained = sum(int((r["labels"] != -100).sum() - (r["labels"][f] != -100).sum()) for r, f in zip(rows, firsts))
        assert whole.stats[f"{prefix}trained_tokens"] == trained
        assert whole.stats[f"{prefix}tokens"] == sum(len(r["input_ids"]) for r in rows)
    assert whole.stats["doctor"]["dedupe"]["train_removed"] >= 10
    assert whole.stats["rows_dropped"]["no_assistant_turn"] == 1


def test_split_assistant_turns_and_empty_replies_keep_their_source_rows_across_shards(tmp_path, monkeypatch):
    """split_assistant_turns makes several examples of one row: the examples of a row keep that row's number across
    shards and chunks, so the hold-out keeps a row's examples together and the empty replies are named by their
    row, whatever the shard and chunk sizes."""
    rows = [{"messages": [{"role": "user", "content": f"question {k}"},
                          {"role": "assistant", "content": f"first answer {k}"},
                          {"role": "user", "content": f"more {k}"},
                          {"role": "assistant", "content": "" if k % 7 == 3 else f"second answer {k}"}]}
            for k in range(40)]
    path = write_jsonl(tmp_path / "turns.jsonl", rows)
    config = SFTConfig(model_name_or_path="tiny", dataset_name=str(path), max_length=96, assistant_only_loss=True,
                       split_assistant_turns=True, eval_ratio=0.2, dataset_num_proc=1)
    tokenizer = build_tokenizer()
    monkeypatch.setenv("SFTUNE_DATA_CACHE", str(tmp_path / "one"))
    whole = prepare_train_data(config, tokenizer)

    monkeypatch.setattr(build_module, "SHARD_ROWS", 7)  # a shard's examples outnumber its rows
    monkeypatch.setattr(build_module, "CHUNK_ROWS", 5)  # chunks cut a row's examples apart
    monkeypatch.setattr(sources, "READ_BATCH", 3)
    monkeypatch.setenv("SFTUNE_DATA_CACHE", str(tmp_path / "two"))
    config.dataset_num_proc = 2
    small = prepare_train_data(config, tokenizer)

    assert rows_of(small.train_rows) == rows_of(whole.train_rows)
    assert rows_of(small.eval_rows) == rows_of(whole.eval_rows)
    assert {k: v for k, v in small.stats.items() if k != "seconds"} == \
        {k: v for k, v in whole.stats.items() if k != "seconds"}
    empty_rows = [k for k in range(40) if k % 7 == 3]
    train, held = [r["index"] for r in whole.train_rows], [r["index"] for r in whole.eval_rows]
    assert not set(train) & set(held) and len(set(train) | set(held)) == 40  # a row's examples stay together
    assert sorted(train + held) == sorted(k for k in range(40) for _ in range(1 if k in empty_rows else 2))
    assert whole.stats["rows_dropped"] == {"empty_reply": len(empty_rows)}
    empty = whole.stats["empty_replies"]
    assert (empty["turns"], empty["rows"]) == (len(empty_rows), len(empty_rows))
    assert empty["examples"] == [f"{path} row {k + 1}: message 4" for k in empty_rows[:3]]


def test_rows_are_a_lazy_read_only_list(tmp_path):
    data = prepare_train_data(SFTConfig(model_name_or_path="tiny", dataset_name=str(
        write_jsonl(tmp_path / "c.jsonl", conversations(10))), max_length=64), build_tokenizer())
    rows = data.train_rows
    assert len(rows) == 10 and isinstance(rows[0]["input_ids"], np.memmap)
    assert rows_of(rows[-3:]) == rows_of([rows[7], rows[8], rows[9]]) == rows_of(list(rows)[7:])
    assert rows[-1]["index"] == rows[9]["index"]
    with pytest.raises(IndexError):
        rows[10]


# ---------------------------------------------------------------- several processes, and a killed one

PREPARE = """
import json, os, sys, time
from pathlib import Path
from transformers import AutoTokenizer
from sftune import SFTConfig
from sftune.data import prepare
from sftune.logs import setup_logging

setup_logging()
data_file, tokenizer_dir, marker, mode = sys.argv[1:5]
real_build = prepare.build

def build(*args, **kwargs):
    Path(marker).touch()  # inside the lock: preparing
    result = real_build(*args, **kwargs)
    if mode == "hang":  # the entry's files are written, not yet complete: killed here
        time.sleep(600)
    if mode == "slow":  # until the other process is about to ask for the same data, and a little longer
        while not Path(os.environ["PEER_READY"]).exists():
            time.sleep(0.05)
        time.sleep(1.5)
    return result

prepare.build = build
config = SFTConfig(model_name_or_path="tiny", dataset_name=data_file, max_length=64, packing=True)
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
Path(marker + ".ready").touch()
data = prepare.prepare_train_data(config, tokenizer)
print(json.dumps({"cached": bool(data.stats.get("cached")),
                  "rows": [r["input_ids"].tolist() for r in data.train_rows]}))
"""


def start(tmp_path: Path, marker: str, mode: str, cache: Path) -> subprocess.Popen:
    # the sftune this test imported (a mutated copy of src/ under scripts/mutate.py), not the tree beside the test
    env = {**os.environ, "SFTUNE_DATA_CACHE": str(cache), "PYTHONPATH": str(Path(sftune.__file__).parents[1]),
           "PEER_READY": str(tmp_path / "second-preparing.ready")}
    return subprocess.Popen([sys.executable, "-c", PREPARE, str(tmp_path / "chat.jsonl"), str(tmp_path / "tok"),
                             str(tmp_path / marker), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture
def shared(tmp_path):
    write_jsonl(tmp_path / "chat.jsonl", conversations(40, seed=8))
    build_tokenizer().save_pretrained(tmp_path / "tok")
    return tmp_path / "cache"


@pytest.mark.slow  # three Python processes that import transformers
def test_two_processes_prepare_once_the_second_waits_and_reads(tmp_path, shared):
    first = start(tmp_path, "first-preparing", "slow", shared)
    wait_for(tmp_path / "first-preparing", first)  # the first holds the lock now
    second = start(tmp_path, "second-preparing", "fast", shared)
    out_first, err_first = first.communicate(timeout=300)
    out_second, err_second = second.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, err_first[-2000:] + err_second[-2000:]
    one, two = json.loads(out_first), json.loads(out_second)
    assert not one["cached"] and two["cached"] and one["rows"] == two["rows"]
    assert not (tmp_path / "second-preparing").exists()  # it never prepared
    assert "another process is preparing this data" in err_second and "using the prepared data" in err_second
    assert [p.name for p in shared.iterdir()] == [p.name for p in shared.iterdir() if not p.name.startswith(".")]


@pytest.mark.slow  # three Python processes that import transformers
def test_a_killed_preparation_leaves_no_complete_looking_entry_and_a_waiting_process_takes_over(tmp_path, shared):
    doomed = start(tmp_path, "doomed-preparing", "hang", shared)
    wait_for(tmp_path / "doomed-preparing", doomed)
    waiting = start(tmp_path, "waiting-preparing", "fast", shared)
    # the doomed one writes the entry's files, then hangs before completing it; the other waits on the lock
    deadline = time.monotonic() + 120
    while not list(shared.glob(".staging-*/train.input_ids.npy")):
        assert time.monotonic() < deadline and doomed.poll() is None
        time.sleep(0.05)
    time.sleep(0.5)
    assert not (tmp_path / "waiting-preparing").exists()  # still waiting
    assert not [p for p in shared.iterdir() if not p.name.startswith(".")]  # nothing that looks like an entry
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=60)
    out, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, err[-2000:]
    assert (tmp_path / "waiting-preparing").exists() and not json.loads(out)["cached"]  # it prepared, once free
    entries = [p for p in shared.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "stats.json").is_file()
    assert not list(shared.glob(".staging-*"))  # the killed one's half-written folder is gone
    again = start(tmp_path, "third-preparing", "fast", shared)
    out_again, _ = again.communicate(timeout=300)
    assert json.loads(out_again) == {**json.loads(out), "cached": True}
