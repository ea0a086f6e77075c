"""TRL's training-side keys (issue 15), end to end on a tiny model: label smoothing, logging and evaluating at the
start, NEFTune, the best checkpoint at the end and early stopping, model-only checkpoints, padding to a multiple,
eval packing, shuffling and the data seed."""

from __future__ import annotations

import pytest

from sftune import SFTConfig, train
from sftune.errors import ConfigError


def tiny_config(model_dir, data, output_dir, **overrides) -> SFTConfig:
    settings = dict(
        model_name_or_path=str(model_dir), dataset_name=str(data), output_dir=str(output_dir),
        learning_rate=1e-3, max_steps=4, logging_steps=1, per_device_train_batch_size=8, max_length=128,
        save_strategy="no",
    )
    settings.update(overrides)
    return SFTConfig(**settings)


def train_lines(result) -> list[dict]:
    return [h for h in result.history if "loss" in h]


def eval_lines(result) -> list[dict]:
    return [h for h in result.history if "eval_loss" in h]


# ---------------------------------------------------------------- label_smoothing_factor


def test_label_smoothing_raises_the_training_loss_only(tiny_model_dir, chat_jsonl, tmp_path):
    """Same weights, same first batch: the smoothed run's first training loss is higher; its eval loss on the same
    model (before any step) is the plain cross-entropy, equal to the unsmoothed run's."""
    common = dict(max_steps=1, eval_strategy="steps", eval_ratio=0.2, eval_on_start=True)
    plain = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "plain", **common))
    smoothed = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "smooth", label_smoothing_factor=0.1,
                                 **common))
    # an untrained model predicts nearly uniformly, so smoothing adds little at step 1, but it does add
    assert train_lines(smoothed)[0]["loss"] > train_lines(plain)[0]["loss"] + 1e-3
    assert eval_lines(smoothed)[0]["step"] == 0
    assert eval_lines(smoothed)[0]["eval_loss"] == pytest.approx(eval_lines(plain)[0]["eval_loss"], abs=1e-6)


def test_label_smoothing_with_dft_is_one_clear_error():
    with pytest.raises(ConfigError, match="label_smoothing_factor.*loss_type: dft"):
        SFTConfig(label_smoothing_factor=0.1, loss_type="dft")
    with pytest.raises(ConfigError, match="label_smoothing_factor.*must be in"):
        SFTConfig(label_smoothing_factor=1.5)


# ---------------------------------------------------------------- logging_first_step, eval_on_start


def test_logging_first_step_logs_step_one(tiny_model_dir, chat_jsonl, tmp_path):
    without = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "a", max_steps=4, logging_steps=2))
    with_first = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "b", max_steps=4, logging_steps=2,
                                   logging_first_step=True))
    assert [h["step"] for h in train_lines(without)] == [2, 4]
    assert [h["step"] for h in train_lines(with_first)] == [1, 2, 4]


def test_eval_on_start_evaluates_the_loaded_model_at_step_zero(tiny_model_dir, chat_jsonl, tmp_path):
    result = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "a", max_steps=2, eval_ratio=0.2,
                               eval_on_start=True))  # eval_strategy stays "no": only the start is evaluated
    assert [h["step"] for h in eval_lines(result)] == [0]
    assert result.history[0]["step"] == 0 and "eval_loss" in result.history[0]
    later = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "b", max_steps=2, eval_ratio=0.2,
                              eval_strategy="steps", eval_steps=2))
    assert [h["step"] for h in eval_lines(later)] == [2]


def test_eval_on_start_without_eval_data_is_one_clear_error(tiny_model_dir, chat_jsonl, tmp_path):
    from sftune.errors import UserError

    with pytest.raises(UserError, match="eval_on_start.*no eval data"):
        train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "a", eval_on_start=True))
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------- neftune_noise_alpha


