"""One optimizer step of SmolLM2-135M-Instruct: full fine-tuning against LoRA (default targets) and QLoRA.

Self-contained and re-runnable: `python bench/lora_vs_full_step.py [--steps 4] [--threads 1]`. Needs the real
model (`make assets`). The variants alternate step by step in one process, so a busy machine slows them alike;
the first step of each is a warm-up and is left out. Prints the median seconds per step and the ratio to full
fine-tuning, and the trainable parameters of each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(variant: str, model_dir: str):
    from sftune import SFTConfig
    from sftune.model.adapters import parameter_counts, prepare_for_training
    from sftune.model.load import load_model
    from sftune.training.loss import CausalLMWithLoss

    settings = {"full": {}, "lora": {"use_peft": True}, "qlora": {"use_peft": True, "load_in_4bit": True}}[variant]
    config = SFTConfig(model_name_or_path=model_dir, dataset_name="unused", **settings)
    torch.manual_seed(0)
    model = prepare_for_training(load_model(config, device="cpu"), config)
    loss_model = CausalLMWithLoss(model)
    loss_model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return loss_model, optimizer, parameter_counts(model)[0]


def step(loss_model, optimizer, batch) -> float:
    started = time.perf_counter()
    out = loss_model(**batch)
    (out["loss_sum"] / out["num_tokens"]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--variants", default="full,lora,qlora")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sftune.assets import smollm2_model_dir
    from sftune.run import setup_logging

    setup_logging()
    model_dir = str(smollm2_model_dir())
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (args.batch, args.tokens), generator=generator)
    batch = {"input_ids": ids, "targets": torch.roll(ids, -1, dims=1)}
    variants = args.variants.split(",")
    built = {name: build(name, model_dir) for name in variants}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.steps + 1):
        for name in variants:
            loss_model, optimizer, _ = built[name]
            times[name].append(step(loss_model, optimizer, batch))
    medians = {name: statistics.median(values[1:]) for name, values in times.items()}
    print(f"batch {args.batch} x {args.tokens} tokens, {args.threads} thread(s), {args.steps} timed steps each")
    for name in variants:
        ratio = medians[name] / medians[variants[0]]
        print(f"{name:6s} {medians[name]:7.2f} s/step  x{ratio:.2f}  trainable {built[name][2]:,}")


if __name__ == "__main__":
    main()
