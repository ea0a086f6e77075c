"""Push a finished run to the Hugging Face Hub: the model or adapter, tokenizer, card, plot, metrics and config.

The token is huggingface_hub's business: HF_TOKEN, or the file `hf auth login` writes. sftune never reads it
into its config, logs or files. Checkpoints, hidden staging folders and temporary files stay local. A push that
fails leaves the local run as it was and says how to push it again (`sftune push RUN_DIR`).
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


def check_push_settings(config: SFTConfig, before_training: bool = True) -> str:
    """The Hub is reachable with a token that works. Returns the repository id ('owner/name'): hub_model_id, or
    the output_dir's folder name under the token's account.

    Called before training starts by every process (no files are written): a missing token stops all of them
    alike, before any model is loaded, instead of after hours of training.
    """
    from huggingface_hub import constants, get_token

    way_out = " (or set push_to_hub: false)" if before_training else ""
    if constants.is_offline_mode():
        raise UserError(f"pushing to the Hub, but HF_HUB_OFFLINE is set: unset it to push{way_out}")
    if get_token() is None:
        raise UserError("push_to_hub needs a Hugging Face token with write access: set HF_TOKEN or run "
                        f"`hf auth login`{way_out}")
    name = config.hub_model_id or Path(config.output_dir).expanduser().resolve().name
    if not HUB_MODEL_ID.match(name):
        raise UserError(f"the output_dir's name {name!r} is not a valid Hub repository name: set hub_model_id")
    try:
        account = _api().whoami()["name"]
    except Exception as err:  # an invalid token, no network, a Hub error: all stop the run here, before training
        raise UserError(f"push_to_hub: could not check the Hugging Face token with the Hub at {constants.ENDPOINT} "
                        f"({_reason(err)}): check the network, HF_TOKEN or `hf auth login`{way_out}") from None
    return name if "/" in name else f"{account}/{name}"


# Left out of a push: checkpoints (optimizer states, often several times the model's size), hidden files and
# folders (the staging folders of atomic saves), and temporary files. fnmatch's '*' also matches '/'.
NOT_PUSHED = ["checkpoint-*", ".*", "*.tmp"]


def push_run(output_dir: Path, repo_id: str, private: bool | None) -> str:
    """Create the repository if needed and upload the run folder in one commit. Returns the commit's URL.

    The model card goes up as `card_for_repo` makes it (its quick start loading from `repo_id`); nothing in
    output_dir changes."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.utils import disable_progress_bars, filter_repo_objects

    disable_progress_bars()  # the log says what is pushed; no bar per file

    from sftune.export.card import CARD_FILENAME, card_for_repo

    files = {path.relative_to(output_dir).as_posix(): path for path in sorted(output_dir.rglob("*")) if path.is_file()}
    names = list(filter_repo_objects(list(files), ignore_patterns=NOT_PUSHED))
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(files[name]) if name != CARD_FILENAME else
                           card_for_repo(files[name].read_text(encoding="utf-8"), repo_id).encode("utf-8"))
        for name in names
    ]
    log.info("pushing %d files (%.1f MB) from %s to the Hub repository %s", len(names),
             sum(files[name].stat().st_size for name in names) / 2**20, output_dir, repo_id)
    api = _api()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.create_commit(repo_id, operations, commit_message=COMMIT_MESSAGE)
    except Exception as err:  # HTTP errors, no network, a refused token: the local run is untouched either way
        raise HubPushError(
            f"the push to the Hub repository {repo_id} failed ({_reason(err)}); the run is saved in {output_dir}: "
            f"push it again with `sftune push {output_dir}`"
        ) from None
    log.info("pushed to %s", commit.commit_url)
    return commit.commit_url


def push_saved_run(run_dir: str | Path, hub_model_id: str | None = None, private: bool | None = None) -> str:
    """`sftune push RUN_DIR`: push a finished run (again), to the repository its saved config names unless
    `hub_model_id` is given."""
    from sftune.config import CONFIG_FILENAME, load_config

    folder = Path(run_dir).expanduser()
    if not (folder / CONFIG_FILENAME).is_file():
        raise UserError(f"'{folder}' holds no {CONFIG_FILENAME}: expected the output_dir of an sftune run")
    overrides: dict[str, Any] = {"output_dir": str(folder)}
    if hub_model_id is not None:
        overrides["hub_model_id"] = hub_model_id
    if private is not None:
        overrides["hub_private_repo"] = private
    config = load_config(folder / CONFIG_FILENAME, overrides)
    repo_id = check_push_settings(config, before_training=False)
    return push_run(folder, repo_id, config.hub_private_repo)


def _api() -> Any:
    from huggingface_hub import HfApi

    return HfApi()


def _reason(err: Exception) -> str:
    """One line that says what went wrong (huggingface_hub's HTTP errors carry the server's message)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
