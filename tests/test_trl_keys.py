"""All 163 keys of `trl sft` (TRL 1.16, transformers 5.24): each is accepted with TRL's meaning, accepted and
ignored (logged once), or refused in one line; none is an unknown key. Expectations come from the table in
config/trl.py and from the schema's fields, so a key another branch implements turns into a field with no edit."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from sftune import SFTConfig
from sftune.config.fields import default_of
from sftune.config.trl import (
    ALIAS, DEFAULTS_UNLIKE_TRL, FIELD, INERT, NOT_YET, REFUSED, TRL_KEYS, accepts_as_no_op, defaults_unlike_trl,
    effective_status, log_compatibility,
)
from sftune.config.compat import ALIASES
from sftune.errors import ConfigError

FIELDS = frozenset(f.name for f in dataclasses.fields(SFTConfig))

# A value a TRL user may set for each key (not its default), and the keys a valid config needs beside it.
EXAMPLES: dict[str, tuple] = {
    # SFTConfig
    "learning_rate": (1e-4,), "model_init_kwargs": ({"attn_implementation": "sdpa"},),
    "trust_remote_code": (True,), "router_aux_loss_coef": (0.01,), "chat_template_path": ("template.jinja",),
    "dataset_text_field": ("content",), "dataset_kwargs": ({"skip_prepare_dataset": True},),
    "dataset_num_proc": (4,), "eos_token": ("<|im_end|>",), "max_length": (2048,), "truncation_mode": ("keep_end",),
    "shuffle_dataset": (True,), "packing": (True,), "packing_strategy": ("wrapped",), "padding_free": (True,),
    "pad_to_multiple_of": (8,), "eval_packing": (False,), "completion_only_loss": (False,),
    "assistant_only_loss": (True,), "loss_type": ("dft",), "activation_offloading": (True,), "pad_token": ("<pad>",),
    # _BaseConfig
    "logging_steps": (0.05,), "gradient_checkpointing": (False,), "bf16": (True,),
    "lr_scheduler_kwargs": ({"min_lr_rate": 0.1},), "use_liger_kernel": (True,), "torch_empty_cache_steps": (10,),
    # TrainingArguments
    "output_dir": ("out",), "per_device_train_batch_size": (4,), "num_train_epochs": (1.0,), "max_steps": (100,),
    "lr_scheduler_type": ("cosine",), "warmup_steps": (0.03,), "optim": ("adamw_torch",),
    "optim_args": ("betas=(0.9,0.95)",), "weight_decay": (0.01,), "adam_beta1": (0.8,), "adam_beta2": (0.95,),
    "adam_epsilon": (1e-6,), "optim_target_modules": (["attn"],), "gradient_accumulation_steps": (4,),
    "average_tokens_across_devices": (False,), "max_grad_norm": (0.5,), "label_smoothing_factor": (0.1,),
    "fp16": (True,), "bf16_full_eval": (True,), "fp16_full_eval": (True,), "tf32": (True,),
    "activation_checkpointing": (True,), "activation_checkpointing_kwargs": ({"use_reentrant": True},),
    "gradient_checkpointing_kwargs": ({"use_reentrant": True},), "torch_compile": (True,),
    "torch_compile_backend": ("aot_eager",), "torch_compile_mode": ("max-autotune",),
    "liger_kernel_config": ({"rope": True},), "use_cache": (True,), "neftune_noise_alpha": (5.0,),
    "auto_find_batch_size": (True,), "logging_strategy": ("epoch",), "logging_first_step": (True,),
    "log_on_each_node": (False,), "logging_nan_inf_filter": (False,), "include_num_input_tokens_seen": ("all",),
    "log_level": ("info",), "log_level_replica": ("error",), "disable_tqdm": (True,), "report_to": (["tensorboard"],),
    "run_name": ("my-run",), "project": ("sft",), "trackio_space_id": ("me/space",),
    "trackio_bucket_id": ("me/bucket",), "trackio_static_space_id": ("me/static",),
    "eval_strategy": ("steps", {"eval_ratio": 0.1}), "eval_steps": (0.25,), "eval_delay": (2,),
    "per_device_eval_batch_size": (16,), "prediction_loss_only": (True,), "eval_on_start": (True,),
    "eval_do_concat_batches": (False,), "eval_use_gather_object": (True,), "eval_accumulation_steps": (4,),
    "include_for_metrics": (["inputs"],), "batch_eval_metrics": (True,), "save_only_model": (True,),
    "save_strategy": ("epoch",), "save_steps": (0.5,), "save_on_each_node": (True,), "save_total_limit": (2,),
    "enable_jit_checkpoint": (True,), "push_to_hub": (True,), "hub_token": ("hf_xxx",), "hub_private_repo": (True,),
    "hub_model_id": ("me/model",), "hub_strategy": ("checkpoint",), "hub_always_push": (True,),
    "hub_revision": ("dev",), "load_best_model_at_end": (True, {"eval_strategy": "steps", "eval_ratio": 0.1}), "metric_for_best_model": ("eval_loss",),
    "greater_is_better": (False,), "ignore_data_skip": (True,), "restore_callback_states_from_checkpoint": (True,),
    "full_determinism": (True,), "seed": (7,), "data_seed": (3,), "use_cpu": (True,),
    "accelerator_config": ({"split_batches": True},), "parallelism_config": ({"cp_size": 2},),
    "dataloader_drop_last": (True,), "dataloader_num_workers": (4,), "dataloader_pin_memory": (False,),
    "dataloader_persistent_workers": (True,), "dataloader_prefetch_factor": (2,),
    "dataloader_multiprocessing_context": ("spawn",), "dataloader_in_order": (False,),
    "remove_unused_columns": (False,), "label_names": (["labels"],), "train_sampling_strategy": ("group_by_length",),
    "length_column_name": ("n_tokens",), "ddp_find_unused_parameters": (False,), "ddp_bucket_cap_mb": (25,),
    "ddp_broadcast_buffers": (False,), "ddp_static_graph": (True,), "ddp_backend": ("gloo",), "ddp_timeout": (600,),
    "fsdp": ("full_shard auto_wrap",), "fsdp_config": ({"version": 2},), "deepspeed": ("zero3.json",),
    "debug": ("underflow_overflow",), "skip_memory_metrics": (False,), "do_train": (True,), "do_eval": (True,),
    "do_predict": (True,), "resume_from_checkpoint": ("out/checkpoint-10",), "local_rank": (0,),
    # ModelConfig
    "model_name_or_path": ("Qwen/Qwen3-0.6B",), "model_revision": ("v1",), "dtype": ("bfloat16",),
    "attn_implementation": ("sdpa",), "use_peft": (True,), "lora_r": (8,), "lora_alpha": (16,),
    "lora_dropout": (0.1,), "lora_target_modules": (["q_proj", "v_proj"],),
    "lora_target_parameters": (["mlp.experts.gate_up_proj"], {"use_peft": True, "lora_dropout": 0.0}), "lora_modules_to_save": (["lm_head"],),
    "lora_task_type": ("SEQ_CLS",), "use_rslora": (True,), "use_dora": (True,),
    "load_in_8bit": (True, {"use_peft": True}), "load_in_4bit": (True, {"use_peft": True}),
    "bnb_4bit_quant_type": ("fp4",), "use_bnb_nested_quant": (True,), "bnb_4bit_quant_storage": ("bfloat16",),
    # ScriptArguments
    "dataset_name": ("trl-lib/Capybara",), "dataset_config": ("default",), "dataset_train_split": ("train_sft",),
    "dataset_test_split": ("test_sft",), "dataset_streaming": (True,), "ignore_bias_buffers": (True,),
    # DatasetMixtureConfig
    "datasets": ([{"path": "a.jsonl"}],), "streaming": (True,), "test_split_size": (0.1,),
}


def test_the_table_holds_every_key_of_trl_sft_once():
    names = [key.name for key in TRL_KEYS]
    assert len(names) == 163 == len(set(names))
    counts = {origin: sum(key.origin == origin for key in TRL_KEYS) for origin in {key.origin for key in TRL_KEYS}}
    assert counts == {"SFTConfig": 22, "_BaseConfig": 6, "TrainingArguments": 107, "ModelConfig": 19,
                      "ScriptArguments": 6, "DatasetMixtureConfig": 3}
    assert set(EXAMPLES) == set(names)
    for key in TRL_KEYS:  # a field row names a real field, an alias row a real alias of one
        assert key.status != FIELD or key.name in FIELDS, key.name
        assert key.status != ALIAS or (ALIASES[key.name].target == key.note and key.note in FIELDS), key.name
        assert key.status not in (INERT, REFUSED) or key.note, key.name


@pytest.mark.parametrize("key", TRL_KEYS, ids=lambda key: key.name)
def test_trls_default_is_accepted(key):
    """A TRL config that spells out a default (as `trl sft` dumps do) runs."""
    config = SFTConfig.from_dict({key.name: key.trl_default})
    if effective_status(key, FIELDS) == INERT:
        assert key.name in config.ignored_keys


@pytest.mark.parametrize("key", TRL_KEYS, ids=lambda key: key.name)
def test_each_trl_key_is_taken_or_refused_as_the_table_says(key):
    value, *extra = EXAMPLES[key.name]
    values = {key.name: value, **(extra[0] if extra else {})}
    status = effective_status(key, FIELDS)
    refused = status in (REFUSED, NOT_YET) or (status == INERT and not accepts_as_no_op(key, value))
    if refused:
        with pytest.raises(ConfigError) as caught:
            SFTConfig.from_dict(values)
        message = str(caught.value)
        assert "unknown key" not in message and "\n" not in message
        assert f"key '{key.name}' = {value!r} is not supported" in message
        assert (key.note in message) if status != NOT_YET else f"not supported yet ({key.note})" in message
        return
    config = SFTConfig.from_dict(values)
    if status == INERT:
        assert config.ignored_keys == {key.name: value}
    else:
        target = ALIASES[key.name].target if status == ALIAS else key.name
        assert getattr(config, target) == value or (key.name, value) in TAKEN_AS, key.name


# Values a field keeps in another form (its resolved meaning), checked here instead.
TAKEN_AS = {("datasets", None)}


def test_values_taken_in_another_form():
    assert SFTConfig(report_to="tensorboard").report_to == ["tensorboard"]
    assert SFTConfig(datasets=[]).datasets is None  # TRL's default: no mixture
    assert SFTConfig(lr_scheduler_kwargs=None).lr_scheduler_kwargs is None
    assert SFTConfig(loss_type="chunked_nll").loss_type == "nll"  # TRL's older name of its (chunked) nll


def test_a_not_yet_key_becomes_a_field_once_sftune_has_one():
    pending = [key for key in TRL_KEYS if key.status == NOT_YET]
    assert pending
    for key in pending:
        assert effective_status(key, FIELDS | {key.name}) == FIELD
        assert effective_status(key, FIELDS) == (FIELD if key.name in FIELDS else NOT_YET)


def test_old_names_are_aliases_with_their_meaning():
    config = SFTConfig(warmup_ratio=0.1, group_by_length=True, gradient_checkpointing=True, max_seq_length=64,
                       torch_dtype="float32", gradient_checkpointing_kwargs={"use_reentrant": True})
    assert (config.warmup_steps, config.train_sampling_strategy, config.activation_checkpointing) == \
        (0.1, "group_by_length", True)
    assert (config.max_length, config.dtype, config.activation_checkpointing_kwargs) == \
        (64, "float32", {"use_reentrant": True})
    assert config.gradient_checkpointing and config.group_by_length  # read by their old names too
    assert SFTConfig(warmup_ratio=0.0).warmup_steps == 0
    assert SFTConfig(group_by_length="false").train_sampling_strategy == "random"
    with pytest.raises(ConfigError, match="'warmup_ratio' = 1.5: must be in"):
        SFTConfig(warmup_ratio=1.5)
    with pytest.raises(ConfigError, match="given twice"):
        SFTConfig(gradient_checkpointing=True, activation_checkpointing=False)


def test_defaults_differ_from_trl_only_where_the_table_says():
    """Every sftune field has TRL's default, except the differences --help and the log name (each real)."""
    defaults = {f.name: default_of(f) for f in dataclasses.fields(SFTConfig)}
    same_meaning = {  # spelled otherwise, meaning TRL's default
        "learning_rate": None,  # unset resolves to TRL's 2e-5 (2e-4 with use_peft, logged and in --help)
        "lr_scheduler_kwargs": {}, "report_to": ["none"], "datasets": None,
        "padding_free": None,  # unset: chosen per machine; the batching plan's log line says so
        "pad_to_multiple_of": None,  # TRL's "auto" pads only on AWS Neuron
        "metric_for_best_model": "eval_loss",  # TRL's None: the loss
    }
    for key in TRL_KEYS:
        if effective_status(key, FIELDS) != FIELD or key.name in DEFAULTS_UNLIKE_TRL:
            continue
        expected = same_meaning.get(key.name, key.trl_default)
        assert defaults[key.name] == expected, key.name
    for name in DEFAULTS_UNLIKE_TRL:
        trl_default = next(key.trl_default for key in TRL_KEYS if key.name == name)
        assert defaults[name] != trl_default, name


