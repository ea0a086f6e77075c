"""The chunked loss equals plain cross-entropy over full logits: values, gradients and token statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sftune.training.loss import CausalLMWithLoss, LogitTransform, chunked_lm_loss

TOL = dict(rtol=0, atol=1e-6)


def reference(hidden, head, targets, dft=False, softcap=None):
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    nll = F.cross_entropy(logits, targets, reduction="none")
    loss = (torch.exp(-nll).detach() * nll).sum() if dft else nll.sum()
    log_probs = logits.log_softmax(-1)
    return loss, nll.detach(), logits.argmax(-1) == targets, -(log_probs.exp() * log_probs).sum(-1)


def make(n=37, hidden_size=16, vocab=50, bias=True, seed=0):
    torch.manual_seed(seed)
    head = nn.Linear(hidden_size, vocab, bias=bias)
    hidden = torch.randn(n, hidden_size, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    return hidden, head, targets


def grads(loss, hidden, head):
    return torch.autograd.grad(loss, [hidden, *head.parameters()])


@pytest.mark.parametrize("chunk", [5, 37, 1000])
@pytest.mark.parametrize("dft", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_equal_full_logits(chunk, dft, bias):
    hidden, head, targets = make(bias=bias)
    n = len(targets)  # compare means, as the loop divides the sum by the trained tokens
    expected = reference(hidden, head, targets, dft=dft)
    expected_grads = grads(expected[0] / n, hidden, head)
    loss, stats = chunked_lm_loss(hidden, head, targets, dft=dft, chunk_tokens=chunk)
    torch.testing.assert_close(loss / n, expected[0] / n, **TOL)
    for got, want in zip(grads(loss / n, hidden, head), expected_grads):
        torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(stats.nll, expected[1], **TOL)
    assert torch.equal(stats.correct, expected[2])
    torch.testing.assert_close(stats.entropy, expected[3], **TOL)


@pytest.mark.parametrize("dft", [False, True])
def test_logit_scale_and_softcapping_are_applied(dft):
    hidden, head, targets = make()
    cap = 2.0
    scaled = WrappedHead(head, factor=0.5)
    expected = reference(hidden, scaled, targets, softcap=cap, dft=dft)
    loss, _ = chunked_lm_loss(hidden, head, targets, LogitTransform(scale=0.5, softcap=cap), dft=dft, chunk_tokens=8)
    n = len(targets)
    torch.testing.assert_close(loss / n, expected[0] / n, **TOL)
    for got, want in zip(grads(loss / n, hidden, head), grads(expected[0] / n, hidden, head)):
        torch.testing.assert_close(got, want, **TOL)


def test_frozen_head_gets_no_gradient_and_hidden_still_does():
    hidden, head, targets = make()
    head.requires_grad_(False)
    loss, _ = chunked_lm_loss(hidden, head, targets, chunk_tokens=8)
    expected = reference(hidden, head, targets)[0]
    torch.testing.assert_close(torch.autograd.grad(loss, hidden)[0], torch.autograd.grad(expected, hidden)[0], **TOL)


class WrappedHead(nn.Module):
    """A head that is not a plain Linear (as under peft or quantization): the module path is used."""

    def __init__(self, inner, factor=1.5):
        super().__init__()
        self.inner = inner
        self.weight = inner.weight
        self.factor = factor

    def forward(self, x):
        return self.inner(x) * self.factor


def test_a_wrapped_head_goes_through_its_own_forward():
    hidden, head, targets = make()
    wrapped = WrappedHead(head)
    loss, _ = chunked_lm_loss(hidden, wrapped, targets, chunk_tokens=6)
    expected = reference(hidden, wrapped, targets)[0]
    n = len(targets)
    torch.testing.assert_close(loss / n, expected / n, **TOL)
    for got, want in zip(grads(loss / n, hidden, head), grads(expected / n, hidden, head)):
        torch.testing.assert_close(got, want, **TOL)


def test_no_trained_token_gives_zero_loss_and_zero_gradients():
    hidden, head, targets = make(n=0)
    loss, stats = chunked_lm_loss(hidden, head, targets)
    assert loss.item() == 0.0 and stats.nll.numel() == 0
    for g in grads(loss, hidden, head):
        assert torch.count_nonzero(g) == 0


def test_no_grad_mode_gives_the_same_numbers():
    hidden, head, targets = make()
    with torch.no_grad():
        loss, stats = chunked_lm_loss(hidden, head, targets, chunk_tokens=7)
    expected = reference(hidden, head, targets)
    torch.testing.assert_close(loss / len(targets), expected[0] / len(targets), **TOL)
    torch.testing.assert_close(stats.nll, expected[1], **TOL)


def test_bfloat16_head_gets_bfloat16_gradients():
    hidden, head, targets = make()
    head = head.to(torch.bfloat16)
    hidden = hidden.detach().to(torch.bfloat16).requires_grad_()
    loss, _ = chunked_lm_loss(hidden, head, targets, chunk_tokens=8)
    grad_hidden, grad_weight, _ = grads(loss, hidden, head)
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
    expected = reference(hidden, head, targets)[0]
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-3)


def test_model_loss_and_gradients_equal_transformers(tiny_model_dir):
    """On a real (tiny) causal LM: our module's loss and every parameter gradient equal transformers' own."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    input_ids = torch.randint(3, model.config.vocab_size, (3, 20))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 15:] = 0
    labels = input_ids.clone()
    labels[:, :6] = -100  # an untrained prompt
    labels[attention_mask == 0] = -100
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]

    out = CausalLMWithLoss(model, chunk_tokens=7)(input_ids=input_ids, targets=targets, attention_mask=attention_mask)
    ours = out["loss_sum"] / out["num_tokens"]
    ours.backward()
    our_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    theirs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    theirs.backward()
    torch.testing.assert_close(ours, theirs, **TOL)
    for name, param in model.named_parameters():
        torch.testing.assert_close(our_grads[name], param.grad, **TOL, msg=name)


