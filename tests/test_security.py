"""Security: weights we write are safetensors only; pickled weights load only on request; our state files load
with weights_only=True; YAML is loaded safely; trust_remote_code is off unless asked; no credential is saved."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import conversations, write_jsonl
from safetensors.torch import load_file

from sftune import SFTConfig, train
from sftune.config import CONFIG_FILENAME, load_config, without_secrets
from sftune.errors import UserError
from sftune.model.load import load_model

SOURCE = Path(__file__).resolve().parents[1] / "src" / "sftune"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
# Our own training state: optimizer, schedule and random generators (no model weights), read with weights_only=True.
STATE_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pt"}


@pytest.fixture(scope="module", params=["full", "lora"])
def finished_run(request, tiny_model_dir, tmp_path_factory) -> Path:
    """A two-step run with a checkpoint after each step: a full fine-tune and a LoRA one."""
    folder = tmp_path_factory.mktemp(f"secure-{request.param}")
    data = write_jsonl(folder / "chat.jsonl", conversations(8))
    train(SFTConfig(model_name_or_path=str(tiny_model_dir), dataset_name=str(data), output_dir=str(folder / "run"),
                    max_steps=2, save_steps=1, per_device_train_batch_size=4, max_length=64,
                    use_peft=request.param == "lora"))
    return folder / "run"


def test_weights_are_written_as_safetensors_only(finished_run):
    pickled = [p for p in finished_run.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    checkpoints = sorted(finished_run.glob("checkpoint-*"))
    assert len(checkpoints) == 2
    assert sorted(p.relative_to(finished_run).as_posix() for p in pickled) == sorted(
        f"{c.name}/{name}" for c in checkpoints for name in STATE_FILES
    )
    for folder in [finished_run, *checkpoints]:
        weights = list(folder.glob("*.safetensors"))
        assert [w.name for w in weights] in (["model.safetensors"], ["adapter_model.safetensors"])
        assert load_file(weights[0])


def test_our_state_files_load_without_pickle_and_hold_no_weights(finished_run, tiny_model_dir):
    weight_shapes = {tuple(t.shape) for t in load_file(tiny_model_dir / "model.safetensors").values() if t.dim() == 2}
    state_files = sorted(finished_run.glob("checkpoint-*/*.pt"))
    assert sorted(p.name for p in state_files) == sorted(list(STATE_FILES) * 2)  # both checkpoints, every file
    for path in state_files:
        state = torch.load(path, weights_only=True)  # refuses anything but tensors and plain containers
        if path.name != "optimizer.pt":  # the optimizer's moments have the shapes of the weights, not their values
            tensors = [v for v in _leaves(state) if isinstance(v, torch.Tensor)]
            assert not any(tuple(t.shape) in weight_shapes for t in tensors), path


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def _calls(name_of_module: str, function: str):
    """(file, line, call) for every `module.function(...)` in sftune's source."""
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == function
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == name_of_module):
                yield path.name, node.lineno, node


def test_every_torch_load_in_the_source_is_weights_only():
    found = list(_calls("torch", "load"))
    assert found  # the checkpoint loader at least
    for file, line, call in found:
        flags = {k.arg: k.value for k in call.keywords}
        assert isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True, (file, line)


def test_no_unsafe_deserialisers_in_the_source():
    for module, function in [("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("pickle", "load"),
                             ("pickle", "loads"), ("dill", "load")]:
        assert not list(_calls(module, function)), f"{module}.{function}"
    for file, line, call in _calls("np", "load"):  # numpy refuses pickled arrays unless allow_pickle=True
        assert "allow_pickle" not in {k.arg for k in call.keywords}, (file, line)
    for path in SOURCE.rglob("*.py"):
        assert "trust_remote_code=True" not in path.read_text(encoding="utf-8"), path


def test_yaml_with_a_python_tag_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"learning_rate: !!python/object/apply:os.system ['touch {marker}']\n", encoding="utf-8")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(path)
    assert not marker.exists()


def _pickled_copy(tiny_model_dir: Path, folder: Path) -> Path:
    shutil.copytree(tiny_model_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickled_weights_load_only_with_the_opt_in(tiny_model_dir, tmp_path):
    folder = _pickled_copy(tiny_model_dir, tmp_path / "pickled")
    with pytest.raises(UserError, match=r"only pickled weights.*allow_pickled_weights: true"):
        load_model(SFTConfig(model_name_or_path=str(folder)))
    model = load_model(SFTConfig(model_name_or_path=str(folder), allow_pickled_weights=True))
    expected = load_file(tiny_model_dir / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_from_pretrained_is_told_safetensors_only_and_no_remote_code(tiny_model_dir, monkeypatch):
    """What reaches transformers, also for a Hub id (where sftune cannot look at the files first)."""
    from transformers import AutoModelForCausalLM

    seen = []

    def record(name, **kwargs):
        seen.append(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", record)
    for allow in (False, True):
        with pytest.raises(UserError):
            load_model(SFTConfig(model_name_or_path=str(tiny_model_dir), allow_pickled_weights=allow))
    assert seen[0]["use_safetensors"] is True and "use_safetensors" not in seen[1]
    assert seen[0]["trust_remote_code"] is False and SFTConfig().trust_remote_code is False
    with pytest.raises(Exception, match="use the config key 'allow_pickled_weights'"):
        load_model(SFTConfig(model_name_or_path=str(tiny_model_dir), model_init_kwargs={"use_safetensors": False}))


def test_the_saved_config_never_holds_a_credential(tmp_path, monkeypatch):
    planted = "hf_PLANTEDsecret123"
    values = {"hub_token": planted, "wandb_api_key": planted, "token": planted, "eos_token": "<|im_end|>",
              "model_init_kwargs": {"token": planted, "revision": "main"}}
    assert without_secrets(values) == {"eos_token": "<|im_end|>", "model_init_kwargs": {"revision": "main"}}
    assert without_secrets(SFTConfig().to_dict()) == SFTConfig().to_dict()  # no setting of ours looks like one
    # a field holding a secret, as a push-to-hub setting might: it never reaches sftune_config.yaml
    config = SFTConfig(model_init_kwargs={"token": planted})
    monkeypatch.setattr(SFTConfig, "to_dict", lambda self: {"hub_token": planted, **vars(self)})
    config.save(tmp_path / CONFIG_FILENAME)
    text = (tmp_path / CONFIG_FILENAME).read_text()
    assert planted not in text and "hub_token" not in text
    assert yaml.safe_load(text)["model_init_kwargs"] == {}
