"""Supervised worker processes: one socket per worker, one task per worker, every wait bounded.

The loading workers of a prediction run (`rsna_infer.runtime.streaming`) must survive what machines
do to processes: the OOM killer's SIGKILL, a decoder that segfaults, a read that hangs
forever (a SIGSTOPped process looks the same). `concurrent.futures.ProcessPoolExecutor`
does not: one dead worker breaks the pool, every pending future fails, and nobody knows
which task killed it. pebble and loky were evaluated (docs/predict.md, *What a run
survives*): their workers share one task pipe and one result pipe guarded by process-shared
locks, and a worker killed or stopped while it holds one (while it pickles and sends a
result: its moment of peak memory, where the OOM killer strikes) wedges every other worker.
Measured with pebble 5.2.3, two workers and 40 MB results: one SIGKILL during a send lost
10 of 12 tasks to timeouts, one SIGSTOP the same.

Here each worker owns a socketpair to the supervisor and holds at most one task, so:

- blame is exact: the future of the task a worker held is the one that fails;
- a worker that dies (any exit, any signal) fails its task with `WorkerDied` and a fresh
  worker takes its slot; nothing is shared, so the other workers never notice;
- every task has a timeout: a worker past it is SIGKILLed (which also ends a stopped
  process), its task fails with `WorkerTimeout`, and the slot restarts;
- a worker that never becomes ready (e.g. spawn under a script without an
  ``if __name__ == "__main__":`` guard) is a start failure; after `MAX_START_FAILURES`
  in a row with no worker ever ready, queued tasks fail with `PoolUnavailable`.

Threads in the calling process: one per slot (sends the task, blocks on the reply) and one
watchdog (kills workers past their deadline). Workers are forked where fork exists, spawned
elsewhere; on Linux each names itself after its task (``/proc/PID/comm``, e.g. ``rsna:4003253``),
so ``ps`` shows which study a stuck worker holds.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .results import recv_result, send_result

logger = logging.getLogger(__name__)

#: Seconds a new worker may take to import and initialise (spawn imports torch).
START_TIMEOUT_S = 120.0
#: Start failures in a row, with no worker ever ready, before the pool gives up.
MAX_START_FAILURES = 3
#: How often the watchdog looks at the deadlines (seconds).
WATCH_INTERVAL_S = 0.1


class WorkerError(RuntimeError):
    """A task did not come back from its worker."""


class WorkerDied(WorkerError):
    """The worker holding the task ended (killed, crashed, exited)."""

    def __init__(self, pid: int | None, exitcode: int | None) -> None:
        self.pid, self.exitcode = pid, exitcode
        super().__init__(f"worker {pid} {describe_exit(exitcode)}")


class WorkerTimeout(WorkerError):
    """The task ran past its timeout; its worker was killed."""

    def __init__(self, pid: int | None, seconds: float) -> None:
        self.pid, self.seconds = pid, seconds
        super().__init__(f"worker {pid} still busy after {seconds:.0f}s: killed")


class WorkerTaskError(WorkerError):
    """The task's function raised in the worker (the message is its ``Type: text``)."""


class PoolUnavailable(WorkerError):
    """No worker could be started; the task never ran."""


def describe_exit(exitcode: int | None) -> str:
    """``'was killed by SIGKILL'``, ``'exited with code 1'``..."""
    if exitcode is None:
        return "ended"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


@dataclass
class _Task:
    id: int
    args: tuple
    future: Future
    timeout: float | None
    label: str
    running: bool = False  # its future is marked running
    requeued: bool = False  # a worker ended before taking it once already


@dataclass
class _Slot:
    """One worker process, its socket, and what it is doing."""

    index: int
    proc: Any = None  # multiprocessing.process.BaseProcess
    conn: Connection | None = None
    task: _Task | None = None
    deadline: float | None = None  # monotonic; for the task, or for the start
    killed: str | None = None  # why the watchdog killed it ("timeout", "start", "close")
    lock: threading.Lock = field(default_factory=threading.Lock)


