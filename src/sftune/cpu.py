"""How many CPU threads torch computes with, and whether other work on the machine competes for those cores.

torch starts as many threads as the machine has cores. When another job keeps some of them busy, its threads wait
for one another at every operation: on a shared 2-core machine a training step took 7-9x longer with 2 threads
than with 1 (bench/threads.py measures it). So sftune chooses the count itself, says which and why, and says
once when the machine's load shows other work on the cores it uses.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sftune.config import SFTConfig

log = logging.getLogger("sftune")

PROC_STAT = Path("/proc/stat")
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


# ---------------------------------------------------------------- the cores this process may use


def process_memory_kb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS now, VmHWM its peak), in KiB. The peak is
    read there, not from `ru_maxrss`, which survives fork and exec: a process started by a large parent (a
    notebook, a test runner) would report the parent's size as its own. Without /proc: ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def affinity_cores() -> set[int]:
    """The CPUs this process may run on (its affinity mask: taskset, cpuset, a container's --cpuset-cpus)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs' worth of time the cgroup quota allows (a container's --cpus, a Kubernetes CPU limit); None: no quota.

    Reads cgroup v2 `cpu.max` and v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`, for this process's cgroup and
    every cgroup above it (the smallest quota wins), and at the mount's root (where a container sees its own).
    """
    folders: list[Path] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "/")
        mounts = [root, root / "unified"] if controllers == "" else \
            [root / name for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu")] if "cpu" in controllers.split(",") else []
        for mount in mounts:
            relative = Path(path.lstrip("/"))
            folders += [mount / relative] + [mount / parent for parent in relative.parents]
    folders += [root, root / "cpu", root / "cpu,cpuacct"]
    limits = [limit for folder in dict.fromkeys(folders) if (limit := _quota_in(folder)) is not None]
    return min(limits) if limits else None


def _quota_in(folder: Path) -> float | None:
    try:
        if (folder / "cpu.max").is_file():  # cgroup v2: "max 100000" or "<quota> <period>"
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if (folder / "cpu.cfs_quota_us").is_file():  # cgroup v1: quota -1 means none
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        pass
    return None


def usable_cores(affinity: set[int] | None = None, quota: float | None = -1.0) -> tuple[int, str]:
    """(cores, how they were found): the affinity mask, capped by the cgroup quota (rounded up, at least 1)."""
    affinity = affinity_cores() if affinity is None else affinity
    quota = cgroup_cpu_limit() if quota == -1.0 else quota
    cores, how = len(affinity), f"{len(affinity)} in its CPU affinity mask"
    if quota is not None and math.ceil(quota) < cores:
        cores, how = max(1, math.ceil(quota)), f"{how}, capped by a cgroup CPU quota of {quota:g}"
    elif quota is not None:
        how += f", within a cgroup CPU quota of {quota:g}"
    else:
        how += ", no cgroup CPU quota"
    return cores, how


def choose_threads(config: SFTConfig) -> tuple[int, str]:
    """(threads, why): num_threads when set, else OMP_NUM_THREADS when set, else the usable cores shared among the
    processes of this machine (a data-parallel launch on CPU runs several)."""
    if config.num_threads is not None:
        return config.num_threads, "num_threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env), f"OMP_NUM_THREADS={env}"
    cores, how = usable_cores()
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if local_processes > 1:
        return max(1, cores // local_processes), f"the cores this process may use ({how}) shared by " \
            f"{local_processes} processes"
    return cores, f"the cores this process may use: {how}"


def use_threads(config: SFTConfig) -> tuple[int, str]:
    """Set torch's thread count for this process as `choose_threads` says: (threads, why)."""
    import torch

    threads, why = choose_threads(config)
    torch.set_num_threads(threads)
    return threads, why


# ---------------------------------------------------------------- other work on those cores


@dataclass
class CpuSample:
    """Busy time of the affinity cores (all processes) and this process's own CPU time, at one moment."""

    wall: float
    busy: float  # seconds, summed over the cores
    own: float  # seconds, this process with its threads and finished children


def cpu_sample(cores: set[int], stat: Path = PROC_STAT) -> CpuSample | None:
    """None where /proc/stat cannot be read (not Linux)."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = 0.0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cores:
            continue
        values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        busy += (sum(values) - values[3] - values[4]) / tick
    own = os.times()
    return CpuSample(time.monotonic(), busy, own.user + own.system + own.children_user + own.children_system)


class CompetitionCheck:
    """Started when a run starts, read just before training: the cores' busy time minus this process's own, over
    the seconds in between (loading and preparing), is the other work on those cores. No waiting, no extra load."""

    def __init__(self, cores: set[int] | None = None, stat: Path = PROC_STAT):
        self.cores, self.stat = affinity_cores() if cores is None else cores, stat
        self.start = cpu_sample(self.cores, stat)

    def other_work(self) -> float | None:
        """Cores' worth of other processes' work since the start; None when it cannot be told (too short, no data)."""
        end = cpu_sample(self.cores, self.stat)
        if self.start is None or end is None or end.wall - self.start.wall < 0.3:
            return None
        others = (end.busy - self.start.busy) - (end.own - self.start.own)
        return max(0.0, others / (end.wall - self.start.wall))

    def report(self, threads: int, why: str, computing_on_cpu: bool = True) -> None:
        """The thread count and why, and (when the model computes on the CPU) one more line if other work leaves
        fewer idle cores than this run has threads, with what to do."""
        log.info("cpu threads: %d (%s)", threads, why)
        others = self.other_work() if computing_on_cpu else None
        if others is None:
            return
        idle = len(self.cores) - others
        suggested = max(1, math.floor(idle + 0.5))
        if threads > idle + 0.5 and suggested < threads:
            log.warning(
                "cpu: other work kept about %.1f of the %d cores busy while this run started, so %d threads will "
                "wait on each other (often several times slower): set num_threads: %d (or OMP_NUM_THREADS=%d)",
                others, len(self.cores), threads, suggested, suggested,
            )