def test_neftune_noises_the_training_forward_only(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from sftune.training.loss import CausalLMWithLoss
    from sftune.training.neftune import NEFTune, input_embedding

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loss_model = CausalLMWithLoss(model).train()
    torch.manual_seed(0)
    input_ids = torch.randint(3, model.config.vocab_size, (2, 16))
    targets = torch.full_like(input_ids, -100)
    targets[:, :-1] = input_ids[:, 1:]
    with torch.no_grad():
        before = loss_model(input_ids=input_ids, targets=targets)["loss_sum"]
        embedding = input_embedding(model)
        with NEFTune(embedding, alpha=50.0):
            noisy = loss_model(input_ids=input_ids, targets=targets)["loss_sum"]
            noisy_again = loss_model(input_ids=input_ids, targets=targets)["loss_sum"]
        after = loss_model(input_ids=input_ids, targets=targets)["loss_sum"]
    assert abs(float(noisy - before)) > 1e-3 and float(noisy) != float(noisy_again)  # fresh noise every forward
    assert float(after) == float(before)
    assert not embedding._forward_hooks  # nothing left on the model


def test_neftune_changes_training_but_not_evaluation_or_the_saved_model(tiny_model_dir, chat_jsonl, tmp_path):
    """Eval at the last step of a NEFTune run equals a fresh evaluation of the model it saved (no noise in either),
    while the trained weights differ from a run without noise."""
    import torch
    from safetensors.torch import load_file

    common = dict(max_steps=2, eval_ratio=0.2, eval_strategy="steps", eval_steps=2)
    noisy = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "noisy", neftune_noise_alpha=50.0, **common))
    train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "plain", **common))
    assert not noisy.model.get_input_embeddings()._forward_hooks
    noisy_weights = load_file(tmp_path / "noisy" / "model.safetensors")
    plain_weights = load_file(tmp_path / "plain" / "model.safetensors")
    assert any(not torch.equal(noisy_weights[k], plain_weights[k]) for k in noisy_weights)
    # the saved model, evaluated on the same eval rows before any step of a new run
    again = train(tiny_config(tmp_path / "noisy", chat_jsonl, tmp_path / "again", max_steps=1, eval_ratio=0.2,
                              eval_on_start=True, learning_rate=1e-9))
    assert eval_lines(again)[0]["step"] == 0
    assert eval_lines(again)[0]["eval_loss"] == pytest.approx(eval_lines(noisy)[-1]["eval_loss"], abs=1e-6)


def test_neftune_alpha_must_be_positive():
    with pytest.raises(ConfigError, match="neftune_noise_alpha"):
        SFTConfig(neftune_noise_alpha=0.0)


# ---------------------------------------------------------------- load_best_model_at_end, early stopping


def best_config(model_dir, data, out, **overrides):
    settings = dict(max_steps=4, eval_ratio=0.2, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                    save_steps=1, load_best_model_at_end=True)
    settings.update(overrides)
    return tiny_config(model_dir, data, out, **settings)


@pytest.mark.parametrize("greater_is_better", [None, True])
def test_best_checkpoint_becomes_the_saved_model(tiny_model_dir, chat_jsonl, tmp_path, greater_is_better):
    """The selection equals the arg-best of the logged eval losses; the saved model's weights are that checkpoint's,
    the best checkpoint survives save_total_limit, and the card names its step. greater_is_better: true on a
    falling eval_loss picks an early step, so the best is not simply the last."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "run"
    result = train(best_config(tiny_model_dir, chat_jsonl, out, greater_is_better=greater_is_better,
                               save_total_limit=1))
    losses = {h["step"]: h["eval_loss"] for h in eval_lines(result)}
    expected = (max if greater_is_better else min)(losses, key=losses.get)
    summary = [h for h in result.history if "best_model_step" in h][-1]
    assert summary["best_model_step"] == expected and summary["best_metric"] == "eval_loss"
    assert summary["best_metric_value"] == losses[expected]
    kept = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert kept == sorted({expected, 4})  # the newest, plus the best
    saved = load_file(out / "model.safetensors")
    best = load_file(out / f"checkpoint-{expected}" / "model.safetensors")
    assert all(torch.equal(saved[k], best[k]) for k in saved)
    if expected != 4:
        last = load_file(out / "checkpoint-4" / "model.safetensors")
        assert any(not torch.equal(saved[k], last[k]) for k in saved)
        assert f"**step {expected}**" in (out / "README.md").read_text()
    if greater_is_better:
        assert expected != 4, "eval_loss should fall during these steps, so the highest is not the last"


def reference_early_stop(values: list[float], patience: int, threshold: float) -> int:
    """The evaluation (1-based) after which transformers' EarlyStoppingCallback stops training, or len(values)."""
    from types import SimpleNamespace

    from transformers.trainer_callback import EarlyStoppingCallback, TrainerControl

    callback = EarlyStoppingCallback(early_stopping_patience=patience, early_stopping_threshold=threshold)
    args = SimpleNamespace(greater_is_better=False, metric_for_best_model="eval_loss")
    state, control = SimpleNamespace(best_metric=None), TrainerControl()
    for i, value in enumerate(values, 1):
        callback.on_evaluate(args, state, control, metrics={"eval_loss": value})
        if state.best_metric is None or value < state.best_metric:  # Trainer._determine_best_metric, after it
            state.best_metric = value
        if control.should_training_stop:
            return i
    return len(values)


