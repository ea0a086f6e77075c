"""Deliberate bugs, one at a time, against the tests that claim to catch them.

    python scripts/mutate.py            # every mutant
    python scripts/mutate.py NAME ...   # some of them
    python scripts/mutate.py --list

Each mutant changes one piece of a copy of src/ in a temporary folder; the tests named with it then run against
that copy (PYTHONPATH puts it first, also for the `sftune` subprocesses and the 2-process runs the tests start)
and must fail. A mutant that survives means an invariant test has gone hollow: it no longer compares two
different computations. A tool for developers, not part of `make test` (all of them take about half an hour on
2 cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str
    file: str  # under src/sftune
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]


MUTANTS = (
    Mutant(
        "ga_normalisation", "each micro-batch normalised by its own trained tokens, not the whole step's",
        "training/loop.py", 'loss = out["loss_sum"] * scale',
        'loss = out["loss_sum"] * self.world_size / max(int((batch["targets"] != IGNORE_INDEX).sum()), 1)',
        ("tests/test_invariants.py::test_gradient_accumulation_equals_one_big_batch",),
    ),
    Mutant(
        "ddp_world_size", "gradients averaged over processes, not summed (the world-size factor dropped)",
        "training/loop.py", "scale = self.world_size / max(step_tokens, 1)", "scale = 1 / max(step_tokens, 1)",
        ("tests/test_engine.py::test_two_processes_equal_one_with_the_same_global_batch",),
    ),
    Mutant(
        "packing_positions", "position_ids do not restart at each packed document (documents attend to each other)",
        "data/collate.py", "return np.arange(int(np.sum(lengths)), dtype=np.int64) - starts",
        "return np.arange(int(np.sum(lengths)), dtype=np.int64) + 0 * starts",
        ("tests/test_invariants.py::test_packed_equals_unpacked",),
    ),
    Mutant(
        "document_end_targets", "the last token of a packed document predicts the next document's first token",
        "data/collate.py", "    targets[ends] = IGNORE_INDEX\n", "",
        ("tests/test_invariants.py::test_packed_equals_unpacked",),
    ),
    Mutant(
        "resume_noop", "resuming loads nothing: training restarts from step 0",
        "run.py", "        trainer.resume(resume_from)\n", "        pass\n",
        ("tests/test_crashes.py::test_kill_after_a_checkpoint_resumes_from_it_with_the_same_losses",),
    ),
    Mutant(
        "rng_not_restored", "resuming leaves the random generators as they are (dropout masks differ)",
        "training/loop.py", "checkpoint.set_rng_state(rng[self.accelerator.process_index] if len(rng) == "
        "self.world_size else rng[0])", "pass",
        ("tests/test_crashes.py::test_kill_after_a_checkpoint_resumes_from_it_with_the_same_losses",),
    ),
    Mutant(
        "optimizer_not_restored", "resuming starts AdamW's moments from zero",
        "training/loop.py", '            self.optimizer.load_state_dict(state["optimizer"])\n', "            pass\n",
        ("tests/test_crashes.py::test_kill_after_a_checkpoint_resumes_from_it_with_the_same_losses",),
    ),
    Mutant(
        "scheduler_not_restored", "resuming restarts the learning-rate schedule",
        "training/loop.py", '        self.scheduler.load_state_dict(state["scheduler"])\n', "",
        ("tests/test_crashes.py::test_kill_after_a_checkpoint_resumes_from_it_with_the_same_losses",),
    ),
    Mutant(
        "mask_trains_role_header", "assistant turns are trained from before their content (the role header too)",
        "data/render.py", "spans = [(t.start, t.end) for t in turns] + job.image_spans",
        "spans = [(max(t.start - 10, 0), t.end) for t in turns] + job.image_spans",
        ("tests/test_masks.py",),
    ),
    Mutant(
        "tool_calls_not_checked", "a template that drops tool calls passes the template checks (empty replies trained)",
        "data/turn_checks.py",
        'if function["name"] not in region or any(str(key) not in region for key in function["arguments"]):',
        "if False:",
        ("tests/test_masks.py::test_a_template_that_drops_tool_calls_is_caught_and_the_row_is_not_trained",),
    ),
    Mutant(
        "empty_reply_trained", "an empty assistant reply is trained (an empty reply plus end-of-turn)",
        "data/turn_checks.py", "    return not answer.strip() and not reasoning", "    return False",
        ("tests/test_masks.py::test_empty_replies_are_never_trained_and_counted",),
    ),
    Mutant(
        "chunked_loss_gradient", "the chunked loss ignores the upstream gradient for the hidden states",
        "training/loss.py", "grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)", "grad_hidden = grad_hidden",
        ("tests/test_loss.py",),
    ),
    Mutant(
        "padding_free_drops_rows", "padding-free micro-batches lose the step's last row",
        "data/collate.py",
        "return lambda rows: [position_batch([row], pad, join=True, multiple=multiple) for row in rows]",
        "return lambda rows: [position_batch([row], pad, join=True, multiple=multiple) for row in rows[:-1] or rows]",
        ("tests/test_invariants.py::test_padding_free_equals_padded_batches",),
    ),
    Mutant(
        "moe_aux_per_micro_batch", "MoE: each micro-batch adds its own balancing loss (its own expert shares and "
        "token count), not its share of the step's", "training/moe.py",
        "        if fractions is None:  # one micro-batch on one process: the counts of this very forward",
        "        if True:",
        ("tests/test_moe.py::test_gradient_accumulation_equals_one_big_batch_with_the_aux_loss",),
    ),
    Mutant(
        "moe_aux_world_size", "MoE: the balancing loss's gradient averaged over processes, not summed",
        "training/moe.py", "return self.coef * self.spec.num_experts * self.world_size * share",
        "return self.coef * self.spec.num_experts * share",
        ("tests/test_moe.py::test_two_processes_equal_one_with_the_aux_loss",),
    ),
    Mutant(
        "moe_padding_routed", "MoE: padding counts as routed tokens in the balancing loss",
        "training/loss.py", "real = token_mask if token_mask is not None else attention_mask", "real = None",
        ("tests/test_moe.py::test_padding_free_equals_padded_batches_with_the_aux_loss",),
    ),
    Mutant(
        "moe_packed_padding_routed", "MoE: the padding of packed rows (no attention mask) counts as routed tokens",
        "training/loss.py", "real = token_mask if token_mask is not None else attention_mask",
        "real = attention_mask",
        ("tests/test_moe.py::test_packed_equals_unpacked_with_the_aux_loss",),
    ),
    Mutant(
        "fsdp_gather_skipped", "under FSDP the final save writes the weights as they were loaded, not gathered",
        "training/sharded.py", "    state = accelerator.get_state_dict(loss_model)\n",
        "    state = None\n",
        ("tests/test_fsdp2.py",),
    ),
    Mutant(
        "label_smoothing_gradient", "label smoothing's uniform share is left out of the gradient (the value keeps it)",
        "training/loss.py", "                grad_logits -= smoothing / logits.shape[-1]\n",
        "                pass\n",
        ("tests/test_loss.py::test_label_smoothing_equals_torch_cross_entropy",),
    ),
    Mutant(
        "best_model_selection", "load_best_model_at_end keeps the last evaluated checkpoint, not the best one",
        "training/best_model.py", "if state.candidate_value is None or self.better(value, state.candidate_value):",
        "if True:",
        ("tests/test_trl_training.py::test_best_checkpoint_becomes_the_saved_model",),
    ),
    Mutant(
        "step_ratio_rounding", "a float eval/save/logging/warm-up step setting rounds down instead of up (transformers)",
        "config/fields.py", "return max(1, math.ceil(round(value * total_steps, 6)))",
        "return max(1, int(value * total_steps))",
        ("tests/test_trl_behaviours.py::test_float_logging_eval_save_and_warmup_steps_are_ratios_of_the_run",),
    ),
    Mutant(
        "dry_run_forgets_hold_out", "--dry_run counts the held-out eval rows as training rows",
        "data/build.py", 'counts["train"].append(total - len(out))', 'counts["train"].append(total)',
        ("tests/test_dry_run.py::test_dry_run_steps_match_the_run",),
    ),
    Mutant(
        "dry_run_rows_not_examples", "--dry_run with split_assistant_turns counts rows, not the examples they become",
        "data/build.py", "            if sizes is not None and config.split_assistant_turns:", "            if False:",
        ("tests/test_dry_run.py::test_dry_run_steps_match_the_run_with_split_assistant_turns",),
    ),
    Mutant(
        "no_fp32_masters", "bf16 mixed precision trains the bf16 weights themselves (no fp32 master copies)",
        "precision.py", "target = plan.trained_dtype if param.requires_grad else plan.frozen_dtype",
        "target = plan.frozen_dtype",
        ("tests/test_precision.py::test_fp32_masters_and_kahan_keep_small_updates_that_pure_bf16_loses",),
    ),
    Mutant(
        "kahan_off", "bf16_weights: kahan runs torch-optimi's AdamW without its Kahan compensation",
        "training/optim.py", "kahan_sum=True", "kahan_sum=False",
        ("tests/test_precision.py::test_fp32_masters_and_kahan_keep_small_updates_that_pure_bf16_loses",),
    ),
    Mutant(
        "masters_not_restored", "a resumed mixed-precision run continues from the bf16 model files, not the fp32 masters",
        "training/checkpoint.py", "        params[name].data.copy_(tensor)", "        pass",
        ("tests/test_precision.py::test_resume_under_bf16_precisions_equals_the_uninterrupted_run",),
    ),
    Mutant(
        "offload_unpack", "activation offloading gives backward zeros instead of the activations it took",
        "training/offload.py", "            return packed.tensor", "            return torch.zeros_like(packed.tensor)",
        ("tests/test_long_context.py::test_offloading_hooks_take_the_saved_activations_and_change_no_gradient",),
    ),
    Mutant(
        "loss_one_chunk", "the fused loss projects every trained token at once ([tokens, vocab] logits)",
        "training/loss.py", "        for start in range(0, hidden.shape[0], chunk_tokens):\n            chunk, chunk_targets",
        "        chunk_tokens = hidden.shape[0]\n        for start in range(0, hidden.shape[0], chunk_tokens):\n"
        "            chunk, chunk_targets",
        ("tests/test_long_context.py::test_loss_memory_grows_with_the_chunk_not_with_the_row_length",),
    ),
    Mutant(
        "lora_trained_params", "the estimate counts LoRA's B matrix twice (trained parameters, gradients, optimizer)",
        "estimate/model_size.py", "trained = sum(config.lora_r * (m.in_features + m.out_features) for _, m in targets)",
        "trained = sum(config.lora_r * (m.in_features + 2 * m.out_features) for _, m in targets)",
        ("tests/test_estimate.py::test_weights_gradients_and_optimizer_lines_count_the_loaded_model",),
    ),
    Mutant(
        "estimate_longest_batch", "the estimate costs the shortest rows instead of the longest",
        "estimate/shapes.py", "key=lambda i: len(rows[i][\"input_ids\"]), reverse=True)",
        "key=lambda i: len(rows[i][\"input_ids\"]))",
        ("tests/test_estimate.py::test_longest_micro_batch_is_the_longest_rows_padded",),
    ),
    Mutant(
        "shard_row_numbers", "each tokenized chunk's documents lose their offset in the source (row numbers restart)",
        "data/build.py", "rows = shard.offset + np.arange(len(examples), dtype=np.int64)",
        "rows = np.arange(len(examples), dtype=np.int64)",
        ("tests/test_scale.py::test_shard_chunk_and_copy_sizes_and_processes_change_nothing",
         "tests/test_scale.py::test_split_assistant_turns_and_empty_replies_keep_their_source_rows_across_shards"),
    ),
    Mutant(
        "split_turn_rows", "split_assistant_turns: the examples a row is split into are numbered as rows themselves",
        "data/build.py", "examples, rows = split_assistant_turns(examples, rows, config.loss_mask)",
        "examples, _ = split_assistant_turns(examples, rows, config.loss_mask)\n"
        "            rows = shard.offset + np.arange(len(examples), dtype=np.int64)",
        ("tests/test_scale.py::test_split_assistant_turns_and_empty_replies_keep_their_source_rows_across_shards",),
    ),
    Mutant(
        "copy_chunk_overlap", "the chunked copy of packed rows repeats a segment at each chunk boundary",
        "data/row_writer.py", "        first = last\n", "        first = max(last - 1, first + 1)\n",
        ("tests/test_scale.py::test_shard_chunk_and_copy_sizes_and_processes_change_nothing",),
    ),
    Mutant(
        "preparation_unlocked", "every process prepares the data itself: the cache entry's lock is never taken",
        "data/cache_lock.py", "            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)\n", "            pass\n",
        ("tests/test_scale.py::test_two_processes_prepare_once_the_second_waits_and_reads",),
    ),
)


def run_mutant(mutant: Mutant, keep: bool = False) -> tuple[bool, float, str]:
    """(caught, seconds, last lines of the test output)."""
    work = Path(tempfile.mkdtemp(prefix=f"sftune-mutant-{mutant.name}-"))
    try:
        shutil.copytree(ROOT / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        target = work / "src" / "sftune" / mutant.file
        text = target.read_text(encoding="utf-8")
        if text.count(mutant.old) != 1:
            raise SystemExit(f"mutant {mutant.name}: the code it changes is not in {mutant.file} exactly once "
                             "(the code moved: update scripts/mutate.py)")
        target.write_text(text.replace(mutant.old, mutant.new), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": str(work / "src"), "OMP_NUM_THREADS": "1"}
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])
        return done.returncode != 0, seconds, tail
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--keep", action="store_true", help="keep each mutated copy of src/ (in the temp folder)")
    args = parser.parse_args()
    known = {m.name: m for m in MUTANTS}
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:26} {m.bug}")
        return 0
    unknown = [n for n in args.names if n not in known]
    if unknown:
        raise SystemExit(f"unknown mutant(s): {', '.join(unknown)} (see --list)")
    survivors = []
    for mutant in [known[n] for n in args.names] or MUTANTS:
        caught, seconds, tail = run_mutant(mutant, args.keep)
        print(f"{'caught  ' if caught else 'SURVIVED'} {mutant.name:26} {seconds:6.0f} s  {mutant.bug}", flush=True)
        if not caught:
            survivors.append(mutant.name)
            print("    " + tail.replace("\n", "\n    "), flush=True)
    print(f"\n{len(survivors)} of {len(args.names) or len(MUTANTS)} mutants survived"
          + (f": {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
