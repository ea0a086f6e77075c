"""Data preparation at size: rows, tokens, seconds and peak summed RSS (the preparing process and all its worker
processes) at 20k, 100k and 300k rows (and 1M with --sizes), for sftune and for TRL 1.16.

The workload is bench/prepare_data.py's: BYU chit-chat conversations with the real Qwen3 tokenizer, assistant-only
loss masks, bfd packing at 2048 tokens, and sftune's data doctor on (its default). The 7,168 conversations are
repeated to the size asked for; each copy after the first gets its copy number in front of its first message, so
that rows are near duplicates rather than exact ones and the doctor's MinHash comparison works on every row (its
costliest case). The rows are written to a JSONL file first (not timed), which both tools read from disk: sftune
through `dataset_name`, TRL through `datasets.load_dataset("json")` with its Arrow cache in a fresh folder (TRL
keeps rows in Arrow on disk), given only the rows with an assistant turn (it stops on the others) and the Qwen3
template with generation markers (see bench/prepare_data.py).

Every measurement runs in a fresh process, started after the data file is written; the parent samples the summed
RSS of that process and its children every 0.1 s. `seconds` is the preparation alone (imports and the tokenizer's
loading are not counted), `cpu s` its CPU time over all its processes (steadier than wall time on a busy
machine); `baseline` is the summed RSS just before it starts. RSS counts the pages that forked
workers share with the main process once per process, so summed RSS is an upper bound; PSS (each shared page
divided among its sharers) is what the processes hold together.

Run:  .venv/bin/python bench/scale_data.py [--sizes 20000,100000,300000] [--trl-sizes 20000,100000]
      [--num-proc N]   (TRL needs the bench extra: pip install -e ".[bench]")
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

MAX_LENGTH = 2048


def write_rows(path: Path, count: int) -> int:
    """`count` chit-chat rows as JSONL; returns how many have an assistant turn."""
    from chitchat import chitchat_conversations

    from sftune.assets import fetch

    base = chitchat_conversations(fetch("chitchat"))
    answered = 0
    with path.open("w", encoding="utf-8") as handle:
        for i in range(count):
            copy, row = divmod(i, len(base))
            messages = [dict(m) for m in base[row]["messages"]]
            if copy:
                messages[0]["content"] = f"{copy} {messages[0]['content']}"
            answered += any(m["role"] == "assistant" for m in messages)
            handle.write(json.dumps({"messages": messages}) + "\n")
    return answered


def summed_memory(pid: int) -> tuple[int, int]:
    """RSS and PSS (shared pages divided among the processes sharing them) summed over the process and its
    children."""
    import psutil

    try:
        process = psutil.Process(pid)
        family = [process] + process.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    rss = pss = 0
    for member in family:
        try:
            info = member.memory_full_info()
            rss, pss = rss + info.rss, pss + info.pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss, pss


def measure(tool: str, data: Path, rows: int, num_proc: int | None, workdir: Path) -> dict:
    command = [sys.executable, __file__, "--child", tool, "--data", str(data), "--workdir", str(workdir)]
    if num_proc is not None:
        command += ["--num-proc", str(num_proc)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    peak = peak_pss = baseline = 0
    ready = workdir / f"{tool}.ready"
    while process.poll() is None:
        rss, pss = summed_memory(process.pid)
        peak, peak_pss = max(peak, rss), max(peak_pss, pss)
        if not baseline and ready.exists():
            baseline = rss
        time.sleep(0.1)
    out = process.stdout.read()
    if process.returncode != 0:
        raise SystemExit(f"{tool} at {rows} rows failed (exit {process.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "tool": tool, "rows": rows, "peak_rss_gb": round(peak / 1e9, 3),
            "peak_pss_gb": round(peak_pss / 1e9, 3),
            "baseline_rss_gb": round(baseline / 1e9, 3)}


# ---------------------------------------------------------------- the measured processes


def cpu_seconds() -> float:
    """CPU time of this process and its finished child processes (the worker pools are joined when done)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def child_sftune(data: Path, workdir: Path, num_proc: int | None) -> dict:
    import logging

    import torch
    from transformers import AutoTokenizer

    from sftune import SFTConfig
    from sftune.assets import fetch
    from sftune.data.prepare import prepare_train_data

    torch.set_num_threads(1)
    logging.getLogger("sftune").setLevel(logging.ERROR)
    os.environ["SFTUNE_DATA_CACHE"] = str(workdir / "sftune-cache")  # fresh: prepares
    tokenizer = AutoTokenizer.from_pretrained(fetch("qwen3-tokenizer"))
    config = SFTConfig(model_name_or_path="qwen3", dataset_name=str(data), max_length=MAX_LENGTH, packing=True,
                       packing_strategy="bfd", assistant_only_loss=True, dataset_num_proc=num_proc)
    (workdir / "sftune.ready").touch()
    started, cpu_started = time.perf_counter(), cpu_seconds()
    prepared = prepare_train_data(config, tokenizer)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    return {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "documents": prepared.stats["documents"],
            "tokens": prepared.stats["tokens"],
            "packed_rows": len(prepared.train_rows)}


