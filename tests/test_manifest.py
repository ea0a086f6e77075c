"""A checkpoint is used only if its files match the manifest written last: a damaged one is named, never loaded,
and the previous complete one is offered (issue 21)."""

from __future__ import annotations

import json

from sftune.cli import main
from sftune.training.manifest import MANIFEST


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
