"""Mixed precision (issue 13): fp32 master weights under bf16 / fp16 autocast, bf16 weights that keep their updates
(Kahan-compensated AdamW), files saved in the checkpoint's dtype, exact resume, and the plan's choices and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_model, build_tokenizer, conversations, write_jsonl
from safetensors.torch import load_file

from sftune import SFTConfig, train
from sftune.errors import ConfigError
from sftune.precision import apply_precision, plan_precision
from sftune.training.checkpoint import MASTER_WEIGHTS


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama saved in bf16, as almost every checkpoint on the Hub is."""
    folder = tmp_path_factory.mktemp("tiny-bf16")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(folder)
    model = build_model(len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", conversations(32, seed=5))


def config_for(model_dir, data, output_dir, **overrides) -> SFTConfig:
    settings = dict(model_name_or_path=str(model_dir), dataset_name=str(data), output_dir=str(output_dir),
                    learning_rate=1e-3, max_steps=4, logging_steps=1, per_device_train_batch_size=4,
                    max_length=64, save_strategy="no")
    settings.update(overrides)
    return SFTConfig(**settings)


def losses(result) -> np.ndarray:
    return np.array([entry["loss"] for entry in result.history if "loss" in entry])


def matrix_fraction_changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Of the matrix weights (2-D), the fraction whose bf16 value differs from the start."""
    changed = total = 0
    for name, start in before.items():
        if start.ndim == 2:
            changed += int((after[name].to(torch.bfloat16) != start.to(torch.bfloat16)).sum())
            total += start.numel()
    return changed / total


# ---------------------------------------------------------------- the 30-step invariant


def test_fp32_masters_and_kahan_keep_small_updates_that_pure_bf16_loses(bf16_model_dir, data_file, tmp_path):
    """30 AdamW steps at lr 2e-5 on a bf16 checkpoint, each run saved in bf16 (the checkpoint's dtype): with fp32
    masters most matrix weights move; with bf16 weights updated in bf16 most updates round away; Kahan-compensated
    AdamW on bf16 weights keeps them, within 10 points of fp32 masters (measured: 82.3%, 25.5%, 82.3%)."""
    start = load_file(bf16_model_dir / "model.safetensors")
    settings = dict(learning_rate=2e-5, lr_scheduler_type="constant", max_steps=30, logging_steps=30)
    fractions, saved = {}, {}
    for name, precision in {"mixed": {"bf16": True}, "pure": {"bf16_weights": "plain"},
                            "kahan": {"bf16_weights": "kahan"}}.items():
        result = train(config_for(bf16_model_dir, data_file, tmp_path / name, **settings, **precision))
        saved[name] = load_file(result.output_dir / "model.safetensors")
        fractions[name] = matrix_fraction_changed(start, saved[name])
        assert {t.dtype for t in saved[name].values()} == {torch.bfloat16}, name  # saved in the checkpoint's dtype
        trained = {p.dtype for p in result.model.parameters()}
        assert trained == ({torch.float32} if name == "mixed" else {torch.bfloat16}), name
    assert fractions["mixed"] > 0.6, fractions
    assert fractions["pure"] < 0.4, fractions
    assert abs(fractions["kahan"] - fractions["mixed"]) <= 0.10, fractions


# ---------------------------------------------------------------- bf16 and fp16 autocast


def test_bf16_mixed_precision_tracks_fp32_within_tolerance(tiny_model_dir, data_file, tmp_path):
    """The same 8 steps in fp32 and under CPU bf16 autocast: the losses agree within 2% (bf16 keeps 8 bits of
    mantissa) yet are not equal, so autocast really ran; the masters stay fp32 and the files the checkpoint's fp32."""
    fp32 = train(config_for(tiny_model_dir, data_file, tmp_path / "fp32", max_steps=8))
    bf16 = train(config_for(tiny_model_dir, data_file, tmp_path / "bf16", max_steps=8, bf16=True))
    np.testing.assert_allclose(losses(bf16), losses(fp32), rtol=0.02)
    assert not np.array_equal(losses(bf16), losses(fp32))
    assert losses(bf16)[-1] < losses(bf16)[0]
    assert {p.dtype for p in bf16.model.parameters()} == {torch.float32}
    assert {t.dtype for t in load_file(bf16.output_dir / "model.safetensors").values()} == {torch.float32}


def test_fp16_loss_scaling_skips_an_overflow_step_and_recovers(tiny_model_dir, data_file, tmp_path):
    """A loss scale far too large makes the first steps' fp16 gradients overflow: those updates are skipped and
    counted (skipped_steps), not a non-finite-loss error; the scale comes down and training goes on."""
    from test_engine import build_trainer, prepared_rows

    rows = prepared_rows(tiny_model_dir, data_file)
    trainer, _ = build_trainer(tiny_model_dir, rows, [], tmp_path / "run", fp16=True, max_steps=8,
                               per_device_train_batch_size=4, max_length=64)
    assert trainer.precision.mode == "fp16" and trainer.scaler is not None
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60, backoff_factor=2.0 ** -24)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    history = trainer.fit()
    assert history[-1]["skipped_steps"] == trainer.skipped_steps
    assert np.isfinite([e["loss"] for e in history]).all()
    # 2**60 and 2**36 overflow fp16, 2**12 does not: two steps skipped, then every step updates
    assert trainer.skipped_steps == 2 and trainer.scaler.get_scale() == 2.0 ** 12
    moved = [name for name, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert moved, "no update was ever taken"
    assert history[-1]["loss"] < history[0]["loss"]


def test_fp16_overflow_step_leaves_the_weights_unchanged(tiny_model_dir, data_file, tmp_path):
    from test_engine import build_trainer, prepared_rows

    rows = prepared_rows(tiny_model_dir, data_file)
    trainer, _ = build_trainer(tiny_model_dir, rows, [], tmp_path / "run", fp16=True, max_steps=1,
                               per_device_train_batch_size=4, max_length=64)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.fit()
    assert trainer.skipped_steps == 1 and trainer.scaler.get_scale() == 2.0 ** 59
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


# ---------------------------------------------------------------- checkpoints, resume, merge


@pytest.mark.parametrize("precision", [{"bf16": True}, {"bf16_weights": "kahan"}, {"bf16": True, "use_peft": True}],
                         ids=["bf16-mixed", "kahan", "lora-bf16-mixed"])
def test_resume_under_bf16_precisions_equals_the_uninterrupted_run(precision, bf16_model_dir, data_file, tmp_path):
    """6 steps straight against 3 + checkpoint + resume + 3 on a bf16 checkpoint: the checkpoint's model files
    are bf16; under bf16 autocast its master_weights.safetensors holds the fp32 masters, with Kahan the weights
    are the bf16 files themselves and the compensation is optimizer state. The resumed run ends with exactly the
    same weights and losses."""
    settings = dict(max_steps=6, learning_rate=1e-4, save_strategy="steps", save_steps=3, **precision)
    full = train(config_for(bf16_model_dir, data_file, tmp_path / "full", **settings))
    checkpoint = tmp_path / "full" / "checkpoint-3"
    weights_file = "adapter_model.safetensors" if "use_peft" in precision else "model.safetensors"
    assert {t.dtype for t in load_file(checkpoint / weights_file).values()} == {torch.bfloat16}
    trained_dtype = torch.float32 if "bf16" in precision else torch.bfloat16
    if trained_dtype == torch.float32:
        assert {t.dtype for t in load_file(checkpoint / MASTER_WEIGHTS).values()} == {torch.float32}
    else:
        assert not (checkpoint / MASTER_WEIGHTS).exists()
    resumed = train(config_for(bf16_model_dir, data_file, tmp_path / "resumed",
                               resume_from_checkpoint=str(checkpoint), **settings))
    assert list(losses(resumed)) == list(losses(full))[3:]
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
        assert a.dtype == (trained_dtype if a.requires_grad else torch.bfloat16), name


def test_fp16_resume_restores_the_loss_scale(tiny_model_dir, data_file, tmp_path):
    settings = dict(fp16=True, max_steps=4, save_strategy="steps", save_steps=2)
    full = train(config_for(tiny_model_dir, data_file, tmp_path / "full", **settings))
    import json

    state = json.loads((tmp_path / "full" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["precision"] == "fp16" and state["grad_scaler"]["scale"] > 0
    resumed = train(config_for(tiny_model_dir, data_file, tmp_path / "resumed",
                               resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"), **settings))
    assert list(losses(resumed)) == list(losses(full))[2:]


def test_lora_adapter_and_merge_are_saved_in_the_base_dtype(bf16_model_dir, data_file, tmp_path):
    """LoRA under bf16 autocast on a bf16 base: adapters trained as fp32 masters, saved in bf16; `sftune merge`
    writes bf16 too, and save_dtype: float32 makes both fp32."""
    from sftune.cli import main

    run = train(config_for(bf16_model_dir, data_file, tmp_path / "lora", use_peft=True, bf16=True, max_steps=2))
    trained = {p.dtype for p in run.model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in run.model.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == {torch.bfloat16}
    assert "bf16 mixed precision (fp32 master weights, bf16 autocast)" in (run.output_dir / "README.md").read_text()
    assert {t.dtype for t in load_file(run.output_dir / "adapter_model.safetensors").values()} == {torch.bfloat16}
    assert main(["merge", str(run.output_dir), "--output", str(tmp_path / "merged")]) == 0
    assert {t.dtype for t in load_file(tmp_path / "merged" / "model.safetensors").values()} == {torch.bfloat16}

    wide = train(config_for(bf16_model_dir, data_file, tmp_path / "lora32", use_peft=True, bf16=True, max_steps=2,
                            save_dtype="float32"))
    assert {t.dtype for t in load_file(wide.output_dir / "adapter_model.safetensors").values()} == {torch.float32}
    assert main(["merge", str(wide.output_dir), "--output", str(tmp_path / "merged32")]) == 0
    merged = load_file(tmp_path / "merged32" / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.float32}
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged32", dtype="auto").dtype == torch.float32


def test_saved_full_model_says_its_own_dtype(bf16_model_dir, data_file, tmp_path):
    """fp32 masters saved as bf16 files: config.json says bfloat16, so dtype='auto' loads them as bf16."""
    from transformers import AutoModelForCausalLM

    result = train(config_for(bf16_model_dir, data_file, tmp_path / "run", max_steps=1))
    assert result.model.dtype == torch.float32  # fp32 on CPU, unset: the masters
    assert "schedule), fp32 (weights and compute). Settings" in (result.output_dir / "README.md").read_text()
    assert AutoModelForCausalLM.from_pretrained(result.output_dir, dtype="auto").dtype == torch.bfloat16


# ---------------------------------------------------------------- the plan: defaults, errors, QLoRA


def test_unset_precision_is_chosen_for_the_machine_and_saved(tiny_model_dir, data_file, tmp_path):
    from sftune.config import load_config

    config = SFTConfig()
    assert plan_precision(config, "cpu").mode == "fp32"
    assert plan_precision(config, "cuda", bf16_supported=True).mode == "bf16"
    assert plan_precision(config, "cuda", bf16_supported=False).mode == "fp32"
    assert plan_precision(config, "cuda", bf16_supported=True, launcher="fp16").mode == "fp16"
    assert plan_precision(SFTConfig(bf16=False), "cuda", bf16_supported=True, launcher="bf16").mode == "fp32"
    assert plan_precision(SFTConfig(bf16=True), "cpu").mode == "bf16"
    assert plan_precision(SFTConfig(bf16_weights="kahan"), "cpu").kahan

    result = train(config_for(tiny_model_dir, data_file, tmp_path / "run", max_steps=1))
    saved = load_config(result.output_dir / "sftune_config.yaml")
    assert (saved.bf16, saved.fp16) == (False, False)  # the machine's choice, written down


@pytest.mark.parametrize("settings,message", [
    ({"bf16": True, "fp16": True}, "'bf16' and 'fp16' are both true: keep one of them"),
    ({"bf16_weights": "kahan", "fp16": True}, "'bf16_weights' = 'kahan' trains in bf16, but fp16 is true"),
    ({"bf16_weights": "plain", "bf16": False}, "but bf16 is false"),
    ({"bf16_weights": "kahan", "optim": "sgd"}, "set optim: adamw_torch, or drop bf16_weights"),
    ({"save_dtype": "int8"}, "'save_dtype' = 'int8': expected one of auto, float32, bfloat16, float16"),
])
def test_contradictory_precision_keys_are_one_line_errors(settings, message):
    with pytest.raises(ConfigError) as caught:
        SFTConfig(**settings)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_machine_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match="config key 'bf16' asks for bf16, but this cuda device has no bf16 support"):
        plan_precision(SFTConfig(bf16=True), "cuda", bf16_supported=False)
    with pytest.raises(ConfigError, match="'bf16_weights' asks for bf16"):
        plan_precision(SFTConfig(bf16_weights="kahan"), "cuda", bf16_supported=False)
    with pytest.raises(ConfigError, match="fp16: true is not supported under FSDP"):
        plan_precision(SFTConfig(fp16=True), "cuda", engine="fsdp")


def test_apply_precision_upcasts_trained_weights_and_keeps_ties():
    model = build_model(100, tie_word_embeddings=True).to(torch.bfloat16)
    model.model.layers[0].mlp.requires_grad_(False)  # a frozen part keeps the loaded dtype under mixed precision
    loaded = apply_precision(model, plan_precision(SFTConfig(bf16=True), "cpu"))
    assert loaded == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.up_proj.weight.dtype == torch.float32
    apply_precision(model, plan_precision(SFTConfig(), "cpu"))  # fp32: frozen weights too
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("bf16", [True, False])
def test_qlora_compute_dtype_follows_the_precision(bf16, bf16_model_dir, data_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    import warnings

    import bitsandbytes as bnb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(config_for(bf16_model_dir, data_file, tmp_path / "run", use_peft=True, load_in_4bit=True,
                                  bf16=bf16, max_steps=2))
    base = result.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base, bnb.nn.Linear4bit)
    assert base.compute_dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert {p.dtype for p in result.model.parameters() if p.requires_grad} == {torch.float32}  # fp32 masters
    assert np.isfinite(losses(result)).all()
    assert {t.dtype for t in load_file(result.output_dir / "adapter_model.safetensors").values()} == {torch.bfloat16}


def test_trl_style_flags_on_the_command_line():
    """`--bf16` alone means true, as in TRL's CLI; `--bf16_weights kahan` and `--save_dtype` parse too."""
    from sftune.cli import _parse

    _, overrides = _parse(["train", "--model_name_or_path", "m", "--bf16", "--save_dtype", "float32"])
    config = SFTConfig.from_dict(overrides)
    assert (config.bf16, config.fp16, config.save_dtype) == (True, False, "float32")
    _, overrides = _parse(["train", "--bf16_weights", "kahan", "--fp16", "false"])
    assert SFTConfig.from_dict(overrides).bf16_weights == "kahan"


def test_vision_language_model_trains_under_bf16_autocast(tiny_llava_dir, tmp_path):
    """Image batches arrive in fp32 and meet fp32 masters under bf16 autocast: the loss falls, the files stay fp32
    (the tiny LLaVA's own dtype)."""
    from conftest import random_images
    from vision_families import assistant, user

    (tmp_path / "img").mkdir()
    for i, image in enumerate(random_images(2)):
        image.save(tmp_path / "img" / f"{i}.png")
    rows = [{"images": [f"img/{i}.png"], "messages": [user(None, "what is this"), assistant(answer)]}
            for i, answer in enumerate(["a cat on the mat", "a dog in the rain"])]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    result = train(SFTConfig(model_name_or_path=str(tiny_llava_dir), dataset_name=str(data), max_length=128,
                             output_dir=str(tmp_path / "run"), report_to=["none"], max_steps=4, logging_steps=1,
                             learning_rate=3e-3, per_device_train_batch_size=2, bf16=True, save_strategy="no"))
    assert losses(result)[-1] < losses(result)[0]
    assert {t.dtype for t in load_file(result.output_dir / "model.safetensors").values()} == {torch.float32}


def test_a_resume_with_precision_unset_keeps_the_precision_its_run_chose(tiny_model_dir, data_file, tmp_path):
    """A run whose machine chose bf16 (here: set, as a GPU would choose it), resumed by a config that leaves the
    precision unset: it continues under bf16 autocast, so its steps equal the uninterrupted run's exactly (under
    the fp32 this CPU would choose they would not)."""
    from sftune.config import load_config

    full = train(config_for(tiny_model_dir, data_file, tmp_path / "full", bf16=True, max_steps=4,
                            save_strategy="steps", save_steps=2))
    resumed = train(config_for(tiny_model_dir, data_file, tmp_path / "resumed", max_steps=4, save_strategy="steps",
                               save_steps=2, resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2")))
    assert list(losses(resumed)) == list(losses(full))[2:]
    assert load_config(resumed.output_dir / "sftune_config.yaml").bf16 is True
