"""CPU threads side by side: the same training steps with 1 thread and with one per usable core, on the machine as
it is and with other work competing for the cores.

torch starts one thread per core. When other processes keep some of those cores busy, torch's threads wait for one
another at every operation, and a step can take several times longer than with fewer threads. sftune logs its
thread count (num_threads, else OMP_NUM_THREADS, else the usable cores) and warns when other work competes; this
script measures what is at stake.

Workload: `sftune demo`'s training (SmolLM2-135M-Instruct, LoRA r=16 on the attention projections, the demo's 100
identity questions, 8 rows per step, fp32), cut to --steps optimizer steps, each run a fresh `sftune train`
process; or --model tiny: a 2-layer model built offline (seconds per run, for a quick look). Settings alternate
run by run (1 thread, N threads, 1, N, ...), so a machine whose load changes slows both alike. Per run: the median
seconds per optimizer step after the first (from metrics.jsonl), and whether sftune warned about competing work.
--busy K adds K processes that spin on the CPU for the whole measurement (a stand-in for another user's job).

Run:  .venv/bin/python bench/threads.py                         # the demo's steps, machine as it is, and +1 busy
      .venv/bin/python bench/threads.py --model tiny --busy 0,1 --repeats 3
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
from importlib import resources
from pathlib import Path

HERE = Path(__file__).resolve().parent


def usable_cores() -> int:
    from sftune.cpu import usable_cores as cores

    return cores()[0]


def tiny_model(folder: Path) -> Path:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(folder)
    build_model(len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id).save_pretrained(folder)
    return folder


def one_run(model_dir: Path, threads: int, steps: int, workdir: Path) -> dict:
    """A fresh `sftune train` of the demo's settings; seconds per step after the first, and sftune's warning."""
    demo = resources.files("sftune.demo")
    out = Path(tempfile.mkdtemp(dir=workdir)) / "run"
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    command = [sys.executable, "-m", "sftune", "train", str(demo / "demo.yaml"), "--model_name_or_path",
               str(model_dir), "--dataset_name", str(demo / "identity.jsonl"), "--output_dir", str(out),
               "--max_steps", str(steps), "--logging_steps", "1", "--save_strategy", "no",
               "--num_threads", str(threads)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = [line["num_tokens"] for line in lines]
    seconds = [(b - a) / line["tokens_per_second"] for a, b, line in zip([0] + tokens, tokens, lines)]
    return {"threads": threads, "step_seconds": statistics.median(seconds[1:] or seconds),
            "wall_seconds": time.perf_counter() - started,
            "warned": "other work kept about" in done.stderr}


def spin() -> None:
    while True:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is not counted)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting")
    parser.add_argument("--busy", default="0,1", help="spinning processes added, one measurement each: 0,1")
    parser.add_argument("--threads", default=None, help="thread counts to compare (default: 1 and the usable cores)")
    args = parser.parse_args(argv)

    cores = usable_cores()
    counts = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores})
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.model == "tiny":
            model_dir = tiny_model(workdir / "tiny")
        else:
            from sftune.assets import smollm2_model_dir

            model_dir = smollm2_model_dir()
        rows = []
        for busy in [int(b) for b in args.busy.split(",")]:
            import multiprocessing

            spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(busy)]
            for process in spinners:
                process.start()
            try:
                runs: dict[int, list[dict]] = {count: [] for count in counts}
                for repeat in range(args.repeats):
                    order = counts if repeat % 2 == 0 else counts[::-1]
                    for count in order:
                        result = one_run(model_dir, count, args.steps, workdir)
                        runs[count].append(result)
                        print(f"busy {busy}, {count} thread(s): {result['step_seconds']:.2f} s/step"
                              f"{' (sftune warned)' if result['warned'] else ''}", flush=True)
            finally:
                for process in spinners:
                    process.kill()
            base = statistics.median(r["step_seconds"] for r in runs[counts[0]])
            for count in counts:
                step = statistics.median(r["step_seconds"] for r in runs[count])
                warned = sum(r["warned"] for r in runs[count])
                rows.append((busy, count, step, step / base, f"{warned}/{len(runs[count])}"))

    print(f"\n{args.model}, {args.steps} steps per run, {args.repeats} runs per setting, {cores} usable cores, "
          f"load average before: {os.getloadavg()[0]:.2f}")
    print("| extra busy processes | threads | median s/step | vs 1 thread | sftune warned |")
    print("|---|---|---|---|---|")
    for busy, count, step, ratio, warned in rows:
        print(f"| {busy} | {count} | {step:.2f} | {ratio:.2f}x | {warned} |")


if __name__ == "__main__":
    main()
