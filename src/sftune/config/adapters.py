"""The adapters group: LoRA (and DoRA, rsLoRA) through peft, and the bitsandbytes quantization of the frozen
base that QLoRA trains adapters on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sftune.config.fields import Problems, opt


@dataclass
class AdapterSettings:
    use_peft: bool = opt(False, "Train LoRA adapters on a frozen base model instead of every weight.", "adapters")
    lora_r: int = opt(16, "LoRA rank.", "adapters")
    lora_alpha: int = opt(32, "LoRA scale numerator: updates are scaled by lora_alpha / lora_r.", "adapters")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.", "adapters")
    lora_target_modules: list[str] | None = opt(
        None,
        "Modules that get adapters: names such as q_proj,v_proj, or all-linear "
        "(unset: every linear projection of the language model's attention).",
        "adapters",
    )
    lora_target_parameters: list[str] | None = opt(
        None,
        "Parameters (not modules) that get adapters: names or suffixes of 3-D expert weights of a Mixture-of-"
        "Experts model, e.g. mlp.experts.gate_up_proj,mlp.experts.down_proj (peft's target_parameters; needs "
        "lora_dropout: 0).",
        "adapters",
    )
    lora_modules_to_save: list[str] | None = opt(
        None, "Modules trained fully and saved with the adapter, e.g. lm_head,embed_tokens.", "adapters"
    )
    use_rslora: bool = opt(False, "Rank-stabilised LoRA: scale by lora_alpha / sqrt(lora_r).", "adapters")
    use_dora: bool = opt(False, "DoRA: weight-decomposed LoRA (a trained magnitude per output feature).", "adapters")
    adapter_name_or_path: str | None = opt(
        None,
        "Continue training this LoRA adapter (a folder with adapter_config.json, or a Hub id); its own rank, "
        "alpha and target modules are kept. Needs use_peft.",
        "adapters",
    )
    load_in_4bit: bool = opt(
        False, "QLoRA: load the frozen base in 4 bits through bitsandbytes (needs use_peft).", "adapters"
    )
    load_in_8bit: bool = opt(False, "Load the frozen base in 8 bits through bitsandbytes (needs use_peft).", "adapters")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = opt("nf4", "4-bit data type.", "adapters")
    use_bnb_nested_quant: bool = opt(
        False, "Quantize the 4-bit quantization constants too (double quantization; saves ~0.4 bit per weight).",
        "adapters",
    )

    def _check_adapters(self, problems: Problems) -> None:
        problems.need(self.lora_r >= 1, "lora_r", "must be >= 1")
        problems.need(self.lora_alpha > 0, "lora_alpha", "must be > 0")
        problems.need(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)")
        if self.lora_target_parameters and self.lora_dropout > 0:
            problems.add(
                f"config key 'lora_target_parameters' needs lora_dropout: 0 (it is {self.lora_dropout}): peft "
                "cannot apply dropout to adapters on expert parameters"
            )
        if self.lora_target_parameters and self.use_dora:
            problems.add("config keys 'lora_target_parameters' and 'use_dora' cannot be combined: peft has no "
                         "DoRA for expert parameters; keep one of them")
        for key in ("adapter_name_or_path", "load_in_4bit", "load_in_8bit"):
            problems.need(
                not getattr(self, key) or self.use_peft, key,
                "needs use_peft: true (a quantized or adapter-based run trains adapters, not the base weights)",
            )
        if self.load_in_4bit and self.load_in_8bit:
            problems.add("config keys 'load_in_4bit' and 'load_in_8bit' are both true: keep one of them")
        if self.gguf_file and (self.load_in_4bit or self.load_in_8bit):
            problems.add(
                "config key 'gguf_file' cannot be combined with load_in_4bit / load_in_8bit: "
                "a GGUF checkpoint is dequantized when loaded; use a safetensors model for bitsandbytes"
            )
