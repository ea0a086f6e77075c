"""The registry asset fetcher (checked offline with a local archive) and the real SmolLM2 it provides."""

from __future__ import annotations

import zipfile

import pytest

from sftune import assets
from sftune.errors import UserError


@pytest.fixture
def fake_asset(tmp_path, monkeypatch):
    """A registered asset whose 'download' is a local wheel, so fetch runs end to end without a network."""
    monkeypatch.setenv("SFTUNE_CACHE", str(tmp_path / "cache"))
    payload = b"hello asset"
    wheel = tmp_path / "dl" / "pkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zipped:
        zipped.writestr("pkg/data.txt", payload)

    def download(asset, into):
        target = into / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    monkeypatch.setattr(assets, "_download", download)
    return payload


def register(monkeypatch, sha):
    monkeypatch.setitem(assets.ASSETS, "fake", assets.Asset("pypi", "pkg", "1.0", {"pkg/data.txt": sha}, "a fake"))


def test_fetch_extracts_checks_and_caches(fake_asset, monkeypatch):
    import hashlib

    register(monkeypatch, hashlib.sha256(fake_asset).hexdigest())
    folder = assets.fetch("fake")
    assert (folder / "data.txt").read_bytes() == fake_asset
    monkeypatch.setattr(assets, "_download", lambda *a: pytest.fail("cached asset downloaded again"))
    assert assets.fetch("fake") == folder


def test_fetch_refuses_a_wrong_checksum(fake_asset, monkeypatch):
    register(monkeypatch, "0" * 64)
    with pytest.raises(UserError, match="has sha256 .* expected 0000"):
        assets.fetch("fake")
    assert not (assets.cache_dir() / "assets" / "fake" / "data.txt").exists()


@pytest.mark.slow  # the real 135M model
def test_real_smollm2_knows_paris(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftune.generation import greedy_answer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    assert "Paris" in greedy_answer(model, tokenizer, "What is the capital of France?", max_new_tokens=12)


@pytest.mark.slow  # the real 135M model
def test_demo_command_runs_on_the_real_model(smollm2_dir, tmp_path, capsys, monkeypatch):
    """`sftune demo` wiring end to end, cut to two short steps (the full demo takes a few minutes)."""
    from sftune.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "64"]) == 0
    out = capsys.readouterr().out
    assert "Q: Who are you?" in out and "before:" in out and "after:" in out
    assert (tmp_path / "sftune-demo" / "adapter_model.safetensors").is_file()  # the demo trains LoRA
    assert "sftune merge sftune-demo --output sftune-demo-merged" in out
    # sftune chat on the saved adapter (over the real base) answers as the trained model did in memory
    after = out.split("after:", 1)[1].split("\n", 1)[0].strip()
    assert main(["chat", "sftune-demo", "--prompt", "Who are you?", "--temperature", "0", "--max_new_tokens", "12"]) == 0
    reply = capsys.readouterr().out.strip()
    assert reply and after.startswith(reply)
    assert main(["demo", "--max_steps", "1", "--per_device_train_batch_size", "1", "--max_length", "64",
                 "--use_peft", "false"]) == 0
    assert (tmp_path / "sftune-demo-2" / "model.safetensors").is_file()  # a second demo never overwrites the first