def test_early_stopping_stops_where_transformers_callback_does(tiny_model_dir, chat_jsonl, tmp_path):
    common = dict(max_steps=8, eval_ratio=0.2, eval_strategy="steps", eval_steps=1)
    full = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "full", **common))
    values = [h["eval_loss"] for h in eval_lines(full)]
    gains = sorted(a - b for a, b in zip(values, values[1:]) if a > b)
    stops = []
    for k, threshold in enumerate([0.0, gains[len(gains) // 2] if gains else 0.0, 100.0]):
        expected = reference_early_stop(values, patience=2, threshold=threshold)
        run = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / f"es{k}", early_stopping_patience=2,
                                early_stopping_threshold=threshold, **common))
        assert run.global_step == expected, threshold
        assert [h["eval_loss"] for h in eval_lines(run)] == values[:expected]
        assert train_lines(run)[-1]["step"] == expected  # the last step's interval is logged
        stops.append(expected)
    assert stops[-1] == 3  # nothing improves by 100: the first evaluation, then two without improvement


def test_best_model_settings_are_checked_in_one_line():
    with pytest.raises(ConfigError, match="load_best_model_at_end' needs save_strategy to match"):
        SFTConfig(load_best_model_at_end=True, eval_strategy="steps", save_strategy="no")
    with pytest.raises(ConfigError, match="multiple of the evaluation interval"):
        SFTConfig(load_best_model_at_end=True, eval_strategy="steps", eval_steps=3, save_steps=10)
    with pytest.raises(ConfigError, match="early_stopping_patience' needs evaluations"):
        SFTConfig(early_stopping_patience=2)
    with pytest.raises(ConfigError, match="metric_for_best_model"):
        SFTConfig(metric_for_best_model="bleu", early_stopping_patience=1, eval_strategy="steps")
    SFTConfig(load_best_model_at_end=True, eval_strategy="steps", eval_steps=5, save_steps=10,
              metric_for_best_model="mean_token_accuracy")


def test_a_per_source_metric_must_name_a_mixed_dataset():
    from sftune.errors import UserError
    from sftune.training.best_model import BestModelTracker

    config = SFTConfig(eval_strategy="steps", early_stopping_patience=1, metric_for_best_model="loss/chat")
    BestModelTracker(config).check_sources(["chat", "code"])
    for sources in (["code", "math"], ["chat"]):
        with pytest.raises(UserError, match="eval_loss/chat' names no data source"):
            BestModelTracker(config).check_sources(sources)
    tracker = BestModelTracker(SFTConfig(eval_strategy="steps", early_stopping_patience=1,
                                         metric_for_best_model="mean_token_accuracy"))
    assert tracker.key == "eval_mean_token_accuracy" and tracker.better(0.6, 0.5)  # accuracy: higher is better


def test_a_resumed_run_keeps_choosing_among_all_checkpoints(tiny_model_dir, chat_jsonl, tmp_path):
    """The selection state travels in the checkpoint: after a resume, the best of steps 1-2 still competes."""
    import json

    out = tmp_path / "run"
    train(best_config(tiny_model_dir, chat_jsonl, out, greater_is_better=True, max_steps=2))
    resumed = train(best_config(tiny_model_dir, chat_jsonl, out, greater_is_better=True, max_steps=4,
                                resume_from_checkpoint=True, resume_allow_changes=True))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {h["step"]: h["eval_loss"] for h in lines if "eval_loss" in h}
    assert sorted(losses) == [1, 2, 3, 4]
    summary = [h for h in resumed.history if "best_model_step" in h][-1]
    assert summary["best_model_step"] == max(losses, key=losses.get) <= 2


# ---------------------------------------------------------------- save_only_model


def test_save_only_model_checkpoints_hold_weights_only_and_refuse_to_resume(tiny_model_dir, chat_jsonl, tmp_path):
    from sftune.errors import UserError

    out = tmp_path / "run"
    train(tiny_config(tiny_model_dir, chat_jsonl, out, max_steps=2, save_strategy="steps", save_steps=1,
                      save_only_model=True))
    full = tmp_path / "full"
    train(tiny_config(tiny_model_dir, chat_jsonl, full, max_steps=1, save_strategy="steps", save_steps=1))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pt"):
        assert (full / "checkpoint-1" / name).is_file()
        assert not (out / "checkpoint-1" / name).exists() and not (out / "checkpoint-2" / name).exists()
    assert (out / "checkpoint-2" / "model.safetensors").is_file()
    for resume in (str(out / "checkpoint-1"), True):
        with pytest.raises(UserError, match="save_only_model: true.*cannot continue"):
            train(tiny_config(tiny_model_dir, chat_jsonl, out, max_steps=3, resume_from_checkpoint=resume))
    # its weights start a new run
    train(tiny_config(out / "checkpoint-2", chat_jsonl, tmp_path / "next", max_steps=1))


def test_a_stop_with_save_only_model_still_writes_a_checkpoint_that_resumes(tiny_model_dir, chat_jsonl, tmp_path,
                                                                            monkeypatch):
    from sftune.training import checkpoint
    from sftune.training.loop import Trainer

    config = tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "run", max_steps=2, save_strategy="steps",
                         save_steps=1, save_only_model=True)
    stops = []
    periodic_save = Trainer.save_checkpoint

    def save_then_stop(self, rng_states=None, model_only=None):
        path = periodic_save(self, rng_states, model_only)
        if model_only is None and self.step == 1:  # as if Ctrl-C came during the periodic save of step 1
            stops.append(self._checkpoint_of_last_step())
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_stop)
    train(config)
    assert stops and not checkpoint.is_model_only(stops[0]) and (stops[0] / "optimizer.pt").is_file()


