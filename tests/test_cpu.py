"""CPU threads: the count comes from num_threads, OMP_NUM_THREADS, or the cores this process may use (affinity
mask and cgroup quota, not the machine's core count); it is logged, and other work on those cores is reported once
with what to do. bench/threads.py measures why it matters."""

from __future__ import annotations

import logging
import os
import re
import time

import pytest
import torch
from conftest import conversations, write_jsonl

from sftune import SFTConfig, train
from sftune.cpu import CompetitionCheck, cgroup_cpu_limit, choose_threads, usable_cores


def fake_cgroups(tmp_path, version: int, quota: str, nested: str | None = None):
    """A /proc/self/cgroup and a /sys/fs/cgroup tree with a CPU quota (and optionally a looser one below it)."""
    root = tmp_path / "cgroup"
    tmp_path.mkdir(parents=True, exist_ok=True)
    if version == 2:
        (tmp_path / "self-cgroup").write_text("0::/jobs/mine\n")
        (root / "jobs").mkdir(parents=True)
        (root / "jobs" / "cpu.max").write_text(quota)
        (root / "jobs" / "mine").mkdir()
        (root / "jobs" / "mine" / "cpu.max").write_text(nested or "max 100000\n")
    else:
        (tmp_path / "self-cgroup").write_text("4:memory:/x\n3:cpu,cpuacct:/jobs/mine\n")
        folder = root / "cpu,cpuacct" / "jobs" / "mine"
        folder.mkdir(parents=True)
        (folder / "cpu.cfs_quota_us").write_text(quota)
        (folder / "cpu.cfs_period_us").write_text("100000\n")
    return root, tmp_path / "self-cgroup"


def test_cgroup_quotas_v1_and_v2(tmp_path):
    root, proc = fake_cgroups(tmp_path / "v2", 2, "150000 100000\n")
    assert cgroup_cpu_limit(root, proc) == 1.5  # a parent's quota binds its children
    root, proc = fake_cgroups(tmp_path / "v2b", 2, "max 100000\n", nested="300000 100000\n")
    assert cgroup_cpu_limit(root, proc) == 3.0
    root, proc = fake_cgroups(tmp_path / "v1", 1, "200000\n")
    assert cgroup_cpu_limit(root, proc) == 2.0
    root, proc = fake_cgroups(tmp_path / "none", 1, "-1\n")
    assert cgroup_cpu_limit(root, proc) is None


def test_usable_cores_are_the_affinity_mask_capped_by_the_quota():
    assert usable_cores({0, 1, 2, 3, 4, 5, 6, 7}, 2.5) == (3, "8 in its CPU affinity mask, capped by a cgroup CPU "
                                                                "quota of 2.5")
    assert usable_cores({2, 3}, None) == (2, "2 in its CPU affinity mask, no cgroup CPU quota")
    assert usable_cores({0, 1}, 0.2)[0] == 1
    assert usable_cores()[0] == len(os.sched_getaffinity(0)) or cgroup_cpu_limit() is not None


def test_thread_choice_num_threads_then_omp_then_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(SFTConfig(num_threads=5)) == (5, "num_threads")
    assert choose_threads(SFTConfig()) == (3, "OMP_NUM_THREADS=3")
    monkeypatch.delenv("OMP_NUM_THREADS")
    threads, why = choose_threads(SFTConfig())
    assert threads == usable_cores()[0] and why.startswith("the cores this process may use: ")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two data-parallel processes on this machine share the cores
    assert choose_threads(SFTConfig())[0] == max(1, usable_cores()[0] // 2)


@pytest.fixture
def sftune_log():
    """The messages sftune logs during a test (its logger does not propagate to pytest's caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("sftune")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def fake_stat(path, busy_ticks: list[int], idle_ticks: int = 1000) -> None:
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    lines += [f"cpu{i} {busy} 0 0 {idle_ticks} 0 0 0 0 0 0" for i, busy in enumerate(busy_ticks)]
    path.write_text("\n".join(lines) + "\nintr 1\n")


def test_other_work_on_our_cores_is_reported_once_with_the_suggestion(tmp_path, sftune_log):
    tick = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    fake_stat(stat, [0, 0, 0])
    check = CompetitionCheck(cores={0, 1}, stat=stat)
    time.sleep(0.5)
    seconds = 0.5
    fake_stat(stat, [int(seconds * tick), int(0.9 * seconds * tick), int(seconds * tick)])  # cpu2 is not ours
    check.report(2, "the cores")
    check.report(1, "num_threads")  # one thread fits on the idle core: nothing to say
    warnings = [r.getMessage() for r in sftune_log if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert [r.getMessage() for r in sftune_log][0] == "cpu threads: 2 (the cores)"
    assert re.search(r"other work kept about 1\.[5-9] of the 2 cores busy", warnings[0]), warnings[0]
    assert "set num_threads: 1 (or OMP_NUM_THREADS=1)" in warnings[0]


def test_a_quiet_machine_gets_no_warning(tmp_path, sftune_log):
    stat = tmp_path / "stat"
    fake_stat(stat, [0, 0])
    check = CompetitionCheck(cores={0, 1}, stat=stat)
    time.sleep(0.4)
    check.report(2, "the cores")
    assert not [r for r in sftune_log if r.levelno == logging.WARNING]


def test_a_run_logs_and_uses_its_thread_count(tiny_model_dir, tmp_path, sftune_log, monkeypatch):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(8))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # num_threads wins over it
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train(SFTConfig(model_name_or_path=str(tiny_model_dir), dataset_name=str(data),
                        output_dir=str(tmp_path / "o"), max_steps=1, save_strategy="no", num_threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    lines = [r.getMessage() for r in sftune_log]
    assert lines.count("cpu threads: 1 (num_threads)") == 1


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_num_threads_must_be_a_positive_count(value):
    from sftune.errors import ConfigError

    with pytest.raises(ConfigError, match="num_threads"):
        SFTConfig.from_dict({"num_threads": value})


def test_peak_memory_is_the_processs_own_not_its_large_parents():
    """ru_maxrss survives fork and exec: a run started by a large parent (a notebook, pytest late in the suite)
    reported the parent's size as its peak_memory_mb."""
    import subprocess
    import sys

    child = ("import resource; from sftune.training.report import peak_memory_mb; "
             "print(peak_memory_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    big = bytearray(1_200_000_000)
    big[::4096] = b"\x01" * len(big[::4096])  # touched: resident
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout.split()
    del big
    own, inherited = map(float, out)
    assert inherited > 1100  # the trap is real here
    assert own < inherited - 500
