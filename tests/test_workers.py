"""The supervised worker pool, hurt from outside the way a machine hurts processes: SIGKILL
(the OOM killer), SIGSTOP (a hung read), a worker that cannot start; under fork and spawn.
Only the task a hurt worker held may fail, and every wait ends."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from rsna_infer.runtime.workers import PoolUnavailable, WorkerDied, WorkerPool, WorkerTaskError, WorkerTimeout, describe_exit

METHODS = ["fork", "spawn"] if sys.platform.startswith("linux") else ["spawn"]


def work(i: int, slow_on: int = -1, slow_s: float = 0.0) -> tuple[int, int]:
    """A task: returns its number and the worker's pid; task ``slow_on`` takes ``slow_s``."""
    if i == slow_on:
        time.sleep(slow_s)
    return i, os.getpid()


def fail(i: int) -> None:
    raise ValueError(f"bad input {i}")


def broken_init() -> None:
    raise RuntimeError("this worker cannot start")


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _pid_holding(pool: WorkerPool, label: str, timeout: float = 60.0) -> int:
    """The pid of the worker busy with ``label``, seen from outside (``/proc/PID/comm``)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for pid, held in pool.holding().items():
            if held == label and (not sys.platform.startswith("linux") or _comm(pid) == label):
                return pid
        time.sleep(0.01)
    raise AssertionError(f"no worker took {label} within {timeout}s")


def _results(futures, timeout: float = 60.0) -> list:
    out = []
    for f in futures:
        try:
            out.append(f.result(timeout=timeout)[0])
        except Exception as e:  # noqa: BLE001 - the test looks at which one failed and how
            out.append(e)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_results_in_any_order_of_completion_and_workers_reused(method):
    with WorkerPool(2, work, start_method=method) as pool:
        futures = [pool.submit(i, timeout=60, label=f"rsna:{i}") for i in range(8)]
        got = [f.result(timeout=60) for f in futures]
    assert [i for i, _ in got] == list(range(8))
    assert len({pid for _, pid in got}) <= 2 and pool.started == 2


@pytest.mark.parametrize("method", METHODS)
def test_sigkill_fails_only_the_task_the_worker_held(method):
    with WorkerPool(2, work, (), start_method=method) as pool:
        futures = [pool.submit(i, 3, 3.0, timeout=60, label=f"rsna:{i}") for i in range(10)]
        victim = _pid_holding(pool, "rsna:3")
        os.kill(victim, signal.SIGKILL)
        got = _results(futures)
    assert isinstance(got[3], WorkerDied) and got[3].pid == victim and got[3].exitcode == -signal.SIGKILL
    assert "killed by SIGKILL" in str(got[3])
    assert [g for k, g in enumerate(got) if k != 3] == [k for k in range(10) if k != 3]
    assert pool.deaths == 1 and pool.started == 3  # the slot got a fresh worker


@pytest.mark.parametrize("method", METHODS)
def test_sigstop_is_ended_by_the_task_timeout(method):
    with WorkerPool(2, work, start_method=method) as pool:
        futures = [pool.submit(i, 2, 30.0 if i == 2 else 0.0, timeout=3.0 if i == 2 else 60, label=f"rsna:{i}")
                   for i in range(8)]
        victim = _pid_holding(pool, "rsna:2")
        os.kill(victim, signal.SIGSTOP)
        t0 = time.monotonic()
        got = _results(futures)
        waited = time.monotonic() - t0
    assert isinstance(got[2], WorkerTimeout) and got[2].pid == victim
    assert [g for k, g in enumerate(got) if k != 2] == [k for k in range(8) if k != 2]
    assert waited < 45  # 3 s timeout; generous for a loaded machine, far below the 30 s sleep + a hang
    assert pool.timeouts == 1
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)  # the stopped process is gone, not left behind


def test_a_task_that_raises_keeps_its_worker():
    with WorkerPool(1, fail) as pool:
        f = pool.submit(7, timeout=30)
        with pytest.raises(WorkerTaskError, match="ValueError: bad input 7"):
            f.result(timeout=30)
        assert pool.started == 1


@pytest.mark.parametrize("method", METHODS)
def test_workers_that_cannot_start_make_the_pool_unavailable(method):
    with WorkerPool(2, work, initializer=broken_init, start_method=method) as pool:
        f = pool.submit(1, timeout=30)
        with pytest.raises(PoolUnavailable, match="failed to start"):
            f.result(timeout=120)
        assert pool.broken
        with pytest.raises(PoolUnavailable):
            pool.submit(2).result(timeout=5)


def test_close_ends_busy_and_stopped_workers_promptly():
    pool = WorkerPool(2, work)
    futures = [pool.submit(i, i, 60.0, timeout=600) for i in range(2)]
    end = time.monotonic() + 60
    while len(pool.holding()) < 2 and time.monotonic() < end:
        time.sleep(0.01)
    pids = pool.pids()
    os.kill(pids[0], signal.SIGSTOP)
    t0 = time.monotonic()
    pool.close()
    assert time.monotonic() - t0 < 30
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert all(f.done() for f in futures)


def test_describe_exit():
    assert describe_exit(-9) == "was killed by SIGKILL" and describe_exit(1) == "exited with code 1"


def arrays(n: int) -> dict:
    """A task whose result holds large arrays (a decoded study) and small ones."""
    import numpy as np

    return {"stack": np.arange(n * 64 * 64, dtype=np.float32).reshape(n, 64, 64), "small": np.arange(3),
            "more": [np.full((n, 64, 64), 7, np.int16)], "pid": os.getpid()}


@pytest.mark.parametrize("method", METHODS)
def test_large_arrays_come_back_through_shared_memory_equal_and_writable(method, monkeypatch):
    import numpy as np

    import rsna_infer.runtime.workers as workers

    for shared in (True, False):
        if not shared:  # where memfd is missing the result goes through the socket
            monkeypatch.delattr(workers.os, "memfd_create", raising=False)
        with WorkerPool(1, arrays, start_method=method) as pool:
            got = pool.submit(40, timeout=30).result(timeout=60)
        want = arrays(40)
        np.testing.assert_array_equal(got["stack"], want["stack"])
        np.testing.assert_array_equal(got["more"][0], want["more"][0])
        assert list(got["small"]) == [0, 1, 2] and got["pid"] != os.getpid()
        got["stack"][0, 0, 0] = -1.0  # the caller owns the arrays
