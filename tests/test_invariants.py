"""The shortcuts training takes are proven equal to the plain way, on real padding, over several optimizer steps.

Each test runs two (or three) genuinely different computations of the same update and checks per-step losses,
gradient norms and the final weights within 1e-5 (fp32, CPU). Each also asserts the runs took different paths
(how many forwards a step made, whether padding was there), so that a changed default can never make a test
compare a run with itself. Gradient norms are compared because AdamW hides a uniform scale of the gradient: a
wrong normalisation factor shows in the norm long before it shows in the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import conversations, write_jsonl

from sftune import SFTConfig, train
from sftune.training import loss as loss_module

ATOL = 1e-5


@dataclass
class Forward:
    rows: int
    width: int
    padding: int  # positions that are padding (attention_mask 0)
    positions_restart: bool  # position_ids restart inside a row (packed documents)


@pytest.fixture
def forwards(monkeypatch):
    """Every training forward of the loss model, as (rows, width, padding, restarting positions)."""
    seen: list[Forward] = []
    original = loss_module.CausalLMWithLoss.forward

    def spy(self, input_ids, targets, attention_mask=None, position_ids=None, **model_inputs):
        if self.training:
            padding = int((attention_mask == 0).sum()) if attention_mask is not None else 0
            restart = position_ids is not None and bool((position_ids[:, 1:] == 0).any())
            seen.append(Forward(input_ids.shape[0], input_ids.shape[1], padding, restart))
        return original(self, input_ids, targets, attention_mask, position_ids, **model_inputs)

    monkeypatch.setattr(loss_module.CausalLMWithLoss, "forward", spy)
    return seen


@pytest.fixture(scope="module")
def varied_rows(tmp_path_factory):
    """Conversations of 1 to 3 turns: rows from about 15 to 110 tokens, so padded batches carry real padding."""
    return write_jsonl(tmp_path_factory.mktemp("varied") / "chat.jsonl", conversations(24, seed=8))


def config(model_dir, data, out, **overrides) -> SFTConfig:
    settings = dict(model_name_or_path=str(model_dir), dataset_name=str(data), output_dir=str(out),
                    learning_rate=1e-3, max_steps=5, logging_steps=1, max_length=128, save_strategy="no",
                    attn_implementation="sdpa")
    settings.update(overrides)
    return SFTConfig(**settings)


def run(forwards, *args, **overrides):
    """Train, returning the result and the forwards that training made."""
    start = len(forwards)
    result = train(config(*args, **overrides))
    return result, forwards[start:]


def assert_same_training(a, b):
    for key in ("loss", "grad_norm"):
        ours, theirs = [e[key] for e in a.history if key in e], [e[key] for e in b.history if key in e]
        assert len(ours) == len(theirs) > 1
        np.testing.assert_allclose(ours, theirs, rtol=ATOL, atol=ATOL, err_msg=key)
    assert [e["num_tokens"] for e in a.history if "loss" in e] == [e["num_tokens"] for e in b.history if "loss" in e]
    for (name, x), (_, y) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=ATOL, msg=name)


def test_gradient_accumulation_equals_one_big_batch(tiny_model_dir, varied_rows, tmp_path, forwards):
    """Padded batch 8 x accumulation 1, batch 2 x 4 and batch 1 x 8: the same rows per step, the same update."""
    args = (tiny_model_dir, varied_rows)
    big, big_forwards = run(forwards, *args, tmp_path / "8x1", padding_free=False, per_device_train_batch_size=8)
    quarter, quarter_forwards = run(forwards, *args, tmp_path / "2x4", padding_free=False,
                                    per_device_train_batch_size=2, gradient_accumulation_steps=4)
    single, single_forwards = run(forwards, *args, tmp_path / "1x8", padding_free=False,
                                  per_device_train_batch_size=1, gradient_accumulation_steps=8)
    assert big.plan.layout == quarter.plan.layout == single.plan.layout == "padded"
    assert [len(f) for f in (big_forwards, quarter_forwards, single_forwards)] == [5, 20, 40]
    assert all(f.rows == 8 for f in big_forwards) and sum(f.padding for f in big_forwards) > 0
    assert all(f.rows == 1 and f.padding == 0 for f in single_forwards)
    assert_same_training(big, quarter)
    assert_same_training(big, single)


def test_padding_free_equals_padded_batches(tiny_model_dir, varied_rows, tmp_path, forwards):
    """padding_free on sdpa runs each row alone (no padding): the same losses, evaluation and weights as padded."""
    settings = dict(per_device_train_batch_size=8, eval_strategy="steps", eval_steps=5, eval_ratio=0.2)
    padded, padded_forwards = run(forwards, tiny_model_dir, varied_rows, tmp_path / "padded", padding_free=False,
                                  **settings)
    free, free_forwards = run(forwards, tiny_model_dir, varied_rows, tmp_path / "free", padding_free=True, **settings)
    assert (padded.plan.layout, free.plan.layout) == ("padded", "rows")
    assert len(padded_forwards) == 5 and sum(f.padding for f in padded_forwards) > 0
    assert len(free_forwards) == sum(f.rows for f in padded_forwards)  # one forward per row
    assert all(f.rows == 1 and f.padding == 0 for f in free_forwards)
    assert_same_training(padded, free)
    ours, theirs = ([e["eval_loss"] for e in r.history if "eval_loss" in e] for r in (free, padded))
    assert len(ours) == len(theirs) == 1
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)


def test_packed_equals_unpacked(tiny_model_dir, varied_rows, tmp_path, forwards):
    """Every step holds the whole dataset (one step per epoch), once packed into rows of 128 tokens and once as
    padded rows: packed documents see only themselves, so the update is the same."""
    settings = dict(per_device_train_batch_size=24, max_steps=3)
    unpacked, unpacked_forwards = run(forwards, tiny_model_dir, varied_rows, tmp_path / "unpacked",
                                      padding_free=False, **settings)
    packed, packed_forwards = run(forwards, tiny_model_dir, varied_rows, tmp_path / "packed", packing=True,
                                  **settings)
    assert (unpacked.plan.layout, packed.plan.layout) == ("padded", "packed")
    rows = packed.data_stats["rows"]
    assert rows < packed.data_stats["documents"] == unpacked.data_stats["rows"] == 24
    assert [f.rows for f in unpacked_forwards] == [24] * 3 and [f.rows for f in packed_forwards] == [rows] * 3
    assert all(f.positions_restart for f in packed_forwards) and sum(f.padding for f in unpacked_forwards) > 0
    assert_same_training(unpacked, packed)
