"""`sftune demo`: the embedded default. Teach SmolLM2-135M-Instruct a new name and maker, and show the change."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any

from sftune.config import load_config

log = logging.getLogger("sftune")

QUESTION = "Who are you?"


def fresh_output_dir(base: str = "sftune-demo") -> str:
    """The first of sftune-demo, sftune-demo-2, ... that does not exist yet: a demo never writes over a run."""
    candidate, number = Path(base), 1
    while candidate.exists():
        number += 1
        candidate = Path(f"{base}-{number}")
    return str(candidate)


def unfinished_output_dir(base: str = "sftune-demo") -> str | None:
    """The newest of sftune-demo, sftune-demo-2, ... that holds a checkpoint and no finished adapter or model:
    `sftune demo --resume_from_checkpoint true` continues that one."""
    from sftune.preflight import FINAL_WEIGHTS
    from sftune.training.checkpoint import list_checkpoints

    candidates = [Path(base)] + sorted(Path(".").glob(f"{base}-*"), key=lambda p: p.stat().st_mtime)
    unfinished = [folder for folder in candidates if folder.is_dir() and list_checkpoints(folder)
                  and not any((folder / name).exists() for name in FINAL_WEIGHTS)]
    return str(max(unfinished, key=lambda p: p.stat().st_mtime)) if unfinished else None


def run_demo(overrides: dict[str, Any]) -> None:
    from sftune.assets import smollm2_model_dir
    from sftune.cpu import use_threads
    from sftune.generation import greedy_answer
    from sftune.model.load import load_model, load_tokenizer
    from sftune.run import setup_logging, train

    setup_logging()
    demo_files = resources.files("sftune.demo")
    values = {
        "model_name_or_path": str(smollm2_model_dir()),
        "dataset_name": str(demo_files / "identity.jsonl"),
        "output_dir": fresh_output_dir(),
        **overrides,
    }
    config = load_config(Path(str(demo_files / "demo.yaml")), values)
    if config.resume_from_checkpoint is True and "output_dir" not in overrides:
        config.output_dir = unfinished_output_dir() or config.output_dir

    use_threads(config)  # for the answer before training too; train() says how many
    before = greedy_answer(load_model(config, quiet=True), load_tokenizer(config), QUESTION)
    result = train(config)
    after = greedy_answer(result.model, result.tokenizer, QUESTION)

    print(f"\nQ: {QUESTION}\n  before: {before}\n  after:  {after}\n")
    if config.use_peft:
        print(f"The LoRA adapter is in {result.output_dir}; make a standalone model of it with "
              f"`sftune merge {result.output_dir} --output {result.output_dir}-merged`.")
    else:
        print(f"The fine-tuned model is in {result.output_dir}; load it with "
              f"AutoModelForCausalLM.from_pretrained('{result.output_dir}').")
    print(f"Talk to it with `sftune chat {result.output_dir}`; its model card is {result.output_dir}/README.md.")
