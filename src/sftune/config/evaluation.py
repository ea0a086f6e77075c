"""The evaluation group: when to evaluate, on what batch size, and the prompts answered at each evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sftune.config.fields import Problems, opt


@dataclass
class EvaluationSettings:
    eval_strategy: Literal["no", "steps", "epoch"] = opt(
        "no", "When to evaluate on the eval split: never, every eval_steps, or after every epoch.", "evaluation"
    )
    eval_steps: int | float | None = opt(
        None, "Evaluate every this many optimizer steps, or a float in (0, 1) for that ratio of the total steps "
        "(unset: logging_steps).", "evaluation"
    )
    per_device_eval_batch_size: int = opt(8, "Rows per evaluation batch on each device.", "evaluation")
    generation_prompts: list[str] = opt(
        [], "User prompts the model answers greedily at every evaluation; answers go to samples.jsonl.",
        "evaluation",
    )
    generation_max_new_tokens: int = opt(64, "Longest answer generated for generation_prompts.", "evaluation")

    # TRL training keys (issue 15)
    eval_on_start: bool = opt(
        False, "Evaluate once before the first step (step 0), as a sanity check; needs eval data, and runs even with "
        "eval_strategy: no. A resumed run does not repeat it.", "evaluation",
    )
    load_best_model_at_end: bool = opt(
        False, "End with the best evaluated model (by metric_for_best_model) instead of the last one: the best "
        "checkpoint's weights become the saved model, and the model card names its step. Needs save_strategy = "
        "eval_strategy and save_steps a multiple of eval_steps. The best checkpoint survives save_total_limit.",
        "evaluation",
    )
    metric_for_best_model: str = opt(
        "eval_loss", "Eval metric that picks the best model and drives early stopping: eval_loss, "
        "eval_perplexity, eval_mean_token_accuracy, eval_entropy ('eval_' may be left out; "
        "'eval_loss/<source>' for one dataset of a mixture).", "evaluation",
    )
    greater_is_better: bool | None = opt(
        None, "Whether a higher metric_for_best_model is better (unset: true unless its name ends in 'loss').",
        "evaluation",
    )
    early_stopping_patience: int | None = opt(
        None, "Stop training after this many evaluations in a row without improving metric_for_best_model by more "
        "than early_stopping_threshold (transformers' EarlyStoppingCallback). Unset: never stop early.",
        "evaluation",
    )
    early_stopping_threshold: float = opt(
        0.0, "How much metric_for_best_model must improve on its best value to count for early stopping.",
        "evaluation",
    )

    def _check_evaluation(self, problems: Problems) -> None:
        problems.need(self.eval_steps is None or self.eval_steps > 0, "eval_steps", "must be >= 1, or a ratio of the total steps in (0, 1)")
        # eval_steps and a hold-out without eval_strategy would hold rows out of training and never evaluate them
        # (an explicit eval_strategy: no over a config with eval_steps, and no rows held out, is a way to turn
        # evaluation off)
        problems.need(self.eval_steps is None or self.eval_strategy != "no" or not self.held_out_ratio, "eval_steps",
                      f"is set and eval_ratio holds out {self.held_out_ratio:g} of the rows, but eval_strategy is "
                      "'no', so they would never be evaluated: set eval_strategy: steps (or unset eval_steps and "
                      "eval_ratio)")
        problems.need(self.per_device_eval_batch_size >= 1, "per_device_eval_batch_size", "must be >= 1")
        problems.need(self.generation_max_new_tokens >= 1, "generation_max_new_tokens", "must be >= 1")
        problems.need(self.early_stopping_patience is None or self.early_stopping_patience >= 1,
                      "early_stopping_patience", "must be >= 1, or unset to never stop early")
        problems.need(self.early_stopping_threshold >= 0, "early_stopping_threshold", "must be >= 0")
        # a ratio of the total steps (a float below 1) is only known as steps once the data is: the Trainer checks
        # the two schedules again then
        intervals = (self.eval_steps or self.logging_steps, self.save_steps)
        known = all(isinstance(x, int) or float(x).is_integer() and x >= 1 for x in intervals)
        for problem in best_model_problems(self, *(map(int, intervals) if known else (None, None))):
            problems.add(problem)


EVAL_METRICS = ("loss", "perplexity", "mean_token_accuracy", "entropy")  # training/metrics.py: eval_metrics


def best_model_problems(config: Any, eval_every: int | None, save_every: int | None) -> list[str]:
    """What keeps load_best_model_at_end or early stopping from working, one problem per entry. transformers'
    rules: the best model needs an evaluation at every checkpoint, so the two schedules must line up."""
    problems = []
    name = config.metric_for_best_model
    if name.removeprefix("eval_").split("/", 1)[0] not in EVAL_METRICS:
        problems.append(f"config key 'metric_for_best_model' = {name!r}: expected one of "
                        f"{', '.join('eval_' + m for m in EVAL_METRICS)} (or 'eval_<metric>/<source>' for one "
                        "dataset of a mixture)")
    no_evaluations = "set eval_strategy: steps or epoch (and eval data: dataset_test_split or eval_ratio)"
    if config.load_best_model_at_end:
        if config.eval_strategy == "no":
            problems.append(f"config key 'load_best_model_at_end' needs evaluations: {no_evaluations}")
        elif config.save_strategy != config.eval_strategy:
            problems.append(f"config key 'load_best_model_at_end' needs save_strategy to match eval_strategy (so "
                            f"every checkpoint is evaluated), but they are {config.save_strategy!r} and "
                            f"{config.eval_strategy!r}: set save_strategy: {config.eval_strategy}")
        elif config.eval_strategy == "steps" and eval_every and save_every and save_every % eval_every != 0:
            problems.append(f"config key 'load_best_model_at_end' needs save_steps ({save_every}) to be a multiple "
                            f"of the evaluation interval ({eval_every}: eval_steps, or else logging_steps): set "
                            f"save_steps: {eval_every * max(1, round(save_every / eval_every))}")
    if config.early_stopping_patience is not None and config.eval_strategy == "no":
        problems.append(f"config key 'early_stopping_patience' needs evaluations: {no_evaluations}")
    return problems
