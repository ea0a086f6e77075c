"""Mixture-of-Experts fine-tuning: the router's balancing loss (equal to transformers' own on one batch, and
token-exact across micro-batches, padding and packing), expert-load figures, LoRA on the fused 3-D experts,
merge, resume, reload and QLoRA, on tiny Qwen3-MoE and OLMoE models built from configs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import conversations, write_jsonl
from moe_models import EXPERT_PARAMETERS, FAMILIES, LOSS_FAMILIES, build_moe, save_moe

from sftune import SFTConfig, train
from sftune.cli import main
from sftune.errors import ConfigError
from sftune.training import moe
from sftune.training.loss import CausalLMWithLoss

ATOL = 1e-5
COEF = 0.5  # large, so that a wrongly normalised balancing loss shows in the gradients


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory):
    built = {}

    def folder(family: str):
        if family not in built:
            built[family] = save_moe(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return folder


@pytest.fixture(scope="module")
def varied_rows(tmp_path_factory):
    """Conversations of 1 to 3 turns (about 15 to 110 tokens): padded batches carry real padding."""
    return write_jsonl(tmp_path_factory.mktemp("moe-data") / "chat.jsonl", conversations(24, seed=8))


def config(model_dir, data, out, **overrides) -> SFTConfig:
    settings = dict(model_name_or_path=str(model_dir), dataset_name=str(data), output_dir=str(out),
                    learning_rate=1e-3, max_steps=4, logging_steps=1, max_length=128, save_strategy="no",
                    attn_implementation="sdpa", router_aux_loss_coef=COEF)
    settings.update(overrides)
    return SFTConfig(**settings)


def assert_same_training(a, b, keys=("loss", "grad_norm", "aux_loss", "expert_load_cv", "expert_load_max")):
    for key in keys:
        ours, theirs = [e[key] for e in a.history if key in e], [e[key] for e in b.history if key in e]
        assert len(ours) == len(theirs) > 1, key
        np.testing.assert_allclose(ours, theirs, rtol=ATOL, atol=ATOL, err_msg=key)
    for (name, x), (_, y) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=ATOL, msg=name)


def aux_losses(result) -> list[float]:
    return [e["aux_loss"] for e in result.history if "aux_loss" in e]


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------- the loss itself


@pytest.mark.parametrize("family", LOSS_FAMILIES)
def test_the_balancing_loss_equals_the_models_own_on_one_batch(family):
    """routing_of + balancing_loss against transformers' load_balancing_loss_func, through the model's own
    causal-LM forward, on a padded batch (padding excluded by the attention mask)."""
    model = build_moe(family, vocab_size=300, pad_token_id=0, eos_token_id=1)
    ids = torch.randint(2, 300, (3, 17), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 11:], mask[2, 5:] = 0, 0
    theirs = model(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False).aux_loss.detach()
    loss_model = CausalLMWithLoss(model)
    spec = loss_model.router
    assert spec == moe.RouterSpec(num_experts=4, top_k=2, config_coef=model.config.router_aux_loss_coef)
    routing = loss_model(ids, torch.full_like(ids, -100), attention_mask=mask, routing_only=True)["routing"]
    assert routing.tokens == int(mask.sum()) and routing.counts.shape == (2, 4)
    assert routing.counts.sum() == 2 * 2 * mask.sum()  # every real token chooses 2 experts in each of 2 layers
    ours = moe.balancing_loss(routing, spec).detach()
    assert abs(float(ours) - float(theirs)) < 1e-6
    ignoring_padding = moe.balancing_loss(moe.routing_of(
        model.model(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits, None, spec), spec)
    # the padding is really there, and really left out
    assert abs(float(ignoring_padding.detach()) - float(theirs)) > 1e-4


def test_a_dense_model_has_no_router(tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM

    from sftune.logs import setup_logging

    setup_logging()  # sftune's log, as a run has it (on stderr)
    assert CausalLMWithLoss(AutoModelForCausalLM.from_pretrained(tiny_model_dir)).router is None
    capsys.readouterr()
    assert moe.balance_for(None, None, 1, torch.clone) is None and "router" not in capsys.readouterr().err
    assert moe.balance_for(None, 0.01, 1, torch.clone) is None
    assert "router_aux_loss_coef is set, but this model has no router balancing loss" in capsys.readouterr().err


def test_load_figures():
    even = moe.load_figures(torch.tensor([[5.0, 5, 5, 5], [2, 2, 2, 2]]))
    assert even == {"expert_load_cv": 0.0, "expert_load_max": 0.25}
    skewed = moe.load_figures(torch.tensor([[10.0, 0, 0, 0], [4, 2, 1, 1]]))
    assert skewed["expert_load_max"] == 1.0
    np.testing.assert_allclose(skewed["expert_load_cv"], (np.sqrt(3) + np.std([4, 2, 1, 1]) / 2) / 2)


def test_position_batches_mark_their_padding():
    """Packed rows of unequal length are padded without an attention mask: token_mask says which tokens are real."""
    from sftune.data.collate import position_batch

    rows = [{"input_ids": np.arange(5), "labels": np.arange(5), "seq_lengths": [2, 3], "source": [0, 0]},
            {"input_ids": np.arange(3), "labels": np.arange(3)}]
    batch = position_batch(rows, pad_token_id=0, join=False)
    assert batch["token_mask"].tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert "token_mask" not in position_batch(rows[:1], pad_token_id=0, join=False)
    assert "token_mask" not in position_batch(rows, pad_token_id=0, join=True)  # one row: no padding


# ---------------------------------------------------------------- token-exact across micro-batches, padding, packing


def test_gradient_accumulation_equals_one_big_batch_with_the_aux_loss(moe_dir, varied_rows, tmp_path):
    """Padded batch 8 x accumulation 1 (counts from the same forward) against batch 1 x 8 (the routing pre-pass):
    the same losses, aux losses, expert load, gradient norms and weights."""
    model_dir = moe_dir("qwen3_moe")
    big = train(config(model_dir, varied_rows, tmp_path / "8x1", padding_free=False, per_device_train_batch_size=8))
    single = train(config(model_dir, varied_rows, tmp_path / "1x8", padding_free=False, per_device_train_batch_size=1,
                          gradient_accumulation_steps=8))
    assert big.plan.layout == single.plan.layout == "padded"
    assert all(a > 1.0 for a in aux_losses(big))  # the balancing loss is on (top-2: 2.0 when perfectly even)
    assert_same_training(big, single)
    off = train(config(model_dir, varied_rows, tmp_path / "off", padding_free=False, per_device_train_batch_size=8,
                       router_aux_loss_coef=0.0))
    assert len(aux_losses(off)) == 4  # still logged with the loss off
    gaps = [abs(x - y) for x, y in zip(big.history[1:], off.history[1:]) for x, y in [(x["loss"], y["loss"])]]
    assert max(gaps) > 1e-4  # ... and on, it changes training: the comparison above is not of the main loss alone


def test_padding_free_equals_padded_batches_with_the_aux_loss(moe_dir, varied_rows, tmp_path):
    """Each row alone (no padding, a pre-pass over 8 forwards) against padded batches of 8 (padding masked out
    of the routing); evaluation's aux loss and expert load too."""
    model_dir = moe_dir("olmoe")
    settings = dict(per_device_train_batch_size=8, eval_strategy="steps", eval_steps=4, eval_ratio=0.2)
    padded = train(config(model_dir, varied_rows, tmp_path / "padded", padding_free=False, **settings))
    free = train(config(model_dir, varied_rows, tmp_path / "free", padding_free=True, **settings))
    assert (padded.plan.layout, free.plan.layout) == ("padded", "rows")
    assert all(a > 1.0 for a in aux_losses(padded))
    assert_same_training(padded, free)
    ours, theirs = ([e for e in r.history if "eval_loss" in e][-1] for r in (free, padded))
    for key in ("eval_loss", "eval_aux_loss", "eval_expert_load_cv", "eval_expert_load_max"):
        np.testing.assert_allclose(ours[key], theirs[key], rtol=0, atol=ATOL, err_msg=key)


