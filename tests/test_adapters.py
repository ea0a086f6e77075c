"""LoRA / DoRA / rsLoRA through peft: what trains, what is saved, continuing an adapter, merging, checkpointing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from sftune import SFTConfig, train
from sftune.cli import main
from sftune.config import CONFIG_FILENAME
from sftune.errors import UserError
from sftune.model.adapters import default_target_modules, prepare_for_training
from sftune.model.load import load_model
from sftune.training.loss import CausalLMWithLoss

# generation_config.json: peft leaves it out, sftune saves it beside the adapter (see tests/test_export.py)
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "generation_config.json"}
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
RUN_FILES = {"metrics.jsonl", CONFIG_FILENAME, "README.md", "loss_curve.png"}  # the card and its plot


def lora_config(model_dir, data, output_dir, **overrides) -> SFTConfig:
    settings = dict(
        model_name_or_path=str(model_dir), dataset_name=str(data), output_dir=str(output_dir), use_peft=True,
        learning_rate=1e-2, max_steps=3, logging_steps=1, per_device_train_batch_size=8, max_length=128,
    )
    settings.update(overrides)
    return SFTConfig(**settings)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """One LoRA run on the tiny Llama, shared by the tests that inspect it; `.initial` is the state it started from."""
    from conftest import conversations, write_jsonl

    from sftune.model import adapters

    folder = tmp_path_factory.mktemp("lora-run")
    data = write_jsonl(folder / "chat.jsonl", conversations())
    initial: dict[str, torch.Tensor] = {}
    prepare = adapters.prepare_for_training

    def prepare_and_remember(model, config):
        model = prepare(model, config)
        initial.update({k: v.detach().clone() for k, v in model.get_base_model().state_dict().items()})
        return model

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(adapters, "prepare_for_training", prepare_and_remember)
        result = train(lora_config(tiny_model_dir, data, folder / "run"))
    result.initial = initial
    return result


def test_lora_trains_adapters_only_and_saves_only_the_adapter(lora_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    result, out, initial = lora_run, lora_run.output_dir, lora_run.initial
    assert set(p.name for p in out.iterdir()) == ADAPTER_FILES | TOKENIZER_FILES | RUN_FILES
    losses = [e["loss"] for e in result.history]
    assert losses[-1] < losses[0]

    pretrained = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    trained = result.model.get_base_model().state_dict()
    assert trained.keys() == initial.keys()
    adapters = [k for k in trained if "lora_" in k]
    assert len(adapters) == 2 * 4 * 2  # lora_A and lora_B on q, k, v, o of 2 layers
    for name, tensor in trained.items():
        if "lora_" not in name:  # the base: bit-identical to the pretrained weights after training
            assert torch.equal(tensor, pretrained[name.replace(".base_layer", "")]), name
    # Every adapter weight moved: B starts at zero, A from a random draw; both must differ after a few steps.
    assert all(not torch.any(initial[n]) for n in adapters if "lora_B" in n)
    for name in adapters:
        assert (trained[name] != initial[name]).float().mean() > 0.9, f"{name}: most entries unchanged"


def test_saved_adapter_loads_with_peft_and_gives_the_same_logits(lora_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    saved = load_file(lora_run.output_dir / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)  # nothing of the base model
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_run.output_dir)
    ids = torch.tensor([lora_run.tokenizer.encode("hello world how are you")])
    assert torch.equal(logits_of(reloaded, ids), logits_of(lora_run.model, ids))


def test_peft_learning_rate_default_is_resolved_and_saved(lora_run, tiny_model_dir, tmp_path):
    saved = yaml.safe_load((lora_run.output_dir / CONFIG_FILENAME).read_text())
    assert saved["learning_rate"] == 1e-2  # set explicitly in lora_config
    config = SFTConfig(model_name_or_path=str(tiny_model_dir), dataset_name="d", use_peft=True)
    assert config.learning_rate == 2e-4 and config.learning_rate_is_default
    config.save(tmp_path / CONFIG_FILENAME)
    again = SFTConfig.from_dict(yaml.safe_load((tmp_path / CONFIG_FILENAME).read_text()))
    assert again.learning_rate == 2e-4 and not again.learning_rate_is_default


def test_the_log_names_the_default_learning_rate_and_the_trainable_parameters(tiny_model_dir, chat_jsonl, tmp_path,
                                                                             capsys):
    config = lora_config(tiny_model_dir, chat_jsonl, tmp_path / "run", learning_rate=None, max_steps=1)
    result = train(config)
    err = capsys.readouterr().err
    assert "learning_rate: 0.0002, the default with use_peft" in err
    assert result.history[0]["learning_rate"] == 2e-4
    assert "parameters: 14,336 trainable of 139,584 (10.27%)" in err  # r=16 on q, k, v, o of the tiny Llama
    assert yaml.safe_load((result.output_dir / CONFIG_FILENAME).read_text())["learning_rate"] == 2e-4


def test_saved_config_repeats_a_lora_run(lora_run, tmp_path):
    again = tmp_path / "again"
    assert main(["train", str(lora_run.output_dir / CONFIG_FILENAME), "--output_dir", str(again)]) == 0
    repeated = [json.loads(line)["loss"] for line in (again / "metrics.jsonl").read_text().splitlines()]
    assert repeated == [e["loss"] for e in lora_run.history]
    first, second = (load_file(folder / "adapter_model.safetensors") for folder in (lora_run.output_dir, again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_merge_cli_gives_the_adapter_logits(lora_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    merged_dir = tmp_path / "merged"
    assert main(["merge", str(lora_run.output_dir), "--output", str(merged_dir)]) == 0
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in merged_dir.iterdir()}
    assert not list(tmp_path.glob(".merged.staging-*"))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = torch.tensor([lora_run.tokenizer.encode("the cat sat on the mat today")])
    difference = (logits_of(merged, ids) - logits_of(lora_run.model, ids)).abs().max()
    assert difference < 1e-5

    # never over an existing non-empty folder, and a full model has nothing to merge
    assert main(["merge", str(lora_run.output_dir), "--output", str(merged_dir)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert main(["merge", str(merged_dir), "--output", str(tmp_path / "x")]) == 2
    assert "holds a full model (nothing to merge)" in capsys.readouterr().err


def test_merge_an_adapter_trained_elsewhere(lora_run, tmp_path):
    """Without sftune_config.yaml (a TRL or peft adapter), the base comes from adapter_config.json."""
    import shutil

    from transformers import AutoModelForCausalLM

    from sftune.model.adapters import merge_adapter

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for name in ADAPTER_FILES:
        shutil.copy(lora_run.output_dir / name, foreign / name)
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(foreign, tmp_path / "merged"))
    ids = torch.tensor([lora_run.tokenizer.encode("hello world")])
    assert (logits_of(merged, ids) - logits_of(lora_run.model, ids)).abs().max() < 1e-5
    assert (tmp_path / "merged" / "tokenizer.json").is_file()  # the base model's tokenizer


def test_resume_a_lora_run_from_its_checkpoint(tiny_model_dir, chat_jsonl, tmp_path):
    """4 steps straight against 2 steps + checkpoint + resume: the same losses and adapter weights."""
    from sftune.training.checkpoint import list_checkpoints

    full = train(lora_config(tiny_model_dir, chat_jsonl, tmp_path / "full", max_steps=4, save_strategy="steps",
                             save_steps=2, per_device_train_batch_size=4))
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert [step for step, _ in list_checkpoints(tmp_path / "full")] == [2, 4]
    assert ADAPTER_FILES <= {p.name for p in checkpoint.iterdir()} and not (checkpoint / "model.safetensors").exists()
    resumed = train(lora_config(tiny_model_dir, chat_jsonl, tmp_path / "resumed", max_steps=4, save_strategy="steps",
                                save_steps=2, per_device_train_batch_size=4, resume_from_checkpoint=str(checkpoint)))
    losses = [e["loss"] for e in full.history if "loss" in e]
    assert [e["loss"] for e in resumed.history if "loss" in e] == losses[2:]
    first, second = (load_file(r.output_dir / "adapter_model.safetensors") for r in (full, resumed))
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"use_rslora": True, "lora_r": 4},
                                     {"lora_target_modules": ["all-linear"], "lora_modules_to_save": ["lm_head"]}])
def test_variants_train_and_merge_exactly(variant, tiny_model_dir, chat_jsonl, tmp_path):
    from sftune.model.adapters import merge_adapter

    result = train(lora_config(tiny_model_dir, chat_jsonl, tmp_path / "run", max_steps=2, **variant))
    peft_config = result.model.peft_config["default"]
    trained = dict(result.model.named_parameters())
    if variant.get("use_dora"):
        assert peft_config.use_dora and any("lora_magnitude_vector" in n for n in trained)
    if variant.get("use_rslora"):
        layer = result.model.get_base_model().model.layers[0].self_attn.q_proj
        assert layer.scaling["default"] == pytest.approx(32 / 4 ** 0.5)
    if "lora_target_modules" in variant:
        adapted = {name.rsplit(".", 1)[-1] for name in peft_config.target_modules}
        assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        saved = load_file(result.output_dir / "adapter_model.safetensors")
        assert any(k.startswith("base_model.model.lm_head") for k in saved)  # the fully trained head is saved
    merged = merge_adapter(result.output_dir, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([result.tokenizer.encode("one two three four five")])
    difference = (logits_of(AutoModelForCausalLM.from_pretrained(merged), ids) - logits_of(result.model, ids)).abs().max()
    assert difference < 1e-5


def test_a_tied_head_trained_in_full_stays_tied(chat_jsonl, tmp_path):
    """SmolLM2-like tied embeddings with lm_head in lora_modules_to_save: one trained matrix, merged still tied."""
    from conftest import build_model, build_tokenizer
    from transformers import AutoModelForCausalLM

    from sftune.model.adapters import merge_adapter

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tied")
    build_model(len(tokenizer), tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id).save_pretrained(tmp_path / "tied")
    result = train(lora_config(tmp_path / "tied", chat_jsonl, tmp_path / "run", max_steps=2,
                               lora_modules_to_save=["lm_head"]))
    fully_trained = [n for n, p in result.model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert len(fully_trained) == 1
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(result.output_dir, tmp_path / "merged"))
    assert merged.config.tie_word_embeddings and merged.lm_head.weight is merged.model.embed_tokens.weight
    ids = torch.tensor([result.tokenizer.encode("hello world how are you")])
    assert (logits_of(merged, ids) - logits_of(result.model, ids)).abs().max() < 1e-5


def test_continue_from_an_adapter(lora_run, tiny_model_dir, chat_jsonl, tmp_path):
    first = load_file(lora_run.output_dir / "adapter_model.safetensors")
    # the adapter's own rank wins over lora_r; training starts from its trained weights
    config = lora_config(tiny_model_dir, chat_jsonl, tmp_path / "more", adapter_name_or_path=str(lora_run.output_dir),
                         lora_r=4, max_steps=1)
    model = prepare_for_training(load_model(config), config)
    assert model.peft_config["default"].r == 16
    state = model.get_base_model().state_dict()
    for key, tensor in first.items():
        local = key.replace("base_model.model.", "", 1).replace(".weight", ".default.weight")
        assert torch.equal(state[local], tensor), key
    result = train(config)
    again = load_file(result.output_dir / "adapter_model.safetensors")
    assert again.keys() == first.keys() and all(not torch.equal(again[k], first[k]) for k in first)


def test_adapter_errors_are_clear(lora_run, tiny_model_dir, chat_jsonl, tmp_path):
    with pytest.raises(UserError, match="holds a LoRA adapter, not a full model.*adapter_name_or_path"):
        load_model(lora_config(lora_run.output_dir, chat_jsonl, tmp_path / "a"))
    with pytest.raises(UserError, match="could not add LoRA adapters.*lora_target_modules"):
        train(lora_config(tiny_model_dir, chat_jsonl, tmp_path / "b", lora_target_modules=["no_such_proj"]))
    with pytest.raises(UserError, match="does not exist: check adapter_name_or_path"):  # before anything loads
        train(lora_config(tiny_model_dir, chat_jsonl, tmp_path / "c", adapter_name_or_path=str(tmp_path / "none")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="could not load the adapter"):
        train(lora_config(tiny_model_dir, chat_jsonl, tmp_path / "c", adapter_name_or_path=str(tmp_path / "empty")))


def test_adapters_take_the_dtype_of_the_model(tiny_model_dir):
    config = SFTConfig(model_name_or_path=str(tiny_model_dir), dataset_name="unused", use_peft=True, dtype="bfloat16")
    model = prepare_for_training(load_model(config), config)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}


def test_default_targets_are_the_attention_projections(tiny_llava_dir):
    from conftest import build_model
    from transformers import AutoModelForImageTextToText, GPT2Config, GPT2LMHeadModel

    assert default_target_modules(build_model(100)) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    # GPT-2's MLP also has a c_proj: the attention's own layers are named in full
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    assert default_target_modules(gpt2) == [f"transformer.h.{i}.attn.{n}" for i in range(2) for n in ("c_attn", "c_proj")]
    # a vision-language model: the language model's attention, not the vision tower's
    llava = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir)
    targets = default_target_modules(llava)
    assert len(targets) == 8 and all(t.startswith("model.language_model.layers.") for t in targets)


# ---- gradient checkpointing: the same gradients, with full fine-tuning and with adapters on a frozen base


def gradients(model_dir, batch, **settings) -> dict[str, torch.Tensor]:
    config = SFTConfig(model_name_or_path=str(model_dir), dataset_name="unused", **settings)
    torch.manual_seed(0)
    model = prepare_for_training(load_model(config), config)
    generator = torch.Generator().manual_seed(2)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave A without a gradient to compare
            param.data.normal_(0, 0.1, generator=generator)
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert checkpointing == settings.get("gradient_checkpointing", False)
    loss_model = CausalLMWithLoss(model)
    loss_model.train()
    torch.manual_seed(1)  # the same dropout draws in both runs
    loss_model(**batch)["loss_sum"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.any(g) for g in grads.values())
    return grads


@pytest.mark.parametrize("settings", [
    {},
    {"use_peft": True},
    {"use_peft": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}},
], ids=["full", "lora", "lora-reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(settings, tiny_model_dir):
    from transformers import AutoTokenizer

    from sftune.data.collate import pad_batch

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["hello world how are you today", "the cat sat on the mat", "one two three"]
    rows = [{"input_ids": np.array(ids), "labels": np.array(ids)} for ids in tokenizer(texts)["input_ids"]]
    batch = pad_batch(rows, tokenizer.pad_token_id)
    kwargs = settings.pop("gradient_checkpointing_kwargs", None)
    plain = gradients(tiny_model_dir, batch, **settings)
    checkpointed = gradients(tiny_model_dir, batch, gradient_checkpointing=True,
                             gradient_checkpointing_kwargs=kwargs, **settings)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6, msg=name)


def test_gradient_checkpointing_trains_identically(tiny_model_dir, chat_jsonl, tmp_path):
    plain = train(lora_config(tiny_model_dir, chat_jsonl, tmp_path / "a", max_steps=2))
    checkpointed = train(lora_config(tiny_model_dir, chat_jsonl, tmp_path / "b", max_steps=2,
                                     gradient_checkpointing=True))
    np.testing.assert_allclose([e["loss"] for e in plain.history], [e["loss"] for e in checkpointed.history],
                               rtol=0, atol=1e-6)


def test_real_smollm2_adapter_is_a_few_megabytes(smollm2_dir, tmp_path):
    """r=16 on the attention projections of SmolLM2-135M: 30 layers x (q, k, v, o) adapters, saved alone."""
    from transformers import AutoTokenizer

    from sftune.export.save import save_model

    config = SFTConfig(model_name_or_path=str(smollm2_dir), dataset_name="unused", use_peft=True)
    model = prepare_for_training(load_model(config), config)
    trainable, total = model.get_nb_trainable_parameters()
    # per layer r * (in + out): q and o 576 + 576, k and v 576 + 192 (3 key-value heads of 64)
    assert trainable == 30 * 16 * (2 * (576 + 576) + 2 * (576 + 192)) == 1_843_200
    save_model(model, AutoTokenizer.from_pretrained(smollm2_dir), tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert 4 * trainable <= size < 4 * trainable + 100_000  # fp32 adapter weights and a small header: 7.4 MB
    assert {p.name for p in tmp_path.iterdir()} == ADAPTER_FILES | TOKENIZER_FILES
