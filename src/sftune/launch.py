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


def launch_data_parallel(num_processes: int, argv: list[str]) -> int:
    """Run `sftune <argv>` in `num_processes` processes with DDP; returns the launcher's exit code.

    With GPUs, one process per GPU. Without, CPU processes talking over gloo: accelerate needs
    ACCELERATE_USE_CPU and --multi_gpu for that (a plain CPU config would start a single process).
    """
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "sftune", *argv,
    ]
    return subprocess.run(command, env=env).returncode
