"""Every top-level key `trl sft` accepts (TRL 1.16 with transformers 5.24: ScriptArguments, SFTConfig, ModelConfig,
DatasetMixtureConfig; 163 keys), and what sftune does with each. This is data, read by the schema (config/schema.py),
`--help` and the run log; a TRL user's YAML meets it first.

Statuses:
- field: sftune has a setting of this name with TRL's meaning.
- alias: accepted and mapped onto an sftune setting of another name (ALIASES below, with any value conversion).
- inert: means nothing for sftune's own loop; accepted, ignored, and listed once in the run log with the reason.
  Where only some values are harmless (`only`), any other value is refused with the reason.
- refused: one line that says why and what to set instead (TRL's default, which asks for nothing, is accepted).
- not_yet: another issue implements it; until then its TRL default is accepted (it asks for nothing) and any other
  value is refused with "not yet: issue N". The status is effective only while sftune has no field of that name:
  once a merge adds the field, the key is simply a field (`effective_status`), with no edit here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sftune.config.compat import ALIASES
from sftune.config.training import SEQUENCE_PARALLEL_UNAVAILABLE

FIELD, ALIAS, INERT, REFUSED, NOT_YET = "field", "alias", "inert", "refused", "not_yet"
ANY = None  # an inert key whose every value is harmless


@dataclass(frozen=True)
class TrlKey:
    name: str
    origin: str  # the TRL / transformers class that declares it
    trl_default: Any
    status: str
    note: str = ""  # alias: the sftune name; inert / refused: why (and what instead); not_yet: the owner issue
    only: tuple | None = ANY  # inert: the values accepted as no-ops (ANY: every value)
    instead: str = ""  # not_yet: what to set meanwhile


SCRIPT, SFT, BASE, TRAINING, MODEL, MIXTURE = (
    "ScriptArguments", "SFTConfig", "_BaseConfig", "TrainingArguments", "ModelConfig", "DatasetMixtureConfig")

# Reasons shared by several inert keys: the log groups the ignored keys by reason, so it stays one short line.
NO_DATALOADER = "rows are prepared before training and batched by sftune's own loop (no DataLoader)"
LAUNCHER = "distributed training is set up by `accelerate launch` (or sftune train --num_processes)"
ONE_LOG = "sftune's log has one level and only the main process writes it"
EVAL_TOTALS = "sftune's evaluation keeps running loss and token totals (no predictions, no compute_metrics)"
FSDP_DS = ("FSDP and DeepSpeed come from accelerate: run `accelerate launch --config_file <fsdp or deepspeed "
           "config> -m sftune train CONFIG`, and remove this key")
TRAINER_ONLY = "a switch of transformers' Trainer script flow: `sftune train` always trains"


def _field(name: str, origin: str, default: Any) -> TrlKey:
    return TrlKey(name, origin, default, FIELD)


def _alias(name: str, origin: str, default: Any, target: str) -> TrlKey:
    return TrlKey(name, origin, default, ALIAS, target)


def _inert(name: str, origin: str, default: Any, why: str, only: tuple | None = ANY) -> TrlKey:
    return TrlKey(name, origin, default, INERT, why, only)


def _refused(name: str, origin: str, default: Any, why: str) -> TrlKey:
    return TrlKey(name, origin, default, REFUSED, why)


def _not_yet(name: str, origin: str, default: Any, issue: str, instead: str = "") -> TrlKey:
    return TrlKey(name, origin, default, NOT_YET, issue, instead=instead)


TRL_KEYS: tuple[TrlKey, ...] = (
    # ---- trl/trainer/sft_config.py: SFTConfig's own fields
    _field("learning_rate", SFT, 2e-5),
    _field("model_init_kwargs", SFT, None),
    _field("trust_remote_code", SFT, False),
    _not_yet("router_aux_loss_coef", SFT, None, "issue 16"),
    _field("chat_template_path", SFT, None),
    _field("dataset_text_field", SFT, "text"),
    _field("dataset_kwargs", SFT, None),
    _field("dataset_num_proc", SFT, None),
    _field("eos_token", SFT, None),
    _field("max_length", SFT, 1024),
    _field("truncation_mode", SFT, "keep_start"),
    _not_yet("shuffle_dataset", SFT, False, "issue 15 (training keys)"),
    _field("packing", SFT, False),
    _field("packing_strategy", SFT, "bfd"),
    _field("padding_free", SFT, False),
    _not_yet("pad_to_multiple_of", SFT, "auto", "issue 15 (training keys)"),
    _not_yet("eval_packing", SFT, None, "issue 15 (training keys)"),
    _field("completion_only_loss", SFT, None),
    _field("assistant_only_loss", SFT, False),
    _field("loss_type", SFT, "nll"),
    _not_yet("activation_offloading", SFT, False, "issue 18"),
    _inert("pad_token", SFT, None, "deprecated in TRL; padding never reaches sftune's loss, and the tokenizer keeps "
           "its own pad token"),
    # ---- trl/trainer/base_config.py: TRL's overrides of TrainingArguments
    _field("logging_steps", BASE, 10),
    _alias("gradient_checkpointing", BASE, True, "activation_checkpointing"),
    _not_yet("bf16", BASE, None, "issue 13", "meanwhile sftune trains in the dtype the model is loaded in: set "
             "`dtype: bfloat16` instead"),
    _field("lr_scheduler_kwargs", BASE, None),
    _field("use_liger_kernel", BASE, False),
    _inert("torch_empty_cache_steps", BASE, None, "sftune never empties the allocator's cache during training"),
    # ---- transformers' TrainingArguments
    _field("output_dir", TRAINING, "trainer_output"),
    _field("per_device_train_batch_size", TRAINING, 8),
    _field("num_train_epochs", TRAINING, 3.0),
    _field("max_steps", TRAINING, -1),
    _field("lr_scheduler_type", TRAINING, "linear"),
    _field("warmup_steps", TRAINING, 0),
    _field("optim", TRAINING, "adamw_torch_fused"),
    _inert("optim_args", TRAINING, None, "sftune's optimizers take adam_beta1, adam_beta2, adam_epsilon and "
           "weight_decay; remove optim_args", only=(None, "")),
    _field("weight_decay", TRAINING, 0.0),
    _field("adam_beta1", TRAINING, 0.9),
    _field("adam_beta2", TRAINING, 0.999),
    _field("adam_epsilon", TRAINING, 1e-8),
    _inert("optim_target_modules", TRAINING, None, "GaLore / APOLLO optimizers are not in sftune: use LoRA "
           "(use_peft: true) to train fewer weights, and remove optim_target_modules", only=(None,)),
    _field("gradient_accumulation_steps", TRAINING, 1),
    _inert("average_tokens_across_devices", TRAINING, True, "sftune always divides a step's loss by the trained "
           "tokens of the whole step on every process; remove it", only=(True,)),
    _field("max_grad_norm", TRAINING, 1.0),
    _not_yet("label_smoothing_factor", TRAINING, 0.0, "issue 15 (training keys)"),
    _not_yet("fp16", TRAINING, False, "issue 13", "meanwhile sftune trains in the dtype the model is loaded in: "
             "set `dtype: float16` instead"),
    _inert("bf16_full_eval", TRAINING, False, "evaluation runs in the dtype training runs in; remove it",
           only=(False,)),
    _inert("fp16_full_eval", TRAINING, False, "evaluation runs in the dtype training runs in; remove it",
           only=(False,)),
    _inert("tf32", TRAINING, None, "sftune leaves TF32 at torch's setting; remove it", only=(None,)),
    _field("activation_checkpointing", TRAINING, True),  # None there: it follows TRL's gradient_checkpointing: true
    _field("activation_checkpointing_kwargs", TRAINING, None),
    _alias("gradient_checkpointing_kwargs", TRAINING, None, "activation_checkpointing_kwargs"),
    _field("torch_compile", TRAINING, False),
    _inert("torch_compile_backend", TRAINING, None, "sftune compiles with torch.compile's defaults (inductor); "
           "remove it", only=(None, "inductor")),
    _inert("torch_compile_mode", TRAINING, None, "sftune compiles with torch.compile's default mode; remove it",
           only=(None, "default")),
    _inert("liger_kernel_config", TRAINING, None, "with use_liger_kernel sftune applies Liger's RMSNorm, RoPE and "
           "SwiGLU kernels and keeps its own chunked loss; remove liger_kernel_config", only=(None,)),
    _inert("use_cache", TRAINING, False, "training runs without a KV cache (packed documents need it off)",
           only=(False,)),
    _not_yet("neftune_noise_alpha", TRAINING, None, "issue 15 (training keys)"),
    _inert("auto_find_batch_size", TRAINING, False, "set per_device_train_batch_size (and gradient_accumulation_"
           "steps); `sftune train CONFIG --dry_run` shows the batching plan", only=(False,)),
    _inert("logging_strategy", TRAINING, "steps", "sftune logs every logging_steps optimizer steps: set "
           "logging_steps instead", only=("steps",)),
    _not_yet("logging_first_step", TRAINING, False, "issue 15 (training keys)"),
    _inert("log_on_each_node", TRAINING, True, ONE_LOG),
    _inert("logging_nan_inf_filter", TRAINING, True, "a non-finite loss stops the run or skips its step "
           "(on_nonfinite_loss), so none is ever logged"),
    _inert("include_num_input_tokens_seen", TRAINING, "no", "metrics.jsonl always has num_tokens (trained tokens)"),
    _inert("log_level", TRAINING, "passive", ONE_LOG),
    _inert("log_level_replica", TRAINING, "warning", ONE_LOG),
    _inert("disable_tqdm", TRAINING, None, "sftune's progress is one line on the terminal"),
    _field("report_to", TRAINING, "none"),
    _field("run_name", TRAINING, None),
    _inert("project", TRAINING, "huggingface", "trackers take their project from their own settings "
           "(WANDB_PROJECT, TRACKIO_PROJECT); the run is named by run_name"),
    _inert("trackio_space_id", TRAINING, None, "sftune logs trackio locally (TRACKIO_DIR); sync it with trackio's "
           "own tools, and remove this key", only=(None,)),
    _inert("trackio_bucket_id", TRAINING, None, "sftune logs trackio locally (TRACKIO_DIR); remove this key",
           only=(None,)),
    _inert("trackio_static_space_id", TRAINING, None, "sftune logs trackio locally (TRACKIO_DIR); remove this key",
           only=(None,)),
    _field("eval_strategy", TRAINING, "no"),
    _field("eval_steps", TRAINING, None),
    _inert("eval_delay", TRAINING, 0, "evaluation follows eval_strategy and eval_steps from the start; remove "
           "eval_delay", only=(0, 0.0, None)),
    _field("per_device_eval_batch_size", TRAINING, 8),
    _inert("prediction_loss_only", TRAINING, False, EVAL_TOTALS),
    _not_yet("eval_on_start", TRAINING, False, "issue 15 (training keys)"),
    _inert("eval_do_concat_batches", TRAINING, True, EVAL_TOTALS),
    _inert("eval_use_gather_object", TRAINING, False, EVAL_TOTALS),
    _inert("eval_accumulation_steps", TRAINING, None, EVAL_TOTALS),
    _inert("include_for_metrics", TRAINING, [], EVAL_TOTALS, only=(None, [])),
    _inert("batch_eval_metrics", TRAINING, False, EVAL_TOTALS),
    _not_yet("save_only_model", TRAINING, False, "issue 15 (training keys)"),
    _field("save_strategy", TRAINING, "steps"),
    _field("save_steps", TRAINING, 500),
    _inert("save_on_each_node", TRAINING, False, "the main process writes every checkpoint: give the nodes a "
           "shared output_dir, and remove save_on_each_node", only=(False,)),
    _field("save_total_limit", TRAINING, None),
    _inert("enable_jit_checkpoint", TRAINING, False, "sftune always saves a checkpoint when SIGTERM or SIGINT "
           "stops a run"),
    _field("push_to_hub", TRAINING, False),
    _refused("hub_token", TRAINING, None, "a token in the config would be saved with the run: set HF_TOKEN or run "
             "`hf auth login` instead"),
    _field("hub_private_repo", TRAINING, None),
    _field("hub_model_id", TRAINING, None),
    _inert("hub_strategy", TRAINING, "every_save", "sftune pushes once, when training ends (checkpoints stay "
           "local); remove hub_strategy", only=("every_save", "end")),
    _inert("hub_always_push", TRAINING, False, "sftune pushes once, when training ends, and waits for the push"),
    _inert("hub_revision", TRAINING, None, "sftune pushes to the repository's main branch; remove hub_revision",
           only=(None, "main")),
    _not_yet("load_best_model_at_end", TRAINING, False, "issue 15 (training keys)"),
    _not_yet("metric_for_best_model", TRAINING, None, "issue 15 (training keys)"),
    _not_yet("greater_is_better", TRAINING, None, "issue 15 (training keys)"),
    _inert("ignore_data_skip", TRAINING, False, "sftune resumes at the exact data position at once (the order is "
           "a function of the seed and the epoch); remove ignore_data_skip", only=(False,)),
    _inert("restore_callback_states_from_checkpoint", TRAINING, False, "sftune has no callbacks; a checkpoint "
           "restores all of the loop's state"),
    _field("full_determinism", TRAINING, False),
    _field("seed", TRAINING, 42),
    _not_yet("data_seed", TRAINING, None, "issue 15 (training keys)"),
    _field("use_cpu", TRAINING, False),
    _inert("accelerator_config", TRAINING, None, "accelerate's settings come from `accelerate launch "
           "--config_file`; remove accelerator_config", only=(None,)),
    _refused("parallelism_config", TRAINING, None, SEQUENCE_PARALLEL_UNAVAILABLE + "; remove parallelism_config"),
    _inert("dataloader_drop_last", TRAINING, False, NO_DATALOADER + "; an epoch's last partial step is trained, "
           "so remove dataloader_drop_last", only=(False,)),
    _inert("dataloader_num_workers", TRAINING, 0, NO_DATALOADER),
    _inert("dataloader_pin_memory", TRAINING, True, NO_DATALOADER),
    _inert("dataloader_persistent_workers", TRAINING, False, NO_DATALOADER),
    _inert("dataloader_prefetch_factor", TRAINING, None, NO_DATALOADER),
    _inert("dataloader_multiprocessing_context", TRAINING, None, NO_DATALOADER),
    _inert("dataloader_in_order", TRAINING, True, NO_DATALOADER),
    _inert("remove_unused_columns", TRAINING, True, "prepared rows hold only what the model takes"),
    _inert("label_names", TRAINING, None, "prepared rows carry their labels; remove label_names", only=(None,)),
    _field("train_sampling_strategy", TRAINING, "random"),
    _inert("length_column_name", TRAINING, "length", "sftune measures lengths from the prepared rows"),
    _inert("ddp_find_unused_parameters", TRAINING, None, LAUNCHER),
    _inert("ddp_bucket_cap_mb", TRAINING, None, LAUNCHER),
    _inert("ddp_broadcast_buffers", TRAINING, None, LAUNCHER),
    _inert("ddp_static_graph", TRAINING, None, LAUNCHER),
    _inert("ddp_backend", TRAINING, None, LAUNCHER),
    _inert("ddp_timeout", TRAINING, 1800, LAUNCHER),
    _inert("fsdp", TRAINING, None, FSDP_DS, only=(None, "", [], False)),
    _inert("fsdp_config", TRAINING, None, FSDP_DS, only=(None,)),
    _inert("deepspeed", TRAINING, None, FSDP_DS, only=(None,)),
    _inert("debug", TRAINING, "", "transformers' debug modes are not in sftune (`sftune --debug` shows tracebacks); "
           "remove it", only=("", None, [])),
    _inert("skip_memory_metrics", TRAINING, True, "metrics.jsonl always has peak_memory_mb"),
    _inert("do_train", TRAINING, False, TRAINER_ONLY),
    _inert("do_eval", TRAINING, False, "evaluation follows eval_strategy"),
    _inert("do_predict", TRAINING, False, "sftune has no prediction pass; remove do_predict", only=(False,)),
    _field("resume_from_checkpoint", TRAINING, None),
    _inert("local_rank", TRAINING, -1, LAUNCHER),
    # ---- trl/trainer/model_config.py: ModelConfig
    _field("model_name_or_path", MODEL, None),
    _field("model_revision", MODEL, "main"),
    _field("dtype", MODEL, "float32"),
    _field("attn_implementation", MODEL, None),
    _field("use_peft", MODEL, False),
    _field("lora_r", MODEL, 16),
    _field("lora_alpha", MODEL, 32),
    _field("lora_dropout", MODEL, 0.05),
    _field("lora_target_modules", MODEL, None),
    _not_yet("lora_target_parameters", MODEL, None, "issue 16"),
    _field("lora_modules_to_save", MODEL, None),
    _inert("lora_task_type", MODEL, "CAUSAL_LM", "sftune trains causal language models only", only=("CAUSAL_LM",)),
    _field("use_rslora", MODEL, False),
    _field("use_dora", MODEL, False),
    _field("load_in_8bit", MODEL, False),
    _field("load_in_4bit", MODEL, False),
    _field("bnb_4bit_quant_type", MODEL, "nf4"),
    _field("use_bnb_nested_quant", MODEL, False),
    _inert("bnb_4bit_quant_storage", MODEL, None, "sftune stores 4-bit weights in bitsandbytes' default (uint8); "
           "remove it", only=(None, "uint8")),
    # ---- trl/scripts/utils.py: ScriptArguments
    _field("dataset_name", SCRIPT, None),
    _field("dataset_config", SCRIPT, None),
    _field("dataset_train_split", SCRIPT, "train"),
    _field("dataset_test_split", SCRIPT, "test"),
    _not_yet("dataset_streaming", SCRIPT, False, "issue 17"),
    _inert("ignore_bias_buffers", SCRIPT, False, LAUNCHER),
    # ---- trl/scripts/utils.py: DatasetMixtureConfig
    _field("datasets", MIXTURE, []),
    _not_yet("streaming", MIXTURE, False, "issue 17"),
    _field("test_split_size", MIXTURE, None),
)

TRL_KEY = {key.name: key for key in TRL_KEYS}


# TRL keys whose default sftune changes on purpose: (what --help and the log say). Each must really differ.
DEFAULTS_UNLIKE_TRL = {
    "activation_checkpointing": "TRL turns it on (gradient_checkpointing: true); sftune leaves it off, since it "
                                "costs about a third more time and small runs do not need the memory",
    "dtype": "TRL loads float32 weights; sftune loads the checkpoint's own dtype and, like TRL, trains fp32 master "
             "weights (bf16 autocast on a GPU with bf16, plain fp32 on CPU)",
    "dataset_test_split": "TRL evaluates on 'test' when eval_strategy is set; sftune evaluates only on a split "
                          "you name (or eval_ratio)",
}


def defaults_unlike_trl(config: Any) -> list[str]:
    """'dtype auto (TRL: float32)' for each setting left at an sftune default that TRL sets otherwise; only where
    the values really differ for this run (TRL's test split matters only when evaluating)."""
    import dataclasses

    from sftune.config.fields import default_of

    defaults = {f.name: default_of(f) for f in dataclasses.fields(config)}
    lines = []
    for name in DEFAULTS_UNLIKE_TRL:
        value, trl_default = getattr(config, name), TRL_KEY[name].trl_default
        if name == "dataset_test_split" and (config.eval_strategy == "no" or config.held_out_ratio):
            continue
        if value == defaults[name] and value != trl_default:
            lines.append(f"{name} {_shown(value)} (TRL: {_shown(trl_default)})")
    return lines


def _shown(value: Any) -> str:
    return "unset" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def log_compatibility(config: Any, log: Any) -> None:
    """Once per run: the TRL keys the config gave that sftune ignores, and the defaults sftune sets unlike TRL."""
    if config.ignored_keys:
        log.info("ignored TRL keys (they mean nothing for sftune's loop): %s", ignored_summary(config.ignored_keys))
    unlike = defaults_unlike_trl(config)
    if unlike:
        log.info("defaults unlike TRL's: %s (see `sftune train --help`)", ", ".join(unlike))


def effective_status(key: TrlKey, field_names: set[str] | frozenset[str]) -> str:
    """A key sftune has a field for is a field, whatever the table said before that field was merged."""
    return FIELD if key.name in field_names else key.status


def accepts_as_no_op(key: TrlKey, value: Any) -> bool:
    """An inert key's value that is harmless to ignore; a not_yet key at TRL's default (it asks for nothing)."""
    if key.status in (NOT_YET, REFUSED):
        return _same(value, key.trl_default)
    return key.only is ANY or any(_same(value, allowed) for allowed in key.only)


def _same(value: Any, other: Any) -> bool:
    if isinstance(value, str) and not isinstance(other, str):  # a CLI flag's text
        text = value.strip().lower()
        if other is None:
            return text in ("none", "null", "~", "")
        if isinstance(other, bool):
            return text in (("true", "yes", "on", "1") if other else ("false", "no", "off", "0"))
        if isinstance(other, (int, float)):
            try:
                return float(text) == other
            except ValueError:
                return False
        return False
    if isinstance(value, bool) != isinstance(other, bool):
        return False
    return value == other


def refusal(key: TrlKey, value: Any) -> str:
    """The one line for a TRL key sftune does not take (with this value)."""
    if key.status == NOT_YET:
        instead = key.instead or f"remove it, or set it to TRL's default ({key.trl_default!r})"
        return f"key '{key.name}' = {value!r} is not supported yet ({key.note}): {instead}"
    return f"key '{key.name}' = {value!r} is not supported: {key.note}"


def ignored_summary(ignored: dict[str, Any]) -> str:
    """'do_train, do_eval (why); ddp_timeout (why)': the ignored keys grouped by their reason, for one log line."""
    by_reason: dict[str, list[str]] = {}
    for name in ignored:
        by_reason.setdefault(TRL_KEY[name].note, []).append(name)
    return "; ".join(f"{', '.join(names)} ({reason})" for reason, names in by_reason.items())


def other_names() -> list[str]:
    """Every key the schema takes that is not a field: the aliases, and TRL's keys sftune has no field for."""
    import dataclasses

    from sftune.config.schema import SFTConfig

    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    return [name for name in dict.fromkeys([*ALIASES, *TRL_KEY]) if name not in fields]


def compatibility_help() -> str:
    """The short `--help` section: the TRL keys sftune accepts and ignores, and the other names it maps."""
    inert = sorted(key.name for key in TRL_KEYS if key.status == INERT)
    aliases = ", ".join(f"{name} -> {alias.target}" for name, alias in ALIASES.items())
    return (f"Accepted so that a TRL config runs as it is, ignored (the log lists them once, with the reason): "
            f"{', '.join(inert)}. Other names accepted for a setting: {aliases}.")