def test_the_log_names_ignored_keys_once_and_only_real_default_differences(caplog):
    log = logging.getLogger("sftune.test")
    config = SFTConfig(do_train=True, ddp_timeout=60, dataloader_num_workers=2, log_level="info")
    with caplog.at_level(logging.INFO, logger="sftune.test"):
        log_compatibility(config, log)
    lines = [record.getMessage() for record in caplog.records]
    ignored = [line for line in lines if line.startswith("ignored TRL keys")]
    assert len(ignored) == 1
    for name in ("do_train", "ddp_timeout", "dataloader_num_workers", "log_level"):
        assert ignored[0].count(name) == 1
    assert "sftune train --num_processes" in ignored[0]  # the reason, said once for the ddp keys
    assert any("activation_checkpointing false (TRL: true)" in line and "dtype auto (TRL: float32)" in line
               for line in lines)
    # set as TRL has them: nothing to say; no learning rate line either (2e-5 is TRL's too)
    assert defaults_unlike_trl(SFTConfig(dtype="float32", activation_checkpointing=True)) == []
    assert defaults_unlike_trl(SFTConfig(dtype="float32", activation_checkpointing=True, eval_strategy="steps")) \
        == ["dataset_test_split unset (TRL: test)"]


def test_help_keeps_trls_inert_keys_in_one_short_section(capsys):
    from sftune.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "accepted for TRL compatibility" in text
    section = text[text.index("accepted for TRL compatibility"):]
    assert "ddp_timeout" in section and "--ddp_timeout" not in text and "--do_train" not in text
    for name in DEFAULTS_UNLIKE_TRL:  # each difference is said in its field's help
        help_line = text[text.index(f"--{name} "):][:600]
        assert "unlike trl" in help_line.lower(), name


def test_trl_keys_work_as_flags(tmp_path):
    from sftune.config import load_config

    config = load_config(None, {"do_train": "true", "warmup_ratio": "0.2", "gradient_checkpointing": "true"})
    assert config.ignored_keys == {"do_train": "true"} and config.warmup_steps == 0.2
    assert config.activation_checkpointing
