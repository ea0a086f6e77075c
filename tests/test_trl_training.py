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
    plain = train(tiny_config(tiny_model_dir, chat_jsonl, tmp_path / "plain", **common))
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
