"""Ctrl-C while training: the first stops at the next micro-batch boundary with a checkpoint of the last completed
step, the second stops at once without saving, and the printed command resumes the run (`sftune train` and
`sftune demo`), ending with the weights of a run that was never interrupted.

A slow CPU step is one long torch operation during which Python cannot run a signal handler; the runner script
below reproduces that: at one chosen micro-batch the main thread waits inside C (a pthread mutex held by another
thread), so signals arrive while no Python code runs, as they do during a backward pass of tens of seconds.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_model, build_tokenizer, conversations, write_jsonl

from sftune.cli import main, resume_command
from sftune.config import CONFIG_FILENAME
from sftune.training.checkpoint import list_checkpoints

RUNNER = textwrap.dedent("""
    import ctypes, os, sys, threading, time
    from pathlib import Path

    import sftune.assets
    from sftune.training import loss
    from sftune.cli import main

    if os.environ.get("TINY_MODEL"):  # `sftune demo` on the tiny model instead of SmolLM2
        sftune.assets.smollm2_model_dir = lambda: Path(os.environ["TINY_MODEL"])
    block_at = int(os.environ.get("BLOCK_AT_CALL", "0"))
    libc = ctypes.CDLL(None)
    mutex = ctypes.create_string_buffer(64)  # all zeros: an unlocked pthread mutex
    calls = 0
    real_forward = loss.CausalLMWithLoss.forward

    def forward(self, *args, **kwargs):
        global calls
        calls += 1
        if calls == block_at:
            held = threading.Event()

            def hold():
                libc.pthread_mutex_lock(mutex)
                held.set()
                time.sleep(float(os.environ["BLOCK_SECONDS"]))
                libc.pthread_mutex_unlock(mutex)

            threading.Thread(target=hold, daemon=True).start()
            held.wait()
            Path(os.environ["BLOCK_MARKER"]).write_text("blocked")
            libc.pthread_mutex_lock(mutex)  # waits in C: no Python runs in this thread until it is released
            libc.pthread_mutex_unlock(mutex)
        return real_forward(self, *args, **kwargs)

    loss.CausalLMWithLoss.forward = forward
    sys.exit(main(sys.argv[1:]))
""")

ROWS, ACCUMULATION, STEPS = 4, 3, 6
MICRO_BATCHES = ROWS * ACCUMULATION  # padding-free on CPU: every row is a micro-batch of its own


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model with dropout (exact resume needs the random generators of the step's start), its data, and
    the weights of the run never interrupted."""
    folder = tmp_path_factory.mktemp("interrupts")
    model_dir = folder / "model"
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(model_dir)
    build_model(len(tokenizer), attention_dropout=0.2, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id).save_pretrained(model_dir)
    data = write_jsonl(folder / "chat.jsonl", conversations(40, seed=21))
    runner = folder / "runner.py"
    runner.write_text(RUNNER)
    straight = folder / "straight"
    assert main(["train", *flags(model_dir, data, straight)]) == 0
    return model_dir, data, runner, weights(straight)


def flags(model_dir: Path, data: Path, out: Path) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out),
            "--max_steps", str(STEPS), "--per_device_train_batch_size", str(ROWS),
            "--gradient_accumulation_steps", str(ACCUMULATION), "--learning_rate", "1e-3", "--max_length", "64",
            "--logging_steps", "1"]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def start(runner: Path, argv: list[str], tmp_path: Path, block_at: int, seconds: float, **env: str):
    marker = tmp_path / "blocked"
    environment = {**os.environ, "BLOCK_AT_CALL": str(block_at), "BLOCK_SECONDS": str(seconds),
                   "BLOCK_MARKER": str(marker), **env}
    process = subprocess.Popen([sys.executable, str(runner), *argv], cwd=tmp_path, env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), process.communicate()[1]
    return process


def printed_command(err: str) -> list[str]:
    """The resume command the run printed, as arguments for `main`."""
    command = shlex.split(re.findall(r"continue with: (.+)", err)[-1])
    assert command[0] == "sftune"
    return command[1:]


@pytest.mark.slow  # trains in subprocesses
def test_ctrl_c_stops_at_the_next_micro_batch_and_the_printed_command_resumes_exactly(setup, tmp_path):
    model_dir, data, runner, expected = setup
    out = tmp_path / "run"
    argv = ["train", *flags(model_dir, data, out), "--save_strategy", "no"]
    # blocked in the 5th micro-batch of step 3, for longer than the rest of the step would take
    process = start(runner, argv, tmp_path, block_at=2 * MICRO_BATCHES + 5, seconds=3)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)

    assert process.returncode == 130, err
    assert "Traceback" not in err
    stopped = re.search(r"stopped in step (\d+) after micro-batch (\d+) of (\d+)", err)
    assert stopped, err
    step, done, total = map(int, stopped.groups())
    assert (step, done, total) == (3, 5, MICRO_BATCHES)  # not the end of the step: its 5th micro-batch
    assert [s for s, _ in list_checkpoints(out)] == [2]  # the last completed step, although save_strategy: no

    command = printed_command(err)
    assert command == ["train", *flags(model_dir, data, out), "--save_strategy", "no",
                       "--resume_from_checkpoint", "true"]
    assert main(command) == 0
    assert_same(weights(out), expected)

    # the resumed run's saved config repeats the run: from the start, in a new folder, to the same weights
    saved = yaml.safe_load((out / CONFIG_FILENAME).read_text())
    assert saved["resume_from_checkpoint"] is None
    again = tmp_path / "again"
    assert main(["train", str(out / CONFIG_FILENAME), "--output_dir", str(again)]) == 0
    assert_same(weights(again), expected)