def test_packed_equals_unpacked_with_the_aux_loss(moe_dir, varied_rows, tmp_path):
    """The whole dataset in each step, packed into rows of 128 (rows of unequal length: their padding is masked by
    token_mask) and as padded rows: packed documents route like separate ones, padding never counts."""
    model_dir = moe_dir("qwen3_moe")
    settings = dict(per_device_train_batch_size=24, max_steps=3)
    unpacked = train(config(model_dir, varied_rows, tmp_path / "unpacked", padding_free=False, **settings))
    packed = train(config(model_dir, varied_rows, tmp_path / "packed", packing=True, **settings))
    assert (unpacked.plan.layout, packed.plan.layout) == ("padded", "packed")
    assert packed.data_stats["rows"] < packed.data_stats["documents"] == 24
    assert_same_training(unpacked, packed)


def test_the_config_coefficient_is_the_default(moe_dir, varied_rows, tmp_path, capsys):
    """router_aux_loss_coef unset takes the model config's value (here set to COEF in the model folder)."""
    folder = tmp_path / "model"
    shutil.copytree(moe_dir("qwen3_moe"), folder)
    settings = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**settings, "router_aux_loss_coef": COEF}))
    common = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2, padding_free=False)
    unset = train(config(folder, varied_rows, tmp_path / "unset", router_aux_loss_coef=None, **common))
    explicit = train(config(folder, varied_rows, tmp_path / "explicit", **common))
    assert_same_training(unset, explicit)
    assert "moe: 4 experts, top-2; router balancing loss x 0.5 (the model config's)" in capsys.readouterr().err


