"""sftune against TRL 1.16's SFTTrainer: same model, data and settings, alternating runs, one invocation.

Every run is a fresh Python process started the way a user starts a job, so its wall time holds start-up
(imports), data preparation, model loading, one epoch of training and the final save; its peak RSS is that
process's own high-water mark (`ru_maxrss`, plus any tokenizing worker processes it started, reported
separately). The tools alternate run by run (sftune, TRL, TRL, sftune, ...), so a busy machine slows both alike.
Each run gets fresh, empty data caches (SFTUNE_DATA_CACHE, HF_DATASETS_CACHE): every run prepares its data.

Workload (scenario a): a model with SmolLM2-135M-Instruct's config and random weights (vocabulary 49,152, seed 0,
saved once as safetensors and loaded by both tools) and its real tokenizer and chat template, on the first
N real BYU chit-chat conversations that have an assistant turn (N = 2,000), max_length 1024, 8 rows per
optimizer step (8 x 1), fp32, seed 42, AdamW (fused), linear schedule, lr 2e-5, no evaluation, no checkpoints,
final model saved by both. Scenarios:

  a   loss on all tokens, padded batches (both tools' plain way)
  b   a + LoRA r=16, alpha 32, dropout 0.05 on every linear projection of the layers, lr 2e-4
  c   a + assistant-only loss (TRL gets SmolLM2's template with {% generation %} markers, as its users must)
  d   each tool's defaults (only model, data, epochs, output and fp32 given; TRL's defaults include
      gradient checkpointing on, sftune's do not)
  e   each tool's fastest settings: TRL packing (bfd, padding-free); sftune padding_free (on sdpa: every row
      its own micro-batch, no padding, the same update as a)
  eg  as e, but TRL with group_by_length (TRL's other fast setting; the faster TRL row is the fair one)

Metrics per run: whole-job wall seconds; training throughput = trained tokens / training seconds, where trained
tokens are the positions with a next-token target in the epoch (counted by each tool from its own prepared data,
the same rule for both) and training seconds are each tool's own training-loop time (TRL: `train_runtime` of
`trainer.train()`; sftune: `TrainResult.train_seconds`, the time in its loop); peak RSS. The report prints the
median over runs and the ratio sftune/TRL per metric, and the training FLOP rate as a fraction of this machine's
fp32 matmul rate (2048 x 2048 matmuls on the same thread count, measured in the same invocation).

Model FLOPs per trained token: full fine-tuning 6 x N, N = weights of every matmul (the layers' projections and
the vocabulary head; the embedding lookup is no matmul) - attention score FLOPs are left out. LoRA: the frozen
base still runs forward (2N) and passes gradients back to its inputs (2N), but computes no weight gradients, so
4 x N_base + 6 x N_lora. Counted on trained tokens only: work on padding or untrained positions is not useful work.

Quick mode (--quick): 16 conversations (2 optimizer steps), max_length 256, 1 run per tool per scenario, default
scenarios a,e: about 5 minutes per scenario on 2 free cores (much more when other jobs load the cores). Full
mode: 2,000 conversations (1.07M tokens after truncation to 1024), max_length 1024, 3 runs per tool: about
9 x 10^14 model FLOPs per run of scenario a: hours per run on 2 cores; see docs/benchmarks.md.

Run:  .venv/bin/pip install -e ".[bench]"
      .venv/bin/python bench/compare_trl.py --quick                      # a, e; ~6 min
      .venv/bin/python bench/compare_trl.py --scenarios a,b,c,d,e,eg --runs 3 --markdown results.md
GPU:  --device cuda --model-config qwen2.5-0.5b --dtype bfloat16 (see bench/gpu_check.sh): a bf16 checkpoint, trained
      by both tools with fp32 master weights and bf16 autocast (--precision bf16-mixed, the default for bf16; or
      pure-bf16: bf16 weights for both)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCENARIOS = ("a", "b", "c", "d", "e", "eg")
DESCRIPTIONS = {
    "a": "loss on all tokens",
    "b": "LoRA r=16",
    "c": "assistant-only loss",
    "d": "each tool's defaults",
    "e": "fastest: TRL packing (padding-free)",
    "eg": "fastest: TRL group_by_length",
}
LORA = dict(r=16, alpha=32, dropout=0.05,
            targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

# Model configs for the GPU check (random weights; tokenizer: SmolLM2's, so the vocabulary is 49,152).
QWEN25_05B = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, vocab_size=49152)
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=49152,
            tie_word_embeddings=True, max_position_embeddings=2048)


@dataclass
class Job:
    """Everything one run needs; written as JSON for the child process."""

    tool: str
    scenario: str
    model_dir: str
    data_file: str
    output_dir: str
    max_length: int
    threads: int
    device: str = "cpu"
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    assistant_template: str = ""
    liger: bool = False
    batch_size: int = 8
    precision: str = "fp32"  # fp32 | bf16-mixed | pure-bf16 (PRECISIONS)


@dataclass
class RunResult:
    tool: str
    scenario: str
    wall_seconds: float = 0.0
    train_seconds: float = 0.0
    trained_tokens: int = 0
    peak_rss_mb: float = 0.0
    worker_peak_rss_mb: float = 0.0
    peak_gpu_mb: float = 0.0
    steps: int = 0
    final_loss: float = float("nan")
    job_done_at: float = 0.0  # time.time() when the user's job (training and final save) was over
    error: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.trained_tokens / self.train_seconds if self.train_seconds else 0.0


# ---------------------------------------------------------------- settings of each tool, per scenario

# The same precision for both tools: TRL's bf16 flag autocasts over whatever dtype the model is loaded in, so its
# fp32 master weights come from loading in fp32 (TRL's CLI default); sftune's bf16 upcasts the trained weights itself.
PRECISIONS = {
    "fp32": ({"bf16": False}, {"bf16": False, "dtype": "float32"}),
    "bf16-mixed": ({"bf16": True}, {"bf16": True, "dtype": "float32"}),
    "pure-bf16": ({"bf16_weights": "plain"}, {"bf16": True, "dtype": "bfloat16"}),
}


def sftune_settings(job: Job) -> dict:
    s = job.scenario
    settings = dict(model_name_or_path=job.model_dir, dataset_name=job.data_file, output_dir=job.output_dir,
                    num_train_epochs=1, dtype=job.dtype, overwrite_output_dir=True, report_to=[])
    if "bf16" in _sftune_fields():  # the precision field (issue 13)
        settings.update(PRECISIONS[job.precision][0])
    if s == "d":
        return settings
    settings.update(max_length=job.max_length, per_device_train_batch_size=job.batch_size,
                    gradient_accumulation_steps=1, learning_rate=2e-5, seed=42, save_strategy="no",
                    eval_strategy="no", logging_steps=10, optim="adamw_torch_fused",
                    attn_implementation=job.attn_implementation, gradient_checkpointing=False, dataset_num_proc=1)
    if s == "b":
        settings.update(use_peft=True, lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                        lora_target_modules=LORA["targets"], learning_rate=2e-4)
    if s == "c":
        settings.update(assistant_only_loss=True)
    if s in ("e", "eg"):
        if job.device == "cpu" or "flash" in job.attn_implementation:
            # no compute on padding, same data order and update as scenario a (a joined varlen row on flash)
            settings.update(padding_free=True)
        else:  # on a GPU with sdpa, rows one by one would leave it underfed: batches of similar length instead
            settings.update(group_by_length=True)
    if job.liger and "use_liger_kernel" in _sftune_fields():
        settings.update(use_liger_kernel=True)
    return settings


def _sftune_fields() -> set[str]:
    import dataclasses

    from sftune import SFTConfig

    return {f.name for f in dataclasses.fields(SFTConfig)}


def trl_settings(job: Job) -> dict:
    s = job.scenario
    trl = PRECISIONS[job.precision][1]
    settings = dict(output_dir=job.output_dir, num_train_epochs=1, bf16=trl["bf16"], fp16=False, report_to="none",
                    save_strategy="no", use_cpu=job.device == "cpu", disable_tqdm=True,
                    model_init_kwargs={"dtype": trl["dtype"]})
    if s == "d":
        return settings
    settings.update(max_length=job.max_length, per_device_train_batch_size=job.batch_size,
                    gradient_accumulation_steps=1, learning_rate=2e-5, seed=42, eval_strategy="no", logging_steps=10,
                    optim="adamw_torch_fused", gradient_checkpointing=False, dataset_num_proc=1,
                    lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0)
    settings["model_init_kwargs"]["attn_implementation"] = job.attn_implementation
    if s == "b":
        settings.update(learning_rate=2e-4)
    if s == "c":
        settings.update(assistant_only_loss=True, chat_template_path=job.assistant_template)
    if s == "e":
        settings.update(packing=True, packing_strategy="bfd", padding_free=True)
    if s == "eg":
        settings.update(train_sampling_strategy="group_by_length")  # transformers 5's name for group_by_length
    if job.liger:
        settings.update(use_liger_kernel=True)
    return settings


# ---------------------------------------------------------------- the child processes

def _trained_positions(lengths: list[list[int]], labels: list[list[int]] | None = None) -> int:
    """Positions with a next-token target, per row of documents (`lengths`): every token but each document's
    first, and of those only the ones whose label is not -100 when labels are given."""
    if labels is None:
        return int(sum(max(n - 1, 0) for row in lengths for n in row))
    total = 0
    for row_lengths, row_labels in zip(lengths, labels):
        start = 0
        for n in row_lengths:
            total += sum(1 for label in row_labels[start + 1:start + n] if label != -100)
            start += n
    return total


def run_sftune(job: Job) -> RunResult:
    import torch

    from sftune import SFTConfig
    from sftune.data.collate import next_token_targets
    from sftune.data.render import IGNORE_INDEX
    from sftune.run import train

    torch.set_num_threads(job.threads)
    config = SFTConfig(**sftune_settings(job))
    result = train(config)
    done = time.time()
    # the trained rows are not returned; recount from the data cache the run just wrote (same rows, same rule)
    from sftune.data.prepare import prepare_train_data
    from sftune.model.load import load_tokenizer

    rows = prepare_train_data(config, load_tokenizer(config)).train_rows
    tokens = sum(int((next_token_targets(r["labels"], r.get("seq_lengths")) != IGNORE_INDEX).sum()) for r in rows)
    last = [h for h in result.history if "loss" in h]
    return RunResult("sftune", job.scenario, train_seconds=result.train_seconds, trained_tokens=tokens,
                     job_done_at=done, steps=result.global_step, final_loss=last[-1]["loss"] if last else float("nan"))


def run_trl(job: Job) -> RunResult:
    import torch
    from datasets import load_dataset
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    torch.set_num_threads(job.threads)
    settings = trl_settings(job)
    dataset = load_dataset("json", data_files=job.data_file, split="train")
    peft_config = None
    if job.scenario == "b":
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=LORA["targets"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=job.model_dir, args=TRLConfig(**settings), train_dataset=dataset,
                         peft_config=peft_config)
    output = trainer.train()
    trainer.save_model()
    done = time.time()
    prepared = trainer.train_dataset
    columns = prepared.column_names
    lengths = prepared["seq_lengths"] if "seq_lengths" in columns else [[len(ids)] for ids in prepared["input_ids"]]
    labels = prepared["labels"] if "labels" in columns else None  # TRL 1.16 folds loss masks into labels
    tokens = _trained_positions(lengths, labels)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return RunResult("trl", job.scenario, train_seconds=output.metrics["train_runtime"],
                     trained_tokens=tokens, job_done_at=done, steps=trainer.state.global_step,
                     final_loss=losses[-1] if losses else output.metrics.get("train_loss", float("nan")))


def child_main(job_file: str, result_file: str) -> None:
    job = Job(**json.loads(Path(job_file).read_text()))
    try:
        result = run_sftune(job) if job.tool == "sftune" else run_trl(job)
        import torch

        if torch.cuda.is_available():
            result.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20
    except Exception as err:  # reported by the parent, which goes on with the other runs
        import traceback

        traceback.print_exc()
        result = RunResult(job.tool, job.scenario, error=f"{type(err).__name__}: {err}"[:500])
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.worker_peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    Path(result_file).write_text(json.dumps(asdict(result)))


# ---------------------------------------------------------------- the parent: set-up, alternation, report

def chitchat_rows(count: int, inputs: Path | None = None) -> list[dict]:
    if inputs is not None:  # exported by --export-inputs, for a machine without the assets
        rows = [json.loads(line) for line in (inputs / "conversations.jsonl").read_text().splitlines()]
        if count > len(rows):
            raise SystemExit(f"{inputs} holds {len(rows)} conversations; asked for {count}")
        return rows[:count]
    sys.path.insert(0, str(HERE))
    from chitchat import chitchat_conversations

    from sftune.assets import fetch

    rows = [r for r in chitchat_conversations(fetch("chitchat"))
            if any(m["role"] == "assistant" for m in r["messages"])]
    if count > len(rows):
        raise SystemExit(f"only {len(rows)} conversations have an assistant turn; asked for {count}")
    return rows[:count]


def smollm2_dir(inputs: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct's config, tokenizer and chat template (weights are never read)."""
    if inputs is not None:
        return inputs / "smollm2"
    from sftune.assets import smollm2_model_dir

    return Path(smollm2_model_dir())


