"""The training engine: metrics, optimizers and schedules, evaluation, checkpoints and exact resume, signals,
non-finite losses, trackers, data parallelism and compilation."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_model, conversations, write_jsonl

from sftune import SFTConfig, train
from sftune.cli import main
from sftune.errors import TrainingError
from sftune.training.checkpoint import list_checkpoints


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", conversations(24, seed=3))


def config_for(model_dir, data, output_dir, **overrides) -> SFTConfig:
    settings = dict(model_name_or_path=str(model_dir), dataset_name=str(data), output_dir=str(output_dir),
                    learning_rate=1e-3, max_steps=6, logging_steps=1, per_device_train_batch_size=4,
                    max_length=128, save_strategy="no")
    settings.update(overrides)
    return SFTConfig(**settings)


def train_losses(history) -> list[float]:
    return [entry["loss"] for entry in history if "loss" in entry]


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


# ---------------------------------------------------------------- metrics


def test_metrics_lines_carry_accuracy_entropy_and_memory(tiny_model_dir, data_file, tmp_path):
    result = train(config_for(tiny_model_dir, data_file, tmp_path / "run", max_steps=2))
    entry = result.history[-1]
    for key in ("loss", "mean_token_accuracy", "entropy", "peak_memory_mb", "grad_norm", "tokens_per_second", "step_seconds"):
        assert key in entry and math.isfinite(entry[key]), key
    assert 0.0 <= entry["mean_token_accuracy"] <= 1.0
    assert 0.0 < entry["entropy"] <= math.log(result.model.config.vocab_size) + 1e-6
    assert entry["peak_memory_mb"] > 0
    assert entry["step_seconds"] > 0  # median wall time of the interval's optimizer steps


def test_dft_loss_trains_and_differs_from_nll(tiny_model_dir, data_file, tmp_path):
    nll = train(config_for(tiny_model_dir, data_file, tmp_path / "nll", max_steps=2))
    dft = train(config_for(tiny_model_dir, data_file, tmp_path / "dft", max_steps=2, loss_type="dft"))
    # DFT weights each token's loss by its probability (tiny for a random model): a much smaller objective
    assert train_losses(dft.history)[0] < 0.1 * train_losses(nll.history)[0]


# ---------------------------------------------------------------- optimizers and schedules


def test_fused_and_foreach_adamw_agree(tiny_model_dir, data_file, tmp_path):
    fused = train(config_for(tiny_model_dir, data_file, tmp_path / "a", max_steps=3, optim="adamw_torch_fused"))
    foreach = train(config_for(tiny_model_dir, data_file, tmp_path / "b", max_steps=3, optim="adamw_torch"))
    np.testing.assert_allclose(train_losses(fused.history), train_losses(foreach.history), rtol=0, atol=1e-5)


@pytest.mark.parametrize("optim", ["sgd", "adamw_8bit"])
def test_other_optimizers_lower_the_loss(tiny_model_dir, data_file, tmp_path, optim):
    if optim == "adamw_8bit":
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is part of the test extras")
    lr = 0.5 if optim == "sgd" else 5e-3
    result = train(config_for(tiny_model_dir, data_file, tmp_path / optim, max_steps=8, optim=optim,
                              learning_rate=lr, per_device_train_batch_size=24))
    losses = train_losses(result.history)
    assert losses[-1] < losses[0]


def test_weight_decay_skips_biases_and_norms():
    from sftune.training.optim import parameter_groups

    model = build_model(64, attention_bias=True)
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 and "norm" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"model.norm.weight", "model.layers.0.self_attn.q_proj.bias"}


def test_cosine_with_min_lr(tiny_model_dir, data_file, tmp_path):
    result = train(config_for(tiny_model_dir, data_file, tmp_path / "run", max_steps=6,
                              lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1}))
    rates = [e["learning_rate"] for e in result.history if "loss" in e]
    assert rates[0] == pytest.approx(1e-3) and all(r >= 1e-4 - 1e-12 for r in rates)
    assert rates[-1] < rates[0]


def test_cosine_with_min_lr_needs_its_kwargs(tiny_model_dir, data_file, tmp_path, capsys):
    code = main(["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data_file),
                 "--output_dir", str(tmp_path / "o"), "--lr_scheduler_type", "cosine_with_min_lr"])
    assert code == 2 and "needs lr_scheduler_kwargs with min_lr or min_lr_rate" in capsys.readouterr().err


# ---------------------------------------------------------------- evaluation


def build_trainer(model_dir, train_rows, eval_rows, output_dir, source_names=("train",), **overrides):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftune.batching import plan_batching
    from sftune.data.collate import make_collator
    from sftune.run import claim_output_dir
    from sftune.training.loop import Trainer

    config = config_for(model_dir, "unused", output_dir, **overrides)
    claim_output_dir(config, None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    plan = plan_batching(config, device_type="cpu")
    return Trainer(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, train_rows, eval_rows,
                   list(source_names), config, Accelerator(cpu=True), Path(output_dir), plan,
                   make_collator(plan, tokenizer)), tokenizer


def prepared_rows(model_dir, data, source=0):
    from transformers import AutoTokenizer

    from sftune.data.prepare import prepare_train_data

    rows = prepare_train_data(config_for(model_dir, data, "unused"), AutoTokenizer.from_pretrained(model_dir)).train_rows
    return [{**row, "source": source} for row in rows]


def test_evaluation_metrics_per_source_and_samples(tiny_model_dir, data_file, tmp_path):

    rows_a = prepared_rows(tiny_model_dir, data_file, source=0)
    rows_b = prepared_rows(tiny_model_dir, write_jsonl(tmp_path / "b.jsonl", conversations(10, seed=9)), source=1)
    eval_rows = rows_a[:5] + rows_b[:7]
    trainer, tokenizer = build_trainer(
        tiny_model_dir, rows_a, eval_rows, tmp_path / "run", source_names=("chat", "other"),
        eval_strategy="steps", eval_steps=2, max_steps=4, per_device_eval_batch_size=3,
        generation_prompts=["hello there", "who are you"], generation_max_new_tokens=5,
    )
    history = trainer.fit()
    evals = [e for e in history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4]
    final = evals[-1]
    assert final["eval_perplexity"] == pytest.approx(math.exp(final["eval_loss"]))
    for key in ("eval_mean_token_accuracy", "eval_entropy", "eval_loss/chat", "eval_loss/other"):
        assert key in final

    # the eval loss is the token-weighted cross-entropy of the trained model on exactly those rows
    model = trainer.model
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in eval_rows:
            ids = torch.tensor(row["input_ids"], dtype=torch.long)[None]
            logits = model(ids).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    assert final["eval_loss"] == pytest.approx(total / count, abs=1e-5)

    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["prompt"]) for s in samples] == [(2, "hello there"), (2, "who are you"),
                                                           (4, "hello there"), (4, "who are you")]
    assert all(isinstance(s["answer"], str) for s in samples)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval_loss" in line for line in lines) == 2


def test_train_loss_per_source(tiny_model_dir, data_file, tmp_path):
    rows = prepared_rows(tiny_model_dir, data_file, source=0)
    rows = [{**row, "source": i % 2} for i, row in enumerate(rows)]
    trainer, _ = build_trainer(tiny_model_dir, rows, [], tmp_path / "run", source_names=("a", "b"), max_steps=2,
                               logging_steps=2)
    entry = trainer.fit()[-1]
    assert {"loss/a", "loss/b"} <= entry.keys()
    assert min(entry["loss/a"], entry["loss/b"]) <= entry["loss"] <= max(entry["loss/a"], entry["loss/b"])


# ---------------------------------------------------------------- checkpoints and exact resume


@pytest.mark.parametrize("packing", [False, True])
def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(dropout_model_dir, data_file, tmp_path, packing):
    """7 steps straight, against 3 steps + checkpoint + resume + 4 steps: the same losses and weights.

    Steps of 8 rows: the run crosses epoch boundaries (reshuffling), with packed rows too, and dropout makes
    every step depend on the random generators.
    """
    settings = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=7, packing=packing,
                    save_strategy="steps", save_steps=3)
    full = train(config_for(dropout_model_dir, data_file, tmp_path / "full", **settings))
    assert [step for step, _ in list_checkpoints(tmp_path / "full")] == [3, 6]
    resumed = train(config_for(dropout_model_dir, data_file, tmp_path / "resumed",
                               resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"), **settings))
    assert [e["step"] for e in resumed.history] == [4, 5, 6, 7]
    assert train_losses(resumed.history) == train_losses(full.history)[3:]
    assert resumed.history[-1]["num_tokens"] == full.history[-1]["num_tokens"]
    assert_same_weights(weights(full.model), weights(resumed.model))


def test_resume_true_continues_the_newest_checkpoint_in_place(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    settings = dict(save_strategy="steps", save_steps=2, save_total_limit=2, max_steps=6)
    full = train(config_for(tiny_model_dir, data_file, out, **settings))
    assert [step for step, _ in list_checkpoints(out)] == [4, 6]  # the oldest were pruned
    checkpoint_4 = out / "checkpoint-4"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pt", "trainer_state.json", "sftune_config.yaml",
                 "model.safetensors", "config.json", "tokenizer.json"):
        assert (checkpoint_4 / name).is_file(), name
    first_weights = weights(full.model)

    shutil.rmtree(out / "checkpoint-6")  # as if the run had died after step 5
    resumed = train(config_for(tiny_model_dir, data_file, out, resume_from_checkpoint=True, **settings))
    assert [e["step"] for e in resumed.history] == [5, 6]
    assert_same_weights(first_weights, weights(resumed.model))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the lines after checkpoint 4 were replaced, not repeated


def test_a_half_written_checkpoint_is_never_taken(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    train(config_for(tiny_model_dir, data_file, out, save_strategy="steps", save_steps=2, max_steps=4))
    (out / ".checkpoint-6.partial-dead").mkdir()  # a crash while saving leaves only a hidden partial folder
    (out / "checkpoint-8").mkdir()  # a folder without trainer_state.json is not a checkpoint
    assert [step for step, _ in list_checkpoints(out)] == [2, 4]


def test_resume_errors(tiny_model_dir, data_file, tmp_path, capsys):
    base = ["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data_file)]
    assert main(base + ["--output_dir", str(tmp_path / "x"), "--resume_from_checkpoint", str(tmp_path)]) == 2
    assert "is not a checkpoint folder" in capsys.readouterr().err
    done = tmp_path / "done"
    train(config_for(tiny_model_dir, data_file, done, max_steps=1))
    assert main(base + ["--output_dir", str(done), "--resume_from_checkpoint", "true"]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err


def test_resume_true_on_a_fresh_output_dir_starts_from_scratch(tiny_model_dir, data_file, tmp_path):
    result = train(config_for(tiny_model_dir, data_file, tmp_path / "new", max_steps=2, resume_from_checkpoint=True))
    assert result.global_step == 2


@pytest.mark.slow  # trains in a subprocess
def test_sigterm_saves_a_checkpoint_and_resume_finishes_the_same_run(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "long.jsonl", conversations(200, seed=5))
    out = tmp_path / "run"
    args = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--output_dir", str(out),
            "--max_steps", "30", "--logging_steps", "1", "--per_device_train_batch_size", "8",
            "--learning_rate", "1e-3", "--save_strategy", "no", "--max_length", "128"]
    process = subprocess.Popen([sys.executable, "-m", "sftune", "train", *args], stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert f"continue with: sftune train {shlex.join(args)} --resume_from_checkpoint true" in err
    assert "Traceback" not in err
    (step, _), = list_checkpoints(out)
    assert 3 <= step < 30

    assert main(["train", *args, "--resume_from_checkpoint", "true"]) == 0
    straight = train(SFTConfig.from_dict({**_flags(args), "output_dir": str(tmp_path / "straight")}))
    from transformers import AutoModelForCausalLM

    resumed_weights = weights(AutoModelForCausalLM.from_pretrained(out))
    assert_same_weights(weights(straight.model), resumed_weights)


def _flags(args: list[str]) -> dict[str, str]:
    return {args[i][2:]: args[i + 1] for i in range(0, len(args), 2)}


# ---------------------------------------------------------------- non-finite losses


@pytest.fixture
def nan_at_step_two(monkeypatch):
    """The second forward gives a NaN loss: step 2's when each step is one forward (padded batches)."""
    from sftune.training.loss import CausalLMWithLoss

    original = CausalLMWithLoss.forward
    calls = {"n": 0}

    def poisoned(self, **batch):
        out = original(self, **batch)
        calls["n"] += 1
        if calls["n"] == 2 and self.training:
            out["loss_sum"] = out["loss_sum"] * float("nan")
        return out

    monkeypatch.setattr(CausalLMWithLoss, "forward", poisoned)


