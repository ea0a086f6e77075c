"""Where one sftune training step spends its time, and what splitting a step's rows into unpadded micro-batches buys.

One optimizer step of 8 real chit-chat conversations (SmolLM2-135M's config, random weights, fp32, sdpa) is run:
- padded: the 8 rows as one right-padded batch (sftune's default);
- by rows: each row its own micro-batch (no padding), losses summed and normalised by the step's trained
  tokens, the same update up to rounding.
The two alternate in one process (first step of each is a warm-up); then torch.profiler shows the top operators of
one padded step.

Run:  .venv/bin/python bench/profile_step.py [--max-length 256] [--repeats 2] [--threads 1] [--skip 0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip", type=int, default=0, help="start at this conversation (another set of 8 rows)")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from chitchat import chitchat_conversations
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from sftune import SFTConfig
    from sftune.assets import fetch, smollm2_model_dir
    from sftune.data.collate import pad_batch, position_batch
    from sftune.data.prepare import prepare_train_data
    from sftune.training.loss import CausalLMWithLoss

    source = smollm2_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(source)
    conversations = [r for r in chitchat_conversations(fetch("chitchat"))
                     if any(m["role"] == "assistant" for m in r["messages"])][args.skip:args.skip + 8]
    config = SFTConfig(model_name_or_path=str(source), max_length=args.max_length, dataset_num_proc=1)
    rows = prepare_train_data(config, tokenizer, train_dataset=conversations).train_rows
    rows = sorted(rows, key=lambda r: r["index"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), attn_implementation="sdpa")
    loss_model = CausalLMWithLoss(model)
    loss_model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    padded = pad_batch(rows, tokenizer.pad_token_id)
    padded.pop("source_ids")
    by_rows = [position_batch([row], tokenizer.pad_token_id, join=True) for row in rows]
    for batch in by_rows:
        batch.pop("source_ids")
    lengths = [len(r["input_ids"]) for r in rows]
    tokens = int((padded["targets"] != -100).sum())
    print(f"rows {lengths}: {sum(lengths)} tokens, padded to {padded['input_ids'].numel()} "
          f"({padded['input_ids'].numel() / sum(lengths):.2f}x); {tokens} trained; {args.threads} thread(s)")

    def step(batches: list[dict]) -> float:
        started = time.perf_counter()
        for batch in batches:
            (loss_model(**batch)["loss_sum"] / tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    times: dict[str, list[float]] = {"padded": [], "by rows": []}
    for _ in range(args.repeats + 1):
        times["padded"].append(step([padded]))
        times["by rows"].append(step(by_rows))
    for name, values in times.items():
        seconds = statistics.median(values[1:])
        print(f"{name:8s} {seconds:6.2f} s/step  {tokens / seconds:6.1f} trained tokens/s  (runs {values})")
    print(f"by rows / padded: {statistics.median(times['by rows'][1:]) / statistics.median(times['padded'][1:]):.2f}")

    if args.no_profile:
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step([padded])
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


if __name__ == "__main__":
    main()
