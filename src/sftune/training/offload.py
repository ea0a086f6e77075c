"""Activation offloading (TRL's `activation_offloading: true`): the tensors autograd saves during a training
forward pass are moved to CPU memory and brought back when backward needs them.

It goes in through torch's saved-tensor hooks (`torch.autograd.graph.saved_tensors_hooks`), entered around each
training micro-batch's forward pass only (the unpacking runs in backward, wherever that is called). On CUDA a saved
activation is copied into pinned host memory on a side stream (so the copy overlaps the forward's compute), and its
GPU memory is released once the copy is done; backward waits for that copy and brings it back with an asynchronous
host-to-device copy. What it costs: the GPU memory of the saved activations is traded for the same amount of pinned
CPU memory and two PCIe transfers per activation per step: the step is slower by whatever part of the transfers the
compute does not hide (not measured here: this machine has no GPU). On another accelerator (MPS, XPU) the copies
are plain synchronous ones.

Parameters (and views of them) and small tensors stay where they are: copying a weight to the host saves no GPU
memory, and for tiny tensors the transfer costs more than it frees. On a CPU run the activations are in CPU
memory already: the same hooks run (and count what they would move), but nothing is copied.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger("sftune")

# Smaller saved tensors are left in place: their transfer costs more than the memory they free (torchtune's and
# TRL's offloading use the same threshold).
MIN_OFFLOAD_BYTES = 1024


def _is_parameter(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, nn.Parameter) or isinstance(getattr(tensor, "_base", None), nn.Parameter)


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """`with ActivationOffload(device):` tensors saved for backward inside live in CPU memory until backward.

    `packed` / `packed_bytes` count the activations the hooks took (on CPU: would have moved), since creation."""

    def __init__(self, device: torch.device, min_bytes: int = MIN_OFFLOAD_BYTES):
        self.device, self.min_bytes = device, min_bytes
        self.moves = device.type != "cpu"
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.packed = 0
        self.packed_bytes = 0
        super().__init__(self._pack, self._unpack)
        if self.moves:
            log.info("activation_offloading: saved activations go to %sCPU memory during forward and come back for "
                     "backward", "pinned " if self.copy_stream is not None else "")
        else:
            log.info("activation_offloading: on %s the activations are in CPU memory already, so nothing moves "
                     "(the offloading hooks still run)", device.type)

    def _pack(self, tensor: torch.Tensor) -> Any:
        size = tensor.numel() * tensor.element_size()
        if size < self.min_bytes or _is_parameter(tensor):
            return tensor
        self.packed += 1
        self.packed_bytes += size
        if not self.moves or tensor.device.type == "cpu":
            return _Kept(tensor)
        if self.copy_stream is None:  # another accelerator (mps, xpu): a plain copy, no side stream
            return _OnHost(tensor.to("cpu"), tensor.device, None)
        return self._to_host(tensor)

    def _to_host(self, tensor: torch.Tensor) -> _OnHost:
        stream = self.copy_stream
        stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the activation is computed before its copy
        with torch.cuda.stream(stream):
            host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        # the caching allocator may reuse the activation's memory only after the side stream's copy has read it
        tensor.record_stream(stream)
        return _OnHost(host, tensor.device, done)

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if isinstance(packed, _Kept):
            return packed.tensor
        if packed.done is None:
            return packed.host.to(packed.device)
        torch.cuda.current_stream(packed.device).wait_event(packed.done)  # the device-to-host copy has finished
        return packed.host.to(packed.device, non_blocking=True)


class _Kept:
    """An activation the hooks took but left where it was (a CPU run)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class _OnHost:
    """An activation in host memory; on CUDA, pinned, with the event that marks its copy there done."""

    __slots__ = ("host", "device", "done")

    def __init__(self, host: torch.Tensor, device: torch.device, done: torch.cuda.Event | None):
        self.host, self.device, self.done = host, device, done