def test_a_nan_loss_stops_the_run_naming_the_step(tiny_model_dir, data_file, tmp_path, nan_at_step_two):
    with pytest.raises(TrainingError, match="step 2: the loss or its gradient is not finite"):
        train(config_for(tiny_model_dir, data_file, tmp_path / "run", max_steps=4, padding_free=False))


def test_a_nan_loss_can_skip_its_step(tiny_model_dir, data_file, tmp_path, nan_at_step_two):
    result = train(config_for(tiny_model_dir, data_file, tmp_path / "run", max_steps=4, on_nonfinite_loss="skip",
                                padding_free=False))
    assert result.global_step == 4 and result.history[-1]["skipped_steps"] == 1
    assert all(math.isfinite(loss) for loss in train_losses(result.history))
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


# ---------------------------------------------------------------- trackers


def test_tensorboard_wandb_and_trackio_offline(tiny_model_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    (tmp_path / "wandb").mkdir()
    out = tmp_path / "run"
    train(config_for(tiny_model_dir, data_file, out, max_steps=3, report_to=["tensorboard", "wandb", "trackio"],
                     run_name="tracked"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "runs" / "tracked"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]

    runs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))

    import sqlite3

    databases = list((tmp_path / "trackio").rglob("*.db"))
    assert databases
    with sqlite3.connect(databases[0]) as db:
        tables = [row[0] for row in db.execute("select name from sqlite_master where type='table'")]
        assert any("metric" in t for t in tables)
        rows = db.execute(f"select * from {[t for t in tables if 'metric' in t][0]}").fetchall()
    assert len(rows) >= 3


