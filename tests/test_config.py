"""The config schema: three ways in give one resolved config, and every bad value is caught with a clear message."""

from __future__ import annotations

import pytest
import yaml

from sftune import SFTConfig, load_config
from sftune.cli import main
from sftune.config import CONFIG_FILENAME
from sftune.errors import ConfigError


def test_defaults_follow_trl():
    config = SFTConfig()
    assert config.learning_rate == 2e-5 and config.learning_rate_is_default
    assert SFTConfig(use_peft=True).learning_rate == 2e-4  # adapters take a larger step by default
    assert SFTConfig(use_peft=True, learning_rate=1e-5).learning_rate == 1e-5
    assert not SFTConfig(learning_rate=2e-5).learning_rate_is_default
    assert (config.use_peft, config.lora_r, config.lora_alpha, config.lora_dropout) == (False, 16, 32, 0.05)
    assert config.per_device_train_batch_size == 8
    assert config.max_length == 1024
    assert config.num_train_epochs == 3.0
    assert config.lr_scheduler_type == "linear"


def test_python_yaml_and_flags_resolve_to_the_same_config(tmp_path):
    python = SFTConfig(model_name_or_path="m", dataset_name="d.jsonl", learning_rate=1e-4, max_length=256)
    path = tmp_path / "run.yaml"
    path.write_text("model_name_or_path: m\ndataset_name: d.jsonl\nlearning_rate: 1e-3\nmax_length: 256\n")
    from_yaml_with_flag = load_config(path, {"learning_rate": "1e-4"})
    from_flags = load_config(None, {"model_name_or_path": "m", "dataset_name": "d.jsonl",
                                    "learning_rate": "1e-4", "max_length": "256"})
    assert python.to_dict() == from_yaml_with_flag.to_dict() == from_flags.to_dict()


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1e-4\nadam_epsilon: 1e-6\nmax_steps: 1e2\n")
    config = load_config(path)
    assert config.learning_rate == 1e-4 and config.adam_epsilon == 1e-6 and config.max_steps == 100


@pytest.mark.parametrize("text,expected", [("true", True), ("false", False), ("True", True), ("no", False)])
def test_boolean_values(text, expected):
    assert load_config(None, {"overwrite_output_dir": text}).overwrite_output_dir is expected


