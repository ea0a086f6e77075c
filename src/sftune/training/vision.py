"""Data-parallel training of a vision-language model when some micro-batches have no images.

DDP all-reduces the gradients of every trained parameter after each synchronised backward, in buckets, and
expects each rank to produce all of them. A rank whose micro-batch has no images leaves the vision tower without
gradients while another rank's has them: the ranks then disagree on what to all-reduce and hang or fail.
`find_unused_parameters=True` would cope, at the cost of a graph traversal every step; instead:
- a micro-batch without images also runs one blank image through the vision tower (`get_image_features`) and
  adds zero times the result to its loss: the vision parameters get zero gradients on that rank, so every rank
  all-reduces the same parameters and the sum of gradients is exactly that of the ranks with images;
- when no rank had an image in a step, those zero gradients are dropped again before the optimizer step, so the
  optimizer leaves the vision parameters alone, as one process with the same rows would (no gradient at all);
- parameters a forward with an image never uses (a vision tower's post-layernorm or pooling head that the model
  skips) would get gradients from the blank pass only, or from nothing: they are found by one probe step on a
  blank image before training and frozen, which changes nothing (one process never updates them either).
Only with more than one process: one process needs none of this.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger("sftune")
BLANK_SIZE = (64, 64)  # (height, width) of the blank image: small, and large enough for every processor


class BlankImagePass:
    """One blank image's inputs and how to run them through the vision tower, for micro-batches without images."""

    def __init__(self, processor: Any):
        from sftune.data.image_tokens import blank_image
        from sftune.data.vision_inputs import vision_inputs_of

        vision = vision_inputs_of(processor)
        self.image_inputs = vision.image_inputs
        self.inputs = vision.image_arrays([[blank_image(*BLANK_SIZE)]])
        self.passes = 0  # micro-batches since the last step that ran it instead of real images
        self.forwards = 0

    def needed(self, model_inputs: dict[str, torch.Tensor]) -> bool:
        """A training forward without images (evaluation runs without gradients: nothing to keep in step)."""
        if not torch.is_grad_enabled():
            return False
        self.forwards += 1
        needed = not any(name in model_inputs for name in self.image_inputs)
        self.passes += needed
        return needed

    def zero_loss(self, backbone: nn.Module, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Zero, computed from the vision tower's output for the blank image (so it carries their gradients)."""
        inputs = {k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in self.inputs.items()}
        return 0.0 * _tensor_sum(backbone.get_image_features(**inputs))

    def step_had_images(self) -> bool:
        """Whether a micro-batch of this step (on this process) had images; resets the counts."""
        had = self.passes < self.forwards
        self.passes = self.forwards = 0
        return had


def _tensor_sum(output: Any) -> torch.Tensor:
    """The sum of every floating-point tensor in a model output (features, deepstack features, ...)."""
    if isinstance(output, torch.Tensor):
        return output.float().sum() if output.is_floating_point() else output.new_zeros((), dtype=torch.float32)
    values = output.values() if hasattr(output, "values") else output if isinstance(output, (list, tuple)) else ()
    parts = [_tensor_sum(value) for value in values if value is not None]
    return torch.stack(parts).sum() if parts else torch.zeros(())


def vision_parameters(causal_lm: nn.Module) -> list[nn.Parameter]:
    """The trained parameters outside the language model: vision tower and projector (with their adapters)."""
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    language = getattr(backbone, "language_model", None)
    text = {id(p) for p in language.parameters()} if language is not None else set()
    text |= {id(p) for p in causal_lm.get_output_embeddings().parameters()}
    return [p for p in backbone.parameters() if p.requires_grad and id(p) not in text]


def prepare_data_parallel(loss_model: nn.Module, processor: Any, collate: Any, device: torch.device) -> None:
    """Set up `loss_model` (a CausalLMWithLoss, before it is wrapped for DDP) for processes without images: the
    blank image pass, and the parameters a forward with an image never uses frozen (found by one forward and
    backward of the blank image as a training row, batched by `collate`, the run's collator)."""
    import numpy as np

    from sftune.data.image_tokens import ImagePlaceholders, blank_image

    text = ImagePlaceholders(processor).replacements([BLANK_SIZE])[0]
    ids = np.asarray(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    batch, = collate([{"input_ids": ids, "labels": ids.copy(), "images": [blank_image(*BLANK_SIZE)]}])
    out = loss_model(**{k: v.to(device) for k, v in batch.items() if k != "source_ids"})
    out["loss_sum"].backward()
    unused = [(name, p) for name, p in loss_model.named_parameters() if p.requires_grad and p.grad is None]
    for _, param in unused:
        param.requires_grad_(False)
    loss_model.zero_grad(set_to_none=True)
    loss_model.blank_images = BlankImagePass(processor)
    if unused:
        names = ", ".join(name.removeprefix("model.") for name, _ in unused[:3])
        log.info("data parallel: %d parameter tensors the model never uses are frozen (%s%s); a micro-batch "
                 "without images runs a blank image through the vision tower so every process all-reduces the same "
                 "gradients", len(unused), names, ", ..." if len(unused) > 3 else "")


def drop_blank_gradients(loss_model: nn.Module, any_images: bool) -> None:
    """After a step in which no process had an image: no gradient for the vision parameters, as in one process."""
    if not any_images:
        for param in vision_parameters(loss_model.causal_lm):
            param.grad = None
