"""The bad-input corpus (tests/bad_inputs/cases.yaml): every mistake ends with exit code 2 and one clear line.

Cases run in-process through `sftune.cli.main` (fast); one test runs the installed console script to show it
behaves the same, and one shows that --debug gives the traceback instead.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import conversations, write_jsonl

from sftune.cli import main

CASES_FILE = Path(__file__).parent / "bad_inputs" / "cases.yaml"
CASES = yaml.safe_load(CASES_FILE.read_text(encoding="utf-8"))
BASE_CONFIG = {
    "model_name_or_path": "{model}", "dataset_name": "{tmp}/data.jsonl", "output_dir": "{tmp}/out",
    "max_steps": 1, "max_length": 64, "per_device_train_batch_size": 2, "save_strategy": "no",
}


def fill(value, places: dict[str, str]):
    """Put the case's folders into every string of a YAML value."""
    if isinstance(value, str):
        for name, text in places.items():
            value = value.replace("{" + name + "}", text)
        return value
    if isinstance(value, list):
        return [fill(v, places) for v in value]
    if isinstance(value, dict):
        return {fill(k, places): fill(v, places) for k, v in value.items()}
    return value


def set_up(case: dict, tmp: Path, model_dir: Path, vlm_dir: Path | None = None) -> list[str]:
    """Write the case's files and config; return the command line to run."""
    places = {"tmp": str(tmp), "model": str(model_dir), "vlm": str(vlm_dir)}
    write_jsonl(tmp / "data.jsonl", conversations(6))
    for step in case.get("make", []):
        if "mkdir" in step:
            (tmp / step["mkdir"]).mkdir(parents=True)
        if "images" in step:  # small PNG files under {tmp}/<folder>
            from conftest import random_images

            (tmp / step["images"]).mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(random_images(2)):
                image.save(tmp / step["images"] / f"{i}.png")
        if "copy_model" in step:
            folder = tmp / step["copy_model"]
            shutil.copytree(model_dir, folder)
            for name in step.get("drop", []):
                (folder / name).unlink()
            if "truncate" in step:  # half of the file, as a copy that stopped
                data = (folder / step["truncate"]).read_bytes()
                (folder / step["truncate"]).write_bytes(data[:len(data) // 2])
            if "config_changes" in step:  # config.json no longer describes the weights
                values = json.loads((folder / "config.json").read_text())
                (folder / "config.json").write_text(json.dumps({**values, **step["config_changes"]}))
            if step.get("pickled"):
                import torch
                from safetensors.torch import load_file

                torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
                (folder / "model.safetensors").unlink()
    for name, text in case.get("files", {}).items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(fill(text, places), encoding=case.get("encoding", "utf-8"))
    argv = [case.get("command", "train")]
    if argv[0] in ("train", "inspect", "estimate") and not case.get("no_config"):
        config_path = tmp / "config.yaml"
        if "config_text" in case:
            config_path.write_text(fill(case["config_text"], places), encoding="utf-8")
        else:
            values = {k: v for k, v in BASE_CONFIG.items() if k not in case.get("unset", [])}
            values.update(case.get("config", {}))
            config_path.write_text(yaml.safe_dump(fill(values, places), sort_keys=False), encoding="utf-8")
        argv.append(str(config_path))
    return argv + fill(case.get("argv", []), places)


def file_hashes(folder: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def error_lines(stderr: str) -> list[str]:
    """What the user sees besides sftune's progress log ("[sftune] ..." lines)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("[sftune]")]


def test_the_corpus_is_large_and_every_case_is_named_once():
    ids = [case["id"] for case in CASES]
    assert len(ids) >= 40 and len(ids) == len(set(ids))
    for case in CASES:
        assert case.get("expect"), case["id"]


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_bad_input_gives_one_clear_line_and_exit_code_2(case, tiny_model_dir, tmp_path, capsys, request):
    vlm_dir = request.getfixturevalue("tiny_llava_dir") if "{vlm}" in yaml.safe_dump(case) else None
    argv = set_up(case, tmp_path, tiny_model_dir, vlm_dir)
    before = file_hashes(tmp_path)
    out_existed = (tmp_path / "out").exists()
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert code == 2, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("sftune: error: ")
    for fragment in case["expect"]:
        assert fill(fragment, {"tmp": str(tmp_path), "model": str(tiny_model_dir)}) in lines[0], lines[0]
    for name in case.get("absent", []):
        assert not (tmp_path / name).exists(), name
    after = file_hashes(tmp_path)
    for path, digest in before.items():  # a failed run overwrites nothing the user had...
        assert after.get(path) == digest, path
    assert not [p for p in after if p not in before]  # ...nor adds a file anywhere
    assert out_existed or not (tmp_path / "out").exists()  # ...nor leaves a folder it made


def test_the_console_script_behaves_the_same(tmp_path):
    """The installed `sftune` entry point, in its own process: exit code 2, one line, no traceback; with --debug,
    the traceback (a config error: the process needs no torch, so this stays fast)."""
    (tmp_path / "config.yaml").write_text("learnig_rate: 1.0e-4\n", encoding="utf-8")
    script = Path(sys.executable).with_name("sftune")
    result = subprocess.run([str(script), "train", str(tmp_path / "config.yaml")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"sftune: error: {tmp_path / 'config.yaml'}: unknown key 'learnig_rate' (did you mean 'learning_rate'?)"
    ]
    debug = subprocess.run([str(script), "train", str(tmp_path / "config.yaml"), "--debug"], capture_output=True,
                           text=True)
    assert debug.returncode == 1
    assert debug.stderr.startswith("Traceback (most recent call last)")
    assert "sftune.errors.ConfigError" in debug.stderr and "did you mean 'learning_rate'" in debug.stderr


def test_debug_lets_a_deep_error_through_with_its_traceback(tiny_model_dir, tmp_path):
    """--debug: the error from deep in the data pipeline reaches the caller whole, traceback and all."""
    import traceback

    from sftune.errors import DataError

    case = next(case for case in CASES if case["id"] == "data-wrong-role")
    argv = set_up(case, tmp_path, tiny_model_dir)
    with pytest.raises(DataError, match="did you mean 'assistant'") as caught:
        main([*argv, "--debug"])
    frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert frames[1] == "main" and "_messages" in frames  # from the CLI down to the function that found it
