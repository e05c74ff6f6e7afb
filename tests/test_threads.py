"""The thread policy: explicit choices win; otherwise the cores no other process is busy on."""

from __future__ import annotations

import pytest

from toolkit.errors import ToolkitError
from toolkit.threads import (
    apply_thread_policy,
    choose_threads,
    requested_threads,
    runnable_in,
)


@pytest.mark.parametrize(
    "cores, others, expected",
    [(2, 0, 2), (2, 1, 1), (2, 7, 1), (8, 3, 5), (1, 0, 1)],
)
def test_threads_are_the_cores_left_over_and_at_least_one(cores, others, expected):
    assert choose_threads(cores, others) == expected


def test_runnable_count_is_read_from_proc_loadavg_format():
    assert runnable_in("0.52 0.60 0.61 3/456 7890\n") == 3


def _others_running() -> int:
    """Threads of other processes in state R, counted from each one's /proc stat (another
    route than /proc/loadavg)."""
    import os
    from pathlib import Path

    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                stat = (task / "stat").read_text()
                count += stat[stat.rindex(")") + 2] == "R"
        except OSError:  # the process or thread ended meanwhile
            continue
    return count


def test_the_load_sample_leaves_out_this_process_own_busy_threads():
    """A thread of this process busy in numpy (the GIL released, so it stays runnable) is not
    another process's: the CLI counted OpenBLAS's spinning workers so and gave torch 1 thread
    of 2 on an idle machine."""
    import statistics
    import threading

    import numpy as np

    from toolkit.threads import other_runnable, own_runnable

    stop = threading.Event()

    def busy():
        block = np.random.default_rng(0).random(2_000_000)
        while not stop.is_set():
            np.sort(block)  # ~0.1 s without the GIL

    helper = threading.Thread(target=busy)
    helper.start()
    try:
        before = [_others_running() for _ in range(5)]
        counted = other_runnable()
        after = [_others_running() for _ in range(5)]
        busy_here = max(own_runnable() for _ in range(5))
    finally:
        stop.set()
        helper.join()
    assert busy_here >= 2  # the helper is seen running beside the asking thread
    # the other processes' count, sampled around it (0 on a quiet machine, where the helper
    # made it 1 before)
    assert counted <= statistics.median_high(before + after)


def test_without_proc_or_cpu_affinity_every_core_is_used(monkeypatch):
    """macOS has neither /proc nor os.sched_getaffinity: the policy takes every core there
    instead of stopping every torch command with a traceback."""
    import os
    from pathlib import Path

    from toolkit import threads

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    real_is_file = Path.is_file
    monkeypatch.setattr(
        Path, "is_file", lambda path: False if str(path).startswith("/proc") else real_is_file(path)
    )
    assert threads.usable_cores() == os.cpu_count()
    assert threads.other_runnable() == 0
    assert threads.choose_threads(threads.usable_cores(), threads.other_runnable()) == (
        os.cpu_count()
    )


@pytest.fixture
def clean_env(monkeypatch):
    for name in (
        "TOOLKIT_THREADS",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OMP_WAIT_POLICY",
        "TOOLKIT_THREADS_AUTOMATIC",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_option_beats_toolkit_threads_beats_omp_num_threads(clean_env):
    assert requested_threads() is None
    clean_env.setenv("OMP_NUM_THREADS", "3")
    assert requested_threads() == 3
    clean_env.setenv("TOOLKIT_THREADS", "2")
    assert requested_threads() == 2
    assert requested_threads(5) == 5


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_thread_count_is_a_clear_error(clean_env, value):
    clean_env.setenv("TOOLKIT_THREADS", value)
    with pytest.raises(ToolkitError, match="TOOLKIT_THREADS"):
        requested_threads()


def test_layer_workers_are_the_threads_asked_for_else_every_usable_core(clean_env):
    import os

    from toolkit.threads import worker_count

    usable = len(os.sched_getaffinity(0))
    assert worker_count(64) == usable
    assert worker_count(1) == 1
    clean_env.setenv("OMP_NUM_THREADS", "3")
    assert worker_count(64) == 3
    clean_env.setenv("TOOLKIT_THREADS_AUTOMATIC", "1")  # the policy chose 3, not the user
    assert worker_count(64) == usable


def test_policy_sets_torch_threads_and_passive_waiting(clean_env):
    import os

    import torch

    before = torch.get_num_threads()
    try:
        assert apply_thread_policy(1) == 1
        assert torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == "1"
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    finally:
        torch.set_num_threads(before)


def test_automatic_choice_is_within_the_usable_cores(clean_env):
    import os

    import torch

    before = torch.get_num_threads()
    try:
        threads = apply_thread_policy()
        assert 1 <= threads <= len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
