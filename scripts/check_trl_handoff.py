"""Check that README's "Continue with preference tuning or RL" snippets run with TRL on sftune outputs.

Usage: python scripts/check_trl_handoff.py FULL_RUN_DIR ADAPTER_RUN_DIR   (needs `pip install 'sftune[bench]'`)

Local stand-ins replace the Hub datasets of the README, and each trainer takes one CPU step, so that this runs
offline in about a minute on tiny runs (e.g. those tests/test_export.py trains).
"""

from __future__ import annotations

import sys
import tempfile

from datasets import Dataset
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

PREFERENCES = Dataset.from_list([{"prompt": [{"role": "user", "content": "hello there"}],
                                  "chosen": [{"role": "assistant", "content": "I am a small model"}],
                                  "rejected": [{"role": "assistant", "content": "no"}]}] * 4)
PROMPTS = Dataset.from_list([{"prompt": [{"role": "user", "content": "who are you"}]}] * 4)


def brevity(completions, **kwargs):  # conversational prompts: each completion is a list of messages
    return [-len(completion[0]["content"]) / 100 for completion in completions]


def main(full_run: str, adapter_run: str) -> None:
    out = tempfile.mkdtemp(prefix="trl-handoff-")
    one_step = dict(max_steps=1, per_device_train_batch_size=2, report_to="none", use_cpu=True, save_strategy="no")

    model = AutoModelForCausalLM.from_pretrained(full_run)
    tokenizer = AutoTokenizer.from_pretrained(full_run)
    DPOTrainer(model=model, args=DPOConfig(output_dir=f"{out}/dpo", **one_step), processing_class=tokenizer,
               train_dataset=PREFERENCES).train()
    print("DPO on the full run: ok")

    model = AutoPeftModelForCausalLM.from_pretrained(adapter_run, is_trainable=True)
    model.generation_config = GenerationConfig.from_pretrained(adapter_run)
    tokenizer = AutoTokenizer.from_pretrained(adapter_run)
    trainer = GRPOTrainer(model=model, reward_funcs=brevity, processing_class=tokenizer, train_dataset=PROMPTS,
                          args=GRPOConfig(output_dir=f"{out}/grpo", num_generations=2, max_completion_length=8,
                                          **one_step))
    stops = set(GenerationConfig.from_pretrained(adapter_run).eos_token_id)
    assert stops <= set(trainer.eos_token_ids), (stops, trainer.eos_token_ids)  # completions end at end of turn
    trainer.train()
    print("GRPO on the adapter run: ok; completions stop at", trainer.eos_token_ids)

    model = AutoPeftModelForCausalLM.from_pretrained(adapter_run, is_trainable=True)
    trainer = DPOTrainer(model=model, args=DPOConfig(output_dir=f"{out}/dpo-adapter", **one_step),
                         processing_class=tokenizer, train_dataset=PREFERENCES)
    assert "ref" in trainer.model.peft_config  # the reference is a frozen copy of the SFT adapter
    trainer.train()
    print("DPO on the adapter run: ok")


if __name__ == "__main__":
    main(*sys.argv[1:3])
