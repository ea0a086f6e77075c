"""`sftune train --num_processes N`: start N data-parallel copies of the same command through accelerate."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# TRL's named accelerate configs (`accelerate_config: zero2`), as `accelerate launch` flags: the engine each names.
# Their other settings (bf16 mixed precision, 8 processes) are not taken: sftune's own settings decide those.
NAMED_CONFIG_FLAGS = {
    "single_gpu": [], "multi_gpu": ["--multi_gpu"],
    "zero1": ["--use_deepspeed", "--zero_stage", "1"], "zero2": ["--use_deepspeed", "--zero_stage", "2"],
    "zero3": ["--use_deepspeed", "--zero_stage", "3"],
    "fsdp1": ["--use_fsdp", "--fsdp_version", "1"], "fsdp2": ["--use_fsdp", "--fsdp_version", "2"],
}


def launch_command(num_processes: int, argv: list[str], accelerate_config: str | None = None) -> list[str]:
    """The `accelerate launch` command that runs `sftune <argv>` in `num_processes` processes: plain data parallel,
    one of TRL's named configs, or the user's accelerate config file (whose settings then win)."""
    if accelerate_config is not None and accelerate_config not in NAMED_CONFIG_FLAGS:
        engine = ["--config_file", accelerate_config, "--num_processes", str(num_processes)]
    else:
        flags = NAMED_CONFIG_FLAGS.get(accelerate_config or "multi_gpu") or ["--multi_gpu"]
        engine = [*flags, "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no"]
    return [sys.executable, "-m", "accelerate.commands.launch", *engine, "--main_process_port", str(free_port()),
            "-m", "sftune", *argv]


def launch_data_parallel(num_processes: int, argv: list[str], accelerate_config: str | None = None,
                         child_env: dict[str, str] | None = None) -> int:
    """Run `sftune <argv>` in `num_processes` processes; returns the launcher's exit code.

    With GPUs, one process per GPU. Without, CPU processes talking over gloo: accelerate needs
    ACCELERATE_USE_CPU and --multi_gpu for that (a plain CPU config would start a single process).
    """
    env = {**os.environ, **(child_env or {})}  # the children's only: this process's environment stays as it was
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
    return subprocess.run(launch_command(num_processes, argv, accelerate_config), env=env).returncode
