"""Push a finished run to the Hugging Face Hub: the model or adapter, tokenizer, card, plot, metrics and config.

The token is huggingface_hub's business: HF_TOKEN, or the file `hf auth login` writes. sftune never reads it
into its config, logs or files. Checkpoints (optimizer states, often several times the model's size), hidden
staging folders and temporary files stay local. A push that fails leaves the local run as it was.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sftune.config import HUB_MODEL_ID, SFTConfig
from sftune.errors import UserError

log = logging.getLogger("sftune")

COMMIT_MESSAGE = "Upload a model trained with sftune"


class HubPushError(UserError):
    """The run is saved locally, but the upload to the Hub failed."""


def check_push_settings(config: SFTConfig) -> str:
    """Before training starts: the Hub is reachable with a token that works. Returns the repository id
    ('owner/name'): hub_model_id, or the output_dir's folder name under the token's account.

    Every process may call this (no files are written): a missing token stops all of them alike, before any
    model is loaded, instead of after hours of training.
    """
    from huggingface_hub import constants, get_token

    if constants.is_offline_mode():
        raise UserError("push_to_hub is set, but HF_HUB_OFFLINE is set too: unset HF_HUB_OFFLINE to push, "
                        "or set push_to_hub: false")
    if get_token() is None:
        raise UserError("push_to_hub needs a Hugging Face token with write access: set HF_TOKEN or run "
                        "`hf auth login` (or set push_to_hub: false)")
    name = config.hub_model_id or Path(config.output_dir).expanduser().resolve().name
    if not HUB_MODEL_ID.match(name):
        raise UserError(f"push_to_hub: the output_dir's name {name!r} is not a valid Hub repository name: "
                        "set hub_model_id")
    try:
        account = _api().whoami()["name"]
    except Exception as err:  # an invalid token, no network, a Hub error: all stop the run here, before training
        raise UserError(f"push_to_hub: the Hub did not accept the token ({_reason(err)}): check HF_TOKEN or "
                        "`hf auth login`, or set push_to_hub: false") from None
    return name if "/" in name else f"{account}/{name}"


def files_to_push(output_dir: Path) -> list[Path]:
    """Everything in output_dir but checkpoints, hidden files and folders (staging), and temporary files."""
    chosen = []
    for path in sorted(output_dir.rglob("*")):
        relative = path.relative_to(output_dir)
        if not path.is_file() or path.suffix == ".tmp" or any(part.startswith(".") for part in relative.parts):
            continue
        if relative.parts[0].startswith("checkpoint-") and len(relative.parts) > 1:
            continue
        chosen.append(path)
    return chosen


def push_run(output_dir: Path, repo_id: str, private: bool | None) -> str:
    """Create the repository if needed and upload the run in one commit. Returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd

    files = files_to_push(output_dir)
    log.info("pushing %d files (%.1f MB) to the Hub repository %s", len(files),
             sum(p.stat().st_size for p in files) / 2**20, repo_id)
    api = _api()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=p.relative_to(output_dir).as_posix(), path_or_fileobj=str(p))
                      for p in files]
        commit = api.create_commit(repo_id, operations, commit_message=COMMIT_MESSAGE)
    except Exception as err:
        log.error("the push to %s failed: %s", repo_id, _reason(err))
        raise HubPushError(
            f"the push to the Hub repository {repo_id} failed ({_reason(err)}); the run is saved in {output_dir}. "
            f"Upload it later with `hf upload {repo_id} {output_dir} --exclude 'checkpoint-*/*' --exclude '.*'`"
        ) from None
    log.info("pushed to %s", commit.commit_url)
    return commit.commit_url


def _api() -> Any:
    from huggingface_hub import HfApi

    return HfApi()


def _reason(err: Exception) -> str:
    """One line that says what went wrong (huggingface_hub's HTTP errors carry the server's message)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
