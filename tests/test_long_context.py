"""Long context (issue 18): activation offloading through torch's saved-tensor hooks, the chunked loss's memory on
a 32k-token row, and the refusal of sequence parallelism while no engine can do it here."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from conftest import build_model
from torch.utils._python_dispatch import TorchDispatchMode

from sftune import SFTConfig, train
from sftune.errors import ConfigError
from sftune.training.loss import CausalLMWithLoss
from sftune.training.offload import ActivationOffload


def _batch(vocab_size: int, rows: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (rows, length), generator=generator)
    targets = torch.full_like(input_ids, -100)
    targets[:, :-1] = input_ids[:, 1:]
    return {"input_ids": input_ids, "targets": targets}


def _gradients(loss_model: torch.nn.Module, batch: dict[str, torch.Tensor], hooks=None) -> dict[str, torch.Tensor]:
    loss_model.zero_grad(set_to_none=True)
    with hooks or nullcontext():  # as the loop does: the forward pass inside the hooks, backward outside
        loss = loss_model(**batch)["loss_sum"]
    loss.backward()
    return {name: p.grad.clone() for name, p in loss_model.named_parameters()}


# ---------------------------------------------------------------- activation_offloading


def test_offloading_hooks_take_the_saved_activations_and_change_no_gradient():
    model = build_model(256, hidden_size=64, intermediate_size=128)
    loss_model = CausalLMWithLoss(model).train()
    batch = _batch(256, rows=2, length=64)
    plain = _gradients(loss_model, batch)
    offload = ActivationOffload(torch.device("cpu"))
    offloaded = _gradients(loss_model, batch, offload)
    # the hooks took the activations autograd saved (weights are left alone), and gave back what backward needs
    assert offload.packed > 10 and offload.packed_bytes > 2 * 64 * 64 * 4
    assert plain.keys() == offloaded.keys()
    for name in plain:
        torch.testing.assert_close(offloaded[name], plain[name], atol=1e-6, rtol=0, msg=name)
    # nothing is left installed once the context is left: a later backward saves its tensors as usual
    taken = offload.packed
    _gradients(loss_model, batch)
    assert offload.packed == taken


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_offloading_with_activation_checkpointing_moves_only_what_the_checkpoints_keep(use_reentrant):
    model = build_model(256, hidden_size=64, intermediate_size=128)
    loss_model = CausalLMWithLoss(model).train()
    batch = _batch(256, rows=2, length=64)
    plain = _gradients(loss_model, batch)
    everything = ActivationOffload(torch.device("cpu"))
    _gradients(loss_model, batch, everything)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed = ActivationOffload(torch.device("cpu"))
    offloaded = _gradients(loss_model, batch, checkpointed)
    for name in plain:
        torch.testing.assert_close(offloaded[name], plain[name], atol=1e-6, rtol=0, msg=name)
    # the recomputation in backward saves its tensors outside the hooks (they are used at once)
    assert 0 < checkpointed.packed_bytes < everything.packed_bytes / 4


def test_offloading_leaves_parameters_and_small_tensors_in_place():
    offload = ActivationOffload(torch.device("cpu"))
    weight = torch.nn.Parameter(torch.randn(64, 64))
    small = torch.randn(8, requires_grad=True)
    with offload:
        (weight.t() @ torch.randn(64, 64)).sum().backward()  # saves a view of the weight
        (small * small).sum().backward()  # saves two 32-byte tensors
    assert offload.packed == 1  # only the 16 KB activation that multiplied the weight


def test_activation_offloading_trains_as_without_it(tiny_model_dir, chat_jsonl, tmp_path, monkeypatch, capsys):
    """Through the loop: same per-step losses and same saved weights, and the hooks ran in every micro-batch."""
    from safetensors.torch import load_file

    import sftune.training.loop as loop

    made: list[ActivationOffload] = []

    class Recorded(ActivationOffload):
        def __init__(self, device):
            super().__init__(device)
            made.append(self)

    monkeypatch.setattr(loop, "ActivationOffload", Recorded)
    common = dict(model_name_or_path=str(tiny_model_dir), dataset_name=str(chat_jsonl), learning_rate=1e-3,
                  max_steps=3, logging_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                  max_length=128, save_strategy="no")
    offloaded = train(SFTConfig(output_dir=str(tmp_path / "offload"), activation_offloading=True, **common))
    assert "nothing moves" in capsys.readouterr().err  # the run log says a CPU run moves nothing
    plain = train(SFTConfig(output_dir=str(tmp_path / "plain"), **common))
    assert len(made) == 1 and made[0].packed > 0
    losses = [[h["loss"] for h in result.history if "loss" in h] for result in (offloaded, plain)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    a, b = load_file(tmp_path / "offload" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    for name in b:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)


# ---------------------------------------------------------------- the chunked loss on a 32k-token row


class _LargestVocabTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operator makes whose last dimension is the vocabulary."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size, self.largest = vocab_size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.ndim and tensor.shape[-1] == self.vocab_size:
                self.largest = max(self.largest, tensor.numel())
        return out


def _largest_logits(loss_model: CausalLMWithLoss, length: int, chunk: int, vocab: int) -> int:
    loss_model.chunk_tokens = chunk
    loss_model.zero_grad(set_to_none=True)
    batch = _batch(vocab, rows=1, length=length)
    recorder = _LargestVocabTensor(vocab)
    with recorder:
        loss_model(**batch)["loss_sum"].backward()
    assert loss_model.causal_lm.lm_head.weight.grad is not None
    return recorder.largest


def test_loss_memory_grows_with_the_chunk_not_with_the_row_length():
    """Forward and backward of a 32k-token row: the largest [*, vocab] tensor is one chunk's logits, the same as on
    a 4k-token row, and 4x larger with a 4x larger chunk; the row's [32k, vocab] logits never exist (131 MB here,
    32k x 1000 fp32; 19.7 GB for a 150k vocabulary)."""
    vocab, long_row = 1000, 32768  # a vocabulary size no other dimension of this model has
    model = build_model(vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, max_position_embeddings=long_row)
    loss_model = CausalLMWithLoss(model).train()
    long_row_largest = _largest_logits(loss_model, long_row, 256, vocab)
    short_row_largest = _largest_logits(loss_model, 4096, 256, vocab)
    short_row_larger_chunk = _largest_logits(loss_model, 4096, 1024, vocab)
    assert long_row_largest == short_row_largest == 256 * vocab  # 8x the row, the same largest logits
    assert short_row_larger_chunk == 1024 * vocab  # 4x the chunk, 4x the largest logits


# ---------------------------------------------------------------- sequence parallelism: refused, with the reason


def test_sequence_parallelism_is_one_line_naming_the_engine_it_needs():
    for settings in ({"sequence_parallel_size": 2}, {"parallelism_config": {"cp_size": 2}}):
        with pytest.raises(ConfigError) as caught:
            SFTConfig.from_dict(settings)
        message = str(caught.value)
        assert "\n" not in message and "ring context parallelism" in message and "DeepSpeed Ulysses" in message
    assert SFTConfig(sequence_parallel_size=1).sequence_parallel_size == 1
    with pytest.raises(ConfigError, match="sequence_parallel_size"):
        SFTConfig(sequence_parallel_size=0)
