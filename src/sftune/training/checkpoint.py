"""Checkpoints: everything needed to continue a run exactly, written so that a crash never leaves a fake one.

A checkpoint is `output_dir/checkpoint-<step>/` holding the model (or adapter) and tokenizer as the final save
writes them, `optimizer.pt`, `scheduler.pt`, `rng_state.pt` (every process's generators), `trainer_state.json`
(step, tokens seen, loss scale), `master_weights.safetensors` (the fp32 master weights, where the model files
hold them in the checkpoint's own lower dtype) and the run's config. The data position is the step itself: the data order is a pure
function of (seed, epoch). It is written into a hidden `.partial` folder and renamed into place in one step, so
a folder named `checkpoint-<step>` was complete when written; its manifest (written last, manifest.py) is checked
before a resume reads it, so one damaged since is named, never loaded.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sftune.errors import UserError, write_failure_reason
from sftune.manifest import manifest_problem, write_manifest

if TYPE_CHECKING:
    import torch

log = logging.getLogger("sftune")

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
MASTER_WEIGHTS = "master_weights.safetensors"  # fp32 masters behind model files saved in a lower dtype
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in output_dir, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume_path(output_dir: Path, resume: bool | str | None) -> Path | None:
    """The checkpoint to continue from: None to start fresh."""
    if not resume:
        return None
    if resume is True:
        found = list_checkpoints(output_dir)
        return refuse_model_only(intact(found[-1][1])) if found else None
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise UserError(f"resume_from_checkpoint '{resume}' is not a checkpoint folder (no {STATE_FILE} in it)")
    return refuse_model_only(intact(path))


def intact(path: Path) -> Path:
    """`path`, if its files match its manifest; else an error naming what is wrong and the newest earlier
    checkpoint of its run that is intact."""
    problem = manifest_problem(path)
    if problem is None:
        return path
    step = int(_NAME.match(path.name).group(1)) if _NAME.match(path.name) else None
    earlier = [p for s, p in reversed(list_checkpoints(path.parent)) if step is None or s < step]
    good = next((p for p in earlier if manifest_problem(p) is None), None)
    instead = (f"resume from the previous complete one (resume_from_checkpoint: {good})" if good is not None else
               "no earlier checkpoint is complete: start the run again")
    raise UserError(f"checkpoint '{path}' is damaged or incomplete ({problem}), so training cannot continue from "
                    f"it: {instead}, and delete '{path}'")


def is_model_only(path: Path) -> bool:
    """A checkpoint written with save_only_model: weights, tokenizer and config, no training state."""
    try:
        return bool(json.loads((path / STATE_FILE).read_text()).get("model_only"))
    except (OSError, json.JSONDecodeError):
        return False


def refuse_model_only(path: Path) -> Path:
    if is_model_only(path):
        raise UserError(f"checkpoint '{path}' was saved with save_only_model: true, so it holds no optimizer, "
                        "schedule or random-generator state and training cannot continue from it: start a new run "
                        f"from its weights (model_name_or_path: {path}), or resume from a full checkpoint")
    return path


# ---------------------------------------------------------------- RNG state, kept as plain data


def rng_state() -> dict[str, Any]:
    import torch

    numpy_state = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(_to_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


# ---------------------------------------------------------------- save and load


def stage_path(output_dir: Path, step: int) -> Path:
    """Where checkpoint-<step> is written before it is published; every process can compute it."""
    return output_dir / f".{PREFIX}{step}.partial"


def prepare_stage(stage: Path) -> None:
    """A fresh, empty staging folder; leftovers of runs that died while saving are removed (main process)."""
    for leftover in stage.parent.glob(f".{PREFIX}*.partial*"):
        shutil.rmtree(leftover, ignore_errors=True)
    stage.mkdir()


def publish_checkpoint(
    stage: Path, step: int, save_model_files: Any, optimizer: Any | None, scheduler: Any | None,
    rng_states: list[dict[str, Any]] | None, trainer_state: dict[str, Any], config_path: Path,
) -> Path:
    """Write the rest of checkpoint-<step> into `stage` and rename it into place (main process only).

    `save_model_files(folder)` writes the model; `optimizer` is None when its shards were saved by every process,
    or (with scheduler and rng_states) when the checkpoint holds only the model (save_only_model).
    """
    import torch

    final = stage.parent / f"{PREFIX}{step}"
    try:
        save_model_files(stage)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), stage / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), stage / "scheduler.pt")
        if rng_states is not None:
            torch.save({"processes": rng_states}, stage / "rng_state.pt")
        shutil.copyfile(config_path, stage / config_path.name)
        (stage / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        write_manifest(stage)  # last: a checkpoint whose files do not match it is not used (manifest.py)
        _fsync_tree(stage)
        if final.exists():  # the same step saved again (after a resume): swap the new one in
            old = stage.parent / f".{PREFIX}{step}.old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            stage.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            stage.rename(final)
    except BaseException as err:
        shutil.rmtree(stage, ignore_errors=True)
        reason = write_failure_reason(err)
        if reason is None:
            raise
        earlier = list_checkpoints(stage.parent)
        then = (f"continue from checkpoint-{earlier[-1][0]} with resume_from_checkpoint: true" if earlier else
                "run the same command again (no earlier checkpoint: the run starts over)")
        raise UserError(f"could not write checkpoint-{step} in {stage.parent} ({reason}); the earlier checkpoints "
                        f"are untouched: free some space, then {then}") from None
    return final


def _fsync_tree(folder: Path) -> None:
    """Make the files durable before the rename publishes them."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def load_training_state(path: Path) -> dict[str, Any]:
    """Optimizer, scheduler and RNG states, and the trainer state; our own files, loaded without pickle."""
    import torch

    optimizer_file = path / "optimizer.pt"
    try:
        return {
            "optimizer": torch.load(optimizer_file, weights_only=True, map_location="cpu")
            if optimizer_file.is_file() else None,  # saved as shards by a sharded engine
            "scheduler": torch.load(path / "scheduler.pt", weights_only=True),
            "rng": torch.load(path / "rng_state.pt", weights_only=True)["processes"],
            "trainer": json.loads((path / STATE_FILE).read_text()),
        }
    except (OSError, RuntimeError, json.JSONDecodeError, KeyError) as err:
        raise UserError(f"checkpoint '{path}' cannot be read ({err}); resume from another checkpoint") from None


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    """Put the checkpoint's weights into the model built for this run (a full model or a peft adapter)."""
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
        return
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise UserError(f"checkpoint '{path}' holds no model weights (model.safetensors)")
    state = {}
    for file in files:
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (an LM head sharing the embedding) are saved once; every other key must be there.
    own = model.state_dict()
    loaded = {t.data_ptr() for name, t in own.items() if name in state}
    untied_missing = [k for k in missing if own[k].data_ptr() not in loaded]
    if unexpected or untied_missing:
        raise UserError(
            f"checkpoint '{path}' does not fit this model (missing {untied_missing[:3]}, unexpected "
            f"{unexpected[:3]}): resume with the same model settings"
        )


