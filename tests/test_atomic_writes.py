"""Nothing the user had is overwritten, and every file a run writes lands by a rename: a crash at any moment leaves
either the old file or the complete new one, never half of one.

Renames are recorded while a run trains, checkpoints and saves, and while `sftune merge` writes: every file found
afterwards must have arrived by one (or sit inside a folder that did). metrics.jsonl and samples.jsonl are logs,
appended line by line; a line cut short by a kill is dropped on resume (tested below).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import conversations, write_jsonl

from sftune import SFTConfig, train
from sftune.cli import main
from sftune.errors import UserError
from sftune.output_guard import MERGE_MARKER

APPENDED_LOGS = {"metrics.jsonl", "samples.jsonl"}


def _stamp(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class Landings(dict):
    """Every file that arrived by os.replace / os.rename (Path.replace, Path.rename and shutil.move use them), alone
    or inside a renamed folder, with its inode, size and modification time at that moment."""

    def record(self, destination: Path) -> None:
        destination = destination.resolve()
        files = [destination] if destination.is_file() else [p for p in destination.rglob("*") if p.is_file()]
        for path in files:
            self[path] = _stamp(path)


@pytest.fixture
def renames(monkeypatch) -> Landings:
    seen = Landings()
    real_replace, real_rename = os.replace, os.rename

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        seen.record(Path(dst))

    def rename(src, dst, *args, **kwargs):
        real_rename(src, dst, *args, **kwargs)
        seen.record(Path(dst))

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    return seen


def written_in_place(folder: Path, landed: Landings) -> list[str]:
    """Files under `folder` that did not arrive by a rename, or were changed in place after they arrived."""
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*")
        if p.is_file() and p.name not in APPENDED_LOGS and landed.get(p.resolve()) != _stamp(p)
    )


def test_a_file_changed_after_its_rename_is_seen(tmp_path, renames):
    """The check itself can fail: a file renamed into place, then appended to, counts as written in place."""
    (tmp_path / "a.tmp").write_text("complete")
    os.replace(tmp_path / "a.tmp", tmp_path / "a.txt")
    assert written_in_place(tmp_path, renames) == []
    with (tmp_path / "a.txt").open("a") as handle:
        handle.write(" and then some more")
    (tmp_path / "b.txt").write_text("never renamed")
    assert written_in_place(tmp_path, renames) == ["a.txt", "b.txt"]


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_every_file_of_a_run_lands_by_a_rename(use_peft, tiny_model_dir, tmp_path, renames):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(8))
    out = tmp_path / "run"
    train(SFTConfig(model_name_or_path=str(tiny_model_dir), dataset_name=str(data), output_dir=str(out),
                    max_steps=2, save_steps=1, save_total_limit=1, per_device_train_batch_size=4, max_length=64,
                    use_peft=use_peft, generation_prompts=["hello"], eval_strategy="steps", eval_steps=1,
                    eval_ratio=0.25, generation_max_new_tokens=2))
    names = {p.name for p in out.iterdir()}
    assert {"sftune_config.yaml", "metrics.jsonl", "samples.jsonl", "checkpoint-2", "tokenizer.json"} <= names
    assert written_in_place(out, renames) == []
    assert not [n for n in names if n.startswith(".")]  # no staging folder, partial checkpoint or probe left

    if use_peft:  # the merged model too, also when it replaces an earlier merge
        merged = tmp_path / "merged"
        renames.clear()
        assert main(["merge", str(out), "--output", str(merged)]) == 0
        assert written_in_place(merged, renames) == []
        assert main(["merge", str(out), "--output", str(merged), "--overwrite"]) == 0
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_merge_never_replaces_a_folder_with_half_a_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """--overwrite swaps the old folder out only once the new model is complete; a failure keeps the old one."""
    from sftune.export import save

    data = write_jsonl(tmp_path / "chat.jsonl", conversations(8))
    run = tmp_path / "run"
    train(SFTConfig(model_name_or_path=str(tiny_model_dir), dataset_name=str(data), output_dir=str(run),
                    max_steps=1, save_strategy="no", use_peft=True, max_length=64))
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "model.safetensors").write_text("an earlier merge")
    (merged / MERGE_MARKER).write_text("{}")  # which sftune merge wrote: --overwrite may replace it
    assert main(["merge", str(run), "--output", str(merged)]) == 2  # refused without --overwrite

    real_write = save.write_model

    def write_then_fail(model, tokenizer, folder, state_dict=None, **kwargs):
        real_write(model, tokenizer, folder, state_dict, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(save, "write_model", write_then_fail)
    capsys.readouterr()
    assert main(["merge", str(run), "--output", str(merged), "--overwrite"]) == 2  # one line, no traceback
    assert "no space left on the device" in capsys.readouterr().err
    assert sorted(p.name for p in merged.iterdir()) == ["model.safetensors", MERGE_MARKER]
    assert (merged / "model.safetensors").read_text() == "an earlier merge"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl", "merged", "run"]

    monkeypatch.setattr(save, "write_model", real_write)
    assert main(["merge", str(run), "--output", str(merged), "--overwrite"]) == 0
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").stat().st_size > 1000
    assert json.loads((merged / MERGE_MARKER).read_text())["merged_from"] == str(run)


def test_a_failed_start_leaves_output_dir_reusable(tiny_model_dir, tmp_path):
    """A run that stops at bad data leaves no folder it created (nor the parents it would have made), writes nothing
    into an output_dir that was there, and the same command works once the mistake is fixed."""
    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assitant", "content": "yo"}]}\n')
    config = SFTConfig(model_name_or_path=str(tiny_model_dir), dataset_name=str(data),
                       output_dir=str(tmp_path / "runs" / "out"), max_steps=1, save_strategy="no", max_length=64)
    with pytest.raises(UserError, match="did you mean 'assistant'"):
        train(config)
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "out").mkdir(parents=True)  # a folder the user made stays, and stays empty
    with pytest.raises(UserError, match="did you mean 'assistant'"):
        train(config)
    assert list((tmp_path / "runs" / "out").iterdir()) == []
    write_jsonl(data, conversations(4))
    assert train(config).global_step == 1


def test_a_metrics_line_cut_short_by_a_kill_does_not_stop_the_resume(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(8))
    settings = dict(model_name_or_path=str(tiny_model_dir), dataset_name=str(data), output_dir=str(tmp_path / "o"),
                    save_steps=1, logging_steps=1, per_device_train_batch_size=4, max_length=64)
    train(SFTConfig(max_steps=1, **settings))
    metrics = tmp_path / "o" / "metrics.jsonl"
    with metrics.open("a") as handle:
        handle.write('{"step": 2, "loss": 1.2')  # the kill came in the middle of this line
    result = train(SFTConfig(max_steps=2, resume_from_checkpoint=True, resume_allow_changes=True, **settings))
    assert result.global_step == 2
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [1, 2]
    assert torch.isfinite(torch.tensor([line["loss"] for line in lines if "loss" in line])).all()


def test_a_full_disk_while_logging_or_caching_is_handled(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The data cache is optional: a failed cache write is a warning. A failed metrics line is one clear error."""
    import errno

    from sftune.data import prepare
    from sftune.training import report

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    data = write_jsonl(tmp_path / "chat.jsonl", conversations(8, seed=5))
    settings = dict(model_name_or_path=str(tiny_model_dir), dataset_name=str(data), max_steps=1,
                    save_strategy="no", max_length=64, per_device_train_batch_size=4)
    monkeypatch.setattr(prepare, "_save", disk_full)
    assert train(SFTConfig(output_dir=str(tmp_path / "a"), **settings)).global_step == 1
    assert "not cached" in capsys.readouterr().err

    real_open = Path.open

    def open_unless_metrics(self, *args, **kwargs):
        if self.name == "metrics.jsonl":
            disk_full()
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(report.Path, "open", open_unless_metrics)
    with pytest.raises(UserError, match=r"could not write .*metrics.jsonl \(No space left on device\).*resume"):
        train(SFTConfig(output_dir=str(tmp_path / "b"), **settings))
