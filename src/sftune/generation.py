"""Replies from a model, rendered with its chat template: for the demo, evaluation samples and `sftune chat`."""

from __future__ import annotations

from typing import Any

import torch


def greedy_answer(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 64) -> str:
    """The model's greedy reply to one user message (plain continuation when there is no chat template)."""
    return generate_reply(model, tokenizer, [{"role": "user", "content": prompt}], max_new_tokens)


def generate_reply(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int = 64,
                   temperature: float = 0.0, streamer: Any = None) -> str:
    """The model's reply to a conversation: greedy at temperature 0, else sampled. It ends where the model's
    generation config says (the end-of-turn token; see data/template.py `set_generation_stops`) or after
    max_new_tokens. A transformers streamer, when given, receives the tokens as they come."""
    inputs = chat_inputs(tokenizer, messages)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if temperature > 0:
        sampling: dict[str, Any] = {"do_sample": True, "temperature": temperature}
    else:  # unset the model's own sampling settings, which would only warn under greedy decoding
        sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad, streamer=streamer,
                                **sampling)
    model.train(was_training)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def chat_inputs(tokenizer: Any, messages: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    """Token ids of the prompt inference builds: the chat template with the generation prompt appended. A tokenizer
    without a template gets the last message as plain text to continue."""
    if getattr(tokenizer, "chat_template", None):
        return dict(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True))
    return dict(tokenizer(messages[-1]["content"], return_tensors="pt"))
