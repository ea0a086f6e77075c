"""use_liger_kernel: refused clearly where it cannot run, and on a GPU handed to Liger's own integration."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from sftune.config import SFTConfig
from sftune.errors import UserError
from sftune.model.liger import LAYER_KERNELS, check_liger
from sftune.model.load import load_model


@pytest.fixture
def fake_liger(monkeypatch):
    """A stand-in for liger_kernel.transformers that records what it is asked to patch."""
    calls = []
    transformers_module = types.ModuleType("liger_kernel.transformers")
    transformers_module._apply_liger_kernel_to_instance = lambda **kwargs: calls.append(kwargs)
    package = types.ModuleType("liger_kernel")
    package.transformers = transformers_module
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", transformers_module)
    return calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_a_gpu_use_liger_kernel_is_refused_before_any_work(tiny_model_dir):
    config = SFTConfig(model_name_or_path=str(tiny_model_dir), dataset_name="unused", use_liger_kernel=True)
    with pytest.raises(UserError, match="use_liger_kernel: true needs a CUDA GPU"):
        check_liger(config)
    check_liger(SFTConfig(model_name_or_path=str(tiny_model_dir), dataset_name="unused"))  # off: nothing to check


def test_the_loaded_model_gets_the_layer_kernels_but_keeps_our_loss(tiny_model_dir, fake_liger):
    config = SFTConfig(model_name_or_path=str(tiny_model_dir), dataset_name="unused", use_liger_kernel=True)
    model = load_model(config)
    assert len(fake_liger) == 1 and fake_liger[0]["model"] is model
    assert {k: v for k, v in fake_liger[0].items() if k != "model"} == LAYER_KERNELS
    assert not LAYER_KERNELS["fused_linear_cross_entropy"] and not LAYER_KERNELS["cross_entropy"]
    load_model(SFTConfig(model_name_or_path=str(tiny_model_dir), dataset_name="unused"))
    assert len(fake_liger) == 1  # off by default


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's Triton kernels need a CUDA GPU")
def test_on_a_gpu_liger_layers_give_the_same_logits(tiny_model_dir):
    pytest.importorskip("liger_kernel")
    base = dict(model_name_or_path=str(tiny_model_dir), dataset_name="unused")
    plain = load_model(SFTConfig(**base)).cuda()
    liger = load_model(SFTConfig(**base, use_liger_kernel=True)).cuda()
    ids = torch.randint(0, plain.config.vocab_size, (2, 16), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(liger(ids).logits, plain(ids).logits, atol=1e-4, rtol=1e-4)
