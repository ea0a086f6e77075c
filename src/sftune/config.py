"""One schema for every setting: defaults, meaning, validation, and the three ways in (Python, YAML, CLI flags).

Field names follow TRL's SFTConfig / ModelConfig / ScriptArguments where the meaning is the same, so a TRL
user's YAML mostly runs as-is. This module is the ground floor: it imports nothing else from sftune but errors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sftune.errors import ConfigError, did_you_mean

CONFIG_FILENAME = "sftune_config.yaml"
TRACKERS = ("none", "all", "tensorboard", "wandb", "trackio")

# Adapters train far fewer weights from zero (LoRA's B), and take a larger step than full fine-tuning.
DEFAULT_LEARNING_RATE = 2e-5
DEFAULT_PEFT_LEARNING_RATE = 2e-4

# Names other tools use for one of our fields; accepted and mapped, so old YAML files keep working.
ALIASES = {
    "max_seq_length": "max_length",  # TRL before 0.20
    "torch_dtype": "dtype",  # transformers before 5
}

# Keys a TRL / transformers user may bring that sftune does not take, with what to do instead.
NOT_SUPPORTED = {
    "bf16": "sftune trains in the dtype the model is loaded in: set `dtype: bfloat16` instead",
    "fp16": "sftune trains in the dtype the model is loaded in: set `dtype: float16` instead",
    "tf32": "not configurable in sftune; remove it",
    "dataset_kwargs": "sftune detects pre-tokenized rows (an input_ids column) by itself; remove it",
    "hub_token": "a token in the config would be saved with the run: set HF_TOKEN or run `hf auth login` instead",
    "push_to_hub_token": "a token in the config would be saved with the run: set HF_TOKEN or run `hf auth login`",
    "hub_strategy": "sftune pushes once, when training ends (checkpoints stay local); remove it",
    "hub_revision": "sftune pushes to the repository's main branch; remove it",
}

_HUB_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
HUB_MODEL_ID = re.compile(rf"^(?:{_HUB_NAME}/)?{_HUB_NAME}$")


def _opt(default: Any, help: str, group: str) -> Any:
    metadata = {"help": help, "group": group}
    if isinstance(default, (list, dict)):  # each config gets its own copy of a mutable default
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@dataclass
class SFTConfig:
    """Everything that defines a run. Build it in Python, from a YAML file, or from CLI flags: the same schema."""

    # ---- model
    model_name_or_path: str | None = _opt(None, "Local folder or Hugging Face Hub id of the pretrained model.", "model")
    model_revision: str = _opt("main", "Hub revision (branch, tag or commit) of the model.", "model")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _opt(
        "auto", "Dtype the weights are loaded and trained in; 'auto' keeps the checkpoint's own dtype.", "model"
    )
    attn_implementation: str | None = _opt(
        None, "Attention kernel: 'sdpa', 'eager', 'flash_attention_2', ... (unset: transformers' default).", "model"
    )
    trust_remote_code: bool = _opt(
        False, "Allow running Python code shipped inside the model repository. Only for models you trust.", "model"
    )
    use_liger_kernel: bool = _opt(
        False, "GPU only: Liger's Triton kernels for RMSNorm, RoPE and SwiGLU (needs liger-kernel and CUDA); "
        "the loss stays sftune's chunked one.", "model"
    )
    allow_pickled_weights: bool = _opt(
        False,
        "Allow loading model or adapter weights stored with pickle (pytorch_model.bin, adapter_model.bin), which "
        "can run code when loaded. Off: safetensors only. Only for files you trust.",
        "model",
    )
    model_class: Literal["auto", "causal_lm", "image_text_to_text"] = _opt(
        "auto",
        "Which transformers class loads the model: 'auto' picks image_text_to_text for vision-language models "
        "(AutoModelForImageTextToText, with their processor) and causal_lm (AutoModelForCausalLM) otherwise.",
        "model",
    )
    gguf_file: str | None = _opt(
        None, "Load the model and tokenizer from this GGUF file inside model_name_or_path (dequantized).", "model"
    )
    model_init_kwargs: dict | None = _opt(
        None, "Extra keyword arguments for from_pretrained, such as config overrides (JSON on the command line).",
        "model",
    )
    gradient_checkpointing: bool = _opt(
        False, "Recompute activations in the backward pass: much less memory for about a third more time.", "model"
    )
    gradient_checkpointing_kwargs: dict | None = _opt(
        None, "Arguments for torch.utils.checkpoint (unset: {\"use_reentrant\": false}).", "model"
    )

    # ---- adapters (LoRA through peft) and quantization (bitsandbytes)
    use_peft: bool = _opt(False, "Train LoRA adapters on a frozen base model instead of every weight.", "adapters")
    lora_r: int = _opt(16, "LoRA rank.", "adapters")
    lora_alpha: int = _opt(32, "LoRA scale numerator: updates are scaled by lora_alpha / lora_r.", "adapters")
    lora_dropout: float = _opt(0.05, "Dropout on the LoRA input.", "adapters")
    lora_target_modules: list[str] | None = _opt(
        None,
        "Modules that get adapters: names such as q_proj,v_proj, or all-linear "
        "(unset: every linear projection of the language model's attention).",
        "adapters",
    )
    lora_modules_to_save: list[str] | None = _opt(
        None, "Modules trained fully and saved with the adapter, e.g. lm_head,embed_tokens.", "adapters"
    )
    use_rslora: bool = _opt(False, "Rank-stabilised LoRA: scale by lora_alpha / sqrt(lora_r).", "adapters")
    use_dora: bool = _opt(False, "DoRA: weight-decomposed LoRA (a trained magnitude per output feature).", "adapters")
    adapter_name_or_path: str | None = _opt(
        None,
        "Continue training this LoRA adapter (a folder with adapter_config.json, or a Hub id); its own rank, "
        "alpha and target modules are kept. Needs use_peft.",
        "adapters",
    )
    load_in_4bit: bool = _opt(
        False, "QLoRA: load the frozen base in 4 bits through bitsandbytes (needs use_peft).", "adapters"
    )
    load_in_8bit: bool = _opt(False, "Load the frozen base in 8 bits through bitsandbytes (needs use_peft).", "adapters")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = _opt("nf4", "4-bit data type.", "adapters")
    use_bnb_nested_quant: bool = _opt(
        False, "Quantize the 4-bit quantization constants too (double quantization; saves ~0.4 bit per weight).",
        "adapters",
    )

    # ---- data
    dataset_name: str | None = _opt(
        None,
        "Training data: a Hub dataset id, a local .json/.jsonl/.parquet/.csv/.arrow file, or a folder of them.",
        "data",
    )
    dataset_config: str | None = _opt(None, "Hub dataset configuration (subset) name.", "data")
    dataset_train_split: str = _opt("train", "Split of the dataset to train on.", "data")
    dataset_text_field: str = _opt("text", "Column holding plain text, for text datasets.", "data")
    max_length: int | None = _opt(
        1024, "Longest sequence in tokens; longer rows are truncated (unset: no limit).", "data"
    )

    # ---- data: sources, formats, loss masks, packing (see README's Data section)
    datasets: list[dict] | None = _opt(
        None,
        "Several training datasets at once, instead of dataset_name: a list of mappings with 'path' and optionally "
        "'name' (subset), 'split', 'test_split', 'weight', 'columns', 'format'. Weights set each source's share of "
        "the training rows (by rows, not tokens); without weights every row is used once.",
        "data",
    )
    dataset_test_split: str | None = _opt(
        None, "Split of the dataset(s) to evaluate on, e.g. 'test' (unset: no eval split).", "data"
    )
    eval_ratio: float = _opt(
        0.0, "Fraction of the training rows held out for evaluation (seeded), when there is no eval split.", "data"
    )
    dataset_format: Literal["auto", "text", "prompt_completion", "messages", "sharegpt", "alpaca", "tokenized"] = _opt(
        "auto", "Format of the rows; 'auto' detects it from the columns of each dataset.", "data"
    )
    dataset_columns: dict[str, str] | None = _opt(
        None, "Rename columns before format detection: {their_name: our_name}, e.g. {dialog: messages}.", "data"
    )
    chat_template_path: str | None = _opt(
        None, "A .jinja chat template to use instead of the tokenizer's own; it is saved with the model.", "data"
    )
    eos_token: str | None = _opt(
        None, "Token that ends a sequence and stops generation (unset: the tokenizer's EOS).", "data"
    )
    loss_mask: Literal["completion", "all", "assistant", "last_assistant"] | None = _opt(
        None,
        "Which tokens carry loss: completion (prompt/completion rows train the completion, other rows every "
        "token), all, assistant (the assistant turns of conversations), last_assistant (the last assistant turn). "
        "Unset: from TRL's flags below (completion when none is set); the run's saved config holds the result.",
        "data",
    )
    completion_only_loss: bool | None = _opt(
        None, "TRL's flag: false trains every token (loss_mask: all); unset or true, prompt/completion rows train "
        "only the completion.", "data"
    )
    assistant_only_loss: bool = _opt(
        False, "TRL's flag: train only on assistant turns (content and end-of-turn token) of conversations "
        "(loss_mask: assistant).", "data"
    )
    last_assistant_only_loss: bool = _opt(
        False, "Train only on the last assistant turn of each conversation (loss_mask: last_assistant).", "data"
    )
    truncation_mode: Literal["keep_start", "keep_end"] = _opt(
        "keep_start", "Which end of a row longer than max_length is kept.", "data"
    )
    packing: bool = _opt(
        False, "Pack several rows into each max_length sequence; packed rows never attend to one another.", "data"
    )
    packing_strategy: Literal["bfd", "bfd_split", "wrapped"] = _opt(
        "bfd",
        "bfd: best-fit decreasing, rows kept whole; bfd_split: long rows split across sequences; "
        "wrapped: rows cut to fill every sequence exactly.",
        "data",
    )
    padding_free: bool | None = _opt(
        None,
        "No padding: with FlashAttention each batch is joined into one sequence (documents told apart by "
        "position_ids); on sdpa/eager each row runs as a micro-batch of its own (same update, no padding compute). "
        "Unset: on with FlashAttention and on CPU, off for vision-language models, for sdpa/eager on a GPU "
        "(rows one at a time would underfeed it) and under FSDP/DeepSpeed.",
        "data",
    )
    group_by_length: bool = _opt(
        False, "Batch rows of similar length together (less padding); without packing only.", "data"
    )
    dedupe: Literal["exact", "near"] | None = _opt(
        None,
        "Remove duplicate rows the data doctor finds (`sftune inspect` reports them either way): 'exact' (same "
        "text once whitespace is ignored) or 'near' (also same up to case and punctuation, or MinHash "
        "similarity >= 0.8); the first of each group stays, eval rows that repeat a training row go. Unset: "
        "nothing is removed.",
        "data",
    )
    dataset_num_proc: int | None = _opt(
        None, "Processes that tokenize the data (unset: one per CPU core for datasets over 2,000 rows).", "data"
    )

    # ---- training
    learning_rate: float | None = _opt(
        None, "Peak learning rate of AdamW (unset: 2e-5, or 2e-4 with use_peft).", "training"
    )
    per_device_train_batch_size: int = _opt(8, "Rows per micro-batch on each device.", "training")
    gradient_accumulation_steps: int = _opt(
        1, "Micro-batches per optimizer step; the loss is normalised by the trained tokens of the whole step.",
        "training",
    )
    num_train_epochs: float = _opt(3.0, "Passes over the training data (fractions allowed).", "training")
    max_steps: int = _opt(-1, "Optimizer steps to run; overrides num_train_epochs when positive.", "training")
    lr_scheduler_type: Literal["linear", "cosine", "cosine_with_min_lr", "constant", "constant_with_warmup"] = _opt(
        "linear", "Learning-rate schedule after warm-up.", "training"
    )
    lr_scheduler_kwargs: dict = _opt(
        {}, "Extra schedule settings, e.g. {min_lr_rate: 0.1} or {min_lr: 1e-6} for cosine_with_min_lr.", "training"
    )
    warmup_ratio: float = _opt(0.0, "Fraction of the optimizer steps spent warming the learning rate up.", "training")
    warmup_steps: int = _opt(0, "Warm-up length in optimizer steps (instead of warmup_ratio).", "training")
    weight_decay: float = _opt(0.0, "AdamW decoupled weight decay (never applied to biases and norms).", "training")
    adam_beta1: float = _opt(0.9, "AdamW beta1.", "training")
    adam_beta2: float = _opt(0.999, "AdamW beta2.", "training")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon.", "training")
    max_grad_norm: float = _opt(1.0, "Clip the gradient's global L2 norm to this value (0: no clipping).", "training")
    seed: int = _opt(42, "Random seed for initialisation, shuffling and dropout.", "training")

    # ---- training engine: optimizer, loss, numerics
    optim: Literal["adamw_torch_fused", "adamw_torch", "adamw_8bit", "sgd"] = _opt(
        "adamw_torch_fused",
        "Optimizer: AdamW (fused kernel, or torch's multi-tensor one), 8-bit AdamW (bitsandbytes), or plain SGD.",
        "training",
    )
    loss_type: Literal["nll", "dft"] = _opt(
        "nll", "nll: cross-entropy; dft: each token's loss weighted by its own detached probability.", "training"
    )
    loss_chunk_size: int | None = _opt(
        None, "Trained tokens projected to the vocabulary at once in the loss (unset: ~256 MB of logits).",
        "training",
    )
    on_nonfinite_loss: Literal["stop", "skip"] = _opt(
        "stop", "What a NaN/inf loss does: stop the run naming the step, or skip that optimizer step.", "training"
    )
    num_threads: int | None = _opt(
        None,
        "CPU threads for torch's math. Unset: OMP_NUM_THREADS when set, else the cores this process may use (its "
        "CPU affinity and cgroup quota). The log says when other work competes for those cores: then fewer threads "
        "are often much faster.",
        "training",
    )
    torch_compile: bool = _opt(False, "Compile the model's backbone with torch.compile (slow first steps).", "training")
    full_determinism: bool = _opt(
        False, "Use deterministic kernels everywhere (slower; bitwise-repeatable runs on GPU).", "training"
    )

    # ---- evaluation
    eval_strategy: Literal["no", "steps", "epoch"] = _opt(
        "no", "When to evaluate on the eval split: never, every eval_steps, or after every epoch.", "evaluation"
    )
    eval_steps: int | None = _opt(None, "Evaluate every this many optimizer steps (unset: logging_steps).", "evaluation")
    per_device_eval_batch_size: int = _opt(8, "Rows per evaluation batch on each device.", "evaluation")
    generation_prompts: list[str] = _opt(
        [], "User prompts the model answers greedily at every evaluation; answers go to samples.jsonl.",
        "evaluation",
    )
    generation_max_new_tokens: int = _opt(64, "Longest answer generated for generation_prompts.", "evaluation")

    # ---- checkpoints
    save_strategy: Literal["no", "steps", "epoch"] = _opt(
        "steps", "When to write a checkpoint: never, every save_steps, or after every epoch.", "checkpoints"
    )
    save_steps: int = _opt(500, "Write a checkpoint every this many optimizer steps.", "checkpoints")
    save_total_limit: int | None = _opt(None, "Keep only the newest this many checkpoints (unset: all).", "checkpoints")
    resume_from_checkpoint: bool | str | None = _opt(
        None, "true: continue from the newest checkpoint in output_dir; or a checkpoint folder to continue from.",
        "checkpoints",
    )

    # ---- output
    output_dir: str = _opt("trainer_output", "Folder for the trained model, metrics and the resolved config.", "output")
    overwrite_output_dir: bool = _opt(
        False, "Allow writing into an output_dir that already holds files (they may be replaced).", "output"
    )
    logging_steps: int = _opt(10, "Write a line to metrics.jsonl every this many optimizer steps.", "output")
    report_to: list[str] = _opt(
        ["none"], "Trackers besides metrics.jsonl: tensorboard, wandb, trackio, all, or none.", "output"
    )
    run_name: str | None = _opt(None, "Run name shown in trackers (unset: the output_dir's name).", "output")

    # ---- Hub: push the result when training ends. No token field: the token comes from HF_TOKEN or the
    # `hf auth login` file, so that it is never saved with the run.
    push_to_hub: bool = _opt(
        False,
        "When training ends, upload the model or adapter, tokenizer, model card, loss plot, metrics and config to "
        "the Hugging Face Hub (token: HF_TOKEN or `hf auth login`; checkpoints are not uploaded).",
        "hub",
    )
    hub_model_id: str | None = _opt(
        None, "Hub repository to push to: 'name' (under your account) or 'owner/name' (unset: the output_dir's "
        "folder name under your account).", "hub",
    )
    hub_private_repo: bool | None = _opt(
        None, "Create the Hub repository as private (true) or public (false); unset: the Hub's default.", "hub"
    )

    def __post_init__(self) -> None:
        hints = _type_hints()
        problems = []  # every mistyped key at once, not one per run
        for f in dataclasses.fields(self):
            try:
                setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
            except ConfigError as err:
                problems.append(str(err))
        if problems:
            raise ConfigError(join_problems(problems))
        # Resolved here, so the saved config holds the value used and repeats the run as it was.
        self.learning_rate_is_default = self.learning_rate is None
        if self.learning_rate is None:
            self.learning_rate = unset_learning_rate(self.use_peft)
        if self.resume_from_checkpoint is False:
            self.resume_from_checkpoint = None
        self.loss_mask = self._resolved_loss_mask()
        self._check_ranges()

    def _resolved_loss_mask(self) -> str:
        """loss_mask as set, or from TRL's three flags: the one setting every reader of "which tokens are trained"
        uses. Flags that contradict a set loss_mask are an error, so a saved config always agrees with itself."""
        if self.assistant_only_loss and self.last_assistant_only_loss:
            raise ConfigError("config keys 'assistant_only_loss' and 'last_assistant_only_loss' are both true: "
                              "keep one of them (or set loss_mask: assistant | last_assistant)")
        from_flags = loss_mask_of_flags(self)
        if self.loss_mask is None:
            return from_flags or "completion"
        if from_flags is not None and from_flags != self.loss_mask:
            flags = {"last_assistant": "last_assistant_only_loss: true", "assistant": "assistant_only_loss: true",
                     "all": "completion_only_loss: false", "completion": "completion_only_loss: true"}[from_flags]
            raise ConfigError(f"config key 'loss_mask' = {self.loss_mask!r} contradicts {flags}: keep one of them")
        return self.loss_mask

    def _check_ranges(self) -> None:
        problems: list[str] = []  # every value out of range at once

        def need(ok: bool, key: str, rule: str) -> None:
            if not ok:
                problems.append(f"config key '{key}' = {getattr(self, key)!r}: {rule}")

        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(self.per_device_train_batch_size >= 1, "per_device_train_batch_size", "must be >= 1")
        need(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        need(self.max_steps == -1 or self.max_steps >= 1, "max_steps", "must be >= 1, or -1 to use num_train_epochs")
        need(self.max_steps != -1 or self.num_train_epochs > 0, "num_train_epochs", "must be > 0 when max_steps is -1")
        need(math.isfinite(self.num_train_epochs), "num_train_epochs", "must be a finite number")
        need(self.max_length is None or self.max_length >= 2, "max_length", "must be >= 2, or unset for no limit")
        need(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(0.0 <= self.adam_beta1 < 1.0, "adam_beta1", "must be in [0, 1)")
        need(0.0 <= self.adam_beta2 < 1.0, "adam_beta2", "must be in [0, 1)")
        need(self.adam_epsilon > 0, "adam_epsilon", "must be > 0")
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
        need(self.logging_steps >= 1, "logging_steps", "must be >= 1")
        need(self.seed >= 0, "seed", "must be >= 0")
        need(bool(self.output_dir), "output_dir", "must be a folder path")
        need(self.loss_chunk_size is None or self.loss_chunk_size >= 1, "loss_chunk_size", "must be >= 1")
        need(self.eval_steps is None or self.eval_steps >= 1, "eval_steps", "must be >= 1")
        need(self.per_device_eval_batch_size >= 1, "per_device_eval_batch_size", "must be >= 1")
        need(self.generation_max_new_tokens >= 1, "generation_max_new_tokens", "must be >= 1")
        need(self.save_steps >= 1, "save_steps", "must be >= 1")
        need(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit", "must be >= 1")
        need(self.num_threads is None or self.num_threads >= 1, "num_threads", "must be >= 1")
        need(all(tracker in TRACKERS for tracker in self.report_to), "report_to",
             f"each entry must be one of {', '.join(TRACKERS)}")
        need(self.lora_r >= 1, "lora_r", "must be >= 1")
        need(self.lora_alpha > 0, "lora_alpha", "must be > 0")
        need(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)")
        for key in ("adapter_name_or_path", "load_in_4bit", "load_in_8bit"):
            need(
                not getattr(self, key) or self.use_peft, key,
                "needs use_peft: true (a quantized or adapter-based run trains adapters, not the base weights)",
            )
        if problems:
            raise ConfigError(join_problems(problems))
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ConfigError(f"config key 'report_to' = {self.report_to!r}: 'none' cannot be combined with trackers")
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("config keys 'load_in_4bit' and 'load_in_8bit' are both true: keep one of them")
        if self.gguf_file and (self.load_in_4bit or self.load_in_8bit):
            raise ConfigError(
                "config key 'gguf_file' cannot be combined with load_in_4bit / load_in_8bit: "
                "a GGUF checkpoint is dequantized when loaded; use a safetensors model for bitsandbytes"
            )
        self._check_data_settings()
        self._check_hub_settings()
        if self.warmup_ratio > 0 and self.warmup_steps > 0:
            raise ConfigError(
                f"config keys 'warmup_ratio' ({self.warmup_ratio}) and 'warmup_steps' ({self.warmup_steps}) "
                "are both set: keep one of them"
            )

    def _check_data_settings(self) -> None:
        def need(ok: bool, key: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"config key '{key}' = {getattr(self, key)!r}: {rule}")

        need(0.0 <= self.eval_ratio < 1.0, "eval_ratio", "must be in [0, 1)")
        need(self.dataset_num_proc is None or self.dataset_num_proc >= 1, "dataset_num_proc", "must be >= 1")
        need(not self.packing or self.max_length is not None, "packing", "needs max_length (the packed length)")
        if self.dataset_name is not None and self.datasets is not None:
            raise ConfigError("config keys 'dataset_name' and 'datasets' are both set: keep one of them")
        if self.dataset_test_split is not None and self.eval_ratio > 0:
            raise ConfigError("config keys 'dataset_test_split' and 'eval_ratio' are both set: keep one of them")
        if self.datasets is not None:
            check_dataset_entries(self.datasets)

    def _check_hub_settings(self) -> None:
        name = self.hub_model_id
        if name is not None and (not HUB_MODEL_ID.match(name) or len(name.split("/")[-1]) > 96
                                 or ".." in name or "--" in name or name.endswith(".git")):
            raise ConfigError(
                f"config key 'hub_model_id' = {name!r}: expected 'name' or 'owner/name' (letters, digits, '-', '_', "
                "'.'; no '--' or '..'; at most 96 characters)"
            )

    def check_ready_to_train(self, dataset_given: bool = False) -> None:
        """The keys a training run cannot do without; checked at train time, so a partial config can be built."""
        if self.model_name_or_path is None:
            raise ConfigError("missing required key 'model_name_or_path': set it in the YAML file or with "
                              "--model_name_or_path")
        if not dataset_given and self.dataset_name is None and not self.datasets:
            raise ConfigError("missing required key 'dataset_name': set it (or 'datasets') in the YAML file "
                              "or with --dataset_name")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> SFTConfig:
        """Build from a plain mapping (parsed YAML, CLI flags); unknown keys get a did-you-mean error."""
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: expected a mapping of key: value, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        resolved: dict[str, Any] = {}
        problems = []  # every bad key of the file at once: a TRL config is cleared in one run, not one per key
        for key, value in values.items():
            name = ALIASES.get(key, key)
            if name not in known:
                problems.append(unknown_key_message(str(key)))
            elif name in resolved:
                problems.append(f"key '{name}' is given twice (once as '{key}')")
            else:
                resolved[name] = value
        if problems:
            raise ConfigError(f"{where}: {join_problems(problems)}")
        return cls(**resolved)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML that `sftune train <path>` runs again, atomically.

        Continuing this run's own checkpoints (resume_from_checkpoint true, or a checkpoint in output_dir) is how the
        run was carried on, not what the run is: it is saved unset, so the file repeats the run from its start.
        A checkpoint of another run stays: this run started from it.
        """
        path = Path(path)
        values = self.to_dict()
        resume = values["resume_from_checkpoint"]
        if resume is True or (isinstance(resume, str) and _inside(Path(resume), Path(self.output_dir))):
            values["resume_from_checkpoint"] = None
        text = "# sftune resolved config: `sftune train " + path.name + "` repeats this run\n"
        text += yaml.safe_dump(without_secrets(values), sort_keys=False, allow_unicode=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)


