"""Mistakes that need no model are found before torch and transformers load (which takes 4-20 s), and a run that
fails to start leaves no folder behind. Timings are measured in the README, not here: these tests check what makes
them fast, that nothing heavy is imported on the way to the error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import conversations, write_jsonl

from sftune import SFTConfig
from sftune.config import CONFIG_FILENAME
from sftune.errors import UserError
from sftune.preflight import check_before_loading

HEAVY = ("torch", "transformers", "datasets", "accelerate", "peft")

CHECK = """
import json, sys
from sftune.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "imported": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def run_cli_fresh(*argv: str) -> tuple[dict, str]:
    """`sftune ARGV` in a new interpreter: its exit code, the heavy packages it imported, and stderr."""
    done = subprocess.run([sys.executable, "-c", CHECK, *argv], capture_output=True, text=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.parametrize("case", ["missing model folder", "occupied output_dir", "missing data file",
                                  "missing chat template", "bad config value", "folder without a model"])
def test_user_errors_come_before_torch_is_imported(case, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(4))
    settings = {"--model_name_or_path": str(tiny_model_dir), "--dataset_name": str(data),
                "--output_dir": str(tmp_path / "runs" / "out")}
    expected = {
        "missing model folder": ("--model_name_or_path", str(tmp_path / "no-model"), "does not exist"),
        "occupied output_dir": ("--output_dir", str(tmp_path), "already holds files"),
        "missing data file": ("--dataset_name", str(tmp_path / "none.jsonl"), "does not exist"),
        "missing chat template": ("--chat_template_path", str(tmp_path / "t.jinja"), "no such file"),
        "bad config value": ("--per_device_train_batch_size", "0", "must be >= 1"),
        "folder without a model": ("--model_name_or_path", str(tmp_path / "runs"), "has no config.json"),
    }
    key, value, message = expected[case]
    if case == "folder without a model":
        (tmp_path / "runs").mkdir()
    settings[key] = value
    result, err = run_cli_fresh("train", *[part for pair in settings.items() for part in pair])
    assert result["code"] == 2 and message in err, err
    assert result["imported"] == [], f"imported {result['imported']} before reporting: {err}"
    assert not (tmp_path / "runs" / "out").exists()  # no folder made for a run that never started


def test_inspect_reports_a_missing_path_before_torch_too(tiny_model_dir, tmp_path):
    result, err = run_cli_fresh("inspect", "--model_name_or_path", str(tiny_model_dir),
                                "--dataset_name", str(tmp_path / "none.jsonl"))
    assert result == {"code": 2, "imported": []} and "does not exist" in err


def test_check_creates_nothing_and_refuses_what_it_cannot_write(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(4))
    config = SFTConfig(model_name_or_path=str(tiny_model_dir), dataset_name=str(data),
                       output_dir=str(tmp_path / "a" / "b" / "c"))
    assert check_before_loading(config) is None
    assert not (tmp_path / "a").exists()
    config.output_dir = "/proc/sftune-test/run"  # under a folder no one may create anything in
    with pytest.raises(UserError, match="cannot write to output_dir '/proc/sftune-test/run'"):
        check_before_loading(config)


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_it_again(tiny_model_dir, tmp_path):
    """An unfinished run (its config, no checkpoint, no model) is continued from its start in place; a finished run
    without checkpoints, or a folder of something else, is refused."""
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(4))
    out = tmp_path / "out"
    config = SFTConfig(model_name_or_path=str(tiny_model_dir), dataset_name=str(data), output_dir=str(out),
                       resume_from_checkpoint=True)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no checkpoint"):
        check_before_loading(config)
    (out / "notes.txt").unlink()
    config.save(out / CONFIG_FILENAME)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    assert check_before_loading(config) is None  # allowed: it starts from the beginning
    (out / "model.safetensors").write_bytes(b"finished")
    with pytest.raises(UserError, match="holds no checkpoint"):
        check_before_loading(config)


@pytest.mark.parametrize("argv,message", [
    (["chat", "{tmp}/none", "--prompt", "hi"], "does not exist"),
    (["merge", "{tmp}/none", "--output", "{tmp}/merged"], "holds no adapter"),
    (["push", "{tmp}/none"], "holds no sftune_config.yaml"),
    (["train", "--learnig_rate", "1"], "did you mean 'learning_rate'"),
    (["demo", "--gpu_count", "2"], "unknown key 'gpu_count'"),
])
def test_other_commands_answer_a_wrong_folder_before_torch_too(argv, message, tmp_path):
    result, err = run_cli_fresh(*[part.replace("{tmp}", str(tmp_path)) for part in argv])
    assert result == {"code": 2, "imported": []} and message in err, err