def test_a_missing_tracker_package_is_a_clear_error(tiny_model_dir, data_file, tmp_path, monkeypatch, capsys):
    import sftune.training.report as report

    monkeypatch.setitem(report.TRACKER_PACKAGES, "wandb", "wandb_not_installed_here")
    code = main(["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data_file),
                 "--output_dir", str(tmp_path / "o"), "--report_to", "wandb"])
    assert code == 2 and "report_to wandb needs the wandb_not_installed_here package" in capsys.readouterr().err


# ---------------------------------------------------------------- data parallelism, compilation, determinism


@pytest.mark.slow  # two processes
def test_two_processes_equal_one_with_the_same_global_batch(tiny_model_dir, tmp_path):
    """2 CPU processes over gloo x padded batch 2 x accumulation 2 against 1 process x padded batch 8: the same
    per-step losses, gradient norms and final weights (gradients summed over processes and micro-batches, then
    normalised by the step's trained tokens)."""
    from safetensors.torch import load_file

    data_file = write_jsonl(tmp_path / "fresh.jsonl", conversations(24, seed=21))  # not in the data cache yet
    common = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data_file), "--max_steps", "4",
              "--logging_steps", "1", "--learning_rate", "1e-3", "--max_length", "128", "--save_strategy", "no",
              "--padding_free", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "sftune", "train", *common, "--output_dir", str(tmp_path / "ddp"),
                          "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                          "--num_processes", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # really two processes, not two copies
    assert "batching: padded batches; 8 rows per step (2 x 2 accumulation x 2 processes)" in ddp.stderr
    # the data is prepared once: the main process prepares and caches, the other reads the cache
    assert ddp.stderr.count("data: prepared in") == 1 and ddp.stderr.count("data: using the prepared data") == 1
    single = train(config_for(tiny_model_dir, data_file, tmp_path / "one", max_steps=4, per_device_train_batch_size=8,
                              padding_free=False))
    assert single.plan.layout == "padded" and single.plan.rows_per_micro_step == 8
    lines = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]  # written once, by the main process only
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([line[key] for line in lines], [e[key] for e in single.history], rtol=1e-5,
                                   atol=1e-5, err_msg=key)
    assert [line["num_tokens"] for line in lines] == [e["num_tokens"] for e in single.history]
    two, one = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow  # compiles the model (about a minute)
def test_torch_compile_gives_the_same_losses(tiny_model_dir, data_file, tmp_path):
    plain = train(config_for(tiny_model_dir, data_file, tmp_path / "plain", max_steps=2))
    compiled = train(config_for(tiny_model_dir, data_file, tmp_path / "compiled", max_steps=2, torch_compile=True))
    np.testing.assert_allclose(train_losses(plain.history), train_losses(compiled.history), rtol=0, atol=1e-4)
    assert (tmp_path / "compiled" / "model.safetensors").is_file()


@pytest.fixture
def deterministic_mode_restored():
    """full_determinism switches torch's global deterministic mode on: off again after the test, pass or fail."""
    yield
    torch.use_deterministic_algorithms(False)


def test_full_determinism_repeats_bitwise(dropout_model_dir, data_file, tmp_path, deterministic_mode_restored):
    first = train(config_for(dropout_model_dir, data_file, tmp_path / "a", max_steps=2, full_determinism=True))
    assert torch.are_deterministic_algorithms_enabled()
    second = train(config_for(dropout_model_dir, data_file, tmp_path / "b", max_steps=2, full_determinism=True))
    assert train_losses(first.history) == train_losses(second.history)
