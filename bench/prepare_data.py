"""Data preparation speed: sftune against TRL 1.16's SFTTrainer, in one process, alternating.

The workload: all 7,168 BYU chit-chat conversations three times over (21,504 rows) with the real Qwen3
tokenizer, assistant-only loss masks, and bfd packing at 2048 tokens. Both tools get the same datasets.Dataset.

TRL needs {% generation %} markers for assistant-only masks, which Qwen3's template lacks (TRL refuses it), so TRL
gets a copy of the template with markers around each assistant turn (chat_template_path), as a TRL user must
write. TRL also stops with an error on a conversation without an assistant turn (3,150 of the 7,168 are one
speaker only), so TRL gets only the 12,054 rows it accepts while sftune gets all 21,504 and drops those itself:
this favours TRL. sftune's cache is pointed at a fresh folder for every timed run, so every run prepares.

Both tools run with their default dataset_num_proc: TRL's is one process; sftune's is one process per CPU core
for datasets over 2,000 rows. `--num-proc N` gives both N processes instead.

`--doctor-cost` times sftune alone, with and without its data doctor (the duplicate, overlap, empty and repetitive
reply checks of `sftune inspect`), alternating, and prints what the checks add and what they found.

Before timing, the masks are compared on rows that end with an assistant turn (the two tools render those the
same way): the token ids and labels must be identical.

Run:  .venv/bin/pip install -e ".[bench]" && .venv/bin/python bench/prepare_data.py [--repeats 3] [--num-proc N]
      .venv/bin/python bench/prepare_data.py --doctor-cost [--repeats 5]   (TRL not needed)
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from chitchat import chitchat_conversations  # noqa: E402

MAX_LENGTH = 2048


def cpu_seconds() -> float:
    """CPU time of this process and its finished child processes (less sensitive to a busy machine than wall time)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def qwen3_template_with_generation_markers(template: str) -> str:
    """Qwen3's template with {% generation %} around each assistant turn: after the role header, through
    <|im_end|> (the span sftune trains), so TRL's mask covers the same tokens."""

    def swap(old: str, new: str, count: int) -> None:
        nonlocal template
        if template.count(old) != count:
            raise SystemExit(f"the Qwen3 template changed; cannot add generation markers at {old!r}")
        template = template.replace(old, new)

    swap("{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' "
         "+ content.lstrip('\\n') }}",
         "{%- set body = '<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') %}", 1)
    swap("{{- '<|im_start|>' + message.role + '\\n' + content }}", "{%- set body = content %}", 2)
    swap("        {%- if message.tool_calls %}",
         "        {{- '<|im_start|>' + message.role + '\\n' }}{% generation %}{{- body }}\n"
         "        {%- if message.tool_calls %}", 1)
    swap("        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}",
         "        {{- '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}\n    {%- elif message.role == \"tool\" %}", 1)
    return template


def load_tokenizer():
    from transformers import AutoTokenizer

    from sftune.assets import fetch

    return AutoTokenizer.from_pretrained(fetch("qwen3-tokenizer"))


class TRLSide:
    def __init__(self, rows: list[dict], workdir: Path, num_proc: int | None, caching: bool = False):
        import datasets
        import torch
        from transformers import Qwen3Config, Qwen3ForCausalLM
        from trl import SFTConfig as TRLConfig
        from trl import SFTTrainer

        if not caching:  # bench/scale_data.py keeps TRL's Arrow files on disk, as a TRL user's would be
            datasets.disable_caching()
        self.tokenizer = load_tokenizer()
        template = workdir / "qwen3_generation.jinja"
        template.write_text(qwen3_template_with_generation_markers(self.tokenizer.chat_template))
        # TRL prepares data inside SFTTrainer, which needs a model: a tiny one, built before timing starts
        model = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(self.tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8))
        self.args = TRLConfig(
            output_dir=str(workdir / "trl"), max_length=MAX_LENGTH, packing=True, packing_strategy="bfd",
            assistant_only_loss=True, chat_template_path=str(template), dataset_num_proc=num_proc,
            report_to="none", bf16=False, use_cpu=True, disable_tqdm=True,
        )
        with_answer = [r for r in rows if any(m["role"] == "assistant" for m in r["messages"])]
        self.dataset = datasets.Dataset.from_list(with_answer)
        self.trainer = SFTTrainer(model=model, args=self.args, train_dataset=self.dataset.select(range(8)),
                                  processing_class=self.tokenizer)
        self.torch = torch

    def prepare(self, dataset=None, packing: bool = True):
        return self.trainer._prepare_dataset(dataset or self.dataset, self.tokenizer, self.args, packing, None, "bench")