# ---------------------------------------------------------------- pad_to_multiple_of


@pytest.mark.parametrize("layout_settings", [dict(padding_free=False), dict(padding_free=False, packing=True),
                                             dict(padding_free=True)], ids=["padded", "packed", "padding_free"])
def test_pad_to_multiple_of_pads_every_layout_and_changes_no_number(tiny_model_dir, layout_settings):
    """Batch lengths become multiples of 16 in each layout; loss and gradients equal those without the padding."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from sftune.batching import plan_batching
    from sftune.data.collate import make_collator
    from sftune.training.loss import CausalLMWithLoss
    from tests.conftest import build_tokenizer

    tokenizer = build_tokenizer()
    rng = np.random.default_rng(0)
    lengths = [[5, 9], [7], [3, 4, 6]] if layout_settings.get("packing") else [[11], [5], [9]]
    rows = []
    for docs in lengths:
        ids = rng.integers(3, len(tokenizer), sum(docs))
        row = {"input_ids": ids, "labels": ids.copy()}
        if layout_settings.get("packing"):
            row["seq_lengths"], row["source"] = np.array(docs), np.zeros(len(docs), dtype=np.int64)
        rows.append(row)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loss_model = CausalLMWithLoss(model)
    results = []
    for multiple in (None, 16):
        config = SFTConfig(pad_to_multiple_of=multiple, max_length=32, **layout_settings)
        batches = make_collator(plan_batching(config, device_type="cpu"), tokenizer)(rows)
        widths = [b["input_ids"].shape[1] for b in batches]
        if multiple:
            assert all(w % multiple == 0 for w in widths) and widths != results[0][0]
        model.zero_grad()
        total = sum(loss_model(**{k: v for k, v in b.items() if k != "source_ids"})["loss_sum"] for b in batches)
        total.backward()
        results.append((widths, float(total.detach()), [p.grad.clone() for p in model.parameters()]))
    (_, plain_loss, plain_grads), (_, padded_loss, padded_grads) = results
    assert padded_loss == pytest.approx(plain_loss, abs=1e-4)
    for got, want in zip(padded_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- eval_packing


def test_eval_packing_follows_packing_and_keeps_eval_documents_apart(tiny_model_dir, chat_jsonl, tmp_path):
    """Packed eval rows when eval_packing (or, unset, packing) says so; on padded training batches the packed eval
    rows still give the unpacked eval loss (documents kept apart), before any step."""
    from sftune.config import eval_rows_packed

    assert eval_rows_packed(SFTConfig(packing=True)) and not eval_rows_packed(SFTConfig())
    assert not eval_rows_packed(SFTConfig(packing=True, eval_packing=False))
    common = dict(max_steps=1, eval_ratio=0.25, eval_on_start=True, padding_free=False, max_length=256,
                  per_device_eval_batch_size=2)
    unpacked = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "a", **common))
    packed = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "b", eval_packing=True, **common))
    assert unpacked.plan.layout == packed.plan.layout == "padded" and packed.plan.eval_layout == "packed"
    assert packed.data_stats["eval_rows"] < unpacked.data_stats["eval_rows"]  # documents were packed together
    assert packed.data_stats["eval_trained_tokens"] == unpacked.data_stats["eval_trained_tokens"]
    assert eval_lines(packed)[0]["eval_loss"] == pytest.approx(eval_lines(unpacked)[0]["eval_loss"], abs=1e-5)
    not_packed = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "c", packing=True, eval_packing=False,
                                   **common))
    assert not_packed.data_stats["eval_rows"] == unpacked.data_stats["eval_rows"]


# ---------------------------------------------------------------- shuffle_dataset, data_seed


def prepared_train_ids(model_dir, data, **settings) -> list[tuple[int, ...]]:
    from transformers import AutoTokenizer

    from sftune.data.prepare import prepare_train_data

    config = SFTConfig(model_name_or_path=str(model_dir), dataset_name=str(data), max_length=128, **settings)
    prepared = prepare_train_data(config, AutoTokenizer.from_pretrained(model_dir))
    return [tuple(int(t) for t in row["input_ids"]) for row in prepared.train_rows]


def test_shuffle_dataset_shuffles_the_documents_once_by_data_seed(tiny_model_dir, chat_jsonl):
    in_order = prepared_train_ids(tiny_model_dir, chat_jsonl)
    shuffled = prepared_train_ids(tiny_model_dir, chat_jsonl, shuffle_dataset=True)
    again = prepared_train_ids(tiny_model_dir, chat_jsonl, shuffle_dataset=True, seed=5, data_seed=42)
    other = prepared_train_ids(tiny_model_dir, chat_jsonl, shuffle_dataset=True, data_seed=7)
    assert shuffled != in_order and sorted(shuffled) == sorted(in_order)
    assert again == shuffled  # data_seed, not seed, decides
    assert other != shuffled and sorted(other) == sorted(in_order)


def test_data_seed_decides_the_data_order_and_seed_the_rest(tiny_model_dir, chat_jsonl, tmp_path):
    """A full fine-tune without dropout depends on seeds only through the data: the same data_seed under
    different seeds gives the same losses; another data_seed other losses. With LoRA, seed still sets the init."""
    common = dict(max_steps=3, per_device_train_batch_size=4, eval_ratio=0.2, eval_strategy="steps", eval_steps=3)
    first = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "a", seed=1, data_seed=7, **common))
    second = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "b", seed=2, data_seed=7, **common))
    other = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "c", seed=1, data_seed=8, **common))
    assert [h["loss"] for h in train_lines(first)] == [h["loss"] for h in train_lines(second)]
    assert eval_lines(first)[-1]["eval_loss"] == eval_lines(second)[-1]["eval_loss"]  # the same held-out rows
    assert [h["loss"] for h in train_lines(first)] != [h["loss"] for h in train_lines(other)]
    lora = dict(use_peft=True, lora_dropout=0.0, **common)
    lora_a = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "d", seed=1, data_seed=7, **lora))
    lora_b = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "e", seed=2, data_seed=7, **lora))
    assert [h["loss"] for h in train_lines(lora_a)][1:] != [h["loss"] for h in train_lines(lora_b)][1:]


@pytest.mark.slow  # two processes
def test_best_model_and_early_stopping_under_two_processes_equal_one(tiny_model_dir, tmp_path):
    """Under DDP every process stops at the same step and loads the same best checkpoint: the saved model equals
    the one-process run's, which is that run's best checkpoint."""
    import json
    import os
    import subprocess
    import sys

    import torch
    from conftest import conversations, write_jsonl
    from safetensors.torch import load_file

    data_file = write_jsonl(tmp_path / "chat.jsonl", conversations(30, seed=5))
    settings = dict(max_steps=6, eval_ratio=0.2, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                    save_steps=1, load_best_model_at_end=True, greater_is_better=True, early_stopping_patience=2,
                    padding_free=False)
    flags = [part for key, value in settings.items() for part in (f"--{key}", str(value).lower())]
    ddp = subprocess.run([sys.executable, "-m", "sftune", "train", "--model_name_or_path", str(tiny_model_dir),
                          "--dataset_name", str(data_file), "--output_dir", str(tmp_path / "ddp"), "--learning_rate",
                          "1e-3", "--logging_steps", "1", "--max_length", "128", "--per_device_train_batch_size", "2",
                          "--gradient_accumulation_steps", "2", "--num_processes", "2", *flags],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "8 rows per step (2 x 2 accumulation x 2 processes)" in ddp.stderr
    single = train(tiny_config(tiny_model_dir, data_file, tmp_path / "one", per_device_train_batch_size=8,
                               **settings))
    lines = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    summary = [line for line in lines if "best_model_step" in line][-1]
    expected = [h for h in single.history if "best_model_step" in h][-1]
    assert single.global_step < 6 and summary["step"] == expected["step"] == single.global_step
    assert summary["best_model_step"] == expected["best_model_step"]
    two, one = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    best = load_file(tmp_path / "one" / f"checkpoint-{expected['best_model_step']}" / "model.safetensors")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)
        assert torch.equal(one[name], best[name])
