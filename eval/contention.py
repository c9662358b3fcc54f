"""Was this machine ours while we timed? The CPU time other processes took, and the time the hypervisor stole,
on the cores this process may run on, sampled around every timed run.

Why it is needed: a decode benchmark on a shared machine (a CI runner, a laptop, a 2-core VM) measures whatever the
machine had left at that moment. A row timed while another job held a core reads half the speed, and a ratio of two
rows timed minutes apart is then the ratio of two machine states, not of two checkpoints. The load average cannot
say which rows were hit (it lags by a minute and counts this process too), so each timed run is bracketed by two
reads of the kernel's own accounting:

- `/proc/stat`, per core: jiffies spent busy (user, nice, system, irq, softirq) and stolen (steal: the hypervisor
  ran another guest on our virtual CPU), summed over the cores in this process's affinity set;
- `/proc/self/stat`: this process's own user + system jiffies (all its threads), from the same tick accounting.

Busy minus our own is what other processes used. As a share of the window's capacity (seconds x cores) it is
near 0 on a quiet machine (about 0.5% measured on the 2-core VM this was written on) and 0.5-1.0 with one CPU-bound
process beside us. A run whose others' share or steal share exceeds the threshold (10% by default) is *contended*:
the callers (eval/throughput.timed_runs, eval/interleaved.interleave) time it again, a bounded number of times,
and flag the row if the machine never became quiet.

Jiffies are 10 ms ticks, so a window much shorter than ~0.2 s is too coarse to judge one way or the other; the
benchmark's runs are longer than that for any real model.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

THRESHOLD = 0.10  # share of the cores' capacity used by others (or stolen) above which a run is contended
_BUSY_FIELDS = (0, 1, 2, 5, 6)  # user nice system idle iowait irq softirq steal: indices of the busy ones
_STEAL_FIELD = 7


@dataclass(frozen=True)
class Snapshot:
    """The counters at one instant: wall clock (s), busy and steal jiffies of our cores, our own jiffies."""

    wall_s: float
    busy: int
    steal: int
    own: int
    cores: int


def _cores() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _jiffies(pid: int | str = "self") -> int:
    """utime + stime of one process (every thread), in clock ticks, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2:].split()  # the command name may contain spaces: split after it
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), counted from the state field (3)


def _own_jiffies(pids: tuple[int, ...] = ()) -> int:
    """This process's jiffies plus those of `pids` (a server that works for us, e.g. vLLM's process tree); a pid
    that has gone counts 0."""
    total = _jiffies()
    for pid in pids:
        try:
            total += _jiffies(pid)
        except (OSError, ValueError, IndexError):
            pass
    return total


def snapshot(pids: tuple[int, ...] = ()) -> Snapshot | None:
    """The counters now; None where /proc is not Linux's (then nothing is judged, and the result says so).
    `pids`: other processes whose CPU time is ours (the engine server we are timing), not contention."""
    cores = _cores()
    busy = steal = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                if not (line.startswith("cpu") and line[3].isdigit()):
                    continue
                name, *values = line.split()
                if int(name[3:]) in cores:
                    nums = [int(v) for v in values]
                    busy += sum(nums[i] for i in _BUSY_FIELDS if i < len(nums))
                    steal += nums[_STEAL_FIELD] if len(nums) > _STEAL_FIELD else 0
        own = _own_jiffies(tuple(pids))
    except (OSError, ValueError, IndexError):
        return None
    return Snapshot(time.perf_counter(), busy, steal, own, len(cores))


def between(before: Snapshot | None, after: Snapshot | None, threshold: float = THRESHOLD) -> dict:
    """What other processes and the hypervisor took between two snapshots, as shares of the cores' capacity over
    that window, and whether that makes the window contended."""
    if before is None or after is None:
        return {"others_cpu_share": None, "steal_share": None, "contended": False, "judged": False}
    hz = os.sysconf("SC_CLK_TCK")
    capacity = max(after.wall_s - before.wall_s, 1e-9) * hz * before.cores
    others = max(0, (after.busy - before.busy) - (after.own - before.own)) / capacity
    steal = max(0, after.steal - before.steal) / capacity
    return {"others_cpu_share": round(others, 4), "steal_share": round(steal, 4),
            "contended": others > threshold or steal > threshold, "judged": True}


def timed(fn, threshold: float = THRESHOLD, pids=None):
    """`fn()` with the contention of its window: (fn's result, between(...)). `pids`: a callable giving the
    processes that work for us in that window (read before it, so that both snapshots count the same ones)."""
    own = tuple(pids()) if pids else ()
    before = snapshot(own)
    out = fn()
    return out, between(before, snapshot(own), threshold)


def summary(samples: list[dict], used: list[dict], *, retries: int, threshold: float) -> dict:
    """A row's contention block: how many of its timed windows were contended, the worst shares seen, whether the
    figures it reports came from contended windows (`contended`), and the rule that judged them."""
    def worst(key: str, among: list[dict]) -> float | None:
        vals = [s[key] for s in among if s.get(key) is not None]
        return max(vals) if vals else None

    return {"contended": any(s["contended"] for s in used),
            "windows": len(samples), "windows_contended": sum(s["contended"] for s in samples),
            "retries": retries, "max_others_cpu_share": worst("others_cpu_share", samples),
            "max_steal_share": worst("steal_share", samples),
            "used_max_others_cpu_share": worst("others_cpu_share", used),
            "judged": all(s.get("judged", True) for s in samples),
            "rule": (f"a timed window is contended when other processes used, or the hypervisor stole, more than "
                     f"{threshold:.0%} of the CPU time of this process's cores (/proc/stat); contended windows are "
                     f"timed again, at most {retries} times")}
