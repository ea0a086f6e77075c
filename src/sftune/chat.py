"""`sftune chat RUN_DIR`: talk to a finished run, whether it holds a full model, an adapter or a merged model.

An adapter is put on its base model, found as `sftune merge` finds it (the run's sftune_config.yaml, else
adapter_config.json). Generation stops at the end-of-turn token the run was trained to write, from the run's
generation config. Interactive chat keeps the conversation's history and prints the reply as it is generated.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable

from sftune.errors import UserError

log = logging.getLogger("sftune")

HELP = "empty line: nothing; /reset: forget the conversation; /exit or Ctrl-D: quit"


def load_run(run_dir: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) of a run folder, ready to generate: on the GPU when there is one, in eval mode."""
    from sftune.preflight import check_chat_folder

    folder = check_chat_folder(run_dir)  # before torch loads

    import torch
    from transformers.utils import logging as hf_logging

    from sftune.config import SFTConfig
    from sftune.model.adapters import (
        is_adapter_folder, load_adapter_run, run_tokenizer, text_tokenizer, use_saved_generation_config,
    )
    from sftune.model.load import load_model

    hf_logging.disable_progress_bar()  # the reply streams; no loading bars around it
    if is_adapter_folder(folder):
        model, saved_with = load_adapter_run(folder)
    else:
        config = SFTConfig(model_name_or_path=str(folder))
        model, saved_with = load_model(config), run_tokenizer(folder, config)
        use_saved_generation_config(model, folder, text_tokenizer(saved_with))
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    return model, text_tokenizer(saved_with)


class ChatSession:
    """A conversation with one model: each reply is generated from the whole history so far."""

    def __init__(self, model: Any, tokenizer: Any, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.7):
        self.model, self.tokenizer = model, tokenizer
        self.system, self.max_new_tokens, self.temperature = system, max_new_tokens, temperature
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str, stream: bool = False) -> str:
        """The model's answer to `text`, printed token by token as it comes when `stream` is set."""
        from transformers import TextStreamer

        from sftune.generation import generate_reply

        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        self.messages.append({"role": "user", "content": text})
        try:
            answer = generate_reply(self.model, self.tokenizer, self.messages, self.max_new_tokens,
                                    self.temperature, streamer)
        except BaseException:
            self.messages.pop()  # an interrupted turn leaves no trace in the history
            raise
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def run_chat(run_dir: str, prompt: str | None = None, system: str | None = None, max_new_tokens: int = 256,
             temperature: float = 0.7, read_line: Callable[[str], str] = input) -> None:
    """One answer to `prompt`, or (without a prompt) an interactive chat until /exit or end of input."""
    if max_new_tokens < 1:
        raise UserError(f"--max_new_tokens {max_new_tokens}: must be >= 1")
    if not math.isfinite(temperature) or temperature < 0:  # nan passes `< 0` and would sample garbage
        raise UserError(f"--temperature {temperature}: must be a number >= 0 (0: greedy)")
    model, tokenizer = load_run(run_dir)
    session = ChatSession(model, tokenizer, system, max_new_tokens, temperature)
    if prompt is not None:
        session.reply(prompt, stream=True)
        return
    print(f"Chatting with {run_dir} ({HELP}).", flush=True)
    while True:
        try:
            text = read_line("\nyou> ").strip()
        except EOFError:
            print()
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            print("(history cleared)")
        elif text:
            print("model> ", end="", flush=True)
            try:
                session.reply(text, stream=True)
            except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
                print("\n(reply interrupted)", file=sys.stderr)