def export_inputs(folder: Path, count: int = 2000) -> None:
    """What a machine without the assets needs: SmolLM2's config, tokenizer and template, and the conversations."""
    import shutil

    source = smollm2_dir()
    (folder / "smollm2").mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.suffix in (".json", ".jinja"):
            shutil.copy(path, folder / "smollm2" / path.name)
    rows = chitchat_rows(count)
    (folder / "conversations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote SmolLM2's config and tokenizer and {len(rows)} conversations to {folder}")


def build_model_dir(folder: Path, model_config: str, dtype: str, inputs: Path | None = None) -> dict:
    """Random weights (seed 0) with the chosen config, SmolLM2's tokenizer and chat template, saved to `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = smollm2_dir(inputs)
    if model_config == "smollm2-135m":
        config = AutoConfig.from_pretrained(source)
    else:
        settings = dict(QWEN25_05B if model_config == "qwen2.5-0.5b" else TINY)
        model_type = settings.pop("model_type")
        config = AutoConfig.for_model(model_type, **settings)
    tokenizer = AutoTokenizer.from_pretrained(source)
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return matmul_parameters(model)


def matmul_parameters(model) -> dict:
    """Weights that take part in a matmul per token: the layers' linear projections and the vocabulary head."""
    import torch

    layers = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lm_head" not in name)
    head = model.get_output_embeddings().weight.numel()
    return {"layers": layers, "head": head, "lora": lora_parameters(model)}


