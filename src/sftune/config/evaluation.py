"""The evaluation group: when to evaluate, on what batch size, and the prompts answered at each evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sftune.config.fields import Problems, opt


@dataclass
class EvaluationSettings:
    eval_strategy: Literal["no", "steps", "epoch"] = opt(
        "no", "When to evaluate on the eval split: never, every eval_steps, or after every epoch.", "evaluation"
    )
    eval_steps: int | None = opt(None, "Evaluate every this many optimizer steps (unset: logging_steps).", "evaluation")
    per_device_eval_batch_size: int = opt(8, "Rows per evaluation batch on each device.", "evaluation")
    generation_prompts: list[str] = opt(
        [], "User prompts the model answers greedily at every evaluation; answers go to samples.jsonl.",
        "evaluation",
    )
    generation_max_new_tokens: int = opt(64, "Longest answer generated for generation_prompts.", "evaluation")

    def _check_evaluation(self, problems: Problems) -> None:
        problems.need(self.eval_steps is None or self.eval_steps >= 1, "eval_steps", "must be >= 1")
        # eval_steps and eval_ratio without eval_strategy would hold rows out of training and never evaluate them
        # (an explicit eval_strategy: no over a config with eval_steps, and no rows held out, is a way to turn
        # evaluation off)
        problems.need(self.eval_steps is None or self.eval_strategy != "no" or not self.eval_ratio, "eval_steps",
                      f"is set and eval_ratio holds out {self.eval_ratio:g} of the rows, but eval_strategy is 'no', "
                      "so they would never be evaluated: set eval_strategy: steps (or unset eval_steps and "
                      "eval_ratio)")
        problems.need(self.per_device_eval_batch_size >= 1, "per_device_eval_batch_size", "must be >= 1")
        problems.need(self.generation_max_new_tokens >= 1, "generation_max_new_tokens", "must be >= 1")