@pytest.mark.slow  # trains in subprocesses
def test_a_second_ctrl_c_stops_at_once_and_leaves_the_last_checkpoint(setup, tmp_path):
    model_dir, data, runner, expected = setup
    out = tmp_path / "run"
    argv = ["train", *flags(model_dir, data, out), "--save_strategy", "steps", "--save_steps", "1"]
    process = start(runner, argv, tmp_path, block_at=2 * MICRO_BATCHES + 5, seconds=60)
    process.send_signal(signal.SIGINT)
    time.sleep(1.0)  # both arrive while the main thread is inside C: Python sees neither until it returns
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = process.communicate(timeout=60)

    assert time.monotonic() - sent < 20  # the operation held on for 60 s; the process did not wait for it
    assert process.returncode == 130, err
    assert "stopped at once by a second SIGINT, without saving" in err, err
    assert f"the last checkpoint, {out / 'checkpoint-2'}, is intact" in err
    assert [s for s, _ in list_checkpoints(out)] == [1, 2]
    assert main(printed_command(err)) == 0
    assert_same(weights(out), expected)


@pytest.mark.slow  # trains in subprocesses
def test_the_demo_prints_the_command_that_resumes_it(setup, tmp_path):
    model_dir, _, runner, _ = setup
    argv = ["demo", "--max_steps", "4", "--logging_steps", "1"]
    # in step 2 (the demo's batch is 8 rows, a micro-batch each)
    process = start(runner, argv, tmp_path, block_at=8 + 3, seconds=2, TINY_MODEL=str(model_dir))
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "stopped in step 2 after micro-batch 3 of 8" in err, err
    command = printed_command(err)
    assert command == ["demo", "--max_steps", "4", "--logging_steps", "1", "--output_dir", "sftune-demo",
                       "--resume_from_checkpoint", "true"]

    resumed = subprocess.run([sys.executable, str(runner), *command], cwd=tmp_path, capture_output=True, text=True,
                             env={**os.environ, "TINY_MODEL": str(model_dir)}, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from sftune-demo/checkpoint-1 at step 1 of 4" in resumed.stderr
    assert "after:" in resumed.stdout
    assert (tmp_path / "sftune-demo" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "sftune-demo-2").exists()  # continued in place, not a new demo
    log = [line for line in resumed.stderr.splitlines() if line.startswith("[sftune] ")]
    assert len(log) == len(set(log)), log  # every log line once (the model was announced twice before)
    assert sum(line.startswith("[sftune] model: ") for line in log) == 1


@pytest.mark.parametrize("argv,expected", [
    (["train", "run.yaml", "--learning_rate", "1e-4"],
     "sftune train run.yaml --learning_rate 1e-4 --resume_from_checkpoint true"),
    (["train", "run.yaml", "--resume_from_checkpoint", "runs/a/checkpoint-4", "--num_processes", "2"],
     "sftune train run.yaml --num_processes 2 --resume_from_checkpoint true"),
    (["--debug", "demo", "--use_peft", "false", "--output-dir=old"],
     "sftune --debug demo --use_peft false --output_dir 'runs/my demo' --resume_from_checkpoint true"),
])
def test_resume_command_is_the_typed_one_set_to_resume(argv, expected):
    assert resume_command(argv, Path("runs/my demo")) == expected


def test_demo_resume_without_a_folder_continues_the_newest_unfinished_demo(tmp_path, monkeypatch):
    """`sftune demo --resume_from_checkpoint true` alone continues the newest demo folder that has a checkpoint and
    no finished adapter, not a fresh demo."""
    import json

    from sftune.demo import fresh_output_dir, unfinished_output_dir

    monkeypatch.chdir(tmp_path)
    assert unfinished_output_dir() is None
    for name, finished in (("sftune-demo", True), ("sftune-demo-2", False), ("sftune-demo-3", False),
                           ("sftune-demo-4", True)):
        (tmp_path / name / "checkpoint-3").mkdir(parents=True)
        (tmp_path / name / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
        if finished:
            (tmp_path / name / "adapter_model.safetensors").write_bytes(b"done")
        time.sleep(0.02)  # distinct modification times
    (tmp_path / "sftune-demo-5").mkdir()  # started, no checkpoint yet
    assert unfinished_output_dir() == "sftune-demo-3"
    assert fresh_output_dir() == "sftune-demo-6"


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.slow  # prepares data in subprocesses
@pytest.mark.parametrize("how", ["ctrl-c to the terminal's group", "sigterm to sftune"])
def test_a_stop_during_preparation_ends_quietly_with_its_workers(tiny_model_dir, tmp_path, how):
    """Ctrl-C reaches every worker too; none may print a traceback, and a SIGTERM to sftune alone must end the
    workers rather than leave them running (issue 21)."""
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(30000))
    env = {**os.environ, "SFTUNE_DATA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "sftune", "inspect", "--model_name_or_path", str(tiny_model_dir), "--dataset_name",
         str(data), "--dataset_num_proc", "2", "--num_examples", "0"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(_children(process.pid)) < 2:  # the tokenizing workers have started
        assert time.monotonic() < deadline and process.poll() is None, "no workers started"
        time.sleep(0.05)
    workers = _children(process.pid)
    time.sleep(0.3)
    if how.startswith("ctrl-c"):
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "sftune: interrupted" in err, err[-2000:]
    time.sleep(0.5)
    assert not [w for w in workers if Path(f"/proc/{w}").exists() and "zombie" not in
                Path(f"/proc/{w}/status").read_text().lower()], "workers left running"
