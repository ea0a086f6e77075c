"""What a run hands on: the model card and loss plot, a generation config that stops at the end-of-turn token,
`sftune chat`, `sftune merge`, loading with plain transformers / peft, and the push to a (local, fake) Hub."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import threading
from contextlib import redirect_stdout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import StringIO
from pathlib import Path

import pytest
import torch
import yaml

from sftune import SFTConfig, train
from sftune.cli import main
from sftune.config import CONFIG_FILENAME
from sftune.errors import ConfigError

ANSWER = "I am a small model"  # every assistant turn of the training data: the runs learn to say it, then stop
BASE_LICENSE = "apache-2.0"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """The tiny Llama with a ChatML template whose EOS is <|endoftext|>, not the <|im_end|> that ends each turn
    (as in Qwen's base models), and a card that states a license."""
    from conftest import build_model, build_tokenizer

    folder = tmp_path_factory.mktemp("base")
    tokenizer = build_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(folder)
    build_model(len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id).save_pretrained(folder)
    (folder / "README.md").write_text(f"---\nlicense: {BASE_LICENSE}\n---\n# a base model\n")
    return folder


@pytest.fixture(scope="module")
def answer_data(tmp_path_factory) -> Path:
    from conftest import WORDS, write_jsonl

    rng = random.Random(0)
    rows = [{"messages": [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))},
                          {"role": "assistant", "content": ANSWER}]} for _ in range(40)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "identity.jsonl", rows)


def run_config(base_dir, data, output_dir, **overrides) -> SFTConfig:
    settings = dict(
        model_name_or_path=str(base_dir), dataset_name=str(data), output_dir=str(output_dir), max_steps=20,
        learning_rate=3e-3, logging_steps=2, per_device_train_batch_size=8, max_length=64,
        assistant_only_loss=True, eval_ratio=0.2, eval_strategy="steps", eval_steps=10, save_strategy="no",
    )
    settings.update(overrides)
    return SFTConfig(**settings)


@pytest.fixture(scope="module")
def full_run(base_dir, answer_data, tmp_path_factory):
    return train(run_config(base_dir, answer_data, tmp_path_factory.mktemp("full") / "run"))


@pytest.fixture(scope="module")
def adapter_run(base_dir, answer_data, tmp_path_factory):
    return train(run_config(base_dir, answer_data, tmp_path_factory.mktemp("adapter") / "run", use_peft=True,
                            lora_target_modules=["all-linear"], learning_rate=1e-2))


def token_id(folder: Path, token: str) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(token)


def front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def python_block(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


# ---------------------------------------------------------------- the model card and plot


def test_card_of_a_full_run(full_run, answer_data):
    out = full_run.output_dir
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["license"] == BASE_LICENSE
    assert {"sftune", "sft"} <= set(meta["tags"]) and meta["pipeline_tag"] == "text-generation"
    assert "base_model" not in meta and "datasets" not in meta  # local folders have no Hub page to link

    stats = full_run.data_stats
    assert f"Training rows: {stats['rows']:,}" in card and f"{stats['tokens']:,} tokens" in card
    assert f"({100 * stats['trained_fraction']:.1f}%)" in card
    assert f"| `{answer_data.name}` (local) | messages |" in card  # the per-source table
    settings = card.split("## Training settings")[1].split("##")[0]
    for changed in ("learning_rate", "max_steps", "assistant_only_loss", "eval_ratio"):
        assert f"`{changed}`" in settings
    assert "`output_dir`" not in settings and "`per_device_eval_batch_size`" not in settings
    results = card.split("## Results")[1].split("##")[0]
    final_loss = [m for m in full_run.history if "loss" in m][-1]["loss"]
    final_eval = [m for m in full_run.history if "eval_loss" in m][-1]["eval_loss"]
    assert f"{final_loss:.4f} |" in results and f"{final_eval:.4f} |" in results
    assert "Hardware: CPU" in card and "in the training loop" in card
    assert f"torch {torch.__version__}" in card
    assert "AutoModelForCausalLM.from_pretrained(model_id)" in card and "apply_chat_template" in card

    assert "![Training loss and learning rate](loss_curve.png)" in card
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".staging-*"))


