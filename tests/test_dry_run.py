"""`sftune train CONFIG --dry_run`: validates what can be validated without training, prints the resolved config
and the plan, and writes nothing (output_dir untouched, no prepared-data cache entry)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from conftest import conversations, write_jsonl
from sftune import SFTConfig, train
from sftune.cli import main


def write_config(path: Path, **settings) -> Path:
    path.write_text(yaml.safe_dump(settings))
    return path


def snapshot(folder: Path) -> dict[str, float]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(32))
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", model_name_or_path=str(tiny_model_dir), dataset_name=str(data),
                          output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                          num_train_epochs=2, save_steps=0.25, logging_steps=0.1, warmup_ratio=0.1,
                          do_train=True, dataloader_num_workers=4, padding_free=False)
    cache = Path(os.environ["SFTUNE_DATA_CACHE"])
    cache_before = snapshot(cache)
    assert main(["train", str(config), "--dry_run"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists() and snapshot(cache) == cache_before  # no folder made, no data cached
    resolved = yaml.safe_load(printed.split("# plan")[0])
    assert resolved["warmup_steps"] == 0.1 and resolved["output_dir"] == str(out)  # the config as it resolves
    plan = printed.split("# plan")[1]
    assert "steps: 8 (2 epochs; 4 per epoch of 32 rows)" in plan
    assert "per step: 8 rows" in plan and "trained tokens" in plan
    assert "batching: padded batches; 8 rows per step (4 x 2 accumulation x 1 process)" in plan
    assert "checkpoints: 4 (at steps 2, 4, 6, 8)" in plan
    assert "schedule: linear, learning rate 2e-05, 1 warm-up steps; a metrics line every 1 steps" in plan
    assert "saved: the full model" in plan and "precision: weights loaded and trained in dtype auto" in plan
    ignored = next(line for line in plan.splitlines() if line.startswith("ignored TRL keys: "))
    assert "do_train" in ignored and "dataloader_num_workers" in ignored


def test_dry_run_leaves_an_existing_output_dir_as_it_was(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(16))
    out = tmp_path / "run"
    out.mkdir()
    (out / "sftune_config.yaml").write_text("max_steps: 1\n")  # an earlier, finished run's folder
    (out / "model.safetensors").write_text("weights")
    (out / "notes.txt").write_text("mine")
    args = ["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--output_dir",
            str(out), "--dry_run"]
    before = snapshot(out)
    assert main(args) == 2  # another run's files: refused, as training would
    assert "already holds files" in capsys.readouterr().err
    assert main(args + ["--overwrite_output_dir"]) == 0  # training would replace it; the dry run leaves it
    assert snapshot(out) == before and (out / "notes.txt").read_text() == "mine"


def test_dry_run_steps_match_the_run(tiny_model_dir, tmp_path, capsys):
    """The plan's step count is the one training takes (two different computations of it)."""
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(30))
    settings = dict(model_name_or_path=str(tiny_model_dir), dataset_name=str(data), output_dir=str(tmp_path / "run"),
                    per_device_train_batch_size=4, num_train_epochs=1.5, eval_ratio=0.2, max_length=96,
                    save_strategy="no", logging_steps=1)
    assert main(["train", str(write_config(tmp_path / "c.yaml", **settings)), "--dry_run"]) == 0
    plan = capsys.readouterr().out.split("# plan")[1]
    result = train(SFTConfig(**settings))
    assert f"steps: {result.global_step} (1.5 epochs; " in plan
    assert f"{result.data_stats['eval_rows']} eval rows" in plan  # 20% of 30 rows held out


def test_dry_run_steps_match_the_run_with_split_assistant_turns(tiny_model_dir, tmp_path, capsys):
    """split_assistant_turns makes one example per trained turn: the plan counts those examples, not the rows."""
    rows = conversations(24)
    for k, row in enumerate(rows):  # two or three assistant turns a row: each becomes an example of its own
        row["messages"] += [{"role": "user", "content": f"and then {k}"}, {"role": "assistant", "content": "then"}]
        if k % 2:
            row["messages"] += [{"role": "user", "content": "last"}, {"role": "assistant", "content": "done"}]
    data = write_jsonl(tmp_path / "turns.jsonl", rows)
    settings = dict(model_name_or_path=str(tiny_model_dir), dataset_name=str(data), output_dir=str(tmp_path / "run"),
                    per_device_train_batch_size=4, num_train_epochs=1, eval_ratio=0.2, max_length=256,
                    assistant_only_loss=True, split_assistant_turns=True, save_strategy="no", logging_steps=1)
    assert main(["train", str(write_config(tmp_path / "c.yaml", **settings)), "--dry_run"]) == 0
    plan = capsys.readouterr().out.split("# plan")[1]
    result = train(SFTConfig(**settings))
    assert result.data_stats["rows"] > 24 and f"steps: {result.global_step} (1 epoch" in plan
    assert f"{result.data_stats['eval_rows']} eval rows" in plan


def test_dry_run_reports_a_bad_file_in_one_line(tiny_model_dir, tmp_path, capsys):
    args = ["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(tmp_path / "none.jsonl"),
            "--output_dir", str(tmp_path / "run"), "--dry_run"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none.jsonl' does not exist" in err[0]
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(8))
    args[4] = str(data)
    assert main(args + ["--chat_template_path", str(tmp_path / "missing.jinja")]) == 2
    assert "missing.jinja" in capsys.readouterr().err
    assert main(args + ["--eval_strategy", "steps"]) == 2
    assert "no eval data" in capsys.readouterr().err
