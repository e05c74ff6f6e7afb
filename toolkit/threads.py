"""How many CPU threads torch may use: a choice that holds up when other processes share the cores.

torch splits each large operation across a pool of OpenMP threads and waits for the slowest one at
the end. When another process holds one of those cores, every operation waits for the thread that
shares it: with 2 threads on 2 cores, one of them busy, runs took 3-5x their quiet time (issue 14;
bench/busy.py measures it), where 1 thread would lose at most half a core. The policy:
as many threads as there are cores that nothing else is running on, at least 1; waiting threads
sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE), so they do not steal the core they wait for.

An explicit choice always wins: `--threads N`, else TOOLKIT_THREADS, else OMP_NUM_THREADS.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

from toolkit.errors import ToolkitError

ENV = "TOOLKIT_THREADS"
AUTOMATIC = "TOOLKIT_THREADS_AUTOMATIC"  # set when the policy, not the user, chose the count


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow);
    where the platform has no affinity call (macOS), every core."""
    if not hasattr(os, "sched_getaffinity"):
        return os.cpu_count() or 1
    return len(os.sched_getaffinity(0))


def other_runnable(samples: int = 5, interval: float = 0.01) -> int:
    """How many threads of other processes want a core now: the median of a few instants.

    The kernel's count of runnable threads (/proc/loadavg), less this process's own: not only
    the thread asking but any other it runs (numpy's OpenBLAS workers spin for a while after
    numpy's import, so the CLI counted one of its own threads as another process's and gave
    torch 1 thread of 2 on an idle machine). Not the load average: it lags a new job by a
    minute and still counts a job that ended, such as this user's previous command.
    """
    loadavg = Path("/proc/loadavg")
    if not loadavg.is_file():  # no /proc (macOS): nothing to read the load from, assume none
        return 0
    counts = []
    for index in range(samples):
        if index:
            time.sleep(interval)
        everyone = runnable_in(loadavg.read_text())
        counts.append(everyone - own_runnable())
    return max(0, statistics.median_low(counts))


def own_runnable() -> int:
    """This process's threads running or waiting for a core now (state R in
    /proc/self/task/*/stat), at least 1: the thread asking."""
    running = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        running += stat[stat.rindex(")") + 2] == "R"  # the state follows the (name)
    return max(1, running)


def runnable_in(loadavg: str) -> int:
    """The runnable-thread count in a /proc/loadavg line ('0.52 0.60 0.61 3/456 789' -> 3)."""
    return int(loadavg.split()[3].split("/")[0])


def choose_threads(cores: int, others: int) -> int:
    """The cores left when `others` runnable threads take one each, at least 1."""
    return max(1, min(cores, cores - others))


def requested_threads(option: int | None = None) -> int | None:
    """The thread count the user asked for (option, then environment), or None for automatic."""
    if option is not None:
        return _checked(option, "--threads")
    for name in (ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return _checked(int(value), name)
            except ValueError:
                raise ToolkitError(
                    f"{name}={value!r} is not a number of threads: set a whole number, e.g. 1"
                ) from None
    return None


def apply_thread_policy(option: int | None = None) -> int:
    """Set torch's thread pools (and the OpenMP settings torch reads) and return the count.

    Call it before torch is imported: the OpenMP runtime reads its settings once, when it starts
    (with torch already imported, only the intra-op thread count can still change). torch's
    inter-op pool is left alone: it starts threads only for work the toolkit does not run.
    """
    threads = requested_threads(option)
    if threads is None:
        threads = choose_threads(usable_cores(), other_runnable())
        os.environ[AUTOMATIC] = "1"
    else:
        os.environ.pop(AUTOMATIC, None)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by torch and MKL when they load
    os.environ.setdefault("MKL_NUM_THREADS", str(threads))
    if "torch" in sys.modules:  # already loaded (a script that imported it first): resize
        import torch

        torch.set_num_threads(threads)
    return threads


def worker_count(limit: int) -> int:
    """How many one-thread workers a job of independent pieces (compare's layers) may run, at
    most `limit`: the thread count the user asked for, else every usable core. The policy above
    guards multi-threaded operations, whose barriers wait for a busy core; one-thread workers
    share no barrier, so another process on a core slows only the worker there, and a count
    sampled at start-up would hold for the whole job."""
    asked = None if os.environ.get(AUTOMATIC) else requested_threads()
    return max(1, min(limit, asked or usable_cores()))


def _checked(threads: int, where: str) -> int:
    if threads < 1:
        raise ToolkitError(f"{where} must be at least 1, not {threads}")
    return threads
