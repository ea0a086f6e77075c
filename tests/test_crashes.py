"""Kills and crashes never cost a run: SIGKILL at any moment (also while a checkpoint is being written) and a
full disk leave the newest complete checkpoint usable, and resuming continues the same run: it starts at that
checkpoint's step and reaches the same losses and weights as a run that was never interrupted.

The model has dropout, so every step also depends on the random generators: a resume that forgot them (or the
optimizer, or the schedule) would train differently from the uninterrupted run. Kills are timed against progress
the run has shown (a metrics line), never against the clock alone.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from conftest import conversations, write_jsonl

from sftune import SFTConfig, train
from sftune.cli import main
from sftune.training.checkpoint import list_checkpoints

STEPS = 12


def flags(model_dir, data, out, steps: int = STEPS, save_steps: int = 1) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out),
            "--max_steps", str(steps), "--logging_steps", "1", "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-3", "--save_strategy", "steps", "--save_steps", str(save_steps),
            "--max_length", "96"]


def final_weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def logged(folder) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written as we read
            pass
    return lines


def wait_for_step(process, folder, step: int, timeout: float = 180) -> None:
    """Until the run has logged `step` (or ended, or the time is up)."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if any(line.get("step", 0) >= step for line in logged(folder)):
            return
        time.sleep(0.01)


@pytest.fixture(scope="module")
def uninterrupted(dropout_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight")
    data = write_jsonl(folder / "chat.jsonl", conversations(40, seed=11))
    assert main(["train", *flags(dropout_model_dir, data, folder / "run")]) == 0
    return data, final_weights(folder / "run")


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow  # trains in subprocesses
def test_kill_after_a_checkpoint_resumes_from_it_with_the_same_losses(dropout_model_dir, tmp_path):
    steps = 40
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(40, seed=12))
    assert main(["train", *flags(dropout_model_dir, data, tmp_path / "straight", steps, save_steps=4)]) == 0
    straight = {line["step"]: line["loss"] for line in logged(tmp_path / "straight")}

    out = tmp_path / "run"
    args = ["train", *flags(dropout_model_dir, data, out, steps, save_steps=4)]
    process = subprocess.Popen([sys.executable, "-m", "sftune", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for_step(process, out, 6)  # checkpoint-4 is written before step 5 starts
    assert process.poll() is None, "the run ended before it could be killed mid-training"
    process.send_signal(signal.SIGKILL)
    process.wait()
    (checkpoint, _), *_ = reversed(list_checkpoints(out))
    assert 4 <= checkpoint < steps and max(line["step"] for line in logged(out)) > checkpoint

    resumed = subprocess.run([sys.executable, "-m", "sftune", *args, "--resume_from_checkpoint", "true"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {out / f'checkpoint-{checkpoint}'} at step {checkpoint} of {steps}" in resumed.stderr
    lines = logged(out)
    assert [line["step"] for line in lines] == list(range(1, steps + 1))  # the killed run's later lines replaced
    after = [line["loss"] for line in lines if line["step"] > checkpoint]
    np.testing.assert_allclose(after, [straight[s] for s in range(checkpoint + 1, steps + 1)], rtol=0, atol=1e-6)
    assert_same(final_weights(out), final_weights(tmp_path / "straight"))


@pytest.mark.slow  # trains in subprocesses
def test_sigkill_at_random_moments_then_resume_gives_the_same_weights(dropout_model_dir, uninterrupted, tmp_path):
    data, expected = uninterrupted
    out = tmp_path / "run"
    rng = random.Random(7)
    kills = 0
    for attempt in range(6):
        shown = max((line["step"] for line in logged(out)), default=0)
        process = subprocess.Popen([sys.executable, "-m", "sftune", "train", *flags(dropout_model_dir, data, out),
                                    "--resume_from_checkpoint", "true"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_step(process, out, shown + 1)  # this process has trained a step: kill it during its work
        time.sleep(rng.uniform(0.0, 0.15))
        if process.poll() is not None:
            break
        complete = {step for step, _ in list_checkpoints(out)}
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        assert complete <= {step for step, _ in list_checkpoints(out)}, "a kill must keep complete checkpoints"
    assert kills >= 2
    if not (out / "model.safetensors").exists():
        assert main(["train", *flags(dropout_model_dir, data, out), "--resume_from_checkpoint", "true"]) == 0
    assert_same(final_weights(out), expected)


KILL_WHILE_SAVING = textwrap.dedent("""
    import os, signal, sys
    from sftune.training import checkpoint
    from sftune.cli import main

    real = checkpoint._fsync_tree

    def die_while_saving_step_5(folder):
        if folder.name.startswith(".checkpoint-5."):
            os.kill(os.getpid(), signal.SIGKILL)  # every file of checkpoint 5 written, not yet published
        real(folder)

    checkpoint._fsync_tree = die_while_saving_step_5
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow  # trains in a subprocess
def test_sigkill_while_a_checkpoint_is_written(dropout_model_dir, uninterrupted, tmp_path):
    data, expected = uninterrupted
    out = tmp_path / "run"
    script = tmp_path / "kill_while_saving.py"
    script.write_text(KILL_WHILE_SAVING)
    done = subprocess.run([sys.executable, str(script), "train", *flags(dropout_model_dir, data, out)],
                          capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL
    assert [step for step, _ in list_checkpoints(out)] == [1, 2, 3, 4]  # 5 never looked complete
    assert list(out.glob(".checkpoint-5.partial*"))
    assert main(["train", *flags(dropout_model_dir, data, out), "--resume_from_checkpoint", "true"]) == 0
    assert not list(out.glob(".checkpoint-*"))  # the partial one was cleaned up
    assert_same(final_weights(out), expected)


def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(dropout_model_dir, uninterrupted, tmp_path,
                                                                        monkeypatch, capsys):
    data, expected = uninterrupted
    out = tmp_path / "run"
    real_save = torch.save

    def disk_full_at_step_3(obj, path, *args, **kwargs):
        if ".checkpoint-3." in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_3)
    assert main(["train", *flags(dropout_model_dir, data, out)]) == 2
    err = capsys.readouterr().err
    assert "could not write checkpoint-3" in err and "No space left on device" in err and "Traceback" not in err
    assert [step for step, _ in list_checkpoints(out)] == [1, 2] and not list(out.glob(".checkpoint-*"))

    monkeypatch.setattr(torch, "save", real_save)
    assert main(["train", *flags(dropout_model_dir, data, out), "--resume_from_checkpoint", "true"]) == 0
    assert_same(final_weights(out), expected)


def test_a_failed_final_save_keeps_what_was_there(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    data = write_jsonl(tmp_path / "chat.jsonl", conversations(8, seed=1))

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fail)
    config = SFTConfig(model_name_or_path=str(tiny_model_dir), dataset_name=str(data), output_dir=str(tmp_path / "o"),
                       max_steps=1, save_strategy="no")
    with pytest.raises(Exception, match="could not save the model"):
        train(config)
    assert not list((tmp_path / "o").glob(".staging-*")) and not (tmp_path / "o" / "model.safetensors").exists()