# ---------------------------------------------------------------- full fine-tuning, adapters, merge, reload, resume


@pytest.mark.parametrize("family", FAMILIES)
def test_full_fine_tuning_saves_a_model_that_reloads_with_the_same_logits(family, moe_dir, varied_rows, tmp_path):
    from transformers import AutoModelForCausalLM

    result = train(config(moe_dir(family), varied_rows, tmp_path / "run", per_device_train_batch_size=4))
    trained = dict(result.model.named_parameters())
    assert all(p.requires_grad for p in trained.values())
    reloaded = AutoModelForCausalLM.from_pretrained(result.output_dir)
    ids = torch.tensor([result.tokenizer.encode("the cat sat on the mat today")])
    assert (logits_of(reloaded, ids) - logits_of(result.model, ids)).abs().max() < 1e-5
    card = (result.output_dir / "README.md").read_text()
    assert "| train aux loss |" in card and "| train expert load cv |" in card  # the results table


def test_the_card_plot_has_an_expert_load_panel(moe_dir, varied_rows, tmp_path):
    from sftune.export.card import loss_figure

    result = train(config(moe_dir("qwen3_moe"), varied_rows, tmp_path / "run", per_device_train_batch_size=4,
                          eval_strategy="steps", eval_steps=2, eval_ratio=0.2))
    metrics = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("aux_loss" in m and "expert_load_max" in m for m in metrics if "loss" in m)
    assert all("eval_aux_loss" in m and "eval_expert_load_cv" in m for m in metrics if "eval_loss" in m)
    figure = loss_figure(metrics, "run")
    labels = {line.get_label() for axes in figure.axes for line in axes.get_lines()}
    assert {"aux (balancing) loss", "eval aux loss", "expert load CV", "train loss"} <= labels
    dense = [{k: v for k, v in m.items() if "aux" not in k and "expert" not in k} for m in metrics]
    assert len(loss_figure(dense, "run").axes) == 2  # a dense model's plot: loss and learning rate only
    assert (result.output_dir / "loss_curve.png").is_file()


