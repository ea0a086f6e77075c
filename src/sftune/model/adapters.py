"""Make a loaded model ready to train: gradient checkpointing, then LoRA / DoRA / rsLoRA adapters through peft.

With adapters the base weights stay frozen (and may be 4- or 8-bit, see model/load.py); only the adapters and
any `lora_modules_to_save` train, in the dtype the precision plan gives trained weights (sftune/precision.py).
`merge_adapter` folds a trained adapter back into its base model for a standalone checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from sftune.config import CONFIG_FILENAME, SFTConfig, load_config
from sftune.errors import ConfigError, UserError
from sftune.model.load import (
    IMAGE_TEXT_TO_TEXT,
    first_line,
    load_model,
    load_processor,
    load_tokenizer,
    model_class_of,
    parameter_count,
)

log = logging.getLogger("sftune")

ADAPTER_CONFIG = "adapter_config.json"
GENERATION_CONFIG = "generation_config.json"
# What torch.utils.checkpoint.checkpoint takes besides the function and its inputs.
CHECKPOINT_KWARGS = {"use_reentrant", "preserve_rng_state", "context_fn", "determinism_check", "debug"}
ALL_LINEAR = "all-linear"


def prepare_for_training(model: nn.Module, config: SFTConfig) -> nn.Module:
    """The model the loop trains: `model` itself (full fine-tuning) or a peft model wrapping it."""
    if config.activation_checkpointing:
        enable_gradient_checkpointing(model, config.activation_checkpointing_kwargs)
    if config.use_peft:
        model = add_adapters(model, config)
    trainable, total = parameter_counts(model)
    log.info("parameters: %s trainable of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model


def enable_gradient_checkpointing(model: nn.Module, kwargs: dict | None) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them.

    Non-reentrant checkpointing by default: it needs no input that requires grad and gives the same gradients.
    The input embeddings are still made to require grad, because reentrant checkpointing (a user's choice)
    over a frozen base would otherwise drop every gradient of the adapters inside the checkpointed layers.
    """
    kwargs = {"use_reentrant": False} if kwargs is None else dict(kwargs)
    unknown = sorted(set(kwargs) - CHECKPOINT_KWARGS)
    if unknown:  # torch would only complain at the first backward pass, with no word of the config key
        raise ConfigError(f"config key 'activation_checkpointing_kwargs' (or gradient_checkpointing_kwargs) has "
                          f"'{unknown[0]}', which "
                          f"torch.utils.checkpoint does not take (known: {', '.join(sorted(CHECKPOINT_KWARGS))})")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 renamed the method
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.disable_input_require_grads()  # enable_input_require_grads adds hooks on every call: keep one set
    model.enable_input_require_grads()


def check_modules_to_save(model: nn.Module, names: list[str]) -> None:
    """Each lora_modules_to_save name must match a module (as peft matches them: the full name or its last
    parts); peft would train nothing for a name that matches none, without a word."""
    import difflib

    modules = [name for name, _ in model.named_modules() if name]
    for wanted in names:
        if not any(name == wanted or name.endswith("." + wanted) for name in modules):
            leaves = sorted({name.rsplit(".", 1)[-1] for name in modules if not name.rsplit(".", 1)[-1].isdigit()})
            close = difflib.get_close_matches(wanted, leaves, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"config key 'lora_modules_to_save' names '{wanted}', which matches no module of the "
                              f"model: {hint}(modules include: {', '.join(leaves[:12])})")


def add_adapters(model: nn.Module, config: SFTConfig) -> nn.Module:
    """Wrap `model` in a peft model with new LoRA adapters, or with the adapter at config.adapter_name_or_path."""
    from peft import LoraConfig, PeftModel, get_peft_model

    # autocast_adapter_dtype=False: the adapters take the dtype of the layer they adapt (fp32 on a quantized
    # layer); the precision plan then sets the dtype of every trained weight (sftune/precision.py).
    if config.adapter_name_or_path:
        check_adapter_files(config.adapter_name_or_path, config.allow_pickled_weights, "adapter_name_or_path")
        try:
            with _quiet_peft():
                model = PeftModel.from_pretrained(
                    model, config.adapter_name_or_path, is_trainable=True, autocast_adapter_dtype=False
                )
        except (OSError, ValueError) as err:
            raise UserError(
                f"could not load the adapter '{config.adapter_name_or_path}' (adapter_name_or_path): {first_line(err)}"
            ) from None
        settings = model.peft_config["default"]
        log.info(
            "adapters: continuing %s (r=%d, alpha=%s, targets %s); its own settings replace the lora_* keys",
            config.adapter_name_or_path, settings.r, settings.lora_alpha, _targets_label(settings.target_modules),
        )
    else:
        targets = config.lora_target_modules or default_target_modules(model)
        check_target_parameters(model, config.lora_target_parameters)
        check_modules_to_save(model, config.lora_modules_to_save or [])
        lora = LoraConfig(
            task_type="CAUSAL_LM",
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else targets,
            # 3-D parameters such as an MoE model's fused experts, which no module name reaches
            target_parameters=config.lora_target_parameters,
            modules_to_save=config.lora_modules_to_save,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
            # A model whose output head is its input embedding keeps them one matrix when either is trained
            # in full, so the merged model stays tied like its base.
            ensure_weight_tying=_ties_embeddings(model) and bool(config.lora_modules_to_save),
        )
        try:
            with _quiet_peft():
                model = get_peft_model(model, lora, autocast_adapter_dtype=False)
        except ValueError as err:
            keys = "lora_target_parameters" if "target_parameters" in str(err) else "lora_target_modules"
            raise UserError(f"could not add LoRA adapters: {first_line(err)} (check {keys})") from None
        kind = "DoRA" if config.use_dora else "rsLoRA" if config.use_rslora else "LoRA"
        log.info(
            "adapters: %s r=%d alpha=%d dropout=%g on %s%s", kind, config.lora_r, config.lora_alpha,
            config.lora_dropout, _targets_label(lora.target_modules),
            f" and the parameters {','.join(config.lora_target_parameters)}" if config.lora_target_parameters else "",
        )
    report_frozen_experts(model)
    return model


