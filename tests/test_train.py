"""End-to-end training on a tiny model, and the invariants the loop promises."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from sftune import SFTConfig, train
from sftune.cli import main
from sftune.config import CONFIG_FILENAME


def tiny_config(model_dir, data, output_dir, **overrides) -> SFTConfig:
    settings = dict(
        model_name_or_path=str(model_dir), dataset_name=str(data), output_dir=str(output_dir),
        learning_rate=1e-3, max_steps=4, logging_steps=1, per_device_train_batch_size=8, max_length=128,
    )
    settings.update(overrides)
    return SFTConfig(**settings)


def step_losses(result) -> np.ndarray:
    return np.array([entry["loss"] for entry in result.history])


@pytest.mark.slow  # trains in a subprocess
def test_cli_train_end_to_end(tiny_model_dir, chat_jsonl, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "sftune", "train", "--model_name_or_path", str(tiny_model_dir),
               "--dataset_name", str(chat_jsonl), "--output_dir", str(out), "--max_steps", "3",
               "--logging_steps", "1", "--learning_rate", "1e-3", "--per_device_train_batch_size", "4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for key in ("step", "epoch", "loss", "learning_rate", "grad_norm", "num_tokens", "tokens_per_second"):
        assert all(key in m for m in lines)
    assert lines[0]["num_tokens"] < lines[1]["num_tokens"] < lines[2]["num_tokens"]
    assert lines[-1]["loss"] < lines[0]["loss"]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", CONFIG_FILENAME):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) and not list(out.glob(".staging-*"))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and model.config.use_cache is not False

    # the saved config repeats the run
    again = tmp_path / "again"
    assert main(["train", str(out / CONFIG_FILENAME), "--output_dir", str(again)]) == 0
    repeated = [json.loads(line)["loss"] for line in (again / "metrics.jsonl").read_text().splitlines()]
    assert repeated == [m["loss"] for m in lines]


def test_uneven_last_step_is_token_exact(tiny_model_dir, chat_jsonl, tmp_path):
    """32 rows in padded steps of 12: the last step holds 8 rows in 3 micro-batches of 3, 3 and 2."""
    full = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "a", max_steps=-1, num_train_epochs=1,
                             per_device_train_batch_size=12, padding_free=False))
    split = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "b", max_steps=-1, num_train_epochs=1,
                              per_device_train_batch_size=3, gradient_accumulation_steps=4, padding_free=False))
    assert full.plan.layout == split.plan.layout == "padded"
    assert (full.plan.rows_per_micro_step, split.plan.rows_per_micro_step) == (12, 3)
    assert full.global_step == split.global_step == 3
    np.testing.assert_allclose(step_losses(full), step_losses(split), rtol=0, atol=1e-5)
    np.testing.assert_allclose([e["grad_norm"] for e in full.history], [e["grad_norm"] for e in split.history],
                               rtol=1e-5, atol=0)


def test_save_then_load_gives_identical_logits(tiny_model_dir, chat_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    result = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "run", max_steps=2))
    reloaded = AutoModelForCausalLM.from_pretrained(result.output_dir)
    ids = torch.tensor([result.tokenizer.encode("hello world how are you")])
    result.model.eval()
    with torch.no_grad():
        assert torch.equal(result.model(ids).logits, reloaded(ids).logits)


def test_our_loss_equals_transformers_loss(tiny_model_dir, chat_jsonl):
    """The loss module (select trained positions, then project) equals the model's own full-logits loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftune.data.collate import pad_batch
    from sftune.data.prepare import prepare_train_data
    from sftune.training.loss import CausalLMWithLoss

    config = tiny_config(tiny_model_dir, chat_jsonl, "unused")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = prepare_train_data(config, tokenizer).train_rows[:4]
    batch = pad_batch(rows, tokenizer.pad_token_id)
    batch.pop("source_ids")  # the loop takes these out for its per-source report
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    out = CausalLMWithLoss(model)(**batch)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    torch.testing.assert_close(out["loss_sum"] / out["num_tokens"], reference, rtol=0, atol=1e-6)


def test_text_dataset_trains(tiny_model_dir, text_jsonl, tmp_path):
    result = train(tiny_config(tiny_model_dir, text_jsonl, tmp_path / "run", max_steps=3))
    assert result.data_stats["format"] == "text" and result.global_step == 3


def test_schedule_and_warmup(tiny_model_dir, chat_jsonl, tmp_path):
    result = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "run", max_steps=8, warmup_ratio=0.25,
                               lr_scheduler_type="cosine", per_device_train_batch_size=4))
    rates = [e["learning_rate"] for e in result.history]
    assert rates[0] == 0.0 and rates[1] == pytest.approx(5e-4) and rates[2] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(rates[2:], rates[3:]))  # cosine decay after warm-up


def test_epochs_drive_the_step_count(tiny_model_dir, chat_jsonl, tmp_path):
    result = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "run", max_steps=-1, num_train_epochs=1.5,
                               per_device_train_batch_size=8, logging_steps=10))
    assert result.global_step == 6  # 4 steps per epoch
    assert [e["step"] for e in result.history] == [6]  # the last step is always logged
    assert result.history[-1]["epoch"] == 1.5