def sftune_prepare(dataset, num_proc: int | None, packing: bool = True, check_data: bool = True):
    from sftune import SFTConfig
    from sftune.data.prepare import prepare_train_data

    config = SFTConfig(model_name_or_path="qwen3", max_length=MAX_LENGTH, packing=packing, packing_strategy="bfd",
                       assistant_only_loss=True, dataset_num_proc=num_proc)
    os.environ["SFTUNE_DATA_CACHE"] = tempfile.mkdtemp(prefix="sftune-bench-cache-")  # cold: prepare every time
    return prepare_train_data(config, load_tokenizer(), train_dataset=dataset, check_data=check_data)


def doctor_work(rows: list[dict]) -> tuple[float, float]:
    """CPU seconds of the doctor's own work on the rows preparation keeps (those with an assistant turn), in this
    one process: the fingerprints (done in the tokenizer's workers during preparation) and the comparison."""
    import numpy as np

    from sftune.data import doctor

    examples = [{"messages": r["messages"], "completion_start": None, "tools": None, "chat_template_kwargs": None}
                for r in rows if any(m["role"] == "assistant" for m in r["messages"])]
    started = time.process_time()
    prints = doctor.fingerprints(examples, max_words=MAX_LENGTH)  # as preparation does (keep_start)
    fingerprinted = time.process_time()
    n = len(prints)
    doctor.examine(prints, np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64),
                   np.zeros(n, dtype=bool), str, ["chitchat"], None)
    return fingerprinted - started, time.process_time() - fingerprinted


def doctor_cost(dataset, rows: list[dict], repeats: int, num_proc: int | None) -> None:
    """sftune's preparation with and without the data doctor, alternating; medians of wall and CPU time; then
    the doctor's own work timed alone (steadier than a difference of two noisy times on a busy machine)."""
    times: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    report = None
    for repeat in range(repeats):
        for check in (True, False) if repeat % 2 == 0 else (False, True):  # either order first, in turn
            started, cpu_started = time.perf_counter(), cpu_seconds()
            data = sftune_prepare(dataset, num_proc, check_data=check)
            times[check].append(time.perf_counter() - started)
            cpu[check].append(cpu_seconds() - cpu_started)
            report = data.stats["doctor"] if check else report
        print(f"  with the doctor {times[True][-1]:6.1f} s (cpu {cpu[True][-1]:6.1f} s)   without "
              f"{times[False][-1]:6.1f} s (cpu {cpu[False][-1]:6.1f} s)")
    wall = {k: statistics.median(v) for k, v in times.items()}
    work = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"median of {repeats}: {wall[True]:.1f} s with the doctor, {wall[False]:.1f} s without: "
          f"+{100 * (wall[True] / wall[False] - 1):.1f}% wall time (CPU time {work[True]:.1f} s against "
          f"{work[False]:.1f} s: +{100 * (work[True] / work[False] - 1):.1f}%)")
    own = [doctor_work(rows) for _ in range(repeats)]
    prints, compare = statistics.median(o[0] for o in own), statistics.median(o[1] for o in own)
    print(f"the doctor's own work, alone in one process: {prints:.2f} s CPU to fingerprint the rows, {compare:.2f} s "
          f"to compare them: {100 * (prints + compare) / work[False]:.1f}% of the preparation's CPU time")
    print("found: " + ", ".join(f"{key} {report[key]:,}" for key in
                                ("exact_duplicates", "near_duplicates", "train_eval_overlap", "empty_replies",
                                 "repetitive_replies")) + f" in {report['rows_checked']['train']:,} rows")


