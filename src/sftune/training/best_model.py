"""The best model of a run (load_best_model_at_end) and early stopping, with transformers' meanings.

Each evaluation gives one value of `metric_for_best_model` (an eval metric, with or without its `eval_` prefix);
`greater_is_better` unset means: higher is better unless the name ends in "loss" (transformers' rule).

Early stopping is transformers' EarlyStoppingCallback: an evaluation counts as an improvement when it beats the
best value so far by more than `early_stopping_threshold`; after `early_stopping_patience` evaluations in a row
without one, training stops (after that step's checkpoint, if one is due).

The best model is chosen among the models the run still has: the evaluated checkpoints and the final model
(which is always evaluated). transformers picks among checkpoints only; the final model is a candidate here
because sftune evaluates it anyway. The evaluation at the start (eval_on_start) is neither a candidate nor an
improvement: it measures the model before training.
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass
from typing import Any

from sftune.config import SFTConfig
from sftune.errors import UserError

def metric_key(name: str) -> str:
    """The key of metrics.jsonl's eval lines that `metric_for_best_model` names ('loss' -> 'eval_loss')."""
    return name if name.startswith("eval_") else f"eval_{name}"


def greater_is_better(config: SFTConfig) -> bool:
    if config.greater_is_better is not None:
        return config.greater_is_better
    return not config.metric_for_best_model.endswith("loss")


def tracks_best(config: SFTConfig) -> bool:
    return config.load_best_model_at_end or config.early_stopping_patience is not None


@dataclass
class BestModelState:
    """What a checkpoint keeps of the selection, so a resumed run goes on choosing as the uninterrupted one."""

    best_value: float | None = None  # the best value seen in any evaluation (early stopping compares with it)
    best_step: int | None = None  # the step of that evaluation
    candidate_value: float | None = None  # the best among evaluations whose model the run has (checkpoint/final)
    candidate_step: int | None = None
    evaluations_without_improvement: int = 0


class BestModelTracker:
    def __init__(self, config: SFTConfig):
        self.key = metric_key(config.metric_for_best_model)
        self.better = operator.gt if greater_is_better(config) else operator.lt
        self.patience = config.early_stopping_patience
        self.threshold = config.early_stopping_threshold
        self.state = BestModelState()
        self.last: tuple[int, float] | None = None  # (step, value) of the latest evaluation

    def check_sources(self, source_names: list[str]) -> None:
        """A per-source metric ('eval_loss/<source>') must name one of the mixed datasets; checked before training."""
        if "/" not in self.key:
            return
        source = self.key.split("/", 1)[1]
        if len(source_names) < 2 or source not in source_names:
            known = ", ".join(source_names) if len(source_names) > 1 else "none: there is one dataset"
            raise UserError(f"metric_for_best_model: '{self.key}' names no data source of this run (per-source "
                            f"eval metrics: {known}): use one of them, or {self.key.split('/', 1)[0]}")

    def evaluated(self, step: int, metrics: dict[str, Any]) -> None:
        """Record one evaluation of the model at `step` (not the one at the start)."""
        if self.key not in metrics:
            available = ", ".join(sorted(k for k in metrics if k.startswith("eval_")))
            raise UserError(f"metric_for_best_model: '{self.key}' is not among the eval metrics ({available}): "
                            "set metric_for_best_model to one of them")
        value, state = float(metrics[self.key]), self.state
        improved = state.best_value is None or (
            self.better(value, state.best_value) and abs(value - state.best_value) > self.threshold)
        state.evaluations_without_improvement = 0 if improved else state.evaluations_without_improvement + 1
        if state.best_value is None or self.better(value, state.best_value):
            state.best_value, state.best_step = value, step
        self.last = (step, value)

    def kept(self, step: int) -> None:
        """The model of `step` is kept (its checkpoint was saved, or it is the final model): a candidate if it was
        evaluated at that step."""
        if self.last is None or self.last[0] != step:
            return
        value, state = self.last[1], self.state
        if state.candidate_value is None or self.better(value, state.candidate_value):
            state.candidate_value, state.candidate_step = value, step

    def should_stop(self) -> bool:
        return self.patience is not None and self.state.evaluations_without_improvement >= self.patience

    def to_dict(self) -> dict[str, Any]:
        return asdict(self.state)

    def restore(self, saved: dict[str, Any] | None) -> None:
        if saved:
            self.state = BestModelState(**saved)

    def summary(self, final_step: int) -> dict[str, Any]:
        """The metrics.jsonl line that says which model the run ended with (the model card reads it)."""
        return {"step": final_step, "best_model_step": self.state.candidate_step, "best_metric": self.key,
                "best_metric_value": self.state.candidate_value}