# Keys that hold credentials (a Hub token, a tracker key), at any depth (model_init_kwargs: {token: ...}):
# never written to a saved config. Tokenizer keys such as eos_token are settings, not secrets.
_SECRET_KEY = re.compile(r"^(token|use_auth_token|hub_token|.*api_key|.*secret.*|.*password.*|.*access_token)$",
                         re.IGNORECASE)


def without_secrets(values: Any) -> Any:
    """`values` with every credential key removed, for writing to disk."""
    if isinstance(values, dict):
        return {k: without_secrets(v) for k, v in values.items() if not _SECRET_KEY.match(str(k))}
    if isinstance(values, list):
        return [without_secrets(v) for v in values]
    return values


DATASET_ENTRY_KEYS = ("path", "name", "split", "test_split", "weight", "columns", "format")


def check_dataset_entries(entries: list[dict]) -> None:
    """Each entry of `datasets`: a mapping with a 'path'; weights given for all entries or for none."""
    if not entries:
        raise ConfigError("config key 'datasets' is an empty list: give at least one dataset, or unset it")
    formats = typing.get_args(_type_hints()["dataset_format"])
    for i, entry in enumerate(entries):
        where = f"config key 'datasets[{i}]'"
        for key in entry:
            if key not in DATASET_ENTRY_KEYS:
                hint = did_you_mean(str(key), DATASET_ENTRY_KEYS) or f" (known: {', '.join(DATASET_ENTRY_KEYS)})"
                raise ConfigError(f"{where}: unknown key '{key}'{hint}")
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            raise ConfigError(f"{where}: needs 'path' (a Hub dataset id, a file or a folder)")
        weight = entry.get("weight")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0):
            raise ConfigError(f"{where}.weight = {weight!r}: must be a number > 0")
        columns = entry.get("columns")
        if columns is not None and not isinstance(columns, (dict, list)):
            raise ConfigError(f"{where}.columns: expected a mapping {{their_name: our_name}} or a list of columns")
        if entry.get("format", "auto") not in formats:
            raise ConfigError(f"{where}.format = {entry['format']!r}: expected one of {', '.join(formats)}")
    weighted = [entry.get("weight") is not None for entry in entries]
    if any(weighted) and not all(weighted):
        raise ConfigError("config key 'datasets': give every dataset a 'weight', or none (then every row is used once)")


