"""The training group: the optimizer step (learning rate, batch, accumulation, length of the run, schedule,
AdamW's settings, clipping, seed) and the engine under it (optimizer kind, loss, numerics, threads, compilation)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from sftune.config.fields import Problems, opt

# Adapters train far fewer weights from zero (LoRA's B), and take a larger step than full fine-tuning.
DEFAULT_LEARNING_RATE = 2e-5
DEFAULT_PEFT_LEARNING_RATE = 2e-4

# Why sequence parallelism is refused (sequence_parallel_size, TRL's parallelism_config): sftune writes no attention
# all-to-all of its own, and of the engines that split a sequence, torch's ring context parallelism (accelerate's
# ParallelismConfig, FSDP2) needs CUDA, and DeepSpeed's Ulysses is not installed and, measured, lets packed
# documents attend across each other (shared/NOTES.md).
SEQUENCE_PARALLEL_UNAVAILABLE = (
    "splitting a sequence across processes needs an engine sftune does not drive yet (torch's ring context "
    "parallelism through accelerate's ParallelismConfig on CUDA GPUs, or DeepSpeed Ulysses); for long rows use "
    "activation_offloading, activation_checkpointing and the chunked loss (loss_chunk_size)")


def unset_learning_rate(use_peft: bool) -> float:
    """The learning rate a config that leaves it unset trains with (README, `--help`)."""
    return DEFAULT_PEFT_LEARNING_RATE if use_peft else DEFAULT_LEARNING_RATE


@dataclass
class TrainingSettings:
    learning_rate: float | None = opt(
        None, "Peak learning rate of AdamW (unset: 2e-5, or 2e-4 with use_peft).", "training"
    )
    per_device_train_batch_size: int = opt(8, "Rows per micro-batch on each device.", "training")
    gradient_accumulation_steps: int = opt(
        1, "Micro-batches per optimizer step; the loss is normalised by the trained tokens of the whole step.",
        "training",
    )
    num_train_epochs: float = opt(3.0, "Passes over the training data (fractions allowed).", "training")
    max_steps: int = opt(-1, "Optimizer steps to run; overrides num_train_epochs when positive.", "training")
    lr_scheduler_type: Literal["linear", "cosine", "cosine_with_min_lr", "constant", "constant_with_warmup"] = opt(
        "linear", "Learning-rate schedule after warm-up.", "training"
    )
    lr_scheduler_kwargs: dict | None = opt(
        {}, "Extra schedule settings, e.g. {min_lr_rate: 0.1} or {min_lr: 1e-6} for cosine_with_min_lr.", "training"
    )
    warmup_steps: int | float = opt(
        0, "Warm-up length: optimizer steps, or a float in (0, 1) for that ratio of the total steps (transformers 5's "
        "replacement of warmup_ratio, which is accepted too).", "training"
    )
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay (never applied to biases and norms).", "training")
    adam_beta1: float = opt(0.9, "AdamW beta1.", "training")
    adam_beta2: float = opt(0.999, "AdamW beta2.", "training")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.", "training")
    max_grad_norm: float = opt(1.0, "Clip the gradient's global L2 norm to this value (0: no clipping).", "training")
    seed: int = opt(42, "Random seed for initialisation, shuffling and dropout.", "training")


    # engine: optimizer, loss, numerics
    optim: Literal["adamw_torch_fused", "adamw_torch", "adamw_8bit", "sgd"] = opt(
        "adamw_torch_fused",
        "Optimizer: AdamW (fused kernel, or torch's multi-tensor one), 8-bit AdamW (bitsandbytes), or plain SGD.",
        "training",
    )
    loss_type: Literal["nll", "dft", "chunked_nll"] = opt(
        "nll", "nll: cross-entropy (always chunked; chunked_nll is TRL's older name for it); dft: each token's loss "
        "weighted by its own detached probability.", "training"
    )
    loss_chunk_size: int | None = opt(
        None, "Trained tokens projected to the vocabulary at once in the loss (unset: ~256 MB of logits).",
        "training",
    )
    router_aux_loss_coef: float | None = opt(
        None,
        "Mixture-of-Experts: weight of the router's load-balancing loss added to the training loss (unset: the "
        "model config's own router_aux_loss_coef; 0: off, the expert load is still logged).",
        "training",
    )
    on_nonfinite_loss: Literal["stop", "skip"] = opt(
        "stop", "What a NaN/inf loss does: stop the run naming the step, or skip that optimizer step.", "training"
    )
    num_threads: int | None = opt(
        None,
        "CPU threads for torch's math. Unset: OMP_NUM_THREADS when set, else the cores this process may use (its "
        "CPU affinity and cgroup quota). The log says when other work competes for those cores: then fewer threads "
        "are often much faster.",
        "training",
    )
    use_cpu: bool = opt(False, "Train on the CPU even when a GPU is available.", "training")
    torch_compile: bool = opt(False, "Compile the model's backbone with torch.compile (slow first steps).", "training")
    full_determinism: bool = opt(
        False, "Use deterministic kernels everywhere (slower; bitwise-repeatable runs on GPU).", "training"
    )

    # TRL training keys (issue 15)
    label_smoothing_factor: float = opt(
        0.0, "Label smoothing of the training loss, as F.cross_entropy(label_smoothing=...): the target is "
        "(1 - factor) on the true token plus factor spread over the vocabulary. Training only: eval_loss stays "
        "plain cross-entropy. Not with loss_type: dft.", "training",
    )
    neftune_noise_alpha: float | None = opt(
        None, "NEFTune: uniform noise of scale alpha / sqrt(length x hidden) on the input embeddings of the training "
        "forward passes only (evaluation, generation and the saved model never see it); TRL suggests 5. Unset: off.",
        "training",
    )
    # long context (issue 18)
    activation_offloading: bool = opt(
        False, "Move the activations saved for backward to (pinned) CPU memory during each training forward pass and "
        "bring them back for backward (torch's saved-tensor hooks): less GPU memory, for host memory and PCIe "
        "transfers. On a CPU run nothing moves.", "training",
    )
    sequence_parallel_size: int = opt(
        1, "Processes each row's sequence is split across (sequence / context parallelism). Only 1 for now: sftune "
        "does not yet drive an engine that splits a sequence (see README, Long context).", "training",
    )
    # precision (issue 13): TRL's bf16 / fp16 flags, bf16 weights without fp32 masters, the dtype files are saved in
    bf16: bool | None = opt(
        None,
        "bf16 mixed precision (TRL's meaning): fp32 master weights, forward and backward autocast to bf16. Unset: on "
        "for a CUDA GPU with bf16 support, off (fp32) elsewhere; the run's saved config holds the choice.",
        "training",
    )
    fp16: bool = opt(
        False,
        "fp16 mixed precision: fp32 master weights, fp16 autocast and dynamic loss scaling; a step whose gradients "
        "overflow is skipped and counted in the metrics (skipped_steps).",
        "training",
    )
    bf16_weights: Literal["kahan", "plain"] | None = opt(
        None,
        "Keep the trained weights themselves in bf16, without fp32 master copies (4 bytes a weight less, bf16 "
        "optimizer moments): kahan: AdamW with Kahan-compensated updates (torch-optimi), which keeps small updates; "
        "plain: plain updates in bf16, which round most small updates away. Unset: fp32 master weights.",
        "training",
    )
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto",
        "Dtype of the saved model, adapters, merged models and checkpoints' model files; auto: the dtype the weights "
        "were loaded in (the checkpoint's own with dtype: auto). Checkpoints also keep the fp32 master weights.",
        "training",
    )

    def _check_training(self, problems: Problems) -> None:
        need = problems.need
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(self.per_device_train_batch_size >= 1, "per_device_train_batch_size", "must be >= 1")
        need(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        need(self.max_steps == -1 or self.max_steps >= 1, "max_steps", "must be >= 1, or -1 to use num_train_epochs")
        need(self.max_steps != -1 or self.num_train_epochs > 0, "num_train_epochs", "must be > 0 when max_steps is -1")
        need(math.isfinite(self.num_train_epochs), "num_train_epochs", "must be a finite number")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(0.0 <= self.adam_beta1 < 1.0, "adam_beta1", "must be in [0, 1)")
        need(0.0 <= self.adam_beta2 < 1.0, "adam_beta2", "must be in [0, 1)")
        need(self.adam_epsilon > 0, "adam_epsilon", "must be > 0")
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
        need(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32) (numpy's range)")
        need(self.loss_chunk_size is None or self.loss_chunk_size >= 1, "loss_chunk_size", "must be >= 1")
        need(self.num_threads is None or self.num_threads >= 1, "num_threads", "must be >= 1")
        need(self.neftune_noise_alpha is None or self.neftune_noise_alpha > 0, "neftune_noise_alpha",
             "must be > 0, or unset for no noise")
        need(0.0 <= self.label_smoothing_factor < 1.0, "label_smoothing_factor", "must be in [0, 1)")
        if self.label_smoothing_factor > 0 and self.loss_type == "dft":
            problems.add(f"config key 'label_smoothing_factor' ({self.label_smoothing_factor}) does not combine with "
                         "loss_type: dft (DFT weights each token by its own probability): set one of them")
        need(self.sequence_parallel_size >= 1, "sequence_parallel_size", "must be >= 1")
        if self.sequence_parallel_size > 1:
            problems.add(f"config key 'sequence_parallel_size' = {self.sequence_parallel_size} is not supported: "
                         f"{SEQUENCE_PARALLEL_UNAVAILABLE}; set it to 1")
        need(self.router_aux_loss_coef is None or self.router_aux_loss_coef >= 0, "router_aux_loss_coef",
             "must be >= 0 (0 turns the balancing loss off)")
        self._check_precision(problems)

    def _check_precision(self, problems: Problems) -> None:
        """Contradictory precision keys; what the machine cannot do is refused by the precision plan."""
        if self.bf16 and self.fp16:
            problems.add("config keys 'bf16' and 'fp16' are both true: keep one of them")
        if self.bf16_weights is not None and self.fp16:
            problems.add(f"config key 'bf16_weights' = {self.bf16_weights!r} trains in bf16, but fp16 is true: "
                         "keep one of them")
        if self.bf16_weights is not None and self.bf16 is False:
            problems.add(f"config key 'bf16_weights' = {self.bf16_weights!r} trains in bf16, but bf16 is false: "
                         "drop bf16: false (or bf16_weights)")
        if self.bf16_weights == "kahan" and self.optim not in ("adamw_torch", "adamw_torch_fused"):
            problems.add(f"config key 'bf16_weights' = 'kahan' is an AdamW of its own (torch-optimi), but optim is "
                         f"{self.optim!r}: set optim: adamw_torch, or drop bf16_weights")
