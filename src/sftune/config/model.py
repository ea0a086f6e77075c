"""The model group: which checkpoint, how its weights are loaded, and the kernels it runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sftune.config.fields import Problems, opt


@dataclass
class ModelSettings:
    model_name_or_path: str | None = opt(None, "Local folder or Hugging Face Hub id of the pretrained model.", "model")
    model_revision: str = opt("main", "Hub revision (branch, tag or commit) of the model.", "model")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "Dtype the weights are loaded in ('auto': the checkpoint's own; unlike TRL's default, float32). The "
        "dtypes they are trained in come from bf16 / fp16 / bf16_weights (unset: fp32 master weights), the saved "
        "files' from save_dtype.", "model"
    )
    attn_implementation: str | None = opt(
        None, "Attention kernel: 'sdpa', 'eager', 'flash_attention_2', ... (unset: transformers' default).", "model"
    )
    trust_remote_code: bool = opt(
        False, "Allow running Python code shipped inside the model repository. Only for models you trust.", "model"
    )
    use_liger_kernel: bool = opt(
        False, "GPU only: Liger's Triton kernels for RMSNorm, RoPE and SwiGLU (needs liger-kernel and CUDA); "
        "the loss stays sftune's chunked one.", "model"
    )
    allow_pickled_weights: bool = opt(
        False,
        "Allow loading model or adapter weights stored with pickle (pytorch_model.bin, adapter_model.bin), which "
        "can run code when loaded. Off: safetensors only. Only for files you trust.",
        "model",
    )
    model_class: Literal["auto", "causal_lm", "image_text_to_text"] = opt(
        "auto",
        "Which transformers class loads the model: 'auto' picks image_text_to_text for vision-language models "
        "(AutoModelForImageTextToText, with their processor) and causal_lm (AutoModelForCausalLM) otherwise.",
        "model",
    )
    gguf_file: str | None = opt(
        None, "Load the model and tokenizer from this GGUF file inside model_name_or_path (dequantized).", "model"
    )
    model_init_kwargs: dict | None = opt(
        None, "Extra keyword arguments for from_pretrained, such as config overrides (JSON on the command line).",
        "model",
    )
    activation_checkpointing: bool = opt(
        False, "Recompute activations in the backward pass: much less memory for about a third more time "
        "(transformers 5's name; gradient_checkpointing is accepted too). Unlike TRL's default (on), off.", "model"
    )
    activation_checkpointing_kwargs: dict | None = opt(
        None, "Arguments for torch.utils.checkpoint (unset: {\"use_reentrant\": false}); "
        "gradient_checkpointing_kwargs is accepted too.", "model"
    )

    def _check_model(self, problems: Problems) -> None:
        """Nothing in this group constrains another of its keys; quantization's conflicts live with adapters."""