def test_lora_on_attention_says_the_experts_stay_frozen(moe_dir, varied_rows, tmp_path, capsys):
    result = train(config(moe_dir("qwen3_moe"), varied_rows, tmp_path / "run", use_peft=True, max_steps=2,
                          per_device_train_batch_size=4))
    err = capsys.readouterr().err
    assert "moe: 4 experts, top-2; router balancing loss x 0.5 (router_aux_loss_coef)" in err
    lines = [line.removeprefix("[sftune] ") for line in err.splitlines() if "stay frozen" in line]
    assert lines == ["adapters: the experts of this Mixture-of-Experts model stay frozen (LoRA on modules does not "
                     "reach their 3-D weights); to adapt them set lora_target_parameters: "
                     "[mlp.experts.gate_up_proj, mlp.experts.down_proj] (and lora_dropout: 0)"]
    trainable = [name for name, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all("self_attn" in name for name in trainable)
    assert len(aux_losses(result)) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_experts_trains_them_and_merges_into_the_same_logits(family, moe_dir, varied_rows, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train(config(moe_dir(family), varied_rows, tmp_path / "run", use_peft=True, lora_dropout=0.0,
                          lora_target_parameters=EXPERT_PARAMETERS, per_device_train_batch_size=4, max_steps=3))
    err = capsys.readouterr().err
    assert "stay frozen" not in err
    assert "and the parameters mlp.experts.gate_up_proj,mlp.experts.down_proj" in err
    card = (result.output_dir / "README.md").read_text()
    assert "and the parameters `mlp.experts.down_proj`, `mlp.experts.gate_up_proj`" in card
    trainable = [name for name, p in result.model.named_parameters() if p.requires_grad]
    assert any("mlp.experts" in name for name in trainable) and any("self_attn" in name for name in trainable)
    ids = torch.tensor([result.tokenizer.encode("the cat sat on the mat today")])
    base = AutoModelForCausalLM.from_pretrained(moe_dir(family))
    assert (logits_of(base, ids) - logits_of(result.model, ids)).abs().max() > 1e-3  # the adapter changed it
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moe_dir(family)), result.output_dir)
    assert (logits_of(reloaded, ids) - logits_of(result.model, ids)).abs().max() < 1e-5

    merged_dir = tmp_path / "merged"
    assert main(["merge", str(result.output_dir), "--output", str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert (logits_of(merged, ids) - logits_of(result.model, ids)).abs().max() < 1e-5
    before = dict(base.named_parameters())
    changed = [name for name, p in merged.named_parameters() if "experts" in name
               and (p - before[name]).abs().max() > 0]
    assert len(changed) == 4  # gate_up_proj and down_proj of both layers folded in


def test_resume_equals_an_uninterrupted_run(moe_dir, varied_rows, tmp_path):
    settings = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=5, padding_free=False,
                    save_strategy="steps", save_steps=2)
    full = train(config(moe_dir("olmoe"), varied_rows, tmp_path / "full", **settings))
    resumed = train(config(moe_dir("olmoe"), varied_rows, tmp_path / "resumed",
                           resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"), **settings))
    assert [e["step"] for e in resumed.history] == [3, 4, 5]
    from transformers import AutoModelForCausalLM  # a checkpoint keeps the fused experts, and still loads

    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "checkpoint-2", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for key in ("loss", "aux_loss", "expert_load_cv"):
        assert [e[key] for e in resumed.history] == [e[key] for e in full.history][2:], key
    for (name, x), (_, y) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.filterwarnings("ignore:.*(8-bit|8bit|int8|MatMul8bitLt).*:UserWarning")
def test_qlora_on_experts(moe_dir, varied_rows, tmp_path):
    """bitsandbytes quantizes the linear layers to 4 bits; the fused experts are no Linear and stay in fp32,
    where their adapters train."""
    pytest.importorskip("bitsandbytes")
    result = train(config(moe_dir("qwen3_moe"), varied_rows, tmp_path / "run", use_peft=True, load_in_4bit=True,
                          lora_dropout=0.0, lora_target_parameters=EXPERT_PARAMETERS, per_device_train_batch_size=4,
                          max_steps=2))
    kinds = {type(m).__name__ for m in result.model.modules()}
    assert "Linear4bit" in kinds
    assert any(p.requires_grad and "mlp.experts" in n for n, p in result.model.named_parameters())
    assert all(np.isfinite(e["loss"]) and e["aux_loss"] > 1.0 for e in result.history)


# ---------------------------------------------------------------- settings


def test_bad_moe_settings_are_one_line_each():
    base = dict(model_name_or_path="m", dataset_name="d", use_peft=True)
    with pytest.raises(ConfigError, match="'lora_target_parameters' needs lora_dropout: 0 \\(it is 0.05\\)"):
        SFTConfig(**base, lora_target_parameters=EXPERT_PARAMETERS)
    with pytest.raises(ConfigError, match="'router_aux_loss_coef' = -1.0: must be >= 0"):
        SFTConfig(model_name_or_path="m", dataset_name="d", router_aux_loss_coef=-1.0)


def test_a_parameter_target_that_matches_nothing_names_the_key(moe_dir, varied_rows, tmp_path, capsys):
    code = main(["train", "--model_name_or_path", str(moe_dir("qwen3_moe")), "--dataset_name", str(varied_rows),
                 "--output_dir", str(tmp_path / "run"), "--use_peft", "true", "--lora_dropout", "0",
                 "--lora_target_parameters", "mlp.experts.no_such_proj", "--max_steps", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert ("config key 'lora_target_parameters' has 'mlp.experts.no_such_proj', which names no parameter of "
            "Qwen3MoeForCausalLM (this model's expert weights are mlp.experts.gate_up_proj, mlp.experts.down_proj)"
            in err) and "Traceback" not in err


@pytest.mark.slow  # two processes
def test_two_processes_equal_one_with_the_aux_loss(moe_dir, tmp_path):
    """2 CPU processes over gloo x padded batch 2 x accumulation 2 (expert shares summed over processes in the
    pre-pass) against 1 process x padded batch 8 (counts from the same forward)."""
    import os
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "fresh.jsonl", conversations(24, seed=23))
    common = ["--model_name_or_path", str(moe_dir("qwen3_moe")), "--dataset_name", str(data), "--max_steps", "3",
              "--logging_steps", "1", "--learning_rate", "1e-3", "--max_length", "128", "--save_strategy", "no",
              "--padding_free", "false", "--router_aux_loss_coef", str(COEF)]
    ddp = subprocess.run([sys.executable, "-m", "sftune", "train", *common, "--output_dir", str(tmp_path / "ddp"),
                          "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                          "--num_processes", "2"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "8 rows per step (2 x 2 accumulation x 2 processes)" in ddp.stderr
    single = train(config(moe_dir("qwen3_moe"), data, tmp_path / "one", max_steps=3, per_device_train_batch_size=8,
                          padding_free=False))
    lines = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert all(line["aux_loss"] > 1.0 for line in lines)
    for key in ("loss", "grad_norm", "aux_loss", "expert_load_cv", "expert_load_max"):
        np.testing.assert_allclose([line[key] for line in lines], [e[key] for e in single.history], rtol=ATOL,
                                   atol=ATOL, err_msg=key)


def test_gradient_checkpointing_gives_the_same_training(moe_dir, varied_rows, tmp_path):
    """Recomputing the layers in backward must not record the routers twice, nor change the balancing loss."""
    settings = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, padding_free=False)
    plain = train(config(moe_dir("qwen3_moe"), varied_rows, tmp_path / "plain", **settings))
    recomputed = train(config(moe_dir("qwen3_moe"), varied_rows, tmp_path / "recomputed", gradient_checkpointing=True,
                              **settings))
    def checkpointed(model):
        return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())

    assert checkpointed(recomputed.model) and not checkpointed(plain.model)
    assert_same_training(plain, recomputed)


def _fsdp2_worker(rank: int, world: int, port: int, values: dict, result_file: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    from test_fsdp2 import fsdp2_accelerator

    from sftune import run

    def moe_fsdp2_accelerator(config=None):
        accelerator = fsdp2_accelerator()  # accelerate's FSDP2 state on gloo, as test_fsdp2.py builds it
        accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = ["Qwen3MoeDecoderLayer"]
        return accelerator

    run.make_accelerator = moe_fsdp2_accelerator
    result = run.train(SFTConfig(**values))
    if rank == 0:
        with open(result_file, "w") as handle:
            json.dump({"history": result.history, "engine": result.plan.engine}, handle)


@pytest.mark.slow  # two processes
def test_fsdp2_equals_one_process_with_the_aux_loss(moe_dir, tmp_path):
    """FSDP2 on 2 processes (the routing pre-pass runs through the sharded model) against one process."""
    import socket

    import torch.multiprocessing as mp

    data = write_jsonl(tmp_path / "chat.jsonl", conversations(16, seed=13))
    values = dict(model_name_or_path=str(moe_dir("qwen3_moe")), dataset_name=str(data),
                  output_dir=str(tmp_path / "fsdp"), learning_rate=1e-3, max_steps=3, logging_steps=1,
                  per_device_train_batch_size=2, max_length=96, save_strategy="no", attn_implementation="sdpa",
                  router_aux_loss_coef=COEF, padding_free=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_fsdp2_worker, args=(2, port, values, str(tmp_path / "fsdp.json")), nprocs=2, join=True)
    sharded = json.loads((tmp_path / "fsdp.json").read_text())
    assert sharded["engine"] == "fsdp"
    single = train(SFTConfig(**{**values, "output_dir": str(tmp_path / "one"), "per_device_train_batch_size": 4}))
    ours = [e for e in sharded["history"] if "loss" in e]
    assert all(e["aux_loss"] > 1.0 for e in ours)
    for key in ("loss", "grad_norm", "aux_loss", "expert_load_cv"):
        np.testing.assert_allclose([e[key] for e in ours], [e[key] for e in single.history], rtol=ATOL, atol=ATOL,
                                   err_msg=key)
