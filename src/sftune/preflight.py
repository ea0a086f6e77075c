"""What a run can check before torch and transformers load (they take 4-20 s to import): the required keys, the
output folder, the checkpoint to resume from, and the local paths it reads (model, data, chat template, adapter).
A mistake in any of them is one line within a second or two. Nothing here writes anything the user keeps.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from sftune.config import CONFIG_FILENAME, SFTConfig
from sftune.errors import UserError
from sftune.output_guard import check_merge_output, check_overwrite_output_dir, config_inputs, refuse_overlap

# What a finished run leaves in output_dir (a full model, or an adapter).
FINAL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def check_before_loading(config: SFTConfig, dataset_given: bool = False) -> Path | None:
    """Every check of a training run that needs no model, in the order config, output folder, model folder, data.

    Returns the checkpoint to continue from, or None to start from the beginning.
    """
    from sftune.training.checkpoint import resolve_resume_path
    from sftune.training.same_run import check_same_run

    config.check_ready_to_train(dataset_given=dataset_given)
    output_dir = Path(config.output_dir).expanduser()
    resume_from = resolve_resume_path(output_dir, config.resume_from_checkpoint)
    if config.resume_from_checkpoint is True and resume_from is None and output_dir.is_dir() \
            and any(output_dir.iterdir()) and not unfinished_run(output_dir):
        raise UserError(f"resume_from_checkpoint: true, but output_dir '{output_dir}' holds no checkpoint")
    if resume_from is not None:
        check_same_run(config, resume_from)
    if os.environ.get("RANK", "0") == "0":  # under a data-parallel launch the first process checks the folder
        check_output_dir(config, resume_from)
    check_input_paths(config, dataset_given)
    return resume_from


def unfinished_run(output_dir: Path) -> bool:
    """A run stopped before its first checkpoint: its config is there, but no checkpoint and no final weights.
    Continuing it (resume_from_checkpoint: true) starts it again from the beginning, in the same folder."""
    from sftune.training.checkpoint import list_checkpoints

    return ((output_dir / CONFIG_FILENAME).is_file() and not list_checkpoints(output_dir)
            and not any((output_dir / name).exists() for name in FINAL_WEIGHTS))


def check_output_dir(config: SFTConfig, resume_from: Path | None, probe: bool = True) -> Path:
    """Refuse an output_dir this run may not write into, before any work is done: never over another run's files.

    Nothing is created: a folder that does not exist yet is made when the run takes it (run.claim_output_dir), so
    a run that fails to start leaves no folder behind. `probe=False` (--dry_run) asks the file system for write
    permission instead of proving it with a file made and removed at once.
    """
    out = Path(config.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir '{out}' is a file, not a folder: choose another output_dir")
    refuse_overlap(out, config_inputs(config), "output_dir", replaces_contents=config.overwrite_output_dir)
    continuing = resume_from is not None and resume_from.resolve().parent == out.resolve()
    # a run that stopped before its first checkpoint (a crash at step 1, a full disk) left only its config and
    # log lines: the same command starts it over, with or without resume_from_checkpoint
    restarting = resume_from is None and out.is_dir() and unfinished_run(out)
    if config.overwrite_output_dir and not (continuing or restarting):
        check_overwrite_output_dir(out)
    if out.is_dir() and any(out.iterdir()) and not (config.overwrite_output_dir or continuing or restarting):
        raise UserError(
            f"output_dir '{out}' already holds files (another run?): choose another output_dir, "
            "set overwrite_output_dir: true to write over them, or resume_from_checkpoint: true to continue it"
        )
    if not probe:
        existing = out if out.is_dir() else next(p for p in out.absolute().parents if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"cannot write to output_dir '{out}' ('{existing}' is not a writable folder): choose "
                            "another output_dir")
        return out
    try:
        if out.is_dir():
            probe_file = out / f".write-test-{uuid.uuid4().hex[:8]}"
            probe_file.touch()
            probe_file.unlink()
        else:  # make the first missing folder of the path and take it away again: proof that the run can
            missing = out.absolute()
            while not missing.parent.exists():
                missing = missing.parent
            if not missing.parent.is_dir():
                raise UserError(f"output_dir '{out}': '{missing.parent}' is a file, not a folder: choose another "
                                "output_dir")
            missing.mkdir()
            missing.rmdir()
    except OSError as err:
        raise UserError(f"cannot write to output_dir '{out}' ({err.strerror or err}): choose another output_dir") from None
    return out


def check_input_paths(config: SFTConfig, dataset_given: bool = False) -> None:
    """The local files a run reads exist (a name that is not plainly a local path may be a Hub id)."""
    from sftune.data.sources import check_dataset_path, dataset_specs, local_files_of
    from sftune.tokenizer import template_file
    from sftune.model.load import check_model_files

    check_model_files(config)
    if not dataset_given:
        for spec in dataset_specs(config):
            if local_files_of(spec, spec.split) is None:  # data_files / data_dir are checked by finding them
                check_dataset_path(spec.path)
    if config.chat_template_path:
        template_file(config.chat_template_path)
    adapter = config.adapter_name_or_path
    if adapter and adapter.startswith((".", "/", "~")) and not Path(adapter).expanduser().exists():
        raise UserError(f"adapter '{adapter}' does not exist: check adapter_name_or_path")


# ---------------------------------------------------------------- sftune chat / merge: the folders they read and write


def check_chat_folder(run_dir: str | Path) -> Path:
    """`sftune chat RUN_DIR` talks to a full model (config.json) or an adapter (adapter_config.json)."""
    folder = Path(run_dir).expanduser()
    if not (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        where = "does not exist" if not folder.exists() else "holds neither a model (config.json) nor an adapter " \
            "(adapter_config.json)"
        raise UserError(f"'{folder}' {where}: give a run's output_dir or a folder saved by sftune merge")
    return folder


def check_merge_folders(run_dir: str | Path, output: str | Path, overwrite: bool) -> tuple[Path, Path]:
    """`sftune merge RUN_DIR --output DIR`: RUN_DIR holds an adapter; DIR is new or empty (or --overwrite)."""
    run_dir, output = Path(run_dir).expanduser(), Path(output).expanduser()
    if not (run_dir / "adapter_config.json").is_file():
        what = "a full model (nothing to merge)" if (run_dir / "config.json").is_file() else "no adapter"
        raise UserError(f"'{run_dir}' holds {what}: expected a run folder with adapter_config.json")
    check_merge_output(run_dir, output, overwrite)
    return run_dir, output