def child_trl(data: Path, workdir: Path, num_proc: int | None) -> dict:
    import datasets

    from chitchat import chitchat_conversations
    from prepare_data import TRLSide

    from sftune.assets import fetch

    datasets.utils.logging.disable_progress_bar()
    side = TRLSide(chitchat_conversations(fetch("chitchat"))[:64], workdir, num_proc, caching=True)
    dataset = datasets.load_dataset("json", data_files=str(data), split="train",
                                    cache_dir=str(workdir / "hf-cache"))
    dataset = dataset.filter(lambda row: any(m["role"] == "assistant" for m in row["messages"]))
    (workdir / "trl.ready").touch()
    started, cpu_started = time.perf_counter(), cpu_seconds()
    packed = side.prepare(dataset)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    tokens = sum(len(ids) for ids in packed.with_format(None)["input_ids"]) if len(packed) else 0
    return {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "documents": len(dataset), "tokens": tokens,
            "packed_rows": len(packed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,100000,300000", help="rows, comma-separated (sftune)")
    parser.add_argument("--trl-sizes", default="20000,100000", help="rows for TRL ('' for none)")
    parser.add_argument("--num-proc", type=int, default=None, help="dataset_num_proc for both tools")
    parser.add_argument("--child", choices=("sftune", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run = child_sftune if args.child == "sftune" else child_trl
        print(json.dumps(run(args.data, args.workdir, args.num_proc)))
        return

    sizes = [int(s) for s in args.sizes.split(",") if s]
    trl_sizes = [int(s) for s in args.trl_sizes.split(",") if s]
    print(f"cores: {os.cpu_count()}; load: {os.getloadavg()[0]:.1f} (1 min); max_length {MAX_LENGTH}, bfd packing, "
          "assistant-only masks, the data doctor on")
    print(f"{'tool':7} {'rows':>9} {'documents':>9} {'tokens':>12} {'seconds':>8} {'rows/s':>7} {'cpu s':>7} "
          f"{'rows/cpu s':>10} {'peak RSS':>9} "
          f"{'peak PSS':>9} {'baseline':>9}")
    for rows in sorted(set(sizes) | set(trl_sizes)):
        with tempfile.TemporaryDirectory(prefix="sftune-scale-") as folder:
            workdir = Path(folder)
            data = workdir / f"chitchat-{rows}.jsonl"
            write_rows(data, rows)
            for tool in ("sftune", "trl"):
                if rows not in (sizes if tool == "sftune" else trl_sizes):
                    continue
                result = measure(tool, data, rows, args.num_proc, workdir)
                print(f"{tool:7} {rows:9,} {result['documents']:9,} {result['tokens']:12,} {result['seconds']:8.1f} "
                      f"{rows / result['seconds']:7.0f} {result['cpu_seconds']:7.1f} "
                      f"{rows / result['cpu_seconds']:10.0f} {result['peak_rss_gb']:6.2f} GB "
                      f"{result['peak_pss_gb']:6.2f} GB "
                      f"{result['baseline_rss_gb']:6.2f} GB"
                      f"   (load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
