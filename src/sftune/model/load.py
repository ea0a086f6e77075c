"""Load the pretrained model and its tokenizer (and processor), from a local folder, a GGUF file or the Hub.

The model class comes from the model's own config: vision-language models load as image-text-to-text models
with their processor, everything else as a causal LM. Quantized loading (bitsandbytes) is set up here too;
adapters go on afterwards (model/adapters.py).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftune.config import SFTConfig
from sftune.errors import ConfigError, UserError

if TYPE_CHECKING:
    import torch

    from sftune.precision import PrecisionPlan

log = logging.getLogger("sftune")

SAFE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
# Pickle can run code when loaded: these load only with allow_pickled_weights.
PICKLED_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

CAUSAL_LM = "causal_lm"
IMAGE_TEXT_TO_TEXT = "image_text_to_text"

# from_pretrained arguments that sftune sets from its own config keys; model_init_kwargs must not set them.
OWN_LOAD_KEYS = {
    "dtype": "dtype", "torch_dtype": "dtype", "attn_implementation": "attn_implementation",
    "revision": "model_revision", "trust_remote_code": "trust_remote_code", "gguf_file": "gguf_file",
    "quantization_config": "load_in_4bit / load_in_8bit", "load_in_4bit": "load_in_4bit",
    "load_in_8bit": "load_in_8bit", "use_safetensors": "allow_pickled_weights",
}


def _where(name: str) -> str:
    return "local folder" if Path(name).expanduser().is_dir() else "Hugging Face Hub"


def _check_local(config: SFTConfig) -> None:
    """A path that is plainly local must exist and hold a model; anything else may be a Hub id."""
    name = config.model_name_or_path
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not path.exists():
        raise UserError(f"model '{name}' does not exist: check model_name_or_path")
    if not path.is_dir():
        return
    if config.gguf_file:
        if not (path / config.gguf_file).is_file():
            raise UserError(f"model folder '{name}' has no GGUF file '{config.gguf_file}': check gguf_file")
        return
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise UserError(
            f"model folder '{name}' holds a LoRA adapter, not a full model: set model_name_or_path to its base "
            f"model, use_peft: true and adapter_name_or_path: {name} to continue training it, "
            f"or merge it first with `sftune merge {name} --output DIR`"
        )
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; to load a GGUF file set gguf_file: {ggufs[0]}" if ggufs else ""
        raise UserError(f"model folder '{name}' has no config.json: it is not a saved transformers model{hint}")


def check_model_files(config: SFTConfig) -> None:
    """A local model folder holds weights this run may load; checked before any data is prepared."""
    _check_local(config)
    name = config.model_name_or_path
    path = Path(name).expanduser()
    if not path.is_dir() or config.gguf_file or any((path / f).is_file() for f in SAFE_WEIGHT_FILES):
        return
    if any((path / f).is_file() for f in PICKLED_WEIGHT_FILES):
        if config.allow_pickled_weights:
            return
        raise UserError(
            f"model folder '{name}' holds only pickled weights (pytorch_model.bin), which can run code when loaded: "
            "convert them to safetensors, or set allow_pickled_weights: true if you trust the file"
        )
    raise UserError(f"model folder '{name}' holds no weights (expected model.safetensors)")


def _source_kwargs(config: SFTConfig) -> dict[str, Any]:
    """Where the files come from: shared by config, tokenizer, processor and model loading."""
    kwargs: dict[str, Any] = {"revision": config.model_revision, "trust_remote_code": config.trust_remote_code}
    if config.gguf_file:
        kwargs["gguf_file"] = config.gguf_file
    return kwargs


def _load_error(what: str, config: SFTConfig, err: Exception) -> UserError:
    name, message = config.model_name_or_path, first_line(err)
    if "trust_remote_code" in message or "custom code" in message:
        return UserError(
            f"model '{name}' ships its own Python code: set trust_remote_code: true only if you trust its authors"
        )
    hint = ""
    if "deserializing" in message:  # safetensors could not read a weights file
        hint = ": a weights file is damaged or cut short; copy or download the model again"
    elif what == "the model" and "safetensors" in message and not config.allow_pickled_weights:
        hint = " (only safetensors weights load unless allow_pickled_weights: true; set it only if you trust the files)"
    return UserError(f"could not load {what} of '{name}' from the {_where(name)}: {message}{hint}")


def load_model_config(config: SFTConfig) -> Any:
    """The model's transformers config (config.json), read without loading any weights."""
    from transformers import AutoConfig

    _check_local(config)
    try:
        return AutoConfig.from_pretrained(config.model_name_or_path, **_source_kwargs(config))
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise _load_error("the config", config, err) from None