SEE_HELP = " (see `sftune train --help`)"


def unknown_key_message(key: str) -> str:
    """What to say about a key the schema does not have: not supported (and what instead), a close key, or --help."""
    if key in NOT_SUPPORTED:
        return f"key '{key}' is not supported: {NOT_SUPPORTED[key]}"
    names = [f.name for f in dataclasses.fields(SFTConfig)] + list(ALIASES)
    hint = did_you_mean(key, names)
    for alias, target in ALIASES.items():  # suggest the field an alias stands for
        hint = hint.replace(f"'{alias}'", f"'{target}'")
    return f"unknown key '{key}'{hint or SEE_HELP}"


def join_problems(problems: list[str]) -> str:
    """One line for one problem or several: `3 problems: a; b; c`, with the pointer to --help said once."""
    if len(problems) == 1:
        return problems[0]
    see_help = any(problem.endswith(SEE_HELP) for problem in problems)
    trimmed = [problem.removesuffix(SEE_HELP) for problem in problems]
    return f"{len(problems)} problems: " + "; ".join(trimmed) + (SEE_HELP if see_help else "")


def unset_learning_rate(use_peft: bool) -> float:
    """The learning rate a config that leaves it unset trains with (README, `--help`)."""
    return DEFAULT_PEFT_LEARNING_RATE if use_peft else DEFAULT_LEARNING_RATE