class WorkerPool:
    """``fn(*fn_args, *task_args)`` in ``n`` supervised worker processes.

    ``fn`` and ``fn_args`` reach each worker once, when it starts (inherited under fork,
    pickled under spawn); a task sends only its own ``args``, so a task message is small and
    sending it never blocks. ``initializer(*initargs)`` runs once per worker.
    """

    def __init__(
        self,
        n: int,
        fn: Callable[..., Any],
        fn_args: Sequence[Any] = (),
        *,
        initializer: Callable[..., Any] | None = None,
        initargs: Sequence[Any] = (),
        start_method: str | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
        name: str = "rsna",
    ) -> None:
        if n < 1:
            raise ValueError(f"a worker pool needs at least one worker, got {n}")
        methods = mp.get_all_start_methods()
        self.start_method = start_method or ("fork" if "fork" in methods else "spawn")
        self._ctx = mp.get_context(self.start_method)
        self._fn, self._fn_args = fn, tuple(fn_args)
        self._initializer, self._initargs = initializer, tuple(initargs)
        self._start_timeout = float(start_timeout_s)
        self._name = name
        self._queue: deque[_Task] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._broken: str | None = None
        self._ever_ready = False
        self._start_failures = 0  # in a row, reset when a worker becomes ready
        self._fork_lock = threading.Lock()  # one fork at a time: no child inherits another's socket
        self._ids = iter(range(1 << 62))
        self.started = 0  # worker processes started (the first n included)
        self.deaths = 0  # workers that ended while holding a task
        self.timeouts = 0  # workers killed for a task past its timeout
        self._slots = [_Slot(i) for i in range(int(n))]
        self._threads = [threading.Thread(target=self._serve_slot, args=(s,), name=f"{name}-slot-{s.index}", daemon=True)
                         for s in self._slots]
        self._watchdog = threading.Thread(target=self._watch, name=f"{name}-watchdog", daemon=True)
        self._watchdog.start()
        for t in self._threads:
            t.start()

    # -- the caller's side ---------------------------------------------------------------
    def submit(self, *args: Any, timeout: float | None = None, label: str = "", front: bool = False) -> Future:
        """Queue ``args`` for the next free worker; ``front`` puts it before the others.
        ``timeout``: seconds from the moment a worker takes it."""
        fut: Future = Future()
        task = _Task(next(self._ids), tuple(args), fut, None if timeout is None else float(timeout), label)
        with self._cond:
            if self._closed:
                raise RuntimeError("the worker pool is closed")
            if self._broken is not None:
                fut.set_exception(PoolUnavailable(self._broken))
                return fut
            (self._queue.appendleft if front else self._queue.append)(task)
            self._cond.notify()
        return fut

    def holding(self) -> dict[int, str]:
        """``{pid: label}`` of the workers that hold a task now."""
        out = {}
        for s in self._slots:
            with s.lock:
                if s.task is not None and s.proc is not None and s.proc.pid:
                    out[int(s.proc.pid)] = s.task.label
        return out

    def pids(self) -> list[int]:
        return [int(s.proc.pid) for s in self._slots if s.proc is not None and s.proc.pid]

    @property
    def broken(self) -> str | None:
        """Why no worker can be started (None while the pool works)."""
        return self._broken

    def close(self, timeout: float = 5.0) -> None:
        """Cancel queued tasks, stop idle workers, kill busy ones; return within ``timeout``."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for task in queued:
            task.future.cancel()
        for s in self._slots:
            with s.lock:
                if s.task is not None or s.deadline is not None:
                    s.killed = s.killed or "close"
                    _kill(s)
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        for s in self._slots:  # a thread that did not finish in time: make sure its worker is gone
            with s.lock:
                if s.proc is not None and s.proc.is_alive():
                    _kill(s)
            if s.proc is not None:
                s.proc.join(1.0)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- one slot: start a worker, feed it tasks one at a time, restart it when it ends ----
    def _serve_slot(self, slot: _Slot) -> None:
        while not self._closed:
            if not self._start(slot):
                if self._give_up_starting():
                    return
                time.sleep(min(2.0, 0.2 * self._start_failures))
                continue
            while not self._closed:
                task = self._next_task()
                if task is None:
                    break
                if not self._run(slot, task):
                    break  # the worker is gone: start a fresh one
            self._retire(slot)

    def _next_task(self) -> _Task | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            return self._queue.popleft()

    def _start(self, slot: _Slot) -> bool:
        """A fresh worker in ``slot``, ready for tasks (False: it could not start)."""
        with self._fork_lock:
            parent, child = self._ctx.Pipe(duplex=True)
            proc = self._ctx.Process(
                target=_worker_main, name=f"{self._name}-worker-{slot.index}", daemon=True,
                args=(child, self._fn, self._fn_args, self._initializer, self._initargs, os.getpid()),
            )
            try:
                proc.start()
            except Exception as e:  # fork refused (memory), spawn cannot pickle...
                parent.close()
                logger.error("cannot start a loading worker: %s: %s", type(e).__name__, e)
                return False
            finally:
                child.close()
        with self._cond:
            self.started += 1
        with slot.lock:
            slot.proc, slot.conn, slot.task, slot.killed = proc, parent, None, None
            slot.deadline = time.monotonic() + self._start_timeout
        try:
            msg = parent.recv()
        except (EOFError, OSError):
            msg = None
        with slot.lock:
            slot.deadline = None
        if not (isinstance(msg, tuple) and msg and msg[0] == "ready"):
            why = msg[1] if isinstance(msg, tuple) and len(msg) > 1 else None
            code = _reap(slot)
            if not self._closed:
                    logger.error("a loading worker failed to start (%s)%s", "no answer within %.0fs" % self._start_timeout
                             if slot.killed == "start" else describe_exit(code), f": {why}" if why else "")
            self._close_conn(slot)
            return False
        with self._cond:
            self._ever_ready = True
            self._start_failures = 0
        return True

    def _give_up_starting(self) -> bool:
        """Count a start failure; True when the pool is unusable (tasks fail over)."""
        with self._cond:
            if self._closed:
                return True
            self._start_failures += 1
            # before any worker was ready it is the start itself that fails (e.g. spawn without
            # a __main__ guard); after, give a machine short of memory more tries
            if self._start_failures < MAX_START_FAILURES * (3 if self._ever_ready else 1):
                return False
            self._broken = (f"{self._start_failures} loading worker(s) in a row failed to start under "
                            f"{self.start_method!r}")
            queued = list(self._queue)
            self._queue.clear()
        for task in queued:
            task.future.set_exception(PoolUnavailable(self._broken))
        return True

    def _run(self, slot: _Slot, task: _Task) -> bool:
        """One task on ``slot``'s worker; False when the worker is gone afterwards."""
        if not task.running and not task.future.set_running_or_notify_cancel():
            return True  # cancelled while queued
        task.running = True
        conn = slot.conn
        assert conn is not None
        with slot.lock:
            slot.task = task
            slot.deadline = None if task.timeout is None else time.monotonic() + task.timeout
        try:
            conn.send((task.id, task.label, task.args))
            taken = conn.recv() is not None  # ("start", id): the worker has it
        except (EOFError, OSError):
            taken = False
        except Exception as e:  # the arguments cannot be pickled; the worker is fine
            self._finish(slot)
            task.future.set_exception(WorkerTaskError(f"cannot send the task: {type(e).__name__}: {e}"))
            return True
        if not taken:  # the worker ended (or hung) before it took the task: not the task's fault
            if task.requeued or self._closed:
                return self._failed(slot, task)
            task.requeued = True
            self._finish(slot)
            _reap(slot)
            self._close_conn(slot)
            with self._cond:
                self._queue.appendleft(task)
                self._cond.notify()
            return False
        try:
            reply = recv_result(conn)
        except (EOFError, OSError):
            return self._failed(slot, task)
        except Exception as e:  # a reply that does not unpickle here
            reply = ("error", task.id, f"the result could not be read: {type(e).__name__}: {e}")
        self._finish(slot)
        kind, _, value = reply
        if kind == "ok":
            task.future.set_result(value)
        else:
            task.future.set_exception(WorkerTaskError(str(value)))
        return slot.killed is None  # a kill that raced the reply: the result stands, the worker does not

    def _failed(self, slot: _Slot, task: _Task) -> bool:
        """The worker holding ``task`` is gone: say why on the task's future."""
        code = _reap(slot)
        with slot.lock:
            killed, slot.task, slot.deadline = slot.killed, None, None
        if killed == "timeout":
            err: WorkerError = WorkerTimeout(_pid(slot), task.timeout or 0.0)
        else:
            err = WorkerDied(_pid(slot), code)
        with self._cond:
            self.timeouts += killed == "timeout"
            self.deaths += killed is None
        if killed != "close":
            logger.warning("loading worker %s holding %s: %s", _pid(slot), task.label or "a task", err)
        self._close_conn(slot)
        task.future.set_exception(err)
        return False

    def _finish(self, slot: _Slot) -> None:
        with slot.lock:
            slot.task, slot.deadline = None, None

    def _retire(self, slot: _Slot) -> None:
        """Stop the slot's worker politely, then firmly."""
        conn, proc = slot.conn, slot.proc
        if conn is not None and proc is not None and proc.is_alive():
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
            proc.join(1.0)
        with slot.lock:
            if proc is not None and proc.is_alive():
                _kill(slot)
        if proc is not None:
            proc.join(1.0)
        self._close_conn(slot)

    @staticmethod
    def _close_conn(slot: _Slot) -> None:
        with slot.lock:
            conn, slot.conn = slot.conn, None
        if conn is not None:
            conn.close()

    # -- the watchdog ------------------------------------------------------------------------
    def _watch(self) -> None:
        while True:
            with self._cond:
                if self._closed and not any(t.is_alive() for t in self._threads):
                    return
            now = time.monotonic()
            for s in self._slots:
                with s.lock:
                    if s.deadline is not None and now > s.deadline and s.killed is None:
                        s.killed = "timeout" if s.task is not None else "start"
                        _kill(s)
            time.sleep(WATCH_INTERVAL_S)