def model_class_of(config: SFTConfig) -> str:
    """'image_text_to_text' for vision-language models, 'causal_lm' otherwise, unless config.model_class says."""
    if config.model_class != "auto":
        return config.model_class
    if config.gguf_file:  # GGUF checkpoints that transformers reads are text-only
        return CAUSAL_LM
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        model_type = getattr(load_model_config(config), "model_type", None)
    except UserError:
        return CAUSAL_LM  # the tokenizer or model loader, which runs next, reports what is wrong
    return IMAGE_TEXT_TO_TEXT if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES else CAUSAL_LM


def load_tokenizer(config: SFTConfig) -> Any:
    """The text tokenizer (for a vision-language model, its processor's tokenizer)."""
    processor = load_processor(config)
    if processor is not None:
        return processor.tokenizer
    from transformers import AutoTokenizer

    _check_local(config)
    try:
        return AutoTokenizer.from_pretrained(config.model_name_or_path, **_source_kwargs(config))
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise _load_error("the tokenizer", config, err) from None


def load_processor(config: SFTConfig) -> Any | None:
    """The processor (image processor + tokenizer) of a vision-language model; None for text-only models."""
    if model_class_of(config) != IMAGE_TEXT_TO_TEXT:
        return None
    from transformers import AutoProcessor

    from sftune.model.processor import load_without_video, needs_torchvision

    try:
        try:
            processor = AutoProcessor.from_pretrained(config.model_name_or_path, **_source_kwargs(config))
        except ImportError as err:  # a video processor, which needs torchvision: images do not need it
            if not needs_torchvision(err):
                raise
            processor = load_without_video(config.model_name_or_path, load_model_config(config),
                                           _source_kwargs(config))
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise _load_error("the processor", config, err) from None
    if not hasattr(processor, "tokenizer"):
        raise UserError(
            f"'{config.model_name_or_path}' loads as a vision-language model, but its processor "
            f"({type(processor).__name__}) has no tokenizer: set model_class: causal_lm if it is a text model"
        )
    return processor


