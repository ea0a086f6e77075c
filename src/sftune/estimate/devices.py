"""Named accelerators `sftune estimate --device NAME` can cost a run for, without having one.

Memory is the usable HBM in MiB as torch reports it (a little under the marketing figure); bf16 FLOP/s are the
vendor's dense (no sparsity) tensor-core peaks. Training reaches only part of that peak: MFU (model FLOP
utilisation) of 0.35 is what well-tuned dense-decoder fine-tuning typically reaches at a few thousand tokens per
micro-batch; small batches, LoRA on small models and padding reach less, so a time from this table is a
lower bound more than a promise.
"""

from __future__ import annotations

from dataclasses import dataclass

from sftune.errors import ConfigError

STATED_MFU = 0.35


@dataclass(frozen=True)
class Device:
    name: str
    memory_mb: float
    bf16_flops: float  # dense peak, FLOP/s
    mfu: float = STATED_MFU
    device_type: str = "cuda"

    @property
    def effective_flops(self) -> float:
        return self.bf16_flops * self.mfu


DEVICES = {d.name: d for d in (
    Device("h100-80gb", 81_559, 989e12),
    Device("h200", 143_771, 989e12),
    Device("a100-80gb", 81_051, 312e12),
    Device("a100-40gb", 40_370, 312e12),
    Device("l4-24gb", 22_563, 121e12),
    Device("rtx4090-24gb", 24_210, 165e12),
)}


def named_device(name: str) -> Device:
    """A device of the table by name ('cuda' is this machine's GPU, read from torch)."""
    if name == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda, but this machine has no CUDA GPU: name one of "
                              f"{', '.join(DEVICES)} to cost the run for it")
        props = torch.cuda.get_device_properties(0)
        known = [d for d in DEVICES.values() if d.name.split("-")[0] in props.name.lower().replace(" ", "")]
        flops = known[0].bf16_flops if known else 100e12  # an unknown GPU: a mid-range guess, said in the output
        return Device(f"cuda ({props.name})", props.total_memory / 2**20, flops)
    if name not in DEVICES:
        raise ConfigError(f"--device {name!r} is not a device sftune knows: use cuda, cpu or one of "
                          f"{', '.join(DEVICES)}")
    return DEVICES[name]
