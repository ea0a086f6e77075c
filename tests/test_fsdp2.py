"""FSDP2 (torch's fully_shard) with our loss on 2 CPU processes: the same steps as one unsharded process.

accelerate drops its FSDP plugin on CPU (NOTES.md), so this calls fully_shard directly, as accelerate does on GPUs:
it checks that the chunked loss, which reads the head's weight inside the root module's forward, sees full
parameters, and that token-exact normalisation across shards gives the single-process update.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import build_model

from sftune.training.loss import CausalLMWithLoss

VOCAB, STEPS = 96, 3


def batches(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        input_ids = torch.randint(0, VOCAB, (4, 12), generator=generator)
        targets = torch.randint(0, VOCAB, (4, 12), generator=generator)
        targets[torch.rand(4, 12, generator=generator) < 0.4] = -100  # uneven trained tokens per row
        yield input_ids, targets


def run_steps(loss_model, optimizer, rank: int, world: int) -> list[float]:
    losses = []
    for input_ids, targets in batches():
        share = slice(rank * 4 // world, (rank + 1) * 4 // world)
        tokens = torch.tensor(float((targets != -100).sum()))  # every rank knows the whole step's count
        out = loss_model(input_ids=input_ids[share], targets=targets[share])
        (out["loss_sum"] * world / tokens).backward()  # FSDP averages gradients over ranks, as DDP does
        optimizer.step()
        optimizer.zero_grad()
        loss = out["loss_sum"].detach().clone()
        if world > 1:
            dist.all_reduce(loss)
        losses.append(float(loss / tokens))
    return losses


def sharded_worker(rank: int, world: int, folder: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    mesh = dist.device_mesh.init_device_mesh("cpu", (world,))
    loss_model = CausalLMWithLoss(build_model(VOCAB, seed=1), chunk_tokens=5)
    for layer in loss_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(loss_model, mesh=mesh)
    optimizer = torch.optim.AdamW(loss_model.parameters(), lr=1e-3)
    losses = run_steps(loss_model, optimizer, rank, world)
    state = get_model_state_dict(loss_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"losses": losses, "state": state}, f"{folder}/result.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp2_sharded_steps_equal_one_process(tmp_path):
    mp.spawn(sharded_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    sharded_losses, sharded_state = result["losses"], result["state"]

    single = CausalLMWithLoss(build_model(VOCAB, seed=1), chunk_tokens=5)
    single_losses = run_steps(single, torch.optim.AdamW(single.parameters(), lr=1e-3), 0, 1)
    torch.testing.assert_close(torch.tensor(sharded_losses), torch.tensor(single_losses), rtol=0, atol=1e-5)
    for name, value in single.state_dict().items():
        diff = (sharded_state[name] - value).abs().max().item()
        assert diff < 1e-5, (name, diff)
