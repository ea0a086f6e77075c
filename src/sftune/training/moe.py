"""Mixture-of-Experts: the router's load-balancing loss, normalised per optimizer step, and expert-load figures.

The loop calls the backbone and computes the loss itself, so an MoE model's own auxiliary loss (added by its
causal-LM forward) never happens on its own: this module adds it back. It is the Switch-Transformer loss that
transformers' `load_balancing_loss_func` computes for Qwen-MoE, Mixtral, OLMoE, GPT-OSS and others:

    aux = num_experts * sum_e f_e * P_e

with f_e the share of top-k assignments that go to expert e and P_e the mean router probability of e, both
means over every real token of every MoE layer. Neither is a sum over tokens, so aux is not additive over
micro-batches: accumulating each micro-batch's own aux would weight a short micro-batch like a long one and
make gradient accumulation, padding-free rows and data parallelism change the update. Instead f (the counts,
which carry no gradient) is taken for the whole optimizer step first, by a routing-only forward pass over the
step's micro-batches without gradients, summed over processes. Then each micro-batch adds
num_experts * sum_e f_e * (its tokens' summed p_te) / T_step, and those terms sum exactly to the step's aux.
A step of one micro-batch on one process needs no pre-pass: its counts come from the same forward.

Padding never counts as a routed token (the attention mask, or the collator's token_mask for padded packed
rows); packed documents are tokens of their own and count, as they would unpacked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("sftune")

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RouterSpec:
    """What the balancing loss needs to know of a model's routers."""

    num_experts: int
    top_k: int
    config_coef: float  # the model config's router_aux_loss_coef (0.0 where it has none)