def test_loss_plot_shows_train_eval_and_learning_rate(full_run):
    from sftune.export.card import loss_figure, read_metrics

    figure = loss_figure(read_metrics(full_run.output_dir), "run")
    loss_axes, rate_axes = figure.axes
    assert [line.get_label() for line in loss_axes.lines] == ["train loss", "eval loss"]
    assert [line.get_label() for line in rate_axes.lines] == ["learning rate"]
    assert list(loss_axes.lines[1].get_xdata()) == [10, 20]  # evaluated at eval_steps
    assert loss_figure([{"step": 1, "learning_rate": 1e-3}], "run") is None  # nothing to plot, no figure


def test_a_short_run_plots_every_step_not_one_dot(base_dir, answer_data, tmp_path):
    """3 steps with logging_steps 10 log one point; the plot draws the loss of each of the 3 steps instead."""
    from sftune.export.card import MIN_LOGGED_POINTS, loss_figure, read_metrics

    result = train(run_config(base_dir, answer_data, tmp_path / "short", max_steps=3, logging_steps=10,
                              eval_strategy="no", eval_ratio=0.0))
    assert len(read_metrics(result.output_dir)) == 1 < MIN_LOGGED_POINTS
    figure = loss_figure(read_metrics(result.output_dir), "run", result.step_losses)
    train_line = figure.axes[0].lines[0]
    assert train_line.get_label() == "train loss (every step)" and list(train_line.get_xdata()) == [1, 2, 3]
    per_step = list(train_line.get_ydata())
    assert per_step == [m["loss"] for m in result.step_losses] and len(set(per_step)) == 3
    # the one logged point is the token-weighted loss of those 3 steps: close to their plain mean
    assert sum(per_step) / 3 == pytest.approx(result.history[-1]["loss"], rel=0.02)
    assert (result.output_dir / "loss_curve.png").is_file()


def test_card_settings_differ_from_the_help_defaults(adapter_run):
    """use_peft and logging_steps differ from their `--help` defaults: both are listed; nothing that is at its
    default is listed (the learning rate counts as default when it is what unset gives)."""
    from sftune.config import field_help

    settings = (adapter_run.output_dir / "README.md").read_text().split("## Training settings")[1].split("##")[0]
    listed = set(re.findall(r"^\| `(\w+)` \|", settings, re.M))
    assert {"use_peft", "logging_steps", "learning_rate", "lora_target_modules", "max_steps"} <= listed
    config = SFTConfig.from_dict(yaml.safe_load((adapter_run.output_dir / CONFIG_FILENAME).read_text()))
    help_defaults = {name: default for _, name, default, _, _ in field_help()}
    for name in listed:
        assert getattr(config, name) != help_defaults[name], name


def test_saved_files_have_normal_permissions(base_dir, answer_data, tmp_path):
    """Every file a run writes, weights included (safetensors alone makes them 0600), has the mode the umask gives:
    0644 under the usual 022, 0640 under 027; folders 0755 / 0750."""
    previous = os.umask(0o027)
    try:
        out = tmp_path / "run"
        train(run_config(base_dir, answer_data, out, max_steps=2, eval_strategy="no", eval_ratio=0.0,
                         save_strategy="steps", save_steps=1, use_peft=True))
        assert main(["merge", str(out), "--output", str(tmp_path / "merged")]) == 0
    finally:
        os.umask(previous)
    written = [p for p in [*out.rglob("*"), *(tmp_path / "merged").rglob("*"), tmp_path / "merged"]]
    assert {"adapter_model.safetensors", "model.safetensors"} <= {p.name for p in written}
    for path in written:
        assert path.stat().st_mode & 0o777 == (0o750 if path.is_dir() else 0o640), path


