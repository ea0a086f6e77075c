"""Loading models the way users expect: class choice, init kwargs, remote code, GGUF, 4- and 8-bit bases, and a
vision-language model with its processor."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from sftune import SFTConfig, train
from sftune.config import CONFIG_FILENAME
from sftune.errors import ConfigError, UserError
from sftune.model.adapters import parameter_counts, prepare_for_training
from sftune.model.load import load_model, load_processor, load_tokenizer, model_class_of
from sftune.training.loss import CausalLMWithLoss

# bitsandbytes' 8-bit matmul on CPU warns on every call that it is slow
pytestmark = pytest.mark.filterwarnings("ignore:.*(8-bit|8bit|int8|MatMul8bitLt).*:UserWarning")


def model_config(model_dir, **overrides) -> SFTConfig:
    return SFTConfig(model_name_or_path=str(model_dir), dataset_name="unused", **overrides)


def run_config(model_dir, data, output_dir, **overrides) -> SFTConfig:
    settings = dict(
        model_name_or_path=str(model_dir), dataset_name=str(data), output_dir=str(output_dir),
        max_steps=3, logging_steps=1, per_device_train_batch_size=8, max_length=128,
    )
    settings.update(overrides)
    return SFTConfig(**settings)


# ---- loading


def test_model_class_comes_from_the_config(tiny_model_dir, tiny_llava_dir):
    assert model_class_of(model_config(tiny_model_dir)) == "causal_lm"
    assert model_class_of(model_config(tiny_llava_dir)) == "image_text_to_text"
    assert model_class_of(model_config(tiny_llava_dir, model_class="causal_lm")) == "causal_lm"  # the override
    assert load_processor(model_config(tiny_model_dir)) is None
    with pytest.raises(UserError, match="could not load the model"):  # a LLaVA is no AutoModelForCausalLM
        load_model(model_config(tiny_llava_dir, model_class="causal_lm"))


def test_model_init_kwargs_reach_from_pretrained(tiny_model_dir):
    model = load_model(model_config(tiny_model_dir, model_init_kwargs={"rms_norm_eps": 0.125}))
    assert model.config.rms_norm_eps == 0.125
    with pytest.raises(ConfigError, match="model_init_kwargs' sets 'torch_dtype': use the config key 'dtype'"):
        load_model(model_config(tiny_model_dir, model_init_kwargs={"torch_dtype": "bfloat16"}))
    assert SFTConfig.from_dict({"model_init_kwargs": '{"a": 1}'}).model_init_kwargs == {"a": 1}  # JSON flag


def write_remote_code_model(folder, tiny_model_dir) -> None:
    """A local model whose config names its own classes (auto_map), as Hub repos with custom code do."""
    import shutil

    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tiny_custom", architectures=["TinyCustomForCausalLM"], auto_map={
        "AutoConfig": "configuration_tiny.TinyCustomConfig",
        "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM",
    })
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass TinyCustomConfig(LlamaConfig):\n    model_type = 'tiny_custom'\n"
    )
    (folder / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_tiny import TinyCustomConfig\n\n\n"
        "class TinyCustomForCausalLM(LlamaForCausalLM):\n    config_class = TinyCustomConfig\n"
    )


def test_a_model_with_its_own_code_needs_trust_remote_code(tiny_model_dir, tmp_path):
    folder = tmp_path / "custom"
    write_remote_code_model(folder, tiny_model_dir)
    with pytest.raises(UserError, match="ships its own Python code: set trust_remote_code: true only if you trust"):
        load_model(model_config(folder))
    model = load_model(model_config(folder, trust_remote_code=True))
    assert type(model).__name__ == "TinyCustomForCausalLM"


def test_folder_mistakes_get_clear_errors(tmp_path):
    gguf_only = tmp_path / "gguf"
    gguf_only.mkdir()
    (gguf_only / "model.Q4.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="no config.json.*set gguf_file: model.Q4.gguf"):
        load_model(model_config(gguf_only))
    with pytest.raises(UserError, match="has no GGUF file 'other.gguf'"):
        load_model(model_config(gguf_only, gguf_file="other.gguf"))


@pytest.mark.slow  # the real 135M model
def test_real_gguf_model_trains_and_saves_as_safetensors(tmp_path):
    """SmolLM2 straight from its GGUF file: dequantized on load, fully fine-tuned, saved as a plain model."""
    from conftest import asset_folder, write_jsonl
    from transformers import AutoModelForCausalLM

    folder = asset_folder("smollm2-135m-instruct-gguf")
    data = write_jsonl(tmp_path / "who.jsonl", [
        {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Juniper."}]}])
    result = train(run_config(folder, data, tmp_path / "run", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                              max_steps=1, per_device_train_batch_size=1, max_length=32, learning_rate=1e-5))
    assert type(result.model).__name__ == "LlamaForCausalLM" and result.tokenizer.eos_token == "<|im_end|>"
    assert (result.output_dir / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(result.output_dir)
    assert getattr(reloaded.config, "quantization_config", None) is None
    ids = torch.tensor([result.tokenizer.encode("The capital of France is")])
    result.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, result.model(ids).logits)


# ---- QLoRA and 8-bit: bitsandbytes on CPU


@pytest.mark.parametrize("settings", [
    {"load_in_4bit": True},
    {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "use_bnb_nested_quant": True, "dtype": "bfloat16",
     "bf16": True},
    {"load_in_8bit": True},
], ids=["nf4", "fp4-nested-bf16", "int8"])
def test_quantized_base_trains_adapters(settings, tiny_model_dir, chat_jsonl, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train(run_config(tiny_model_dir, chat_jsonl, tmp_path / "run", use_peft=True, learning_rate=1e-2,
                              **settings))
    losses = [e["loss"] for e in result.history]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]

    q_proj = result.model.get_base_model().model.layers[0].self_attn.q_proj
    base = q_proj.base_layer
    expected = torch.bfloat16 if settings.get("bf16") else torch.float32  # the precision's compute dtype
    if settings.get("load_in_4bit"):
        assert isinstance(base, bnb.nn.Linear4bit) and base.compute_dtype == expected
        assert base.weight.quant_state.quant_type == settings.get("bnb_4bit_quant_type", "nf4")
        assert base.weight.quant_state.nested == settings.get("use_bnb_nested_quant", False)
    else:
        assert isinstance(base, bnb.nn.Linear8bitLt)
    assert parameter_counts(result.model) == (14_336, 139_584)  # as unquantized: 4-bit weights count unpacked
    # adapters as fp32 masters (fp32 or bf16 mixed precision); the frozen base unchanged by training
    assert {p.dtype for p in result.model.parameters() if p.requires_grad} == {torch.float32}
    fresh = load_model(run_config(tiny_model_dir, chat_jsonl, tmp_path / "x", use_peft=True, **settings))
    assert torch.equal(fresh.model.layers[0].self_attn.q_proj.weight.data, base.weight.data)

    # the adapter is saved alone and loads onto an unquantized base
    assert not (result.output_dir / "model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.output_dir)
    assert reloaded.peft_config["default"].r == 16


def test_quantization_settings_are_checked(tiny_model_dir, monkeypatch):
    with pytest.raises(ConfigError, match="'load_in_4bit' = True: needs use_peft: true"):
        SFTConfig(load_in_4bit=True)
    with pytest.raises(ConfigError, match="'load_in_4bit' and 'load_in_8bit' are both true"):
        SFTConfig(use_peft=True, load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ConfigError, match="gguf_file' cannot be combined with load_in_4bit"):
        SFTConfig(use_peft=True, load_in_4bit=True, gguf_file="m.gguf")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"load_in_8bit needs the bitsandbytes package.*pip install"):
        load_model(model_config(tiny_model_dir, use_peft=True, load_in_8bit=True))


# ---- a vision-language model: class, processor, loss on an image batch, saving


def image_batch(processor, n: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Conversations with one image each, through the processor; targets never on image tokens or padding."""
    from conftest import random_images

    from sftune.data.collate import next_token_targets

    words = ["a red house", "two dogs on a mat", "blue sky", "one tree by a river today"]
    texts = [processor.apply_chat_template([
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this"}]},
        {"role": "assistant", "content": words[i % len(words)]}], tokenize=False) for i in range(n)]
    batch = processor(text=texts, images=random_images(n, seed), return_tensors="pt", padding=True)
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    labels = batch["input_ids"].masked_fill((batch["input_ids"] == image_token) | (batch["attention_mask"] == 0), -100)
    targets = torch.stack([torch.from_numpy(next_token_targets(row.numpy())) for row in labels])
    return {**batch, "targets": targets, "labels": labels}


