"""A checkpoint is used only if its files match the manifest written last: a damaged one is named, never loaded,
and the previous complete one is offered (issue 21)."""

from __future__ import annotations

import json

from sftune.cli import main
from sftune.manifest import MANIFEST, manifest_problem


def run(tiny_model_dir, chat_jsonl, out, *extra):
    return main(["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(chat_jsonl),
                 "--output_dir", str(out), "--save_steps", "1", "--max_steps", "3", *extra])


def test_a_damaged_checkpoint_is_named_and_the_previous_complete_one_offered(tiny_model_dir, chat_jsonl, tmp_path,
                                                                            capsys):
    out = tmp_path / "run"
    assert run(tiny_model_dir, chat_jsonl, out) == 0
    listed = json.loads((out / "checkpoint-3" / MANIFEST).read_text())["files"]
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(listed)
    capsys.readouterr()

    weights = out / "checkpoint-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # cut short, as by a full disk during a copy
    assert run(tiny_model_dir, chat_jsonl, out, "--resume_from_checkpoint", "true") == 2
    err = capsys.readouterr().err
    assert "checkpoint-3' is damaged or incomplete (model.safetensors has" in err and "Traceback" not in err
    assert f"resume_from_checkpoint: {out / 'checkpoint-2'}" in err

    optimizer = out / "checkpoint-2" / "optimizer.pt"  # same size, damaged header
    data = bytearray(optimizer.read_bytes())
    data[:8] = b"\xff" * 8
    optimizer.write_bytes(bytes(data))
    assert run(tiny_model_dir, chat_jsonl, out, "--resume_from_checkpoint", str(out / "checkpoint-2")) == 2
    err = capsys.readouterr().err
    assert "optimizer.pt differs from what was written" in err
    assert f"resume_from_checkpoint: {out / 'checkpoint-1'}" in err

    (out / "checkpoint-1" / MANIFEST).unlink()
    assert run(tiny_model_dir, chat_jsonl, out, "--resume_from_checkpoint", str(out / "checkpoint-1")) == 2
    err = capsys.readouterr().err
    assert f"has no {MANIFEST}" in err and "no earlier checkpoint is complete" in err


def test_a_damaged_data_cache_entry_is_prepared_again(tiny_model_dir, chat_jsonl, tmp_path, monkeypatch, caplog):
    import logging
    import os
    from pathlib import Path

    from sftune import SFTConfig
    from sftune.data.prepare import prepare_train_data
    from sftune.model.load import load_tokenizer

    monkeypatch.setenv("SFTUNE_DATA_CACHE", str(tmp_path / "cache"))
    config = SFTConfig(model_name_or_path=str(tiny_model_dir), dataset_name=str(chat_jsonl), max_length=64)
    tokenizer = load_tokenizer(config)
    first = prepare_train_data(config, tokenizer)
    expected = [list(r["input_ids"]) for r in first.train_rows]  # the rows map the entry's files: read them now
    entries = [p for p in Path(os.environ["SFTUNE_DATA_CACHE"]).rglob(MANIFEST)]
    assert len(entries) == 1 and not first.stats.get("cached")
    entry = entries[0].parent
    assert prepare_train_data(config, tokenizer).stats.get("cached")  # intact: read back

    arrays = sorted(entry.glob("train.input_ids*"))
    arrays[0].write_bytes(arrays[0].read_bytes()[:-8])  # cut short
    monkeypatch.setattr(logging.getLogger("sftune"), "propagate", True)  # off once sftune sets up its log
    with caplog.at_level(logging.WARNING, logger="sftune"):
        again = prepare_train_data(config, tokenizer)
    assert not again.stats.get("cached") and "is damaged" in caplog.text and "preparing it again" in caplog.text
    assert [list(r["input_ids"]) for r in again.train_rows] == expected
    assert manifest_problem(entry) is None  # written anew, whole