def lora_parameters(model) -> int:
    """Parameters LoRA r adds: r x (in + out) for each targeted projection."""
    import torch

    return sum(LORA["r"] * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA["targets"])


def flops_per_token(params: dict, scenario: str) -> float:
    base = params["layers"] + params["head"]
    if scenario == "b":
        return 4 * base + 6 * params["lora"]
    return 6 * base


def assistant_template(source_template: str) -> str:
    """SmolLM2's template with {% generation %} around each assistant turn's content and <|im_end|>: the span
    sftune trains with assistant_only_loss, so both tools train the same tokens."""
    plain = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    if plain not in source_template:
        raise SystemExit("SmolLM2's chat template changed: cannot add generation markers")
    marked = ("{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
              "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}" + plain + "{% endif %}")
    return source_template.replace(plain, marked)


def matmul_gflops(threads: int, size: int = 2048, seconds: float = 3.0, device: str = "cpu",
                  dtype: str = "float32") -> float:
    """This machine's dense matmul rate in GFLOP/s, on `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(10 if device == "cuda" else 1):
            a @ b
            count += 1
        sync()
    return 2 * size**3 * count / (time.perf_counter() - started) / 1e9


def run_child(job: Job, workdir: Path, index: int) -> RunResult:
    job_file, result_file = workdir / f"job{index}.json", workdir / f"result{index}.json"
    job_file.write_text(json.dumps(asdict(job)))
    caches = Path(tempfile.mkdtemp(prefix="caches-", dir=workdir))
    env = dict(os.environ, OMP_NUM_THREADS=str(job.threads), MKL_NUM_THREADS=str(job.threads),
               SFTUNE_DATA_CACHE=str(caches / "sftune"), HF_DATASETS_CACHE=str(caches / "hf"),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    log_file = workdir / f"run{index}-{job.tool}-{job.scenario}.log"
    started, started_at = time.perf_counter(), time.time()
    with open(log_file, "w") as log:
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(job_file), str(result_file)],
                       env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - started
    if not result_file.exists():
        return RunResult(job.tool, job.scenario, wall_seconds=wall, error=f"no result; see {log_file}")
    data = json.loads(result_file.read_text())
    result = RunResult(**data)
    # up to the end of the user's job: the token count the child makes afterwards for this report is left out
    result.wall_seconds = result.job_done_at - started_at if result.job_done_at else wall
    if result.error:
        result.error += f" (log: {log_file})"
    return result


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def summarize(results: list[RunResult], scenarios: list[str], params: dict, machine_gflops: float,
              peak_label: str) -> list[dict]:
    """One row per scenario: medians per tool and the ratios sftune/TRL."""
    rows = []
    for s in scenarios:
        row: dict = {"scenario": s, "description": DESCRIPTIONS[s]}
        for tool in ("sftune", "trl"):
            ok = [r for r in results if r.tool == tool and r.scenario == s and not r.error]
            row[tool] = {
                "runs": len(ok),
                "wall_s": median([r.wall_seconds for r in ok]),
                "tokens_per_s": median([r.tokens_per_second for r in ok]),
                "peak_rss_mb": median([r.peak_rss_mb for r in ok]),
                "peak_gpu_mb": median([r.peak_gpu_mb for r in ok]),
                "trained_tokens": median([r.trained_tokens for r in ok]),
                "final_loss": median([r.final_loss for r in ok]),
            }
            flops = row[tool]["tokens_per_s"] * flops_per_token(params, s)
            row[tool]["flops_fraction"] = flops / (machine_gflops * 1e9) if machine_gflops else float("nan")
        ours, theirs = row["sftune"], row["trl"]
        row["ratio"] = {k: _ratio(ours[k], theirs[k]) for k in ("wall_s", "tokens_per_s", "peak_rss_mb", "peak_gpu_mb")}
        rows.append(row)
    return rows


def _ratio(a: float, b: float) -> float:
    return a / b if b and a == a and b == b else float("nan")


def markdown_table(rows: list[dict], gpu: bool, peak_label: str, precision: str = "fp32") -> str:
    memory = "peak GPU MB" if gpu else "peak RSS MB"
    key = "peak_gpu_mb" if gpu else "peak_rss_mb"
    lines = [
        f"| scenario | runs | wall s sftune / TRL | ratio | trained tok/s sftune / TRL | ratio | {memory} sftune / TRL "
        f"| ratio | model FLOPs / {peak_label} sftune / TRL | precision |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, t, q = r["sftune"], r["trl"], r["ratio"]
        lines.append(
            f"| {r['scenario']}: {r['description']} | {o['runs']}/{t['runs']} | {o['wall_s']:.1f} / {t['wall_s']:.1f} "
            f"| {q['wall_s']:.2f} | {o['tokens_per_s']:.1f} / {t['tokens_per_s']:.1f} | {q['tokens_per_s']:.2f} "
            f"| {o[key]:.0f} / {t[key]:.0f} | {q[key]:.2f} "
            f"| {o['flops_fraction']:.1%} / {t['flops_fraction']:.1%} | {precision} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--scenarios", default=None, help=f"comma-separated, from {','.join(SCENARIOS)}")
    parser.add_argument("--runs", type=int, default=None, help="runs per tool per scenario (full: 3, quick: 1)")
    parser.add_argument("--conversations", type=int, default=None, help="full: 2000, quick: 16")
    parser.add_argument("--max-length", type=int, default=None, help="full: 1024, quick: 256")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both tools (and the matmul)")
    parser.add_argument("--quick", action="store_true", help="16 conversations, max_length 256, 1 run, scenarios a,e")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype the random model is saved in (the checkpoint's dtype)")
    parser.add_argument("--precision", default=None, choices=list(PRECISIONS),
                        help="the same for both tools (default: fp32 for a float32 model, else bf16-mixed, TRL's "
                             "and sftune's default on a GPU)")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation for both tools")
    parser.add_argument("--model-config", default="smollm2-135m", choices=["smollm2-135m", "qwen2.5-0.5b", "tiny"])
    parser.add_argument("--liger", action="store_true", help="use_liger_kernel for both tools (GPU only)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="compare FLOPs with this peak (e.g. 989 for H100 bf16 dense) instead of the measured "
                             "matmul rate")
    parser.add_argument("--tools", default="sftune,trl", help="which tools to run (for debugging one side)")
    parser.add_argument("--markdown", default=None, help="also write the results table to this file")
    parser.add_argument("--json", default=None, help="also write every run's numbers to this file")
    parser.add_argument("--workdir", default=None, help="keep the model, data and run logs here")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per optimizer step (micro-batch x 1)")
    parser.add_argument("--inputs", default=None, help="use a folder written by --export-inputs instead of the assets")
    parser.add_argument("--export-inputs", default=None, metavar="DIR",
                        help="write SmolLM2's tokenizer/config and 2,000 conversations to DIR, then stop")
    parser.add_argument("--child", nargs=2, metavar=("JOB", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(*args.child)
        return []

    if args.export_inputs:
        export_inputs(Path(args.export_inputs))
        return []
    inputs = Path(args.inputs).resolve() if args.inputs else None
    quick = args.quick
    scenarios = (args.scenarios or ("a,e" if quick else "a,b,c,d,e,eg")).split(",")
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    runs = args.runs or (1 if quick else 3)
    precision = args.precision or ("fp32" if args.dtype == "float32" else "bf16-mixed")
    conversations = args.conversations or (16 if quick else 2000)
    max_length = args.max_length or (256 if quick else 1024)
    tools = args.tools.split(",")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="compare-trl-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    model_dir, data_file = workdir / "model", workdir / "conversations.jsonl"
    params = build_model_dir(model_dir, args.model_config, args.dtype, inputs)
    rows = chitchat_rows(conversations, inputs)
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = workdir / "assistant_template.jinja"
    template.write_text(assistant_template((smollm2_dir(inputs) / "chat_template.jinja").read_text()))

    if args.peak_tflops:
        machine_gflops, peak_label = args.peak_tflops * 1e3, f"{args.peak_tflops:g} TFLOPS peak"
    else:
        machine_gflops = matmul_gflops(args.threads, device=args.device, dtype=args.dtype)
        peak_label = "matmul rate"
    versions = _versions()
    print(f"machine: {os.cpu_count()} cores, {args.threads} thread(s) per run, device {args.device}, "
          f"{args.dtype}; matmul {machine_gflops:.1f} GFLOP/s; {versions}")
    print(f"workload: {args.model_config} config, random weights, {params['layers'] + params['head']:,} matmul "
          f"weights; {len(rows)} conversations, max_length {max_length}; {runs} run(s) per tool; workdir {workdir}")

    results: list[RunResult] = []
    index = 0
    for s in scenarios:
        for run in range(runs):
            order = tools if run % 2 == 0 else tools[::-1]
            for tool in order:
                job = Job(tool, s, str(model_dir), str(data_file), str(workdir / f"out-{tool}-{s}-{run}"),
                          max_length, args.threads, args.device, args.dtype, args.attn, str(template), args.liger,
                          args.batch_size, precision)
                result = run_child(job, workdir, index)
                index += 1
                results.append(result)
                status = result.error or (f"{result.wall_seconds:.1f} s wall, {result.train_seconds:.1f} s training, "
                                          f"{result.trained_tokens} tokens ({result.tokens_per_second:.1f}/s), "
                                          f"{result.peak_rss_mb:.0f} MB RSS, loss {result.final_loss:.3f}")
                print(f"  [{s} run {run + 1}/{runs}] {tool:6s} {status}", flush=True)
    if not args.peak_tflops:  # measured again at the end; the median guards against a busy moment
        machine_gflops = statistics.median([machine_gflops, matmul_gflops(args.threads, device=args.device,
                                                                          dtype=args.dtype)])
    summary = summarize(results, scenarios, params, machine_gflops, peak_label)
    table = markdown_table(summary, args.device == "cuda", peak_label, precision)
    print()
    print(table)
    print(f"\nratio = sftune / TRL (wall and memory: lower is better for sftune; tokens/s: higher). "
          f"{peak_label}: {machine_gflops:.1f} GFLOP/s.")
    if args.markdown:
        Path(args.markdown).write_text(
            f"{versions}; {args.threads} thread(s); {len(rows)} conversations, max_length {max_length}; "
            f"{args.model_config}, {args.dtype}, {precision}, {args.device}; {peak_label} {machine_gflops:.1f} GFLOP/s\n\n{table}\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": [asdict(r) for r in results],
                                               "machine_gflops": machine_gflops}, indent=1))
    return summary


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for name in ("torch", "transformers", "trl", "peft", "sftune"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} missing")
    return ", ".join(parts)


if __name__ == "__main__":
    main()