def save_master_weights(model: torch.nn.Module, folder: Path, saved_dtype: torch.dtype) -> None:
    """The trained weights exactly as the optimizer holds them (fp32 masters), where the model files hold them in
    another dtype (bf16 for a bf16 checkpoint): without them a resume would continue from rounded weights."""
    from safetensors.torch import save_file

    masters = {name: param.detach().contiguous() for name, param in model.named_parameters()
               if param.requires_grad and param.dtype != saved_dtype}
    if masters:
        save_file(masters, folder / MASTER_WEIGHTS)


def load_master_weights(model: torch.nn.Module, path: Path) -> None:
    """Put a checkpoint's master weights (if it has any) over the weights load_model_weights put in."""
    from safetensors.torch import load_file

    if not (path / MASTER_WEIGHTS).is_file():
        return
    params = dict(model.named_parameters())
    masters = load_file(path / MASTER_WEIGHTS)
    unknown = sorted(set(masters) - set(params))
    if unknown:
        raise UserError(f"checkpoint '{path}' has master weights this model does not ({unknown[:3]}): resume with "
                        "the same model settings")
    for name, tensor in masters.items():
        params[name].data.copy_(tensor)


def prune_checkpoints(output_dir: Path, keep: int | None, protected_step: int | None = None) -> None:
    """Delete the oldest checkpoints beyond `keep`; checkpoint-<protected_step> (the best one) is always kept."""
    if keep is None:
        return
    for step, path in list_checkpoints(output_dir)[:-keep]:
        if step != protected_step:
            shutil.rmtree(path, ignore_errors=True)
