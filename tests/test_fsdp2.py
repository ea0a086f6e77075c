"""FSDP2 through sftune's own Trainer and training/sharded.py on 2 CPU processes: the same steps as one process,
a sharded checkpoint that resumes exactly, and the full state dict gathered into the saved model.

On GPUs `accelerate launch --config_file examples/accelerate/fsdp2.yaml` makes accelerate's state FSDP, and
accelerate shards the model with torch's fully_shard. On CPU accelerate never selects FSDP (NOTES.md: its plugin is
dropped and you get DDP), so the workers below build that same state by hand, on gloo: from there every step is
accelerate's own FSDP2 code and sftune's, nothing replaced.
"""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import conversations, write_jsonl
from safetensors.torch import load_file

from sftune import SFTConfig, train
from sftune.training.checkpoint import list_checkpoints

STEPS = 4


def fsdp2_accelerator(config=None):
    """accelerate's FSDP2 state over gloo, as a GPU launch with an FSDP2 config would make it."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = Accelerator(cpu=True)  # MULTI_CPU over gloo: the processes and the process group
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
                                            state_dict_type="SHARDED_STATE_DICT", reshard_after_forward=True)
    # both states: accelerate copies PartialState's fields into AcceleratorState whenever it is asked for one
    PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    return accelerator


def settings(model_dir, data, out, **overrides) -> dict:
    values = dict(model_name_or_path=str(model_dir), dataset_name=str(data), output_dir=str(out),
                  learning_rate=1e-3, max_steps=STEPS, logging_steps=1, per_device_train_batch_size=2,
                  max_length=96, save_strategy="steps", save_steps=2, attn_implementation="sdpa")
    values.update(overrides)
    return values


def worker(rank: int, world: int, port: int, values: dict, result_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    from sftune import run

    run.make_accelerator = fsdp2_accelerator
    result = run.train(SFTConfig(**values))
    if rank == 0:
        with open(result_file, "w") as handle:
            json.dump({"history": result.history, "engine": result.plan.engine, "layout": result.plan.layout,
                       "processes": result.plan.num_processes}, handle)


def run_fsdp2(values: dict, tmp_path, name: str) -> dict:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result_file = str(tmp_path / f"{name}.json")
    mp.spawn(worker, args=(2, port, values, result_file), nprocs=2, join=True)
    with open(result_file) as handle:
        return json.load(handle)


def train_entries(history: list[dict]) -> list[dict]:
    return [e for e in history if "loss" in e]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("fsdp-data") / "chat.jsonl", conversations(16, seed=13))


@pytest.mark.slow  # two processes
def test_fsdp2_trainer_equals_one_process_and_resumes_from_its_sharded_checkpoint(tiny_model_dir, data_file,
                                                                                  tmp_path):
    sharded = run_fsdp2(settings(tiny_model_dir, data_file, tmp_path / "fsdp"), tmp_path, "fsdp")
    assert (sharded["engine"], sharded["processes"], sharded["layout"]) == ("fsdp", 2, "padded")
    assert [step for step, _ in list_checkpoints(tmp_path / "fsdp")] == [2, 4]
    assert (tmp_path / "fsdp" / "checkpoint-2" / "accelerate_state").is_dir()  # optimizer and model shards
    single = train(SFTConfig(**settings(tiny_model_dir, data_file, tmp_path / "one", per_device_train_batch_size=4,
                                        padding_free=False)))
    assert single.plan.layout == "padded" and single.plan.num_processes == 1

    ours, theirs = train_entries(sharded["history"]), train_entries(single.history)
    assert [e["step"] for e in ours] == [e["step"] for e in theirs] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([e[key] for e in ours], [e[key] for e in theirs], rtol=1e-5, atol=1e-5,
                                   err_msg=key)
    # the final model is the full state dict gathered from the shards, and equals the one process's
    gathered, expected = load_file(tmp_path / "fsdp" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert gathered.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(gathered[name], expected[name], rtol=0, atol=1e-5, msg=name)

    resumed = run_fsdp2(settings(tiny_model_dir, data_file, tmp_path / "resumed",
                                 resume_from_checkpoint=str(tmp_path / "fsdp" / "checkpoint-2")), tmp_path, "resumed")
    after = train_entries(resumed["history"])
    assert [e["step"] for e in after] == [3, 4]
    np.testing.assert_allclose([e["loss"] for e in after], [e["loss"] for e in ours[2:]], rtol=0, atol=1e-6)
    again = load_file(tmp_path / "resumed" / "model.safetensors")
    for name in gathered:
        torch.testing.assert_close(again[name], gathered[name], rtol=0, atol=1e-6, msg=name)