def test_card_is_written_without_matplotlib(full_run, tmp_path, monkeypatch):
    from sftune.export import card

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    summary = card.RunSummary(full_run_config(full_run), full_run.output_dir, full_run.data_stats, full_run.history,
                              1.0, 2.0, full_run.plan)
    summary.output_dir = tmp_path
    card.write_model_card(summary)
    text = (tmp_path / "README.md").read_text()
    assert "No loss plot" in text and "loss_curve.png" not in text and not (tmp_path / "loss_curve.png").exists()


def full_run_config(result) -> SFTConfig:
    from sftune.config import load_config

    return load_config(result.output_dir / CONFIG_FILENAME)


def test_card_metadata_names_hub_models_and_datasets(tmp_path):
    from sftune.export.card import card_metadata, hub_model_id

    config = SFTConfig(model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct",
                       datasets=[{"path": "trl-lib/Capybara"}, {"path": "/data/mine.jsonl"}])
    meta = yaml.safe_load(card_metadata(config, hub_model_id(config.model_name_or_path), True, False))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["datasets"] == ["trl-lib/Capybara"]
    assert meta["library_name"] == "peft" and "license" not in meta  # offline: unknown, never guessed
    cached = tmp_path / "hub" / "models--Qwen--Qwen3-0.6B" / "snapshots" / "abc"  # huggingface_hub's cache layout
    cached.mkdir(parents=True)
    assert hub_model_id(str(cached)) == "Qwen/Qwen3-0.6B"
    assert hub_model_id(str(tmp_path)) is None  # a local folder has no Hub page


# ---------------------------------------------------------------- generation config and hand-off


def test_generation_stops_at_the_end_of_turn_token_with_plain_transformers(full_run, base_dir):
    """The card's own quick-start code, run as a user would: the reply is the trained answer and generation
    stops at <|im_end|>, though the tokenizer's EOS is <|endoftext|>."""
    from transformers import GenerationConfig

    out = full_run.output_dir
    im_end, endoftext = token_id(out, "<|im_end|>"), token_id(out, "<|endoftext|>")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [im_end, endoftext]

    scope: dict = {}
    printed = StringIO()
    with redirect_stdout(printed):
        exec(python_block((out / "README.md").read_text()), scope)
    assert printed.getvalue().strip() == ANSWER
    reply = scope["output"][0, scope["inputs"]["input_ids"].shape[1]:]
    assert reply[-1].item() == im_end and len(reply) < 128

    # The falsifiable part: with the base model's stops alone, the same model writes on past <|im_end|>.
    model, inputs = scope["model"], scope["inputs"]
    longer = model.generate(**inputs, max_new_tokens=24, generation_config=GenerationConfig.from_pretrained(base_dir))
    assert len(longer[0]) - inputs["input_ids"].shape[1] > len(reply)


def test_real_qwen3_base_template_stops_at_im_end():
    """Qwen3's base models end text with <|endoftext|> but their template ends each turn with <|im_end|>."""
    from conftest import asset_folder
    from transformers import AutoTokenizer, GenerationConfig

    from sftune.tokenizer import set_generation_stops

    tokenizer = AutoTokenizer.from_pretrained(asset_folder("qwen3-tokenizer"), eos_token="<|endoftext|>")
    generation = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    set_generation_stops(generation, tokenizer)
    assert tokenizer.convert_ids_to_tokens(generation.eos_token_id) == ["<|im_end|>", "<|endoftext|>"]
    assert generation.pad_token_id == tokenizer.pad_token_id


def test_adapter_run_hands_on_with_peft(adapter_run):
    out = adapter_run.output_dir
    assert {"adapter_config.json", "adapter_model.safetensors", "generation_config.json"} <= set(os.listdir(out))
    assert not (out / "model.safetensors").exists()
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and {"sftune", "sft", "lora"} <= set(meta["tags"])
    assert "LoRA adapter (rank 16" in card and "AutoPeftModelForCausalLM" in card

    scope: dict = {}
    printed = StringIO()
    with redirect_stdout(printed):
        exec(python_block(card), scope)
    assert printed.getvalue().strip() == ANSWER
    reply = scope["output"][0, scope["inputs"]["input_ids"].shape[1]:]
    assert reply[-1].item() == token_id(out, "<|im_end|>") and len(reply) < 128


