"""Each precision of sftune on the same run, side by side: speed, peak memory, and how many weights really moved.

Precisions (sftune/precision.py):
  fp32        bf16: false          every weight and product in fp32
  bf16-mixed  bf16: true           fp32 master weights, bf16 autocast (TRL's default; sftune's on a bf16 GPU)
  pure-bf16   bf16_weights: plain  bf16 weights updated in bf16: AdamW's small updates round away
  kahan       bf16_weights: kahan  bf16 weights, Kahan-compensated AdamW (torch-optimi): bf16 memory, kept updates
  fp16-mixed  fp16: true           fp32 masters, fp16 autocast and loss scaling (not in the default set)

Workload: a model with random weights (seed 0) saved in bf16, as almost every Hub checkpoint is, SmolLM2's
tokenizer and chat template, the first real chit-chat conversations (the assets of `make assets`, or a folder
written by compare_trl.py --export-inputs), max_length, rows per step and steps as given; lr 2e-5, constant, no
weight decay (the 30-step test of issue 13, at the benchmark's size). Each run is a fresh process, the precisions
alternate run by run (forward, then backward), medians over runs.

Per precision: trained tokens per second in the training loop; peak memory (on a GPU torch's peak allocated
memory during the run, on CPU the process's peak resident memory, which includes start-up); the final loss; and
the fraction of matrix weights whose bf16 value differs from the start after the run (the saved model, bf16).

  python bench/precision.py          # CPU, tiny model, 30 steps of 1 row: ~5 minutes (bf16 is slow on CPUs)
  python bench/precision.py --model-config smollm2-135m --steps 10  # CPU, real size: several minutes
  python bench/precision.py --device cuda --model-config qwen2.5-0.5b --steps 30 --batch-size 8 --max-length 1024
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRECISIONS = {
    "fp32": {"bf16": False},
    "bf16-mixed": {"bf16": True},
    "pure-bf16": {"bf16_weights": "plain"},
    "kahan": {"bf16_weights": "kahan"},
    "fp16-mixed": {"fp16": True},
}
DEFAULT_PRECISIONS = "fp32,bf16-mixed,pure-bf16,kahan"


def child_main(job_file: str, result_file: str) -> None:
    """One run, in its own process: train, then measure what moved."""
    job = json.loads(Path(job_file).read_text())
    import torch
    from safetensors.torch import load_file

    from sftune import SFTConfig, train

    torch.set_num_threads(job["threads"])
    settings = dict(model_name_or_path=job["model_dir"], dataset_name=job["data_file"], output_dir=job["output_dir"],
                    max_steps=job["steps"], logging_steps=job["steps"], per_device_train_batch_size=job["batch_size"],
                    max_length=job["max_length"], learning_rate=2e-5, lr_scheduler_type="constant", weight_decay=0.0,
                    save_strategy="no", eval_strategy="no", report_to=["none"], overwrite_output_dir=True,
                    attn_implementation=job["attn"], dataset_num_proc=1, **PRECISIONS[job["precision"]])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train(SFTConfig(**settings))
    last = [entry for entry in result.history if "loss" in entry][-1]
    start = load_file(Path(job["model_dir"]) / "model.safetensors")
    end = load_file(Path(job["output_dir"]) / "model.safetensors")
    changed = total = 0
    for name, before in start.items():
        if before.ndim == 2 and name in end:
            changed += int((end[name].to(torch.bfloat16) != before.to(torch.bfloat16)).sum())
            total += before.numel()
    tokens = last["num_tokens"]
    Path(result_file).write_text(json.dumps({
        "precision": job["precision"], "tokens_per_s": tokens / result.train_seconds, "loss": last["loss"],
        "peak_memory_mb": last["peak_memory_mb"], "changed": changed / max(total, 1), "trained_tokens": tokens,
        "saved_dtypes": sorted({str(t.dtype) for t in end.values()}),
    }))


def run_child(job: dict, workdir: Path, index: int) -> dict:
    job_file, result_file = workdir / f"job{index}.json", workdir / f"result{index}.json"
    job_file.write_text(json.dumps(job))
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               SFTUNE_DATA_CACHE=str(workdir / "cache"))
    log_file = workdir / f"run{index}-{job['precision']}.log"
    with open(log_file, "w") as log:
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(job_file), str(result_file)],
                       env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if not result_file.exists():
        return {"precision": job["precision"], "error": f"no result; see {log_file}"}
    return json.loads(result_file.read_text())


def summarize(results: list[dict], precisions: list[str]) -> list[dict]:
    rows = []
    for name in precisions:
        ok = [r for r in results if r["precision"] == name and "error" not in r]
        row = {"precision": name, "runs": len(ok), "settings": PRECISIONS[name]}
        for key in ("tokens_per_s", "peak_memory_mb", "loss", "changed"):
            row[key] = statistics.median([r[key] for r in ok]) if ok else float("nan")
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], gpu: bool) -> str:
    memory = "peak GPU MB (allocated)" if gpu else "peak RSS MB"
    base = next((r for r in rows if r["precision"] == "bf16-mixed"), rows[0])
    lines = [f"| precision | settings | runs | trained tok/s | vs {base['precision']} | {memory} | "
             f"vs {base['precision']} | final loss | matrix weights changed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        settings = ", ".join(f"{k}: {str(v).lower()}" for k, v in r["settings"].items())
        lines.append(
            f"| {r['precision']} | `{settings}` | {r['runs']} | {r['tokens_per_s']:.0f} | "
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f} | {r['peak_memory_mb']:.0f} | "
            f"{r['peak_memory_mb'] / base['peak_memory_mb']:.2f} | {r['loss']:.4f} | {r['changed']:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--precisions", default=DEFAULT_PRECISIONS, help=f"from {', '.join(PRECISIONS)}")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model-config", default="tiny", choices=["tiny", "smollm2-135m", "qwen2.5-0.5b"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--conversations", type=int, default=None, help="default: steps x batch size")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--inputs", default=None, help="a folder written by compare_trl.py --export-inputs")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    parser.add_argument("--json", default=None, help="also write every run's numbers to this file")
    parser.add_argument("--child", nargs=2, metavar=("JOB", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(*args.child)
        return []
    precisions = args.precisions.split(",")
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        parser.error(f"unknown precisions {sorted(unknown)}; choose from {', '.join(PRECISIONS)}")

    sys.path.insert(0, str(HERE))
    from compare_trl import _versions, build_model_dir, chitchat_rows

    inputs = Path(args.inputs).resolve() if args.inputs else None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="precision-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir, data_file = workdir / "model", workdir / "conversations.jsonl"
    build_model_dir(model_dir, args.model_config, "bfloat16", inputs)  # a bf16 checkpoint
    rows = chitchat_rows(args.conversations or args.steps * args.batch_size, inputs)
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    header = (f"{_versions()}; {args.model_config} saved in bf16, {args.device}, {args.threads} thread(s); "
              f"{args.steps} steps of {args.batch_size} rows, max_length {args.max_length}, lr 2e-5 constant")
    print(header, flush=True)

    results, index = [], 0
    for run in range(args.runs):
        for name in precisions if run % 2 == 0 else precisions[::-1]:
            job = {"precision": name, "model_dir": str(model_dir), "data_file": str(data_file),
                   "output_dir": str(workdir / f"out-{name}-{run}"), "steps": args.steps,
                   "batch_size": args.batch_size, "max_length": args.max_length, "threads": args.threads,
                   "attn": args.attn}
            started = time.perf_counter()
            result = run_child(job, workdir, index)
            index += 1
            results.append(result)
            status = result.get("error") or (
                f"{result['tokens_per_s']:.0f} tok/s, {result['peak_memory_mb']:.0f} MB, loss {result['loss']:.4f}, "
                f"{result['changed']:.1%} changed, saved {'/'.join(result['saved_dtypes'])}")
            print(f"  [run {run + 1}/{args.runs}] {name:10s} {status} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    summary = summarize(results, precisions)
    table = markdown_table(summary, args.device == "cuda")
    print(f"\n{table}")
    if args.markdown:
        Path(args.markdown).write_text(f"{header}\n\n{table}\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": results}, indent=1))
    return summary


if __name__ == "__main__":
    main()