def compare_masks(trl: TRLSide, rows: list[dict], count: int) -> None:
    """Same ids and labels from both tools, unpacked, on conversations that end with an assistant turn."""
    import datasets

    sample = [r for r in rows if r["messages"][-1]["role"] == "assistant" and len(r["messages"]) > 1][:count]
    theirs = trl.prepare(datasets.Dataset.from_list(sample), packing=False)
    ours = sftune_prepare(datasets.Dataset.from_list(sample), 1, packing=False).train_rows
    ours = sorted(ours, key=lambda r: r["index"])
    mismatched = sum(
        list(o["input_ids"]) != list(t["input_ids"][:MAX_LENGTH]) or list(o["labels"]) != list(t["labels"][:MAX_LENGTH])
        for o, t in zip(ours, theirs)
    )
    if len(ours) != len(theirs) or mismatched:
        raise SystemExit(f"masks differ: {mismatched} of {len(ours)} rows (TRL has {len(theirs)})")
    print(f"masks: identical ids and labels on {len(ours)} conversations ending with an assistant turn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per tool (alternating)")
    parser.add_argument("--num-proc", type=int, default=None, help="dataset_num_proc for both tools")
    parser.add_argument("--compare", type=int, default=300, help="rows whose masks are compared first (0: skip)")
    parser.add_argument("--doctor-cost", action="store_true",
                        help="time sftune with and without its data doctor instead (no TRL)")
    args = parser.parse_args()

    import datasets
    import torch

    torch.set_num_threads(1)
    logging.getLogger("sftune").setLevel(logging.ERROR)
    datasets.utils.logging.disable_progress_bar()
    from sftune.assets import fetch

    rows = chitchat_conversations(fetch("chitchat")) * 3
    dataset = datasets.Dataset.from_list(rows)
    if args.doctor_cost:
        print(f"rows: {len(rows)}; max_length {MAX_LENGTH}, bfd packing, assistant-only masks; cores: {os.cpu_count()}")
        return doctor_cost(dataset, rows, args.repeats, args.num_proc)
    workdir = Path(tempfile.mkdtemp(prefix="sftune-bench-"))
    trl = TRLSide(rows, workdir, args.num_proc)
    print(f"rows: sftune {len(rows)}, TRL {len(trl.dataset)} (those with an assistant turn); "
          f"max_length {MAX_LENGTH}, bfd packing, assistant-only masks; cores: {os.cpu_count()}")
    if args.compare:
        compare_masks(trl, rows, args.compare)

    times: dict[str, list[float]] = {"sftune": [], "trl": []}
    cpu: dict[str, list[float]] = {"sftune": [], "trl": []}
    for _ in range(args.repeats):
        started, cpu_started = time.perf_counter(), cpu_seconds()
        data = sftune_prepare(dataset, args.num_proc)
        times["sftune"].append(time.perf_counter() - started)
        cpu["sftune"].append(cpu_seconds() - cpu_started)
        started, cpu_started = time.perf_counter(), cpu_seconds()
        packed = trl.prepare()
        times["trl"].append(time.perf_counter() - started)
        cpu["trl"].append(cpu_seconds() - cpu_started)
        print(f"  sftune {times['sftune'][-1]:6.1f} s (cpu {cpu['sftune'][-1]:6.1f} s, {len(data.train_rows)} packed "
              f"rows)   TRL {times['trl'][-1]:6.1f} s (cpu {cpu['trl'][-1]:6.1f} s, {len(packed)} packed rows)")
    started = time.perf_counter()
    from sftune import SFTConfig
    from sftune.data.prepare import prepare_train_data

    config = SFTConfig(model_name_or_path="qwen3", max_length=MAX_LENGTH, packing=True, assistant_only_loss=True,
                       dataset_num_proc=args.num_proc)
    prepare_train_data(config, load_tokenizer(), train_dataset=dataset)  # the last run's cache
    cached = time.perf_counter() - started
    ours, theirs = statistics.median(times["sftune"]), statistics.median(times["trl"])
    our_cpu, their_cpu = statistics.median(cpu["sftune"]), statistics.median(cpu["trl"])
    print(f"median of {args.repeats}: sftune {ours:.1f} s, TRL {theirs:.1f} s -> sftune is {theirs / ours:.2f}x "
          f"faster (CPU time: {our_cpu:.1f} s against {their_cpu:.1f} s, {their_cpu / our_cpu:.2f}x less); "
          f"a second sftune run loads its cache in {cached:.1f} s")


if __name__ == "__main__":
    main()