def test_merge_keeps_the_generation_config(adapter_run, merged_dir):
    saved = json.loads((adapter_run.output_dir / "generation_config.json").read_text())
    assert json.loads((merged_dir / "generation_config.json").read_text())["eos_token_id"] == saved["eos_token_id"]


@pytest.fixture(scope="module")
def merged_dir(adapter_run, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("merged") / "model"
    assert main(["merge", str(adapter_run.output_dir), "--output", str(target)]) == 0
    return target


# ---------------------------------------------------------------- sftune chat


def bare_adapter(adapter_run, tmp_path) -> Path:
    """The adapter folder as peft alone would leave it: the base model comes from adapter_config.json."""
    import shutil

    folder = tmp_path / "bare-adapter"
    shutil.copytree(adapter_run.output_dir, folder, ignore=shutil.ignore_patterns(CONFIG_FILENAME, "README.md"))
    return folder


@pytest.mark.parametrize("which", ["full", "adapter", "bare adapter", "merged"])
def test_chat_answers_one_prompt(which, request, tmp_path, capsys):
    folder = {"full": lambda: request.getfixturevalue("full_run").output_dir,
              "adapter": lambda: request.getfixturevalue("adapter_run").output_dir,
              "bare adapter": lambda: bare_adapter(request.getfixturevalue("adapter_run"), tmp_path),
              "merged": lambda: request.getfixturevalue("merged_dir")}[which]()
    capsys.readouterr()
    assert main(["chat", str(folder), "--prompt", "hello how are you", "--temperature", "0",
                 "--max_new_tokens", "20"]) == 0
    assert capsys.readouterr().out.strip() == ANSWER


def test_interactive_chat_keeps_the_history(full_run, monkeypatch, capsys):
    from sftune import generation

    seen: list[list[dict]] = []
    render = generation.chat_inputs

    def remember(tokenizer, messages):
        seen.append([dict(m) for m in messages])
        return render(tokenizer, messages)

    monkeypatch.setattr(generation, "chat_inputs", remember)
    monkeypatch.setattr(sys, "stdin", StringIO("hello there\n\nwho are you\n/exit\nnever read\n"))
    assert main(["chat", str(full_run.output_dir), "--system", "be brief", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"model> {ANSWER}") == 2
    system = {"role": "system", "content": "be brief"}
    assert seen == [
        [system, {"role": "user", "content": "hello there"}],
        [system, {"role": "user", "content": "hello there"}, {"role": "assistant", "content": ANSWER},
         {"role": "user", "content": "who are you"}],
    ]

    monkeypatch.setattr(sys, "stdin", StringIO("hello\n"))  # end of input ends the chat too
    assert main(["chat", str(full_run.output_dir), "--temperature", "0"]) == 0
    assert capsys.readouterr().out.count(ANSWER) == 1


def test_chat_errors_are_one_line(tmp_path, capsys):
    assert main(["chat", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["chat", str(tmp_path), "--prompt", "hi", "--temperature", "-1"]) == 2
    assert "--temperature" in capsys.readouterr().err


# ---------------------------------------------------------------- push to a local fake Hub

HF_SECRET = "hf_PlantedTokenDoNotLeak1234567890"
WANDB_SECRET = "wandb_planted_key_0123456789abcdef0123"


class FakeHub:
    """The part of the Hub API that create_repo + upload_folder use, in a thread: whoami, repo creation, YAML
    validation, preupload (every file 'regular') and the NDJSON commit. `fail` answers every upload with 500."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.created: list[dict] = []
        self.requests: list[str] = []  # "METHOD path Authorization"
        self.fail = False
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                hub.requests.append(f"GET {self.path} {self.headers.get('Authorization', '')}")
                if self.path.startswith("/api/whoami-v2"):
                    return self._reply(200, {"type": "user", "name": "tester", "orgs": [],
                                             "auth": {"accessToken": {"role": "write"}}})
                self._reply(404, {"error": f"not faked: GET {self.path}"})

            def do_POST(self):
                hub.requests.append(f"POST {self.path} {self.headers.get('Authorization', '')}")
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/api/repos/create":
                    payload = json.loads(body)
                    hub.created.append(payload)
                    return self._reply(200, {"url": f"{hub.endpoint}/{payload['organization']}/{payload['name']}"})
                if self.path == "/api/validate-yaml":
                    return self._reply(200, {})
                if hub.fail:
                    return self._reply(500, {"error": "the fake Hub is down"})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if "/commit/" in self.path:
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    repo = self.path.split("/api/models/")[1].split("/commit/")[0]
                    return self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/abc123",
                                             "commitOid": "abc123"})
                self._reply(404, {"error": f"not faked: POST {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub():
    hub = FakeHub()
    yield hub
    hub.close()


def sftune(args: list[str], endpoint: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """The CLI in a fresh process: huggingface_hub reads HF_ENDPOINT when it is imported."""
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_TOKEN": HF_SECRET, "WANDB_API_KEY": WANDB_SECRET,
           "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, "-m", "sftune", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow  # trains in a subprocess
def test_push_uploads_the_run_and_no_secret_leaks(base_dir, answer_data, fake_hub, tmp_path):
    out = tmp_path / "run"
    done = sftune(["train", "--model_name_or_path", str(base_dir), "--dataset_name", str(answer_data),
                   "--output_dir", str(out), "--max_steps", "2", "--save_steps", "1", "--logging_steps", "1",
                   "--per_device_train_batch_size", "8", "--max_length", "64", "--push_to_hub", "true",
                   "--hub_model_id", "tiny-sft", "--hub_private_repo", "true"], fake_hub.endpoint, tmp_path)
    assert done.returncode == 0, done.stderr
    assert fake_hub.created == [{"name": "tiny-sft", "organization": "tester", "visibility": "private"}]
    ours = [r for r in fake_hub.requests if "/agent-harnesses" not in r]  # huggingface_hub's own registry fetch
    assert ours and all(r.endswith(f"Bearer {HF_SECRET}") for r in ours)  # the token from HF_TOKEN, every time
    local = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"checkpoint-1/model.safetensors", "checkpoint-2/model.safetensors"} <= local
    pushed = {name for name in local if not name.startswith("checkpoint-")}
    assert set(fake_hub.files) == pushed
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja",
            "README.md", "loss_curve.png", "metrics.jsonl", CONFIG_FILENAME} <= pushed
    assert fake_hub.files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert "model_id = 'tester/tiny-sft'" in fake_hub.files["README.md"].decode()
    assert "pushed to" in done.stderr

    for secret in (HF_SECRET, WANDB_SECRET):
        assert secret not in done.stdout + done.stderr
        for path in out.rglob("*"):
            assert not path.is_file() or secret.encode() not in path.read_bytes(), path
        assert all(secret.encode() not in content for content in fake_hub.files.values())


@pytest.fixture
def hub_here(monkeypatch):
    """Point this process's huggingface_hub at a fake Hub (it read HF_ENDPOINT when imported), online, with the
    planted token."""
    from huggingface_hub import constants

    def point_to(endpoint: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", HF_SECRET)

    return point_to


def test_a_failed_push_keeps_the_run_and_says_how_to_retry(full_run, fake_hub, hub_here, capsys, monkeypatch):
    import huggingface_hub.utils._http as hub_http

    monkeypatch.setattr(hub_http.time, "sleep", lambda seconds: None)  # huggingface_hub retries a 500 five times
    out = full_run.output_dir
    before = folder_digest(out)
    hub_here(fake_hub.endpoint)
    fake_hub.fail = True
    assert main(["push", str(out), "--hub_model_id", "someone/tiny"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("sftune: error: the push to the Hub repository someone/tiny failed")
    assert "500" in error and f"sftune push {out}" in error and HF_SECRET not in error
    assert folder_digest(out) == before and not fake_hub.files

    fake_hub.fail = False  # the Hub is back: the retry uploads the run
    assert main(["push", str(out), "--hub_model_id", "someone/tiny"]) == 0
    assert {"model.safetensors", "README.md", "loss_curve.png", "generation_config.json"} <= set(fake_hub.files)
    assert folder_digest(out) == before
    # the pushed card loads from the Hub; the local one still loads the local folder
    assert f"model_id = 'someone/tiny'  # or the local folder '{out}'\n" in fake_hub.files["README.md"].decode()
    assert f"model_id = '{out}'\n" in (out / "README.md").read_text()


def test_a_push_that_fails_after_training_keeps_the_trained_run(base_dir, answer_data, fake_hub, hub_here, tmp_path,
                                                                capsys, monkeypatch):
    import huggingface_hub.utils._http as hub_http

    monkeypatch.setattr(hub_http.time, "sleep", lambda seconds: None)
    hub_here(fake_hub.endpoint)
    fake_hub.fail = True
    out = tmp_path / "run"
    assert main(["train", "--model_name_or_path", str(base_dir), "--dataset_name", str(answer_data),
                 "--output_dir", str(out), "--max_steps", "2", "--max_length", "64", "--push_to_hub", "true"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("sftune: error: the push to the Hub repository tester/run failed") and "500" in error
    assert f"sftune push {out}" in error
    assert {"model.safetensors", "generation_config.json", "README.md", "loss_curve.png", CONFIG_FILENAME} <= {
        p.name for p in out.iterdir()}
    assert not fake_hub.files and not list(out.glob(".staging-*"))


def test_no_hub_or_no_token_stops_a_push_run_before_training(base_dir, answer_data, hub_here, tmp_path, capsys,
                                                             monkeypatch):
    from huggingface_hub import constants

    hub_here("http://127.0.0.1:9")  # nothing listens on port 9
    out = tmp_path / "run"
    command = ["train", "--model_name_or_path", str(base_dir), "--dataset_name", str(answer_data),
               "--output_dir", str(out), "--max_steps", "2", "--push_to_hub", "true"]
    assert main(command) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "could not check the Hugging Face token with the Hub at http://127.0.0.1:9" in error
    assert "HF_TOKEN" in error and HF_SECRET not in error
    assert not out.exists()  # stopped before anything was loaded or written

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # nor a `hf auth login` file
    assert main(command) == 2
    assert "needs a Hugging Face token" in capsys.readouterr().err and not out.exists()


def test_hub_settings_are_checked_and_tokens_are_refused_in_the_config(tmp_path):
    with pytest.raises(ConfigError, match="hub_model_id"):
        SFTConfig(hub_model_id="bad//name")
    with pytest.raises(ConfigError, match="HF_TOKEN"):
        SFTConfig.from_dict({"hub_token": "hf_x"})
    assert "token" not in " ".join(f for f in SFTConfig().to_dict() if "hub" in f)
    SFTConfig(push_to_hub=True, hub_model_id="me/x", model_init_kwargs={"token": HF_SECRET}).save(tmp_path / "c.yaml")
    assert HF_SECRET not in (tmp_path / "c.yaml").read_text()


def test_the_card_tells_what_was_trained_in_every_source_of_a_mixture():
    from sftune.export.card import _loss_scope

    mixture = {"format": "messages", "sources": [{"format": "messages"}, {"format": "prompt_completion"}]}
    assert _loss_scope(SFTConfig(), mixture) == "completions (every token of the messages rows)"
    assert _loss_scope(SFTConfig(completion_only_loss=False), mixture) == \
        "every token (messages, prompt_completion rows)"
    assert _loss_scope(SFTConfig(loss_mask="assistant"), mixture) == "assistant turns"