def loss_mask_of_flags(config: SFTConfig) -> str | None:
    """The loss_mask TRL's three flags ask for; None when they are all at their defaults."""
    if config.last_assistant_only_loss:
        return "last_assistant"
    if config.assistant_only_loss:
        return "assistant"
    if config.completion_only_loss is None:
        return None
    return "completion" if config.completion_only_loss else "all"


# Settings the schema fills in when they are unset, from the others: what "unset" resolves to for a config.
RESOLVED_WHEN_UNSET = {
    "learning_rate": lambda config: unset_learning_rate(config.use_peft),
    "loss_mask": lambda config: loss_mask_of_flags(config) or "completion",
}


def changed_settings(config: SFTConfig) -> list[tuple[str, Any]]:
    """(name, value) of every setting that differs from its default as `sftune train --help` shows it, in schema
    order. A setting the schema fills in when unset (learning_rate, loss_mask) differs only when it is not what
    unset gives."""
    changed = []
    for _, name, default, _, _ in field_help():
        value = getattr(config, name)
        if name in RESOLVED_WHEN_UNSET:
            default = RESOLVED_WHEN_UNSET[name](config)
        if value != default:
            changed.append((name, value))
    return changed


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.expanduser().resolve().is_relative_to(folder.expanduser().resolve())
    except OSError:
        return False


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> SFTConfig:
    """Defaults, then the YAML file at `path`, then `overrides` (CLI flags): the resolved config."""
    values: dict[str, Any] = {}
    if path is not None:
        values = read_yaml(Path(path))
    where = str(path) if path is not None else "config"
    for key, value in (overrides or {}).items():
        name = ALIASES.get(key, key)
        # A flag replaces the file's value even when the file spelled the key by an alias.
        for alias, target in ALIASES.items():
            if target == name:
                values.pop(alias, None)
        values[name] = value
    return SFTConfig.from_dict(values, where=where)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------- types: one coercion for YAML, CLI and Python

