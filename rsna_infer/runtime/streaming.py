"""Read and preprocess studies ahead of the models, in bounded chunks.

The producer side of the predictor: for each study, decode every DICOM once (`load_study`)
and run the preprocessing of the families that need no keypoints (stage-1 ``prepare``).
With ``num_workers > 0`` this happens in supervised worker *processes*
(`rsna_infer.runtime.workers.WorkerPool`, one torch thread each) while the main process runs the
models on the previous chunk; with ``num_workers = 0`` it runs in the calling process.
Workers are forked on Linux, as torch's DataLoader does (they start instantly, inherit the
registered families and never touch CUDA), and spawned where fork does not exist.

What a machine does to workers, and what the stream does about it (`StudyStream._settle` is
the one place that decides):

- a worker dies holding a study (OOM killer, segfault): that study is tried once more in a
  fresh worker (an OOM kill may have been another process's fault); a study that kills
  `MAX_ATTEMPTS` workers gets prior rows. The other studies are not affected.
- a worker hangs (a stuck read, SIGSTOP): past the per-study watchdog it is killed and its
  study gets prior rows (a hang is not retried: it would cost another watchdog period).
- no worker can start (spawn under a script without an ``if __name__ == "__main__":``
  guard): loading moves in-process, except for a study that already killed or hung a
  worker, which never runs in the main process (it could take the whole run down with it).

Every wait is bounded: by the watchdog, and by the caller's deadline in `StudyStream.take`.
At most ``prefetch`` studies are in flight, so memory is bounded by the chunk size and the
read-ahead (`default_read_ahead`), not by the size of the test set. Results come back in input order, so the chunks, and therefore
every batch, are the same whatever the number of workers.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .workers import PoolUnavailable, WorkerDied, WorkerPool, WorkerTimeout

if TYPE_CHECKING:
    from ..io.discovery import StudyRef
    from ..io.volume import Study
    from ..models.family import Family, Sample

logger = logging.getLogger(__name__)

#: Per-study watchdog without a time budget: reading one study takes seconds; ten minutes is a hang.
DEFAULT_STUDY_TIMEOUT_S = 600.0
#: The watchdog never goes below this, whatever the budget.
MIN_STUDY_TIMEOUT_S = 5.0


def study_timeout_for(time_budget_s: float | None) -> float:
    """The per-study watchdog: `DEFAULT_STUDY_TIMEOUT_S`, or a tenth of the time budget
    (at least `MIN_STUDY_TIMEOUT_S`) when that is shorter, so that one hung worker cannot
    eat the budget."""
    if time_budget_s is None:
        return DEFAULT_STUDY_TIMEOUT_S
    return float(min(DEFAULT_STUDY_TIMEOUT_S, max(MIN_STUDY_TIMEOUT_S, float(time_budget_s) / 10.0)))


@dataclass
class LoadedStudy:
    """One decoded study with its keypoint-free preprocessing done.

    ``samples[group_key]`` holds the samples of each worker-prepared group; a group missing
    from it failed for this study (the reason is in ``errors``). ``study`` is None when the
    study could not be decoded at all.
    """

    study_id: int
    study: "Study | None"
    samples: dict[str, list["Sample"]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    load_s: float = 0.0
    prepare_s: float = 0.0
    peak_rss_mb: float = 0.0  # of the process that loaded it, after loading


def load_and_prepare(ref: "StudyRef", preparers: Sequence[tuple[str, "Family"]], decode_workers: int | None = None) -> LoadedStudy:
    """Decode ``ref`` and run each ``(group_key, family).prepare(study)``; never raises."""
    from ..imaging import shared_resizes
    from ..io import load_study

    out = LoadedStudy(study_id=int(ref.study_id), study=None)
    t0 = time.perf_counter()
    try:
        study = load_study(ref, workers=decode_workers)
    except Exception as e:  # an unreadable study must not stop the run
        logger.error("study %s: loading failed: %s: %s", ref.study_id, type(e).__name__, e, exc_info=e)
        out.errors.append(f"load: {type(e).__name__}: {e}")
        out.load_s = time.perf_counter() - t0
        out.peak_rss_mb = peak_rss_mb()
        return out
    out.study = study
    out.warnings.extend(study.warnings)
    n_files = sum(s.n_files for s in ref.series if s.readable)
    if n_files and not any(study.volumes.values()):
        out.errors.append(f"load: none of the study's {n_files} DICOM file(s) gave a usable image stack (see warnings)")
    t1 = time.perf_counter()
    out.load_s = t1 - t0
    with shared_resizes():  # families that resize a stack alike share one resize
        for key, family in preparers:
            try:
                out.samples[key] = list(family.prepare(study, None))
            except Exception as e:
                logger.error("study %s: prepare %s failed: %s: %s", ref.study_id, key, type(e).__name__, e, exc_info=e)
                out.errors.append(f"prepare {key}: {type(e).__name__}: {e}")
    out.prepare_s = time.perf_counter() - t1
    out.peak_rss_mb = peak_rss_mb()
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB; 0 where unknown)."""
    try:
        import resource
        import sys

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, kB on Linux
    except (ImportError, OSError):
        return 0.0