def expert_parameter_names(model: nn.Module) -> list[str]:
    """The 3-D weights of an MoE model's fused experts, by the suffix after the layer number
    (`mlp.experts.gate_up_proj`); empty for a dense model. Under peft, the base weights' names."""
    suffixes = []
    for name, param in model.named_parameters():
        if param.ndim != 3 or "lora_" in name:
            continue
        parts = name.replace(".base_layer", "").split(".")
        numbered = [i for i, part in enumerate(parts) if part.isdigit()]
        suffix = ".".join(parts[numbered[-1] + 1:] if numbered else parts[-2:])
        if suffix not in suffixes:
            suffixes.append(suffix)
    return suffixes


def check_target_parameters(model: nn.Module, targets: list[str] | None) -> None:
    """Each of lora_target_parameters must name a parameter (peft only warns, and trains without it)."""
    names = [name for name, _ in model.named_parameters()]
    for target in targets or []:
        if not any(name == target or name.endswith(f".{target}") for name in names):
            experts = expert_parameter_names(model)
            hint = f"this model's expert weights are {', '.join(experts)}" if experts else \
                "this model has no 3-D expert weights"
            raise UserError(f"config key 'lora_target_parameters' has '{target}', which names no parameter of "
                            f"{type(model).__name__} ({hint})")


def report_frozen_experts(model: nn.Module) -> None:
    """One line when a LoRA run leaves every expert of an MoE model untouched: module names (even all-linear)
    never reach fused 3-D expert weights, so users are easily surprised."""
    experts = expert_parameter_names(model)
    adapted = any(p.requires_grad and "experts" in name for name, p in model.named_parameters())
    if experts and not adapted:
        log.info("adapters: the experts of this Mixture-of-Experts model stay frozen (LoRA on modules does not "
                 "reach their 3-D weights); to adapt them set lora_target_parameters: [%s] (and lora_dropout: 0)",
                 ", ".join(experts))


def _ties_embeddings(model: nn.Module) -> bool:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return bool(getattr(config, "tie_word_embeddings", False))


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft 0.21 reads a transformers property that transformers 5.24 renamed; the warning is not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def default_target_modules(model: nn.Module) -> list[str]:
    """The linear projections inside the language model's attention blocks (q/k/v/o in most architectures).

    Returned as their short names (`q_proj`, ...) when those pick out exactly these layers in the whole model;
    otherwise (a vision tower with the same names, an MLP sharing a name) as full module names.
    """
    language_model = model.get_decoder() if hasattr(model, "get_decoder") else model
    names_of = {id(module): name for name, module in model.named_modules()}
    wanted: set[str] = set()
    for attention in language_model.modules():
        if not type(attention).__name__.endswith("Attention"):
            continue
        for child in attention.children():
            if _is_linear(child):
                wanted.add(names_of[id(child)])
    if not wanted:
        raise UserError(
            f"could not find the attention projections of {type(model).__name__}: set lora_target_modules "
            f"(module names such as q_proj,v_proj, or {ALL_LINEAR})"
        )
    short = sorted({name.rsplit(".", 1)[-1] for name in wanted})
    matched = {name for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in short and _is_linear(module)}
    return short if matched == wanted else sorted(wanted)