_HINTS: dict[str, Any] = {}


def _type_hints() -> dict[str, Any]:
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(SFTConfig))
    return _HINTS


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Turn a value from YAML (typed) or a CLI flag (text) into the field's type, or say clearly why not."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~", "")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0] if len(inner) == 1 else typing.Union[tuple(inner)])
    if origin in (typing.Union, types.UnionType) and set(args) == {bool, str}:  # a switch or a path
        if isinstance(value, bool) or (isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE):
            return _coerce(key, value, bool)
        return _coerce(key, value, str)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        if isinstance(value, bool):  # YAML reads an unquoted `no` (also off, false) as false; the choice is meant
            spelled = [word for word in (("true", "yes", "on") if value else ("false", "no", "off")) if word in args]
            if spelled:
                return spelled[0]
        hint_text = did_you_mean(str(value), [str(a) for a in args])
        raise ConfigError(
            f"config key '{key}' = {value!r}: expected one of {', '.join(map(str, args))}{hint_text}"
        )
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"config key '{key}' = {value!r}: expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    number = float(value)
                    if number.is_integer():
                        return int(number)
                except ValueError:
                    pass
        raise ConfigError(f"config key '{key}' = {value!r}: expected a whole number")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML reads `1e-4` (no dot) as text, so numbers arrive as strings from files too
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' = {value!r}: expected a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' = {value!r}: expected text")
    if origin is list:
        if isinstance(value, str) and value.strip().startswith("["):
            try:  # a JSON list on the command line, e.g. --datasets '[{"path": "a.jsonl"}]'
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(f"config key '{key}': not a valid JSON list") from None
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a list")
        return [_coerce(f"{key}[{i}]", item, args[0]) for i, item in enumerate(value)] if args else value
    if origin is dict or hint is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(f"config key '{key}': expected a mapping (JSON on the command line)") from None
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a mapping")
        return value
    raise TypeError(f"no coercion for field {key} of type {hint}")  # a schema bug, not a user error


def field_help() -> list[tuple[str, str, Any, str, str]]:
    """(group, name, default, type label, help) for every field, in schema order: what `--help` prints."""
    hints = _type_hints()
    rows = []
    for f in dataclasses.fields(SFTConfig):
        rows.append((f.metadata["group"], f.name, _default(f), _type_label(hints[f.name]), f.metadata["help"]))
    return rows


def _type_label(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return _type_label(inner[0]) if len(inner) == 1 else "BOOL|PATH" if set(inner) == {bool, str} else "VALUE"
    if hint is bool:
        return "BOOL"
    if hint is int:
        return "INT"
    if hint is float:
        return "FLOAT"
    if origin is list:
        return "LIST"
    if origin is dict:
        return "JSON"
    return "TEXT"


def field_is_bool(name: str) -> bool:
    return _type_hints()[name] is bool
