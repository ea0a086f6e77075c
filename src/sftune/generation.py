"""Greedy answers from a model, rendered with its chat template: for the demo, evaluation samples and chat."""

from __future__ import annotations

from typing import Any

import torch


def greedy_answer(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 64) -> str:
    """The model's greedy reply to one user message (plain continuation when there is no chat template)."""
    if getattr(tokenizer, "chat_template", None):
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    model.train(was_training)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
