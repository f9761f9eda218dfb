"""Read and preprocess studies ahead of the models, in bounded chunks.

The producer side of the predictor: for each study, decode every DICOM once (`load_study`)
and run the preprocessing of the families that need no keypoints (stage-1 ``prepare``).
With ``num_workers > 0`` this happens in a pool of worker *processes* (one torch thread
each) while the main process runs the models on the previous chunk; with ``num_workers = 0``
it runs in the calling process. Workers are forked on Linux, as torch's DataLoader does (they
start instantly, inherit the registered families and never touch CUDA), and spawned where
fork does not exist. If the pool breaks (a worker killed for memory, or a script that spawns
without an ``if __name__ == "__main__"`` guard), loading carries on in-process. At most ``prefetch`` studies are in flight, so memory is bounded by the
chunk size, not by the size of the test set. Results come back in input order, so the
chunks, and therefore every batch, are the same whatever the number of workers.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .family import Family, Sample
    from .io.discovery import StudyRef
    from .io.volume import Study

logger = logging.getLogger(__name__)


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
    from .io import load_study

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
    t1 = time.perf_counter()
    out.load_s = t1 - t0
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


def _worker_init(torch_threads: int) -> None:
    """Worker processes: one torch thread each (the pool supplies the parallelism)."""
    try:
        import torch

        torch.set_num_threads(torch_threads)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def _load_task(ref: "StudyRef", preparers: Sequence[tuple[str, "Family"]]) -> LoadedStudy:
    return load_and_prepare(ref, preparers, decode_workers=1)


class StudyStream:
    """Iterate `LoadedStudy` objects for ``refs`` in order, reading ahead at most
    ``prefetch`` studies. Use as a context manager so worker processes are shut down.

    ``stop()`` cancels the read-ahead (the deadline guard uses it when the remaining
    studies will get priors anyway).
    """

    def __init__(
        self,
        refs: Sequence["StudyRef"],
        preparers: Sequence[tuple[str, "Family"]],
        num_workers: int = 0,
        prefetch: int = 16,
        start_method: str | None = None,
    ) -> None:
        self.refs = list(refs)
        self.preparers = list(preparers)
        self.num_workers = max(0, int(num_workers))
        self.prefetch = max(1, int(prefetch))
        self._pool: ProcessPoolExecutor | None = None
        self._pending: deque[Future[LoadedStudy]] = deque()
        self._next = 0
        self._stopped = False
        methods = mp.get_all_start_methods()
        self.start_method = start_method or ("fork" if "fork" in methods else "spawn")
        self.breaks = 0
        self._ok = 0  # studies the pool has delivered
        self.warnings: list[str] = []

    def __enter__(self) -> "StudyStream":
        if self.num_workers > 0 and self.refs:
            self._pool = self._new_pool()
        return self

    def _new_pool(self) -> ProcessPoolExecutor:
        ctx = mp.get_context(self.start_method)
        return ProcessPoolExecutor(self.num_workers, mp_context=ctx, initializer=_worker_init, initargs=(1,))

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopped = True
        for f in self._pending:
            f.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _fill(self) -> None:
        assert self._pool is not None
        while len(self._pending) < self.prefetch and self._next < len(self.refs):
            self._pending.append(self._pool.submit(_load_task, self.refs[self._next], self.preparers))
            self._next += 1

    def take(self, n: int) -> list[LoadedStudy]:
        """The next ``n`` studies (fewer at the end), in input order."""
        out: list[LoadedStudy] = []
        while len(out) < n and not self._stopped:
            if self._pool is None:
                if self._next >= len(self.refs):
                    break
                ref = self.refs[self._next]
                self._next += 1
                out.append(load_and_prepare(ref, self.preparers))
                continue
            self._fill()
            if not self._pending:
                break
            fut = self._pending.popleft()
            ref_index = self._next - len(self._pending) - 1
            try:
                out.append(fut.result())
                self._ok += 1
            except BrokenProcessPool as e:
                blamed = self._pool_broke(ref_index, e)
                if blamed is not None:
                    out.append(blamed)
                continue
            except Exception as e:  # the task itself failed (load_and_prepare never raises)
                ref = self.refs[ref_index]
                logger.error("study %s: worker failed (%s: %s)", ref.study_id, type(e).__name__, e)
                out.append(LoadedStudy(int(ref.study_id), None, errors=[f"worker: {type(e).__name__}: {e}"]))
            self._fill()
        return out

    def skip(self, n: int) -> list[int]:
        """Advance past the next ``n`` studies without using them; their ids."""
        ids: list[int] = []
        while len(ids) < n:
            if self._pending:
                f = self._pending.popleft()
                f.cancel()
                ids.append(int(self.refs[self._next - len(self._pending) - 1].study_id))
            elif self._next < len(self.refs):
                ids.append(int(self.refs[self._next].study_id))
                self._next += 1
            else:
                break
        return ids

    #: Pool restarts after a worker died on a study, before loading moves in-process.
    MAX_RESTARTS = 3

    def _pool_broke(self, ref_index: int, err: BaseException) -> LoadedStudy | None:
        """A worker process died. If the pool never delivered a study, it cannot start here
        (e.g. spawn under a script without a ``__main__`` guard): load in-process from this
        study on. Otherwise a study killed it (memory): that study gets an error, the pool is
        restarted (at most `MAX_RESTARTS` times, then in-process) and the rest resubmitted."""
        self.breaks += 1
        for f in self._pending:
            f.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._ok == 0 or self.breaks > self.MAX_RESTARTS:
            self._next = ref_index
            msg = (f"preprocessing workers failed ({type(err).__name__}: {err}); loading continues in-process. "
                   "Under a script, guard the entry point with `if __name__ == '__main__':`.")
            logger.error("%s", msg)
            self.warnings.append(msg)
            return None
        ref = self.refs[ref_index]
        self._next = ref_index + 1
        msg = f"study {ref.study_id}: a preprocessing worker died on it ({type(err).__name__}); prior rows"
        logger.error("%s; restarting the worker pool", msg)
        self.warnings.append(msg)
        self._pool = self._new_pool()
        return LoadedStudy(int(ref.study_id), None, errors=[f"worker died: {type(err).__name__}: {err}"])

    def __iter__(self) -> Iterator[LoadedStudy]:  # convenience for single-study consumers
        while True:
            batch = self.take(1)
            if not batch:
                return
            yield batch[0]
