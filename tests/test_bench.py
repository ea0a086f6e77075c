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
    assert table.splitlines()[0].endswith("| precision |") and table.splitlines()[2].endswith("| fp32 |")


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


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "pure-bf16"])
def test_both_tools_train_in_the_same_precision(bench, precision):
    """TRL's fp32 masters come from loading in fp32 (its bf16 flag only autocasts); sftune's from its own plan."""
    from sftune.precision import plan_precision

    job = bench.Job("sftune", "a", "model", "data.jsonl", "out", 512, 1, dtype="bfloat16", precision=precision)
    ours, theirs = SFTConfig(**bench.sftune_settings(job)), bench.trl_settings(job)
    assert theirs["bf16"] == (precision != "fp32")
    assert theirs["model_init_kwargs"]["dtype"] == ("bfloat16" if precision == "pure-bf16" else "float32")
    mode = plan_precision(ours, "cuda", bf16_supported=True).mode
    assert mode == {"fp32": "fp32", "bf16-mixed": "bf16", "pure-bf16": "bf16_plain"}[precision]


def test_precision_bench_table():
    spec = importlib.util.spec_from_file_location("precision_bench", BENCH.parent / "precision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    runs = [{"precision": "bf16-mixed", "tokens_per_s": t, "peak_memory_mb": 1000, "loss": 2.0, "changed": 0.8}
            for t in (100, 300, 200)]
    runs += [{"precision": "kahan", "tokens_per_s": 100, "peak_memory_mb": 600, "loss": 2.0, "changed": 0.78},
             {"precision": "kahan", "error": "boom"}]
    rows = module.summarize(runs, ["bf16-mixed", "kahan"])
    assert [r["runs"] for r in rows] == [3, 1] and rows[0]["tokens_per_s"] == 200
    table = module.markdown_table(rows, gpu=True)
    assert "| kahan | `bf16_weights: kahan` | 1 | 100 | 0.50 | 600 | 0.60 | 2.0000 | 78.0% |" in table
