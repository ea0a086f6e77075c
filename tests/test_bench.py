"""The benchmark's own arithmetic: trained-token counting, model FLOPs, the summary table, the settings it gives
each tool. (The timed comparison itself lives in bench/compare_trl.py and is never run by the suite.)"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from sftune import SFTConfig

BENCH = Path(__file__).resolve().parents[1] / "bench" / "compare_trl.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("compare_trl", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_trl"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_trained_positions_skip_each_documents_first_token_and_masked_labels(bench):
    assert bench._trained_positions([[4], [3]]) == 3 + 2
    assert bench._trained_positions([[2, 3]]) == 1 + 2  # a packed row of two documents
    labels = [[-100, -100, 7, 8, 5, 6, -100]]  # documents of 4 and 3 tokens
    assert bench._trained_positions([[4, 3]], labels) == 2 + 1  # 7, 8 | 6 (5 starts its document: no target)


def test_flops_per_token_full_and_lora(bench):
    params = {"layers": 100, "head": 20, "lora": 5}
    assert bench.flops_per_token(params, "a") == 6 * 120
    assert bench.flops_per_token(params, "b") == 4 * 120 + 6 * 5


def test_lora_parameters_count_every_targeted_projection(bench, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = sum(16 * (m.in_features + m.out_features) for name, m in model.named_modules()
                   if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
    assert bench.lora_parameters(model) == expected > 0
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=16, target_modules=bench.LORA["targets"]))
    assert sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n) == expected


def test_summary_medians_ratios_and_table(bench):
    runs = [bench.RunResult("sftune", "a", wall_seconds=w, train_seconds=10, trained_tokens=t, peak_rss_mb=1000)
            for w, t in ((10, 100), (12, 200), (30, 300))]
    runs += [bench.RunResult("trl", "a", wall_seconds=w, train_seconds=10, trained_tokens=100, peak_rss_mb=2000)
             for w in (20, 24, 60)]
    runs.append(bench.RunResult("trl", "a", error="boom"))  # failed runs are left out
    params = {"layers": 10, "head": 0, "lora": 0}
    (row,) = bench.summarize(runs, ["a"], params, machine_gflops=1e-6, peak_label="matmul rate")
    assert row["sftune"]["runs"] == row["trl"]["runs"] == 3
    assert row["ratio"]["wall_s"] == pytest.approx(12 / 24)
    assert row["ratio"]["tokens_per_s"] == pytest.approx(20 / 10)
    assert row["ratio"]["peak_rss_mb"] == pytest.approx(0.5)
    assert row["sftune"]["flops_fraction"] == pytest.approx(20 * 60 / 1e3)
    assert math.isnan(row["ratio"]["peak_gpu_mb"])
    table = bench.markdown_table([row], gpu=False, peak_label="matmul rate")
    assert "| a: loss on all tokens | 3/3 | 12.0 / 24.0 | 0.50 | 20.0 / 10.0 | 2.00 | 1000 / 2000 | 0.50 |" in table


@pytest.mark.parametrize("scenario", ["a", "b", "c", "d", "e", "eg"])
def test_settings_are_valid_and_alike(bench, scenario):
    job = bench.Job("sftune", scenario, "model", "data.jsonl", "out", 512, 1)
    ours = SFTConfig(**bench.sftune_settings(job))  # every key is an sftune field with a valid value
    theirs = bench.trl_settings(job)
    assert ours.num_train_epochs == theirs["num_train_epochs"] == 1
    if scenario != "d":  # d: each tool's own defaults
        for key in ("max_length", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                    "seed", "optim", "gradient_checkpointing"):
            assert getattr(ours, key) == theirs[key], key
        assert ours.save_strategy == theirs["save_strategy"] == "no"
    assert ours.assistant_only_loss == theirs.get("assistant_only_loss", False)


def test_assistant_template_marks_exactly_the_assistant_turns(bench, smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    template = bench.assistant_template(tokenizer.chat_template)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}]
    plain = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template) == plain
    out = tokenizer.apply_chat_template(messages, chat_template=template, return_assistant_tokens_mask=True,
                                        return_dict=True)
    trained = tokenizer.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert trained == "hello<|im_end|>see you<|im_end|>"
