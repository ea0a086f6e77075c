"""What the balancing loss's routing pre-pass costs: the same MoE training steps with and without it.

A step of several micro-batches (gradient accumulation, padding-free rows, several processes) first runs a
forward pass of every micro-batch without gradients, to count the step's expert shares before the first
backward (src/sftune/training/moe.py). This script times optimizer steps of a small Qwen3-MoE model built
offline (hidden 256, 4 layers, 8 experts, top-2), 8 padded rows per step as 1 x 8 accumulation, with the aux
loss on (pre-pass) and off (router_aux_loss_coef: 0, no pre-pass), and as one micro-batch of 8 with the aux loss
on (no pre-pass needed). Settings alternate run by run; per run, the median seconds per step after the first.

Run:  .venv/bin/python bench/moe_prepass.py --repeats 3 --steps 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

SETTINGS = {
    "1x8, aux on (pre-pass)": dict(per_device_train_batch_size=1, gradient_accumulation_steps=8,
                                   router_aux_loss_coef=0.01),
    "1x8, aux off": dict(per_device_train_batch_size=1, gradient_accumulation_steps=8, router_aux_loss_coef=0.0),
    "8x1, aux on (same forward)": dict(per_device_train_batch_size=8, router_aux_loss_coef=0.01),
}


def build(folder: Path) -> Path:
    import torch
    from conftest import build_tokenizer
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                            moe_intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                            num_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
                            tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    Qwen3MoeForCausalLM(config).save_pretrained(folder)
    return folder


def step_seconds(output_dir: Path) -> float:
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if "loss" in m]
    tokens = [b["num_tokens"] - a["num_tokens"] for a, b in zip(train, train[1:])]
    return statistics.median(t / m["tokens_per_second"] for t, m in zip(tokens, train[1:]))


def main() -> None:
    import torch
    from conftest import conversations, write_jsonl

    from sftune import SFTConfig, train

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)  # repeatable on a shared machine (docs/benchmarks.md)
    work = Path(tempfile.mkdtemp(prefix="sftune-moe-bench-"))
    model = build(work / "model")
    data = write_jsonl(work / "chat.jsonl", [r for _ in range(4) for r in conversations(64, seed=5)])
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for repeat in range(args.repeats):
        for name, settings in SETTINGS.items():
            out = work / f"{repeat}-{len(times[name])}-{name.split(',')[0]}-{settings['router_aux_loss_coef']}"
            train(SFTConfig(model_name_or_path=str(model), dataset_name=str(data), output_dir=str(out),
                            max_steps=args.steps, logging_steps=1, save_strategy="no", max_length=256,
                            padding_free=False, num_threads=1, **settings))
            times[name].append(step_seconds(out))
    base = statistics.median(times["1x8, aux off"])
    print(f"\n{'setting':32} {'s/step (median of runs)':>24} {'vs 1x8 aux off':>15}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:32} {median:24.3f} {median / base:15.2f}   runs: {', '.join(f'{v:.3f}' for v in values)}")


if __name__ == "__main__":
    main()