def test_aliases_from_older_trl_names(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_seq_length: 333\ntorch_dtype: bfloat16\n")
    config = load_config(path)
    assert config.max_length == 333 and config.dtype == "bfloat16"
    assert load_config(path, {"max_length": "77"}).max_length == 77  # a flag beats the file's alias


def test_saved_config_round_trips(tmp_path):
    config = SFTConfig(model_name_or_path="m", dataset_name="d", learning_rate=3e-4, max_length=None, seed=7)
    config.save(tmp_path / CONFIG_FILENAME)
    assert load_config(tmp_path / CONFIG_FILENAME).to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "values,message",
    [
        ({"learning_rat": 1}, "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
        ({"per_device_train_batch_sz": 1}, "did you mean 'per_device_train_batch_size'?"),
        ({"max_seq_lenght": 5}, "did you mean 'max_length'?"),
        ({"zzz": 1}, "unknown key 'zzz'"),
        ({"tf32": True}, "'tf32' = True is not supported"),
        ({"learning_rate": "fast"}, "'learning_rate' = 'fast': expected a number"),
        ({"learning_rate": True}, "'learning_rate' = True: expected a number"),
        ({"per_device_train_batch_size": 2.5}, "expected a whole number"),
        ({"per_device_train_batch_size": 0}, "'per_device_train_batch_size' = 0: must be >= 1"),
        ({"gradient_accumulation_steps": -1}, "'gradient_accumulation_steps' = -1: must be >= 1"),
        ({"learning_rate": 0}, "'learning_rate' = 0.0: must be > 0"),
        ({"learning_rate": -1e-4}, "must be > 0"),
        ({"max_steps": 0}, "'max_steps' = 0: must be >= 1, or -1"),
        ({"num_train_epochs": 0}, "'num_train_epochs' = 0.0: must be > 0"),
        ({"max_length": 1}, "'max_length' = 1: must be >= 2"),
        ({"warmup_ratio": 1.5}, "'warmup_ratio' = 1.5: must be in [0, 1)"),
        ({"warmup_ratio": 0.1, "warmup_steps": 5}, "key 'warmup_steps' is given twice (as 'warmup_ratio' and as 'warmup_steps')"),
        ({"adam_beta2": 1.0}, "'adam_beta2' = 1.0: must be in [0, 1)"),
        ({"logging_steps": 0}, "'logging_steps' = 0: must be >= 1"),
        ({"max_grad_norm": -1}, "must be >= 0"),
        ({"dtype": "fp32"}, "'dtype' = 'fp32': expected one of auto, float32, bfloat16, float16"),
        ({"lr_scheduler_type": "cosin"}, "(did you mean 'cosine'?)"),
        ({"overwrite_output_dir": "maybe"}, "expected true or false"),
        ({"model_name_or_path": 5}, "'model_name_or_path' = 5: expected text"),
        ({"seed": -3}, "'seed' = -3: must be in [0, 2**32)"),
        ({"max_seq_length": 5, "max_length": 6}, "key 'max_length' is given twice"),
    ],
)
def test_bad_values_name_the_key(values, message):
    with pytest.raises(ConfigError) as caught:
        SFTConfig.from_dict(values)
    assert message in str(caught.value)


def test_python_constructor_validates_too():
    with pytest.raises(ConfigError, match="per_device_train_batch_size"):
        SFTConfig(per_device_train_batch_size=0)


def test_missing_required_keys_are_reported_at_train_time():
    with pytest.raises(ConfigError, match="missing required key 'model_name_or_path'"):
        SFTConfig(dataset_name="d").check_ready_to_train()


@pytest.mark.parametrize(
    "content,message",
    [
        ("learning_rate: [1, 2\n", "line 2: not valid YAML"),
        ("- a\n- b\n", "expected a mapping of key: value"),
        ("learning_rat: 1\n", "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
    ],
)
def test_bad_yaml_files(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert message in str(caught.value) and "bad.yaml" in str(caught.value)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


# ---- the CLI surface of the same errors: one line, exit code 2, no traceback


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--learning_rat", "1e-4"], "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
        (["train", "--learning-rat=1e-4"], "did you mean 'learning_rate'?"),
        (["train", "--per_device_train_batch_size", "zero"], "expected a whole number"),
        (["train", "--max_steps", "0"], "must be >= 1, or -1"),
        (["train", "missing.yaml"], "config file 'missing.yaml' does not exist"),
        (["train", "a.yaml", "b.yaml"], "unexpected argument 'b.yaml'"),
        (["train", "--learning_rate"], "expected one argument"),
        (["train"], "missing required key 'model_name_or_path'"),
        (["trian"], "invalid choice: 'trian'"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_boolean_flag_forms(tmp_path, capsys):
    from sftune.cli import _parse

    for argv, expected in [(["--overwrite_output_dir"], True), (["--overwrite_output_dir", "false"], False),
                           (["--overwrite_output_dir", "true"], True), (["--overwrite-output-dir=no"], False)]:
        _, overrides = _parse(["train", *argv])
        assert load_config(None, overrides).overwrite_output_dir is expected


def test_help_lists_every_field_with_default(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["train", "--help"])
    assert caught.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for name, value in SFTConfig().to_dict().items():
        assert f"--{name}" in out
    assert "Peak learning rate of AdamW (unset: 2e-5, or 2e-4 with use_peft). (default: unset)" in out
    assert "LoRA rank. (default: 16)" in out
    assert "(default: unset)" in out


def test_debug_flag_shows_the_traceback():
    with pytest.raises(ConfigError):
        main(["train", "--debug", "--learning_rate", "-1"])


def test_saved_yaml_is_plain_data(tmp_path):
    SFTConfig(model_name_or_path="m", dataset_name="d").save(tmp_path / "c.yaml")
    data = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert data["model_name_or_path"] == "m" and data["max_length"] == 1024


@pytest.mark.parametrize(("flags", "expected"), [
    ({}, "completion"),
    ({"completion_only_loss": True}, "completion"),
    ({"completion_only_loss": False}, "all"),
    ({"assistant_only_loss": True}, "assistant"),
    ({"assistant_only_loss": True, "completion_only_loss": False}, "assistant"),
    ({"last_assistant_only_loss": True}, "last_assistant"),
    ({"loss_mask": "all"}, "all"),
    ({"loss_mask": "assistant", "assistant_only_loss": True}, "assistant"),
])
def test_loss_mask_is_resolved_once_from_trls_flags(flags, expected, tmp_path):
    config = SFTConfig(**flags)
    assert config.loss_mask == expected
    config.save(tmp_path / "saved.yaml")  # the saved config holds the result, and agrees with itself on reload
    assert yaml.safe_load((tmp_path / "saved.yaml").read_text())["loss_mask"] == expected
    assert load_config(tmp_path / "saved.yaml").loss_mask == expected


@pytest.mark.parametrize(("flags", "message"), [
    ({"assistant_only_loss": True, "last_assistant_only_loss": True}, "are both true: keep one of them"),
    ({"loss_mask": "all", "assistant_only_loss": True}, "'loss_mask' = 'all' contradicts assistant_only_loss: true"),
    ({"loss_mask": "completion", "completion_only_loss": False}, "contradicts completion_only_loss: false"),
])
def test_contradicting_loss_settings_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        SFTConfig(**flags)


# ---- a TRL file with many foreign keys is cleared in one run; suggestions only for real near-misses


def test_unquoted_no_in_yaml_is_the_choice_no(tmp_path):
    """YAML 1.1 reads an unquoted `no` (and `off`) as false; for a setting whose choices include 'no', that is it."""
    path = tmp_path / "run.yaml"
    path.write_text("save_strategy: no\neval_strategy: off\npacking: no\n")
    config = load_config(path)
    assert (config.save_strategy, config.eval_strategy, config.packing) == ("no", "no", False)
    with pytest.raises(ConfigError, match="'lr_scheduler_type' = False: expected one of"):
        SFTConfig(lr_scheduler_type=False)  # no 'no' among its choices: still an error


def test_every_bad_key_of_a_file_is_reported_in_one_line(tmp_path):
    path = tmp_path / "trl.yaml"
    path.write_text("fsdp: full_shard\nlora_task_type: SEQ_CLS\ngpu_count: true\nlearnig_rate: 1.0e-4\n"
                    "hub_revision: dev\nmax_seq_length: 64\nmax_length: 64\ndo_train: true\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: 6 problems: ")
    for part in ("key 'fsdp' = 'full_shard' is not supported: FSDP", "key 'lora_task_type' = 'SEQ_CLS' is not "
                 "supported: sftune trains causal", "unknown key 'gpu_count'",
                 "unknown key 'learnig_rate' (did you mean 'learning_rate'?)", "'hub_revision' = 'dev' is not supported: sftune pushes to the repository's main branch",
                 "key 'max_length' is given twice"):
        assert part in message
    assert "do_train" not in message  # a TRL key that means nothing here is accepted
    assert message.count("did you mean") == 1  # not use_cpu or use_peft for the foreign key
    assert message.endswith("(see `sftune train --help`)") and message.count("sftune train --help") == 1


@pytest.mark.parametrize("key,suggested", [
    ("shuffle_rows", None), ("task_type", None), ("gpu_count", None), ("colour", None),
    ("learnig_rate", "learning_rate"), ("gradient_acumulation_steps", "gradient_accumulation_steps"),
    ("max_seq_len", "max_length"), ("num_epochs", "num_train_epochs"), ("save_step", "save_steps"),
    ("eval_batch_size", "per_device_eval_batch_size"),
])
def test_did_you_mean_only_for_a_near_miss(key, suggested):
    from sftune.config import unknown_key_message

    message = unknown_key_message(key)
    if suggested is None:
        assert "did you mean" not in message and "sftune train --help" in message
    else:
        assert f"(did you mean '{suggested}'?)" in message


def test_every_value_out_of_range_and_every_mistyped_value_at_once():
    with pytest.raises(ConfigError) as caught:
        SFTConfig.from_dict({"per_device_train_batch_size": "eight", "learning_rate": "fast"})
    assert "2 problems" in str(caught.value) and "'learning_rate' = 'fast'" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        SFTConfig(per_device_train_batch_size=0, logging_steps=0, lora_r=0, num_threads=0)
    message = str(caught.value)
    assert message.startswith("4 problems: ")
    for key in ("per_device_train_batch_size", "logging_steps", "lora_r", "num_threads"):
        assert f"'{key}' = 0" in message


def test_cli_reports_unknown_flags_and_the_file_s_bad_keys_together(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("gpu_count: true\n")
    code, _, err = run_cli(capsys, "train", str(path), "--learnig_rate", "1e-4", "--shuffle-rows", "--seed", "1")
    assert code == 2 and err.count("\n") == 1
    assert "2 problems: unknown key 'learnig_rate' (did you mean 'learning_rate'?); unknown key 'shuffle_rows'" \
        in err
    assert f"and {path}: unknown key 'gpu_count'" in err


def test_changed_settings_use_the_defaults_help_shows():
    from sftune.config import changed_settings

    assert changed_settings(SFTConfig()) == []
    assert changed_settings(SFTConfig(use_peft=True)) == [("use_peft", True)]  # its learning rate is the default
    changed = dict(changed_settings(SFTConfig(use_peft=True, logging_steps=3, learning_rate=2e-5)))
    assert changed == {"use_peft": True, "learning_rate": 2e-5, "logging_steps": 3}


def test_a_resumed_run_saves_the_config_that_repeats_it(tmp_path):
    out = tmp_path / "run"
    for resume in (True, str(out / "checkpoint-4")):
        SFTConfig(output_dir=str(out), resume_from_checkpoint=resume).save(tmp_path / "c.yaml")
        assert yaml.safe_load((tmp_path / "c.yaml").read_text())["resume_from_checkpoint"] is None
    other = str(tmp_path / "other" / "checkpoint-4")  # started from another run's checkpoint: part of the run
    SFTConfig(output_dir=str(out), resume_from_checkpoint=other).save(tmp_path / "c.yaml")
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["resume_from_checkpoint"] == other


def test_environment_variables_in_paths_are_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("SFTUNE_TEST_ROOT", str(tmp_path))
    config = load_config(None, {"output_dir": "${SFTUNE_TEST_ROOT}/runs/a", "dataset_name": "$SFTUNE_TEST_ROOT/d.jsonl"})
    assert config.output_dir == f"{tmp_path}/runs/a" and config.dataset_name == f"{tmp_path}/d.jsonl"
    assert load_config(None, {"dataset_name": "org/name"}).dataset_name == "org/name"  # a Hub id as it was


def test_one_generation_prompt_with_commas_stays_one_prompt():
    config = load_config(None, {"generation_prompts": "Hello, how are you?"})
    assert config.generation_prompts == ["Hello, how are you?"]
    assert load_config(None, {"report_to": "tensorboard, wandb"}).report_to == ["tensorboard", "wandb"]
