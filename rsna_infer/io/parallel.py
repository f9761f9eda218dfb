"""Decode many DICOM files, sequentially or on a thread or process pool.

Decoding is file-parallel: the unit of work is one file, so a study's series share one pool
and a large series is not stuck on one worker. Measured on phantom studies
(benchmarks/bench_io.py, docs/io.md), threads beat processes in 7 of 9 runs: pydicom's header
parse holds the GIL, but a thread pool costs nothing to start and hands arrays back without
pickling, while a process pool pickles every slice through a pipe. Pass ``executor`` to
reuse one pool across studies.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from .dicom import SliceRecord, read_slice

PARALLEL_MODES: tuple[str, ...] = ("sequential", "thread", "process")
#: The faster mode measured by benchmarks/bench_io.py (see docs/io.md).
DEFAULT_PARALLEL = "thread"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, not the
    machine's count): the one count every default pool size starts from."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """Decoding pool size when the caller does not say: `usable_cpus`, at most 8."""
    return min(8, usable_cpus())


def make_executor(parallel: str = DEFAULT_PARALLEL, workers: int | None = None) -> Executor | None:
    """A pool for `decode_files` (``None`` for sequential); the caller shuts it down."""
    _check_mode(parallel)
    workers = default_workers() if workers is None else workers
    if parallel == "sequential" or workers <= 1:
        return None
    if parallel == "thread":
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dicom")
    return ProcessPoolExecutor(max_workers=workers)


def decode_files(
    paths: Sequence[str | Path],
    *,
    pixels: bool = True,
    workers: int | None = None,
    parallel: str = DEFAULT_PARALLEL,
    executor: Executor | None = None,
) -> list[SliceRecord]:
    """`read_slice` on every path, results in input order. Never raises on bad files.

    ``executor`` wins over ``workers``/``parallel``; otherwise a pool of ``workers`` (default
    `default_workers`) of kind ``parallel`` lives for this call only; ``workers <= 1`` or
    ``parallel="sequential"`` decodes in the calling thread.
    """
    return list(iter_decode(paths, pixels=pixels, workers=workers, parallel=parallel, executor=executor))


def iter_decode(
    paths: Sequence[str | Path],
    *,
    pixels: bool = True,
    workers: int | None = None,
    parallel: str = DEFAULT_PARALLEL,
    executor: Executor | None = None,
) -> Iterator[SliceRecord]:
    """`decode_files` as an iterator: records come in input order as they are decoded, so a
    caller that consumes them series by series holds only what it has not used yet (pools
    keep decoding ahead). Consume it to the end, or close it, to release its pool."""
    paths = [str(p) for p in paths]
    if executor is None:
        _check_mode(parallel)
        workers = default_workers() if workers is None else workers
        if parallel == "sequential" or workers <= 1 or len(paths) <= 1:
            for p in paths:
                yield read_slice(p, pixels=pixels)
            return
        with make_executor(parallel, min(workers, len(paths))) as pool:
            yield from _map(pool, paths, pixels)
        return
    yield from _map(executor, paths, pixels)


def _map(pool: Executor, paths: list[str], pixels: bool) -> Iterator[SliceRecord]:
    chunk = 1
    if isinstance(pool, ProcessPoolExecutor):  # amortise the per-task round trip
        chunk = max(1, len(paths) // (4 * (getattr(pool, "_max_workers", 1) or 1)))
    return pool.map(_read, paths, [pixels] * len(paths), chunksize=chunk)


def _read(path: str, pixels: bool) -> SliceRecord:
    return read_slice(path, pixels=pixels)


def _check_mode(parallel: str) -> None:
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