def _pid(slot: _Slot) -> int | None:
    return None if slot.proc is None else slot.proc.pid


def _kill(slot: _Slot) -> None:
    """SIGKILL the slot's worker (it ends a stopped process too) and wake its reader.
    Call with ``slot.lock`` held."""
    proc = slot.proc
    if proc is not None and proc.pid:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    conn = slot.conn
    if conn is not None:  # a reader blocked in recv() wakes with EOF whatever else holds the socket
        try:
            with socket.socket(fileno=os.dup(conn.fileno())) as s:
                s.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass


def _reap(slot: _Slot) -> int | None:
    proc = slot.proc
    if proc is None:
        return None
    proc.join(5.0)
    if proc.is_alive():
        with slot.lock:
            _kill(slot)
        proc.join(5.0)
    return proc.exitcode


# -- the worker process ----------------------------------------------------------------------


def _worker_main(conn: Connection, fn: Callable[..., Any], fn_args: tuple, initializer: Callable[..., Any] | None,
                 initargs: tuple, parent_pid: int) -> None:
    """Serve tasks from ``conn`` until told to stop, the socket closes or the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends us
    try:
        if initializer is not None:
            initializer(*initargs)
    except BaseException as e:
        conn.send(("init-error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", os.getpid()))
    set_process_name("rsna:idle")
    while True:
        try:
            while not conn.poll(1.0):
                if os.getppid() != parent_pid:  # orphaned: the main process died
                    return
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, label, args = msg
        conn.send(("start", task_id, None))
        set_process_name(label or "rsna:busy")
        try:
            reply = ("ok", task_id, fn(*fn_args, *args))
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
            reply = ("error", task_id, f"{type(e).__name__}: {e}")
        try:
            send_result(conn, reply)
        except (EOFError, OSError):
            return
        except Exception as e:  # the result does not pickle
            conn.send(("error", task_id, f"the result could not be sent: {type(e).__name__}: {e}"))
        del reply
        set_process_name("rsna:idle")


# -- process names ------------------------------------------------------------------------------


def named_children(pid: int) -> dict[int, str]:
    """``{pid: name}`` of the child processes of ``pid`` as ``ps`` shows them (Linux
    ``/proc``; empty elsewhere). Loading workers are named after the study they hold
    (``rsna:4003253``, ``rsna:idle``): what a person, or a test, sees from outside."""
    out: dict[int, str] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return out
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            name = (d / "comm").read_text().strip()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the parenthesised name
            out[int(d.name)] = name
    return out


_PR_SET_NAME = 15
_libc: Any = None


def set_process_name(name: str) -> None:
    """This process's name in ``ps`` / ``/proc/PID/comm`` (Linux; at most 15 bytes)."""
    global _libc
    try:
        if _libc is None:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        _libc = False