def test_vision_language_model_loads_with_its_processor(tiny_llava_dir):
    config = model_config(tiny_llava_dir)
    processor = load_processor(config)
    assert type(processor).__name__ == "LlavaProcessor"
    assert type(processor.image_processor).__name__ == "SiglipImageProcessorPil"
    assert type(load_tokenizer(config)) is type(processor.tokenizer)
    assert type(load_model(config)).__name__ == "LlavaForConditionalGeneration"


def test_loss_on_an_image_batch_skips_image_tokens(tiny_llava_dir):
    config = model_config(tiny_llava_dir)
    processor, model = load_processor(config), load_model(config)
    batch = image_batch(processor)
    image_token = model.config.image_token_id
    assert (batch["input_ids"] == image_token).sum() == 2 * 4  # 28 px images in 14 px patches: 4 tokens each
    assert not (batch["targets"] == image_token).any()

    labels, targets = batch.pop("labels"), batch["targets"]
    loss_model = CausalLMWithLoss(model)
    out = loss_model(**batch)
    assert out["num_tokens"] == (targets != -100).sum()
    # equal to the model's own loss on the same labels: the images reached the language model the same way
    model_inputs = {k: v for k, v in batch.items() if k != "targets"}
    reference = model(**model_inputs, labels=labels).loss
    torch.testing.assert_close(out["loss_sum"] / out["num_tokens"], reference, rtol=0, atol=1e-6)
    # and the pixels matter
    other = loss_model(**{**batch, "pixel_values": torch.rand_like(batch["pixel_values"])})
    assert not torch.allclose(other["loss_sum"], out["loss_sum"])


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_vision_language_model_trains_and_reloads_with_its_processor(use_peft, tiny_llava_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from sftune.export.save import save_model
    from sftune.model.adapters import merge_adapter

    config = model_config(tiny_llava_dir, use_peft=use_peft)
    processor = load_processor(config)
    model = prepare_for_training(load_model(config), config)
    if use_peft:  # adapters on the language model only; the vision tower stays as it is
        adapted = {n for n, _ in model.named_parameters() if "lora_" in n}
        assert adapted and all(".language_model." in n for n in adapted)
    batch = image_batch(processor, n=4)
    batch.pop("labels")
    loss_model = CausalLMWithLoss(model)
    loss_model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        out = loss_model(**batch)
        (out["loss_sum"] / out["num_tokens"]).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((out["loss_sum"] / out["num_tokens"]).item())
    assert losses[-1] < losses[0]

    out_dir = tmp_path / "run"
    out_dir.mkdir()
    save_model(model, processor, out_dir)
    files = {p.name for p in out_dir.iterdir()}
    assert {"processor_config.json", "tokenizer.json", "chat_template.jinja"} <= files
    reloaded_processor = AutoProcessor.from_pretrained(out_dir)
    assert reloaded_processor.image_token == processor.image_token
    fresh = image_batch(reloaded_processor, n=2, seed=1)
    fresh.pop("labels")
    if use_peft:
        assert "adapter_model.safetensors" in files and "model.safetensors" not in files
        reloaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_llava_dir), out_dir)
        config.save(out_dir / CONFIG_FILENAME)
        merged = AutoModelForImageTextToText.from_pretrained(merge_adapter(out_dir, tmp_path / "merged"))
        assert (tmp_path / "merged" / "processor_config.json").is_file()
    else:
        reloaded = AutoModelForImageTextToText.from_pretrained(out_dir)
        merged = None
    inputs = {k: v for k, v in fresh.items() if k != "targets"}
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        assert torch.equal(reloaded(**inputs).logits, expected)
        if merged is not None:
            assert (merged(**inputs).logits - expected).abs().max() < 1e-5