def _is_linear(module: nn.Module) -> bool:
    # nn.Linear covers bitsandbytes' Linear4bit / Linear8bitLt (subclasses); Conv1D is GPT-2's linear layer.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _targets_label(targets: Any) -> str:
    if isinstance(targets, str):
        return targets
    names = sorted(targets)
    return ",".join(names) if len(names) <= 8 else f"{len(names)} modules"


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, 4-bit weights counted by their unpacked size."""
    params = list(model.parameters())
    return parameter_count(p for p in params if p.requires_grad), parameter_count(params)


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def check_adapter_files(folder: str | Path, allow_pickled_weights: bool, key: str) -> None:
    """A local adapter saved only with pickle (adapter_model.bin) loads only with allow_pickled_weights."""
    path = Path(folder).expanduser()
    if allow_pickled_weights or not path.is_dir() or (path / "adapter_model.safetensors").is_file():
        return
    if (path / "adapter_model.bin").is_file():
        raise UserError(
            f"adapter folder '{folder}' ({key}) holds only pickled weights (adapter_model.bin), which can run code "
            "when loaded: convert them to safetensors, or set allow_pickled_weights: true if you trust the file"
        )


def merge_adapter(run_dir: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Fold the adapter saved in `run_dir` into its base model and write a full model to `output` (a new folder).

    The base is loaded unquantized, in the run's dtype, even when the adapter was trained on a 4- or 8-bit base:
    merging into quantized weights would round the update away. The merged model is written in the run's
    save_dtype (unset: the base checkpoint's dtype). The merged model keeps the run's generation
    config, so it stops at the end-of-turn token the adapter was trained to write.
    """
    from sftune.export.save import save_new_folder
    from sftune.output_guard import merge_marker

    from sftune.preflight import check_merge_folders

    run_dir, output = check_merge_folders(run_dir, output, overwrite)
    log.info("merging the adapter in %s into its base model", run_dir)
    model, saved_with = load_adapter_run(run_dir)
    with _quiet_peft():
        merged = model.merge_and_unload()
    save_new_folder(merged, saved_with, output, overwrite=overwrite, extra_files=merge_marker(run_dir),
                    dtype=merged_dtype(run_dir))
    log.info("saved the merged model to %s", output)
    return output


def merged_dtype(run_dir: Path) -> Any:
    """The run's save_dtype; None ('auto', or a run sftune did not train): the dtype the base loads in, which the
    merged weights already have (peft merges each update into the base weight's own dtype)."""
    import torch

    saved = run_dir / CONFIG_FILENAME
    name = load_config(saved).save_dtype if saved.is_file() else "auto"
    return None if name == "auto" else getattr(torch, name)


def load_adapter_run(run_dir: Path) -> tuple[Any, Any]:
    """The adapter in `run_dir` on its base model (unquantized, in the run's dtype), and the run's tokenizer or
    processor. Generation stops where the run's saved generation config says (see `use_saved_generation_config`)."""
    from peft import PeftModel

    config = base_model_config(run_dir)
    check_adapter_files(run_dir, config.allow_pickled_weights, "RUN_DIR")
    base = load_model(config)
    saved_with = run_tokenizer(run_dir, config)
    use_saved_generation_config(base, run_dir, text_tokenizer(saved_with))
    try:
        with _quiet_peft():
            return PeftModel.from_pretrained(base, run_dir), saved_with
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"could not apply the adapter in '{run_dir}' to its base model: {first_line(err)}") from None


def use_saved_generation_config(model: Any, folder: Path, tokenizer: Any) -> None:
    """Give `model` the generation config saved in `folder` (beside an adapter, peft does not load it), and make
    sure it stops at the template's end-of-turn token, also for folders that sftune did not write."""
    from transformers import GenerationConfig

    from sftune.tokenizer import set_generation_stops

    if (folder / GENERATION_CONFIG).is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    set_generation_stops(model.generation_config, tokenizer)


def text_tokenizer(saved_with: Any) -> Any:
    """The tokenizer itself, also when a vision-language model's processor holds it."""
    from transformers import ProcessorMixin

    return saved_with.tokenizer if isinstance(saved_with, ProcessorMixin) else saved_with


def base_model_config(run_dir: Path) -> SFTConfig:
    """How to load the adapter's base model: the run's own config when sftune trained it, else adapter_config.json."""
    saved = run_dir / CONFIG_FILENAME
    if saved.is_file():
        config = load_config(saved)
        return dataclasses.replace(
            config, load_in_4bit=False, load_in_8bit=False, activation_checkpointing=False, adapter_name_or_path=None,
        )
    base = json.loads((run_dir / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{run_dir / ADAPTER_CONFIG} names no base_model_name_or_path: cannot tell which model to merge into")
    return SFTConfig(model_name_or_path=base)


def run_tokenizer(run_dir: Path, config: SFTConfig) -> Any:
    """The tokenizer (or processor) saved with the run; the base model's where the run has none."""
    from transformers import AutoProcessor, AutoTokenizer

    if (run_dir / "tokenizer_config.json").is_file():
        vision = model_class_of(config) == IMAGE_TEXT_TO_TEXT
        return (AutoProcessor if vision else AutoTokenizer).from_pretrained(run_dir)
    return load_processor(config) or load_tokenizer(config)
