"""Load the pretrained model and its tokenizer, from a local folder or the Hugging Face Hub."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from sftune.config import SFTConfig
from sftune.errors import UserError

log = logging.getLogger("sftune")

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _where(name: str) -> str:
    return "local folder" if Path(name).expanduser().is_dir() else "Hugging Face Hub"


def _check_local(name: str) -> None:
    """A path that is plainly local must exist; anything else may be a Hub id."""
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not path.exists():
        raise UserError(f"model '{name}' does not exist: check model_name_or_path")
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"model folder '{name}' has no config.json: it is not a saved transformers model")


def load_tokenizer(config: SFTConfig) -> Any:
    from transformers import AutoTokenizer

    name = config.model_name_or_path
    _check_local(name)
    try:
        return AutoTokenizer.from_pretrained(
            name, revision=config.model_revision, trust_remote_code=config.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise UserError(f"could not load the tokenizer of '{name}' from the {_where(name)}: {_first_line(err)}") from None


def torch_dtype(name: str) -> torch.dtype | str:
    return "auto" if name == "auto" else getattr(torch, name)


def load_model(config: SFTConfig) -> Any:
    from transformers import AutoModelForCausalLM

    name = config.model_name_or_path
    _check_local(name)
    path = Path(name).expanduser()
    if path.is_dir() and not any((path / f).is_file() for f in WEIGHT_FILES):
        raise UserError(f"model folder '{name}' holds no weights (expected model.safetensors)")
    kwargs: dict[str, Any] = {
        "revision": config.model_revision,
        "trust_remote_code": config.trust_remote_code,
        "dtype": torch_dtype(config.dtype),
    }
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError, ImportError) as err:
        message = _first_line(err)
        if "trust_remote_code" in message:
            raise UserError(
                f"model '{name}' ships its own code; set trust_remote_code: true only if you trust its authors"
            ) from None
        raise UserError(f"could not load model '{name}' from the {_where(name)}: {message}") from None
    total = sum(p.numel() for p in model.parameters())
    log.info("model: %s (%s, %.1fM parameters, %s)", name, type(model).__name__, total / 1e6, model.dtype)
    return model


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