def default_read_ahead(num_workers: int) -> int:
    """Studies decoded ahead of the chunks taken: two more than the workers, so every worker
    has the next study to read. Peak memory is then the chunk a device runs plus these, the
    same from 20 studies to 2,000; the rest of the next chunk is read when it is taken (about
    ``(chunk - read ahead) x load time / workers``, a few percent of a GPU chunk)."""
    return max(1, int(num_workers) + 2)


def limit_heap_fragmentation() -> None:
    """Serve large arrays (decoded stacks, 1 MB and up) from their own mappings, returned to
    the system when freed. glibc raises its mmap threshold after the first large free and
    then serves later stacks from the heap, which fragments: a worker's peak memory creeps up
    with the studies it reads. Loading workers only: in the main process every large tensor
    of a CPU forward would then be a fresh mapping, page faults included (CPU models ran 2x
    slower), and the studies it receives from workers are shared-memory mappings anyway. A
    no-op where the C library is not glibc."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: fixed, so no longer adjusted upward
    except (OSError, AttributeError):  # pragma: no cover - an unusual libc
        pass


def _worker_init(torch_threads: int) -> None:
    """Worker processes: one torch thread each (the pool supplies the parallelism)."""
    limit_heap_fragmentation()
    try:
        import torch

        torch.set_num_threads(torch_threads)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def _load_task(preparers: Sequence[tuple[str, "Family"]], ref: "StudyRef") -> LoadedStudy:
    return load_and_prepare(ref, preparers, decode_workers=1)


@dataclass
class WorkerEvent:
    """Something a worker did to a study, for the run report."""

    study_id: int
    event: str  # "worker died" | "worker hung" | "worker failed"
    detail: str
    attempt: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class StudyStream:
    """Iterate `LoadedStudy` objects for ``refs`` in order, reading ahead at most
    ``prefetch`` studies. Use as a context manager so worker processes are shut down.

    ``study_timeout_s``: the per-study watchdog of the workers. ``stop()`` cancels the
    read-ahead (the deadline guard uses it when the remaining studies get priors anyway).
    After `take` returns early because its deadline passed, ``out_of_time`` is True.
    """

    #: Workers a study may kill before it gets prior rows (1 = no second try).
    MAX_ATTEMPTS = 2

    def __init__(
        self,
        refs: Sequence["StudyRef"],
        preparers: Sequence[tuple[str, "Family"]],
        num_workers: int = 0,
        prefetch: int = 16,
        start_method: str | None = None,
        study_timeout_s: float = DEFAULT_STUDY_TIMEOUT_S,
    ) -> None:
        self.refs = list(refs)
        self.preparers = list(preparers)
        self.num_workers = max(0, int(num_workers))
        self.prefetch = max(1, int(prefetch))
        self.start_method = start_method
        self.study_timeout_s = float(study_timeout_s)
        self._pool: WorkerPool | None = None
        self._pending: deque[tuple[int, Future[LoadedStudy]]] = deque()  # (index in refs, future), in order
        self._next = 0  # index of the next study to submit (or, in-process, to load)
        self._stopped = False
        self._attempts: dict[int, int] = {}  # study id -> workers it killed or hung
        self.out_of_time = False
        self.warnings: list[str] = []
        self.events: list[WorkerEvent] = []
        self._closed_stats = {"started": 0, "died": 0, "hung": 0}  # of worker pools already closed

    def __enter__(self) -> "StudyStream":
        if self.num_workers > 0 and self.refs:
            self._pool = WorkerPool(self.num_workers, _load_task, (self.preparers,), initializer=_worker_init,
                                    initargs=(1,), start_method=self.start_method)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def workers(self) -> WorkerPool | None:
        """The worker pool (None in-process)."""
        return self._pool

    def stop(self) -> None:
        self._stopped = True
        self._close_pool()

    def _close_pool(self) -> None:
        for _, f in self._pending:
            f.cancel()
        self._pending.clear()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
            self._closed_stats = self._stats(pool)

    @property
    def worker_stats(self) -> dict[str, int]:
        """Worker processes started, died holding a study, killed hung, over the stream's life."""
        return self._stats(self._pool)

    def _stats(self, pool: WorkerPool | None) -> dict[str, int]:
        now = {"started": 0, "died": 0, "hung": 0} if pool is None else {
            "started": pool.started, "died": pool.deaths, "hung": pool.timeouts}
        return {k: self._closed_stats[k] + now[k] for k in now}

    def _submit(self, index: int, front: bool = False) -> Future[LoadedStudy]:
        assert self._pool is not None
        ref = self.refs[index]
        return self._pool.submit(ref, timeout=self.study_timeout_s, label=f"rsna:{ref.study_id}", front=front)

    def _fill(self) -> None:
        while self._pool is not None and len(self._pending) < self.prefetch and self._next < len(self.refs):
            self._pending.append((self._next, self._submit(self._next)))
            self._next += 1

    def take(self, n: int, deadline: float | None = None, clock: Any = time.monotonic) -> list[LoadedStudy]:
        """The next ``n`` studies (fewer at the end), in input order. ``deadline`` (a
        ``clock`` value): stop waiting then, return what is there and set ``out_of_time``."""
        out: list[LoadedStudy] = []
        while len(out) < n and not self._stopped:
            if self._pool is None:
                if self._next >= len(self.refs):
                    break
                ref = self.refs[self._next]
                self._next += 1
                out.append(self._in_process(ref))
                continue
            self._fill()
            if not self._pending:
                break
            index, fut = self._pending[0]
            wait = None if deadline is None else max(0.0, deadline - clock())
            try:
                value: Any = fut.result(timeout=wait)
            except FutureTimeout:
                self.out_of_time = True
                break
            except (Exception, CancelledError) as e:
                value = e
            self._pending.popleft()
            loaded = self._settle(index, value)
            if loaded is not None:
                out.append(loaded)
        return out

    def _settle(self, index: int, value: Any) -> LoadedStudy | None:
        """What a worker's answer means for study ``refs[index]``: the study, a second try
        (None: it is queued again, first), or prior rows. The one place for worker outcomes."""
        ref = self.refs[index]
        sid = int(ref.study_id)
        if isinstance(value, LoadedStudy):
            for e in self.events:
                if e.study_id == sid:
                    value.warnings.append(f"{e.event} on try {e.attempt} ({e.detail}); the next try worked")
            return value
        if isinstance(value, PoolUnavailable):
            self._to_in_process(index, value)
            return None
        attempt = self.count_attempt(sid)
        if isinstance(value, WorkerDied):
            event, fallback = "worker died", f"a loading worker died on it {attempt} time(s)"
        elif isinstance(value, WorkerTimeout):
            event, fallback = "worker hung", f"its loading worker hung for {self.study_timeout_s:.0f}s and was killed"
        else:
            event, fallback = "worker failed", "its loading worker failed"
        detail = f"{type(value).__name__}: {value}"
        self.events.append(WorkerEvent(sid, event, detail, attempt))
        if isinstance(value, WorkerDied) and attempt < self.MAX_ATTEMPTS and self._pool is not None:
            logger.warning("study %s: %s (%s); trying it once more in a fresh worker", sid, event, value)
            self._pending.appendleft((index, self._submit(index, front=True)))
            return None
        msg = f"study {sid}: {fallback} ({value}); prior rows"
        logger.error("%s", msg)
        self.warnings.append(msg)
        return LoadedStudy(sid, None, errors=[f"{event}: {detail}"])

    def count_attempt(self, study_id: int) -> int:
        """One more worker this study killed or hung; how many so far. A study with any is
        never loaded in the main process (it could do the same to it)."""
        attempt = self._attempts[study_id] = self._attempts.get(study_id, 0) + 1
        return attempt

    def _to_in_process(self, index: int, err: BaseException) -> None:
        """No worker can start: load from ``refs[index]`` on in this process."""
        self._close_pool()
        self._next = index
        msg = (f"preprocessing workers could not start ({err}); loading continues in-process. "
               "Under a script, guard the entry point with `if __name__ == '__main__':`.")
        logger.error("%s", msg)
        self.warnings.append(msg)

    def _in_process(self, ref: "StudyRef") -> LoadedStudy:
        sid = int(ref.study_id)
        if self._attempts.get(sid):  # it killed or hung a worker: it could do the same to us
            return LoadedStudy(sid, None, errors=["worker died: it killed a loading worker; never run in the main process"])
        return load_and_prepare(ref, self.preparers)

    def skip(self, n: int) -> list[int]:
        """Advance past the next ``n`` studies without using them; their ids."""
        ids: list[int] = []
        while len(ids) < n:
            if self._pending:
                index, f = self._pending.popleft()
                f.cancel()
                ids.append(int(self.refs[index].study_id))
            elif self._next < len(self.refs):
                ids.append(int(self.refs[self._next].study_id))
                self._next += 1
            else:
                break
        return ids

    def __iter__(self) -> Iterator[LoadedStudy]:  # convenience for single-study consumers
        while True:
            batch = self.take(1)
            if not batch:
                return
            yield batch[0]
