"""The YAML files TRL ships for `trl sft` (tests/trl_configs: its example config and the CLI guide's files, keys and
values unchanged, model and dataset paths local) pass `sftune train CONFIG --dry_run`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import corpus, write_jsonl
from sftune.cli import main

CONFIGS = sorted((Path(__file__).parent / "trl_configs").glob("*.yaml"))


@pytest.fixture
def trl_workspace(tmp_path, tiny_model_dir, monkeypatch):
    """The local stand-ins the files point at: a model folder, and imdb / TinyStories-like text datasets."""
    (tmp_path / "models").mkdir()
    os.symlink(tiny_model_dir, tmp_path / "models" / "Qwen2.5-0.5B")
    texts = corpus(24, seed=2)
    write_jsonl(tmp_path / "datasets" / "imdb" / "train.jsonl", [{"text": t, "label": i % 2} for i, t in
                                                                 enumerate(texts[:16])])
    write_jsonl(tmp_path / "datasets" / "imdb" / "test.jsonl", [{"text": t, "label": 0} for t in texts[16:]])
    write_jsonl(tmp_path / "datasets" / "TinyStories" / "train.jsonl", [{"text": t} for t in corpus(12, seed=3)])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_trl_files_are_all_here():
    assert [p.name for p in CONFIGS] == ["clis_sft_accelerate_config.yaml", "clis_sft_config.yaml",
                                         "clis_sft_datasets.yaml", "clis_sft_num_processes.yaml",
                                         "example_config.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_trls_own_config_passes_the_dry_run(path, trl_workspace, capsys):
    assert main(["train", str(path), "--dry_run"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "# plan" in printed and "steps: " in printed
    assert not (trl_workspace / "trainer_output").exists()  # TRL's default output_dir, not claimed
    if "num_processes" in path.read_text():
        assert "launch: `accelerate launch`: 4 processes, DDP" in printed
    if "accelerate_config" in path.read_text():
        assert "launch: `accelerate launch` with accelerate config zero2: 1 process, DEEPSPEED" in printed


def test_launch_keys_become_accelerate_flags():
    from sftune.launch import launch_command

    command = launch_command(2, ["train", "c.yaml"], "zero2")
    assert command[command.index("--use_deepspeed") + 1:command.index("--use_deepspeed") + 3] == ["--zero_stage", "2"]
    assert launch_command(4, ["train"], "fsdp2")[3:8] == ["--use_fsdp", "--fsdp_version", "2", "--num_processes", "4"]
    assert launch_command(2, ["train"])[3] == "--multi_gpu"
    command = launch_command(2, ["train"], "my_accelerate.yaml")
    assert command[3:7] == ["--config_file", "my_accelerate.yaml", "--num_processes", "2"]
    assert command[-3:] == ["-m", "sftune", "train"]


def test_a_files_launch_keys_start_the_processes_it_asks_for(trl_workspace, monkeypatch):
    from sftune import launch

    started = []
    monkeypatch.setattr(launch, "launch_data_parallel", lambda *args, **kwargs: started.append(args) or 0)
    monkeypatch.delenv("SFTUNE_LAUNCHED_ARGV", raising=False)
    for name in ("clis_sft_num_processes.yaml", "clis_sft_accelerate_config.yaml"):
        path = str(Path(__file__).parent / "trl_configs" / name)
        assert main(["train", path, "--output_dir", str(trl_workspace / name)]) == 0
        assert "SFTUNE_LAUNCHED_ARGV" not in os.environ  # set for the processes it starts only
    assert [(n, config) for n, _, config in started] == [(4, None), (1, "zero2")]
    path = str(Path(__file__).parent / "trl_configs" / "clis_sft_num_processes.yaml")
    main(["train", path, "--num_processes", "2", "--accelerate_config", "fsdp2", "--output_dir", "x"])
    assert started[-1][0] == 2 and started[-1][2] == "fsdp2" and "--num_processes" not in started[-1][1]


def test_the_env_key_of_trls_example_sets_variables_before_anything_loads(trl_workspace, monkeypatch, capsys):
    """TRL's example config shows `env: {CUDA_VISIBLE_DEVICES: 0}` (commented out there)."""
    monkeypatch.setenv("SFTUNE_TEST_VARIABLE", "before")  # restored after the test
    source = (Path(__file__).parent / "trl_configs" / "example_config.yaml").read_text()
    path = trl_workspace / "with_env.yaml"
    path.write_text(source + "env:\n  SFTUNE_TEST_VARIABLE: 0\n")
    assert main(["train", str(path), "--dry_run"]) == 0
    assert os.environ["SFTUNE_TEST_VARIABLE"] == "0"
    path.write_text(source + "env: [CUDA_VISIBLE_DEVICES]\n")
    assert main(["train", str(path), "--dry_run"]) == 2
    assert "config key 'env'" in capsys.readouterr().err