def torch_dtype(name: str) -> torch.dtype | str:
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def load_model(config: SFTConfig, device: torch.device | str | None = None, quiet: bool = False,
               precision: PrecisionPlan | None = None) -> Any:
    """The pretrained model in the configured dtype, attention kernel and quantization.

    `precision` (the run's plan) sets the dtype quantized layers compute in; unset, the plan for this config on a
    CPU. The weights are loaded in config.dtype either way: the training loop brings them to the plan's dtypes.

    `device` places a quantized model directly (bitsandbytes weights are quantized as they are loaded, and an
    8-bit model cannot be moved afterwards); other models are moved by the training loop. `quiet` leaves out the
    log line (for a second load of a model the log has already described).
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    name = config.model_name_or_path
    check_model_files(config)
    kind = model_class_of(config)
    kwargs: dict[str, Any] = {**_source_kwargs(config), "dtype": torch_dtype(config.dtype)}
    if not config.gguf_file and not config.allow_pickled_weights:
        kwargs["use_safetensors"] = True  # a Hub repository with only pickled weights fails instead of unpickling
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    if precision is None:
        from sftune.precision import plan_precision

        precision = plan_precision(config, "cpu")
    quantization = quantization_config(config, precision.compute_dtype)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        if device is not None:
            kwargs["device_map"] = {"": device}
    kwargs.update(_init_kwargs(config))
    model_class = AutoModelForImageTextToText if kind == IMAGE_TEXT_TO_TEXT else AutoModelForCausalLM
    from safetensors import SafetensorError

    try:
        model = model_class.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError, ImportError, SafetensorError) as err:
        raise _load_error("the model", config, err) from None
    except TypeError as err:
        if not config.model_init_kwargs:
            raise
        raise ConfigError(f"config key 'model_init_kwargs': {model_class.__name__}.from_pretrained refused "
                          f"them ({first_line(err)}): check model_init_kwargs") from None
    except RuntimeError as err:
        if "ignore_mismatched_sizes" in str(err):  # transformers: shapes in the weights differ from config.json's
            raise UserError(f"the weights of model '{name}' do not fit its config.json (some tensors have other "
                            "shapes): the config and the weights come from different models; use the config.json "
                            "the weights were saved with") from None
        if quantization is None:
            raise
        raise UserError(
            f"bitsandbytes could not quantize '{name}' on this machine ({first_line(err)}): "
            "check that the installed bitsandbytes supports your device, or drop load_in_4bit / load_in_8bit"
        ) from None
    if config.gguf_file:
        model = plain_model_from_gguf(model)
    if config.use_liger_kernel:
        from sftune.model.liger import apply_liger_kernels

        apply_liger_kernels(model)
    total = parameter_count(model.parameters())
    (log.debug if quiet else log.info)(
        "model: %s (%s, %.1fM parameters, %s%s)", name, type(model).__name__, total / 1e6, model.dtype,
        ", " + _quantization_label(config) if quantization is not None else "",
    )
    return model


def parameter_count(params: Any) -> int:
    """Number of weights, counting a 4-bit bitsandbytes tensor by its unpacked size (two values per byte)."""
    total = 0
    for param in params:
        packed = type(param).__name__ == "Params4bit"
        total += param.numel() * (2 * param.element_size() if packed else 1)
    return total


def _init_kwargs(config: SFTConfig) -> dict[str, Any]:
    extra = dict(config.model_init_kwargs or {})
    for key in extra:
        if key in OWN_LOAD_KEYS:
            raise ConfigError(
                f"config key 'model_init_kwargs' sets '{key}': use the config key '{OWN_LOAD_KEYS[key]}' instead"
            )
    return extra


def quantization_config(config: SFTConfig, compute_dtype: torch.dtype) -> Any | None:
    """bitsandbytes settings for load_in_4bit / load_in_8bit; None for an unquantized model. 4-bit layers compute
    in `compute_dtype`, the precision plan's (bf16 under bf16 mixed precision, fp32 under fp32)."""
    if not (config.load_in_4bit or config.load_in_8bit):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        key = "load_in_4bit" if config.load_in_4bit else "load_in_8bit"
        raise UserError(
            f"{key} needs the bitsandbytes package, which is not installed: "
            "pip install 'sftune[quantization]' (or pip install bitsandbytes)"
        )
    from transformers import BitsAndBytesConfig

    if config.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=config.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _quantization_label(config: SFTConfig) -> str:
    if config.load_in_8bit:
        return "8-bit base"
    nested = " nested" if config.use_bnb_nested_quant else ""
    return f"4-bit {config.bnb_4bit_quant_type}{nested} base"


def plain_model_from_gguf(loaded: Any) -> Any:
    """The same weights in a plain transformers model, without the GGUF quantization config.

    transformers dequantizes a GGUF file when loading it but keeps a `quantization_config` that makes
    save_pretrained refuse the model; rebuilding from the config without it gives a model that saves normally.
    """
    from transformers import AutoModelForCausalLM

    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = type(loaded.config).from_dict(settings)
    model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model


def first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