def test_existing_output_dir_is_never_overwritten(tiny_model_dir, chat_jsonl, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    argv = ["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(chat_jsonl),
            "--output_dir", str(out), "--max_steps", "1"]
    assert main(argv) == 2
    assert "already holds files" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me" and not (out / CONFIG_FILENAME).exists()
    assert main(argv + ["--overwrite_output_dir"]) == 2  # it replaces an earlier run, not the user's own files
    assert "holds files no sftune run wrote (precious.txt)" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me" and not (out / CONFIG_FILENAME).exists()


def test_overwrite_output_dir_replaces_the_earlier_run_whole(tiny_model_dir, chat_jsonl, tmp_path, capsys):
    """The earlier run's later checkpoints must not survive: a resume would continue the other run's weights."""
    out = tmp_path / "run"
    argv = ["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(chat_jsonl),
            "--output_dir", str(out), "--save_steps", "1"]
    assert main(argv + ["--max_steps", "3"]) == 0
    assert {"checkpoint-2", "checkpoint-3"} <= {p.name for p in out.iterdir()}
    (out / "checkpoint-3" / "stale-marker").write_text("from the earlier run")
    assert main(argv + ["--max_steps", "1", "--overwrite_output_dir"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "checkpoint-1" in names and not {"checkpoint-2", "checkpoint-3"} & names
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_max_length_truncates(tiny_model_dir, chat_jsonl, tmp_path):
    result = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "run", max_length=16, max_steps=1))
    assert result.data_stats["rows_truncated"] > 0
    assert result.data_stats["tokens"] <= 16 * result.data_stats["rows"]


def test_seed_makes_runs_repeatable(tiny_model_dir, chat_jsonl, tmp_path):
    first = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "a", per_device_train_batch_size=4))
    second = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "b", per_device_train_batch_size=4))
    other = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "c", per_device_train_batch_size=4, seed=1))
    assert list(step_losses(first)) == list(step_losses(second))
    assert list(step_losses(first)) != list(step_losses(other))  # another seed, another data order


def test_dtype_and_attention_implementation(tiny_model_dir, chat_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    result = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "run", max_steps=2, dtype="bfloat16",
                               attn_implementation="eager"))
    assert result.model.dtype == torch.float32  # loaded in bf16, trained in fp32 on CPU (precision unset)
    assert result.model.config._attn_implementation == "eager"
    assert np.isfinite(step_losses(result)).all()
    assert AutoModelForCausalLM.from_pretrained(result.output_dir, dtype="auto").dtype == torch.bfloat16


def test_public_train_is_the_function_even_after_importing_the_training_package():
    import importlib

    import sftune
    import sftune.training.loop  # noqa: F401  (a subpackage import must not shadow sftune.train)

    assert callable(importlib.import_module("sftune").train) and sftune.train.__doc__.startswith("Fine-tune")


def test_a_crash_at_step_1_leaves_a_folder_the_same_command_reuses(tiny_model_dir, chat_jsonl, tmp_path, monkeypatch,
                                                                   capsys):
    """The crashed run left its config but no checkpoint: rerunning must not be refused as "already holds files",
    and the crash itself is one line asking for a report (exit 1), not a traceback."""
    from sftune.training.loop import Trainer

    out = tmp_path / "run"
    argv = ["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(chat_jsonl),
            "--output_dir", str(out), "--max_steps", "2"]

    def crash(self, micro_batches):
        raise RuntimeError("boom inside a step")

    with monkeypatch.context() as patched:
        patched.setattr(Trainer, "_optimizer_step", crash)
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert "internal error (RuntimeError: boom inside a step)" in err and "--debug" in err and "Traceback" not in err
    assert (out / CONFIG_FILENAME).is_file()  # what the crash left behind
    assert main(argv) == 0
    assert (out / "model.safetensors").is_file()


def test_tool_calls_train_end_to_end_through_the_default_template(tiny_model_no_template_dir, tmp_path):
    """Tool calls, tool results and per-turn examples through a whole run; the saved tokenizer renders calls."""
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    row = {"tools": tools, "messages": [
        {"role": "user", "content": "weather in Paris?"}, {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}]}
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for _ in range(4)))
    out = tmp_path / "run"
    result = train(tiny_config(tiny_model_no_template_dir, data, out, max_steps=2, assistant_only_loss=True,
                               split_assistant_turns=True, save_strategy="no", max_length=1024))
    assert len(result.history) == 2 and all(np.isfinite(step_losses(result)))
    assert result.data_stats["documents"] == 8  # 4 rows, two trained turns each: one example per turn

    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out)  # inference renders the calls as training did
    parsed = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    text = saved.apply_chat_template([row["messages"][0], {**row["messages"][1], "tool_calls": parsed}],
                                     tools=tools, tokenize=False)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in text
    assert "<tools>" in text