# ---------------------------------------------------------------- label smoothing (label_smoothing_factor)


@pytest.mark.parametrize("chunk", [5, 1000])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("wrapped", [False, True])
def test_label_smoothing_equals_torch_cross_entropy(chunk, softcap, wrapped):
    """Values, gradients and the per-token smoothed loss equal F.cross_entropy(label_smoothing=...), on the fused
    Linear path and on the module path (a wrapped head)."""
    hidden, head, targets = make(bias=True)
    eps, n = 0.1, len(targets)
    used_head = WrappedHead(head) if wrapped else head
    logits = used_head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    per_token = F.cross_entropy(logits, targets, label_smoothing=eps, reduction="none")
    expected_grads = grads(per_token.sum() / n, hidden, head)
    loss, stats = chunked_lm_loss(hidden, used_head, targets, LogitTransform(softcap=softcap), chunk_tokens=chunk,
                                  label_smoothing=eps)
    torch.testing.assert_close(loss / n, per_token.sum() / n, **TOL)
    for got, want in zip(grads(loss / n, hidden, head), expected_grads):
        torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(stats.objective, per_token.detach(), **TOL)
    torch.testing.assert_close(stats.nll, F.cross_entropy(logits, targets, reduction="none").detach(), **TOL)
    # and smoothing changes the numbers: the comparison above is not plain cross-entropy against itself
    plain, _ = chunked_lm_loss(hidden, used_head, targets, LogitTransform(softcap=softcap), chunk_tokens=chunk)
    assert abs(float(plain.detach() - loss.detach())) > 1e-3


def test_label_smoothing_applies_in_training_only(tiny_model_dir):
    """The training forward is smoothed; in eval mode the same module gives plain cross-entropy."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    input_ids = torch.randint(3, model.config.vocab_size, (2, 12))
    targets = torch.full_like(input_ids, -100)
    targets[:, :-1] = input_ids[:, 1:]
    smoothed = CausalLMWithLoss(model, label_smoothing=0.2)
    plain = CausalLMWithLoss(model)
    smoothed.train()
    plain.train()
    train_smoothed = smoothed(input_ids=input_ids, targets=targets)
    train_plain = plain(input_ids=input_ids, targets=targets)
    assert float(train_smoothed["loss_sum"].detach()) > float(train_plain["loss_sum"].detach()) + 1e-3
    smoothed.eval()
    with torch.no_grad():
        eval_smoothed = smoothed(input_ids=input_ids, targets=targets)
    torch.testing.assert_close(eval_smoothed["loss_sum"], train_plain["loss_sum"].detach(), **TOL)
    assert eval_smoothed["token_stats"].objective is None


def test_label_smoothing_is_refused_with_dft():
    hidden, head, targets = make()
    with pytest.raises(ValueError, match="DFT"):
        chunked_lm_loss(hidden, head, targets, dft=True, label_smoothing=0.1)
