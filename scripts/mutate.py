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
        "training/loop.py", 'sharded.backward(accelerator, out["loss_sum"] * scale, last)',
        'sharded.backward(accelerator, out["loss_sum"] * self.world_size '
        '/ max(int((batch["targets"] != IGNORE_INDEX).sum()), 1), last)',
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
        "chunked_loss_gradient", "the chunked loss ignores the upstream gradient for the hidden states",
        "training/loss.py", "grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)", "grad_hidden = grad_hidden",
        ("tests/test_loss.py",),
    ),
    Mutant(
        "padding_free_drops_rows", "padding-free micro-batches lose the step's last row",
        "data/collate.py", "return lambda rows: [position_batch([row], pad, join=True) for row in rows]",
        "return lambda rows: [position_batch([row], pad, join=True) for row in rows[:-1] or rows]",
        ("tests/test_invariants.py::test_padding_free_equals_padded_batches",),
    ),
    Mutant(
        "fsdp_gather_skipped", "under FSDP the final save writes the weights as they were loaded, not gathered",
        "training/sharded.py", "    state = accelerator.get_state_dict(loss_model)\n",
        "    state = None\n",
        ("tests/test_fsdp2.py",),
    ),
    Mutant(
        "shard_row_numbers", "each tokenized chunk's documents lose their offset in the source (row numbers restart)",
        "data/build.py", "docs.index.append(chunk.kept + start)", "docs.index.append(chunk.kept)",
        ("tests/test_scale.py::test_shard_chunk_and_copy_sizes_and_processes_change_nothing",),
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