def router_spec(causal_lm: nn.Module) -> RouterSpec | None:
    """The routers of an MoE causal LM with a softmax top-k balancing loss, or None.

    Such a model in transformers records `router_logits` when asked (`output_router_logits` in its config), has
    a `router_aux_loss_coef`, and names its expert count and top-k; its causal LM keeps them as attributes, the
    config under family names. Models that balance without an auxiliary loss (DeepSeek-V3's biased sigmoid
    routing) have no coefficient, and their routing is not softmax top-k: None, like a dense model.
    """
    config = causal_lm.config.get_text_config() if hasattr(causal_lm.config, "get_text_config") else causal_lm.config
    if not hasattr(config, "output_router_logits") or not hasattr(config, "router_aux_loss_coef"):
        return None
    experts = _first_int(causal_lm, config, ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"))
    top_k = _first_int(causal_lm, config, ("num_experts_per_tok", "top_k", "moe_topk", "moe_k"))
    if not experts or not top_k:
        return None
    coef = getattr(causal_lm, "router_aux_loss_coef", None)
    coef = getattr(config, "router_aux_loss_coef", 0.0) if coef is None else coef
    return RouterSpec(int(experts), int(top_k), float(coef or 0.0))


def _first_int(model: nn.Module, config: Any, names: Sequence[str]) -> int | None:
    for source in (model, config):
        for name in names:
            value = getattr(source, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


@dataclass
class Routing:
    """One forward's routing over its real tokens: what the loss and the figures need, per MoE layer."""

    counts: torch.Tensor  # [layers, experts] top-k assignments (float64, no gradient)
    prob_sums: torch.Tensor  # [experts] router probabilities summed over tokens and layers (fp32, differentiable)
    tokens: int  # real tokens (each one routed once per layer)


def routing_of(router_logits: Sequence[torch.Tensor], real_tokens: torch.Tensor | None, spec: RouterSpec) -> Routing:
    """Counts and probability sums from each MoE layer's router logits ([batch * seq, experts] each).

    `real_tokens`: [batch, seq], true where a token is no padding (None: all are real)."""
    device = router_logits[0].device
    real = None if real_tokens is None else real_tokens.reshape(-1).to(device=device, dtype=torch.float32)
    counts, prob_sums = [], torch.zeros(spec.num_experts, dtype=torch.float32, device=device)
    for logits in router_logits:
        # fp32, as the routers themselves compute their probabilities (the chosen experts are then the same)
        probs = F.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs.detach(), spec.top_k, dim=-1).indices
        weights = torch.ones_like(chosen, dtype=torch.float32) if real is None else real[:, None].expand_as(chosen)
        layer_counts = torch.zeros(spec.num_experts, dtype=torch.float32, device=device)
        counts.append(layer_counts.scatter_add_(0, chosen.reshape(-1), weights.reshape(-1)))
        prob_sums = prob_sums + (probs.sum(0) if real is None else (probs * real[:, None]).sum(0))
    tokens = router_logits[0].shape[0] if real is None else int(real.sum())
    return Routing(torch.stack(counts).double(), prob_sums, tokens)


def balancing_loss(routing: Routing, spec: RouterSpec) -> torch.Tensor:
    """num_experts * sum_e f_e * P_e of one batch on its own (what the model's forward computes)."""
    rows = max(routing.tokens * routing.counts.shape[0], 1)
    fractions = routing.counts.sum(0).to(routing.prob_sums) / rows
    return spec.num_experts * (fractions * routing.prob_sums).sum() / rows


def load_figures(counts: torch.Tensor) -> dict[str, float]:
    """expert_load_cv: the coefficient of variation of tokens per expert, averaged over layers (0 = even);
    expert_load_max: the largest share of a layer's assignments that one expert takes, in the most uneven layer
    (1 / num_experts = even)."""
    counts = counts.double()
    totals = counts.sum(1)
    used = totals > 0
    if not bool(used.any()):
        return {}
    counts, totals = counts[used], totals[used]
    mean = totals / counts.shape[1]
    cv = counts.std(dim=1, unbiased=False) / mean
    return {"expert_load_cv": float(cv.mean()), "expert_load_max": float((counts.max(1).values / totals).max())}


class RouterBalance:
    """The balancing loss of each optimizer step, and the aux loss and expert load of each logging interval.

    `reduce` sums a tensor over processes (every process calls it at the same points)."""

    def __init__(self, spec: RouterSpec, coef: float, world_size: int, reduce: Callable[[torch.Tensor], torch.Tensor]):
        self.spec, self.coef, self.world_size, self.reduce = spec, coef, world_size, reduce
        self.fractions: torch.Tensor | None = None  # the step's f_e, when known before its first backward
        self.rows = 0  # the step's real tokens x MoE layers, on every process
        self.interval_aux = 0.0  # this process's share of the interval's per-step aux losses
        self.interval_steps = 0
        self.interval_counts: torch.Tensor | None = None
        self._reset_step()

    def _reset_step(self) -> None:
        self.step_counts: torch.Tensor | None = None
        self.step_prob_sums: torch.Tensor | None = None
        self.step_tokens = 0

    def begin_step(self, micro_batches: list[Batch], routing_forward: Callable[[Batch], Routing]) -> None:
        """Before the step's first backward: its f_e over every micro-batch and process (the routing pre-pass)."""
        self._reset_step()
        self.fractions = None
        if self.coef <= 0 or (len(micro_batches) == 1 and self.world_size == 1):
            return
        # Dropout, if any, draws the same numbers in the pre-pass as in the forwards that follow, so the
        # counted routing is the trained one.
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            passes = [routing_forward(batch) for batch in micro_batches]
        counts = torch.stack([p.counts for p in passes]).sum(0)
        tokens = torch.tensor(float(sum(p.tokens for p in passes)), dtype=torch.float64, device=counts.device)
        self.fractions, self.rows = self._step_fractions(counts, tokens)

    def _step_fractions(self, counts: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self.world_size > 1:
            packed = self.reduce(torch.cat([counts.reshape(-1), tokens.reshape(1)]))
            counts, tokens = packed[:-1].reshape(counts.shape), packed[-1]
        rows = int(round(float(tokens))) * counts.shape[0]
        return counts.sum(0) / max(rows, 1), rows

    def micro_batch_loss(self, routing: Routing) -> torch.Tensor | None:
        """This micro-batch's term of the step's balancing loss, times the coefficient and scaled like the main
        loss (data parallelism averages gradients over processes, so the factor world_size makes it a sum)."""
        self._add_to_step(routing)
        if self.coef <= 0:
            return None
        fractions, rows = self.fractions, self.rows
        if fractions is None:  # one micro-batch on one process: the counts of this very forward
            fractions, rows = self._step_fractions(routing.counts, torch.tensor(float(routing.tokens)))
        share = (fractions.to(routing.prob_sums) * routing.prob_sums).sum() / max(rows, 1)
        return self.coef * self.spec.num_experts * self.world_size * share

    def _add_to_step(self, routing: Routing) -> None:
        counts, probs = routing.counts.detach(), routing.prob_sums.detach().double()
        self.step_counts = counts if self.step_counts is None else self.step_counts + counts
        self.step_prob_sums = probs if self.step_prob_sums is None else self.step_prob_sums + probs
        self.step_tokens += routing.tokens

    def end_step(self) -> None:
        """After the step's last backward: its aux loss and expert load join the logging interval."""
        if self.step_counts is None:
            return
        fractions, rows = self.fractions, self.rows
        if fractions is None:  # no pre-pass: the counts of the forwards just run, over every process
            tokens = torch.tensor(float(self.step_tokens), dtype=torch.float64, device=self.step_counts.device)
            fractions, rows = self._step_fractions(self.step_counts, tokens)
        step_aux = self.spec.num_experts * (fractions.double() * self.step_prob_sums).sum() / max(rows, 1)
        self.interval_aux += float(step_aux)
        self.interval_steps += 1
        counts = self.step_counts
        self.interval_counts = counts if self.interval_counts is None else self.interval_counts + counts
        self._reset_step()

    def interval_metrics(self) -> dict[str, float]:
        """aux_loss (the mean over the interval's steps of each step's balancing loss, before the coefficient),
        expert_load_cv and expert_load_max over the interval; every process must call it."""
        if self.interval_counts is None:
            return {}
        counts, aux = self.interval_counts, torch.tensor(self.interval_aux, dtype=torch.float64,
                                                         device=self.interval_counts.device)
        if self.world_size > 1:
            packed = self.reduce(torch.cat([counts.reshape(-1), aux.reshape(1)]))
            counts, aux = packed[:-1].reshape(counts.shape), packed[-1]
        metrics = {"aux_loss": float(aux) / max(self.interval_steps, 1), **load_figures(counts)}
        self.interval_aux, self.interval_steps, self.interval_counts = 0.0, 0, None
        return metrics


class EvalRouting:
    """The balancing loss and expert load of a whole evaluation, as if it were one batch."""

    def __init__(self, spec: RouterSpec, world_size: int, reduce: Callable[[torch.Tensor], torch.Tensor]):
        self.spec, self.world_size, self.reduce = spec, world_size, reduce
        self.counts: torch.Tensor | None = None
        self.prob_sums: torch.Tensor | None = None
        self.tokens = 0

    def add(self, routing: Routing) -> None:
        counts, probs = routing.counts, routing.prob_sums.detach().double()
        self.counts = counts if self.counts is None else self.counts + counts
        self.prob_sums = probs if self.prob_sums is None else self.prob_sums + probs
        self.tokens += routing.tokens

    def metrics(self) -> dict[str, float]:
        if self.counts is None:
            return {}
        counts, probs = self.counts, self.prob_sums
        tokens = torch.tensor(float(self.tokens), dtype=torch.float64, device=counts.device)
        if self.world_size > 1:
            packed = self.reduce(torch.cat([counts.reshape(-1), probs, tokens.reshape(1)]))
            size = counts.numel()
            counts, probs, tokens = packed[:size].reshape(counts.shape), packed[size:-1], packed[-1]
        rows = max(float(tokens) * counts.shape[0], 1.0)
        aux = self.spec.num_experts * float((counts.sum(0) / rows * probs / rows).sum())
        figures = {f"eval_{k}": v for k, v in load_figures(counts).items()}
        return {"eval_aux_loss": aux, **figures}


def balance_for(spec: RouterSpec | None, coef: float | None, world_size: int,
                reduce: Callable[[torch.Tensor], torch.Tensor]) -> RouterBalance | None:
    """The run's balancing: None for a dense model. `coef` None takes the model config's own coefficient."""
    if spec is None:
        if coef:
            log.warning("router_aux_loss_coef is set, but this model has no router balancing loss (a dense model, "
                        "or routing balanced without one); it is ignored")
        return None
    chosen = spec.config_coef if coef is None else coef
    source = "the model config's" if coef is None else "router_aux_loss_coef"
    if chosen > 0:
        log.info("moe: %d experts, top-%d; router balancing loss x %g (%s)", spec.num_experts, spec.top_k, chosen,
                 source)
    else:
        log.info("moe: %d experts, top-%d; router balancing loss off (%s is 0), expert load still logged",
                 spec.num_experts, spec.top_k, source)
    return RouterBalance(spec, chosen, world_size, reduce)
