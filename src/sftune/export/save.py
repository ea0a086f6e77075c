"""Write the trained model and tokenizer so that transformers (or peft) loads them as-is. Files land atomically.

A full model is saved as safetensors weights, config and generation config; a peft model as its adapter
(adapter_config.json, adapter_model.safetensors) and the generation config, which peft leaves out: it holds the
end-of-turn token that stops generation, for `sftune chat`, `sftune merge` and anyone loading the adapter. Either
way the tokenizer, or a vision-language model's processor, is saved alongside with its chat template.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from sftune.errors import UserError

if TYPE_CHECKING:
    import torch

# peft writes a model card template with every adapter; sftune's own card (export/card.py) replaces it.
PEFT_CARD = "README.md"


@contextmanager
def staged_into(target: Path) -> Iterator[Path]:
    """Yield a fresh staging folder inside `target`; on success move each file into place with an atomic rename.

    A crash before the end leaves `target` as it was (plus a hidden staging folder), never a half-written file.
    """
    stage = target / f".staging-{uuid.uuid4().hex[:8]}"
    stage.mkdir(parents=True)
    try:
        yield stage
        for path in sorted(stage.rglob("*")):
            if path.is_file():
                destination = target / path.relative_to(stage)
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, destination)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def save_model(model: Any, tokenizer: Any, output_dir: Path, state_dict: dict[str, Any] | None = None,
               hub_layout: bool = True, dtype: torch.dtype | None = None) -> None:
    """The model (or its adapter) and the tokenizer or processor, into output_dir (a run folder).

    `state_dict` gives the full weights when the model in memory is sharded (FSDP, DeepSpeed ZeRO-3).
    `hub_layout` False keeps a full model's weights as they are in memory (a checkpoint: see write_model); `dtype`
    is the dtype of the saved weights (the run's save dtype: fp32 masters are written as bf16 for a bf16 checkpoint).
    """
    with staged_into(output_dir) as stage:
        write_model(model, tokenizer, stage, state_dict, hub_layout, dtype)


def save_new_folder(model: Any, tokenizer: Any, target: Path, overwrite: bool = False,
                    extra_files: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> None:
    """Write a model into `target`, which must not exist or be empty unless `overwrite`, in one step.

    Everything is written to a hidden sibling folder first and renamed to `target` at the end, so `target`
    either holds the complete new model or what it held before (with `overwrite`, the old folder is moved aside
    and deleted only once the new one is in place).
    """
    if target.exists() and not target.is_dir():
        raise UserError(f"'{target}' is a file: choose a new folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise UserError(f"'{target}' already exists and is not empty: choose a new folder, or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = target.parent / f".{target.name}.staging-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        write_model(model, tokenizer, stage, dtype=dtype)
        for name, text in (extra_files or {}).items():
            (stage / name).write_text(text, encoding="utf-8")
        if target.is_dir() and any(target.iterdir()):
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            stage.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, target)  # a rename onto a missing or empty folder is atomic
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_model(model: Any, tokenizer: Any, folder: Path, state_dict: dict[str, Any] | None = None,
                hub_layout: bool = True, dtype: torch.dtype | None = None) -> None:
    if dtype is not None:
        state_dict = state_dict_in(model, dtype, state_dict)
    # save_pretrained empties a state_dict it is given (transformers 5), so it gets a copy
    options = {"state_dict": dict(state_dict)} if state_dict is not None else {}
    if not hub_layout and not hasattr(model, "peft_config"):
        # transformers 5 saves some weights in their Hub layout, not the one in memory (an MoE model's fused 3-D
        # experts become one matrix per expert); a checkpoint keeps the memory layout, so that resuming loads it
        # key for key. from_pretrained reads both layouts.
        options["save_original_format"] = False
    model.save_pretrained(folder, **options)
    if dtype is not None and not hasattr(model, "peft_config"):
        label_config_dtype(model.config, dtype, folder)
    if hasattr(model, "peft_config"):
        (folder / PEFT_CARD).unlink(missing_ok=True)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    give_normal_permissions(folder)


def state_dict_in(model: Any, dtype: torch.dtype, state_dict: dict[str, Any] | None = None) -> dict[str, Any]:
    """The weights to save, with floating-point tensors in `dtype`. Only tensors of another dtype are copied (a
    frozen bf16 base is passed as it is); for a peft model only the trained ones, which are all its adapter saves.
    Tensors that share storage (tied embeddings) stay one tensor, so transformers still saves them once."""
    import torch

    state = state_dict if state_dict is not None else model.state_dict()
    trained = {name for name, p in model.named_parameters() if p.requires_grad} \
        if hasattr(model, "peft_config") else None
    converted: dict[int, torch.Tensor] = {}
    out = {}
    for key, tensor in state.items():
        if (isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dtype != dtype
                and (trained is None or key in trained)):
            pointer = tensor.data_ptr()
            if pointer not in converted:
                converted[pointer] = tensor.detach().to(dtype)
            tensor = converted[pointer]
        out[key] = tensor
    return out


def label_config_dtype(config: Any, dtype: torch.dtype, folder: Path) -> None:
    """config.json says the dtype of the weights in the files, not the one in memory: transformers writes the
    model's own (fp32 masters), and `from_pretrained(dtype="auto")` would load bf16 files as fp32 from it."""
    name = str(dtype).removeprefix("torch.")
    configs = [config, *(getattr(config, key) for key in getattr(config, "sub_configs", {}) if
                         getattr(config, key, None) is not None)]
    previous = [c.dtype for c in configs]
    try:
        for c in configs:
            c.dtype = name
        config.save_pretrained(folder)
    finally:
        for c, value in zip(configs, previous):
            c.dtype = value


def give_normal_permissions(folder: Path) -> None:
    """Files and folders under `folder` (and itself) get the mode a plain open() or mkdir() gives under this umask.

    safetensors writes its files with mode 0600 (a private temporary file, renamed), so the weights, alone of all
    the files, could not be read by another user, a container or a serving process; tempfile folders are 0700.
    """
    umask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def current_umask() -> int:
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return umask
