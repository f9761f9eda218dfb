"""The devices of a run: which ones (and whether the torch build can drive them), and running
chunks of studies on their replicas of the ensemble, with failover.

`resolve_devices` turns ``device=`` into torch devices and checks every GPU's compute
capability against ``torch.cuda.get_arch_list()`` *before* a model is built: a card the
build has no kernels for (a P100, sm_60, under a build for sm_75+) otherwise fails in the
first dummy forward, reported as a broken model. Policy: a device the user named
(``"cuda"``, ``"cuda:1"``) raises `DeviceError` naming the card, its capability and the
build's list; with the default (``None``/``"auto"``: every GPU, else CPU) an unusable GPU
is like no GPU: the run goes to CPU with a loud warning, also in the run report.

`ReplicaSet` runs chunks on the replicas, one daemon thread each, and owns what happens to a
chunk: it finishes; it fails on a replica and is re-run on another one; a replica that keeps
failing chunks that another one then finishes is retired with a run warning; a replica that
does not answer within the chunk timeout is abandoned (its thread cannot be stopped) and
its chunk re-run elsewhere. What cannot be re-run comes back as a failed or timed-out
`ChunkOutcome` and its studies get prior rows.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import count
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FINISHED, FAILED, TIMED_OUT = "finished", "failed", "timed out"
#: A device's chunk may take ``study timeout x studies`` but never less than this (seconds).
CHUNK_TIMEOUT_FLOOR_S = 60.0
#: Errors that mean the device, not the data, failed (torch < 2.8 raises plain RuntimeErrors).
_DEVICE_FAULT = re.compile(
    r"CUDA error|CUDA driver|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error|device-side assert|illegal memory access|"
    r"unspecified launch failure|NCCL error|HIP error|ECC error",
    re.IGNORECASE,
)


class DeviceError(ValueError):
    """A device that was asked for cannot run this torch build; the message says what to do."""


# -- which devices ---------------------------------------------------------------------------


def resolve_devices(device: "str | Sequence[str] | None" = None, notes: list[str] | None = None) -> list["torch.device"]:
    """``None``/``"auto"``: every visible GPU the torch build can run, else CPU (with a
    warning appended to ``notes`` when a GPU had to be passed over). ``"cuda"``: every GPU.
    ``"cuda:1"``, ``"cpu"``, ``"cuda:0,cuda:1"``, ``"cpu,cpu"`` or a list: exactly those (a
    replica of the ensemble each). Raises `DeviceError` for a named device that cannot run."""
    import torch

    auto = device is None or device == "auto"
    if auto:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    names = [d.strip() for d in device.split(",")] if isinstance(device, str) else [str(d) for d in device]
    out: list[torch.device] = []
    for name in names:
        try:
            d = torch.device(name)
        except RuntimeError as e:
            raise DeviceError(f"device {name!r} is not a device name ({e}); use cuda, cuda:N or cpu") from None
        if d.type == "cuda":
            if not torch.cuda.is_available():
                raise DeviceError(f"device {name!r} requested but CUDA is not available; use device='cpu'")
            if d.index is None:
                out += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
                continue
            if d.index >= torch.cuda.device_count():
                raise DeviceError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) visible")
        out.append(d)
    if not out:
        raise DeviceError(f"no device in {device!r}")
    problems = [p for p in (cuda_capability_problem(d.index or 0) for d in out if d.type == "cuda") if p]
    if problems:
        if not auto:
            raise DeviceError(f"{problems[0]}; pass device='cpu' or use a GPU this build supports")
        msg = (f"{'; '.join(problems)}. RUNNING ON CPU instead: expect it to be many times slower "
               "(a time budget still finishes the CSV). Choose a supported GPU to avoid this.")
        logger.warning("%s\n%s\n%s", "!" * 88, msg, "!" * 88)
        if notes is not None:
            notes.append(msg)
        return [torch.device("cpu")]
    return out


_ARCH = re.compile(r"^(sm|compute)_(\d+)(\d)([a-z]?)$")


def build_runs_capability(capability: tuple[int, int], arch_list: Sequence[str]) -> bool:
    """Whether a torch build compiled for ``arch_list`` (``torch.cuda.get_arch_list()``) has
    kernels for a GPU of compute ``capability``: a cubin of the same major version and a
    minor at most the card's (``sm_XYa``: exactly that card), or PTX (``compute_XY``) at most
    the card's, which the driver compiles. An empty list (unknown) is taken as yes."""
    if not arch_list:
        return True
    major, minor = capability
    for arch in arch_list:
        m = _ARCH.match(arch)
        if m is None:
            continue
        kind, a_major, a_minor, suffix = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
        if kind == "sm" and a_major == major and (a_minor == minor if suffix == "a" else a_minor <= minor):
            return True
    return False


def cuda_capability_problem(index: int) -> str | None:
    """Why GPU ``index`` cannot run this torch build (None when it can)."""
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    archs = list(torch.cuda.get_arch_list())
    if build_runs_capability((major, minor), archs):
        return None
    name = torch.cuda.get_device_name(index)
    return (f"GPU {index} ({name}) has compute capability sm_{major}{minor}, which this torch {torch.__version__} "
            f"build cannot run (it has kernels for {', '.join(archs)})")


def is_device_fault(exc: BaseException) -> bool:
    """A failure of the device itself (not out-of-memory, which the batch split handles)."""
    import torch

    if is_out_of_memory(exc):
        return False
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None and isinstance(exc, accel):
        return True
    return isinstance(exc, RuntimeError) and bool(_DEVICE_FAULT.search(str(exc)))


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


# -- running chunks on replicas --------------------------------------------------------------


@dataclass
class Chunk:
    """Studies that run together, and the replicas that failed them (``(replica, reason)``)."""

    id: int
    loaded: list[Any]  # LoadedStudy
    plan: Any  # deadline.Plan
    failures: list[tuple[int, str]] = field(default_factory=list)

    @property
    def study_ids(self) -> list[int]:
        return [int(ls.study_id) for ls in self.loaded]


@dataclass
class ChunkOutcome:
    """How a chunk ended: `FINISHED` (``output`` is its ChunkOutput), `FAILED` or `TIMED_OUT`."""

    chunk: Chunk
    status: str
    output: Any = None
    replica: int | None = None
    reason: str = ""


@dataclass
class _Replica:
    index: int
    name: str
    inbox: "queue.Queue[Chunk | None]"
    chunk: Chunk | None = None
    started: float = 0.0
    strikes: int = 0  # chunks in a row it failed that another replica then finished
    retired: str | None = None  # why it gets no more chunks
    abandoned: bool = False  # hung: whatever it answers is ignored
    thread: threading.Thread | None = None


class ReplicaSet:
    """Run ``run(loaded, plan, replica_index)`` on one daemon thread per replica.

    ``study_timeout_s``: a chunk may take ``max(CHUNK_TIMEOUT_FLOOR_S, studies x this)``
    on a device before the replica counts as hung (None: no bound). Times are
    ``time.monotonic`` seconds.
    """

    #: Chunks in a row a replica may fail (that another then finished) before it is retired.
    MAX_STRIKES = 2

    def __init__(self, run: Callable[[Sequence[Any], Any, int], Any], names: Sequence[str],
                 study_timeout_s: float | None = None) -> None:
        self._run = run
        self._done: queue.Queue[tuple[int, Chunk, Any, BaseException | None]] = queue.Queue()
        self._retry: deque[Chunk] = deque()
        self._ids = count()
        self.study_timeout_s = study_timeout_s
        self.replicas = [_Replica(i, str(n), queue.Queue()) for i, n in enumerate(names)]
        self.warnings: list[str] = []
        self.events: list[dict[str, Any]] = []
        for r in self.replicas:
            r.thread = threading.Thread(target=self._serve, args=(r,), name=f"device-{r.index}", daemon=True)
            r.thread.start()

    # -- the caller's side -----------------------------------------------------------------
    @property
    def healthy(self) -> list[_Replica]:
        return [r for r in self.replicas if r.retired is None]

    def can_take(self) -> bool:
        """Whether a new chunk can start now (an idle replica, no re-run waiting)."""
        return not self._retry and any(r.chunk is None for r in self.healthy)

    @property
    def busy(self) -> bool:
        """Whether a chunk is still to be settled."""
        return bool(self._retry) or any(r.chunk is not None and not r.abandoned for r in self.replicas)

    def submit(self, loaded: Sequence[Any], plan: Any) -> Chunk:
        idle = [r for r in self.healthy if r.chunk is None]
        if not idle or self._retry:
            raise RuntimeError("no replica is free (check can_take first)")
        chunk = Chunk(next(self._ids), list(loaded), plan)
        self._send(idle[0], chunk)
        return chunk

    def next(self, deadline: float | None = None) -> ChunkOutcome:
        """The next chunk to settle, waiting at most until ``deadline`` (``time.monotonic``;
        past it the oldest chunk still running is given up as timed out)."""
        while True:
            lost = self._dispatch_retries()
            if lost is not None:
                return lost
            if not self.busy:
                raise RuntimeError("no chunk is in flight")
            limits = [r.started + t for r in self.healthy if r.chunk is not None and (t := self._timeout(r.chunk))]
            if deadline is not None:
                limits.append(deadline)
            wait = None if not limits else max(0.0, min(limits) - time.monotonic())
            try:
                index, chunk, output, exc = self._done.get(timeout=wait)
            except queue.Empty:
                outcome = self._overdue(deadline)
                if outcome is not None:
                    return outcome
                continue
            rep = self.replicas[index]
            if rep.abandoned:  # it was given up for; its chunk was settled already
                continue
            rep.chunk = None
            if exc is None:
                rep.strikes = 0
                for other, _ in chunk.failures:
                    self._strike(self.replicas[other], chunk)
                return ChunkOutcome(chunk, FINISHED, output, index)
            reason = f"{type(exc).__name__}: {exc}"
            logger.error("chunk of studies %s failed on %s: %s", chunk.study_ids, rep.name, reason, exc_info=exc)
            exc = None  # drop the traceback (and the tensors its frames hold) now
            chunk.failures.append((index, reason))
            self._event(rep, "chunk failed", chunk.study_ids, reason)
            self._retry.append(chunk)

    def drain(self, deadline: float | None = None) -> list[ChunkOutcome]:
        """Settle everything in flight (bounded by ``deadline``)."""
        out = []
        while self.busy:
            out.append(self.next(deadline))
        return out

    def close(self) -> None:
        for r in self.replicas:
            r.inbox.put(None)
        for r in self.replicas:
            if r.thread is not None and not r.abandoned:
                r.thread.join(5.0)

    def __enter__(self) -> "ReplicaSet":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- inside ------------------------------------------------------------------------------
    def _serve(self, rep: _Replica) -> None:
        while True:
            chunk = rep.inbox.get()
            if chunk is None:
                return
            try:
                self._done.put((rep.index, chunk, self._run(chunk.loaded, chunk.plan, rep.index), None))
            except BaseException as e:  # noqa: BLE001 - the caller decides what a failure costs
                self._done.put((rep.index, chunk, None, e))
            del chunk

    def _send(self, rep: _Replica, chunk: Chunk) -> None:
        rep.chunk, rep.started = chunk, time.monotonic()
        rep.inbox.put(chunk)

    def _timeout(self, chunk: Chunk) -> float | None:
        if self.study_timeout_s is None:
            return None
        return max(CHUNK_TIMEOUT_FLOOR_S, self.study_timeout_s * max(1, len(chunk.loaded)))

    def _dispatch_retries(self) -> ChunkOutcome | None:
        """Hand a waiting re-run to an idle replica that has not failed it; one that no
        working replica is left for is lost (returned as failed)."""
        for chunk in list(self._retry):
            tried = {i for i, _ in chunk.failures}
            eligible = [r for r in self.healthy if r.index not in tried]
            if not eligible:
                self._retry.remove(chunk)
                return ChunkOutcome(chunk, FAILED, replica=chunk.failures[-1][0], reason=chunk.failures[-1][1])
            idle = [r for r in eligible if r.chunk is None]
            if idle:
                self._retry.remove(chunk)
                logger.warning("re-running the chunk of studies %s on %s", chunk.study_ids, idle[0].name)
                self._send(idle[0], chunk)
        return None

    def _overdue(self, deadline: float | None) -> ChunkOutcome | None:
        """A replica past its chunk timeout is abandoned (its chunk re-run elsewhere if
        possible); past ``deadline`` the oldest running chunk is given up."""
        now = time.monotonic()
        running = sorted((r for r in self.healthy if r.chunk is not None), key=lambda r: r.started)
        for r in running:
            t = self._timeout(r.chunk)  # type: ignore[arg-type]
            if t is not None and now >= r.started + t:
                return self._abandon(r, f"no answer from {r.name} within {t:.0f}s", retry=True)
        if deadline is not None and now >= deadline and running:
            return self._abandon(running[0], f"still running on {running[0].name} when the time budget ran out", retry=False)
        return None

    def _abandon(self, rep: _Replica, why: str, retry: bool) -> ChunkOutcome | None:
        chunk = rep.chunk
        assert chunk is not None
        rep.chunk, rep.abandoned = None, True
        self._retire(rep, why)
        chunk.failures.append((rep.index, why))
        self._event(rep, "hung", chunk.study_ids, why)
        if retry:
            self._retry.append(chunk)
            return None
        return ChunkOutcome(chunk, TIMED_OUT, replica=rep.index, reason=why)

    def _strike(self, rep: _Replica, chunk: Chunk) -> None:
        """``rep`` failed ``chunk`` and another replica finished it."""
        rep.strikes += 1
        if rep.retired is None and rep.strikes >= self.MAX_STRIKES and len(self.healthy) > 1:
            self._retire(rep, f"{rep.strikes} chunks in a row failed on it that another device finished")

    def _retire(self, rep: _Replica, why: str) -> None:
        if rep.retired is not None:
            return
        rep.retired = why
        left = ", ".join(r.name for r in self.healthy) or "none"
        msg = f"device {rep.name} (replica {rep.index}) retired: {why}; devices left: {left}"
        logger.warning("%s", msg)
        self.warnings.append(msg)
        self._event(rep, "retired", [], why)

    def _event(self, rep: _Replica, event: str, studies: list[int], detail: str) -> None:
        self.events.append({"device": rep.name, "replica": rep.index, "event": event, "studies": studies, "detail": detail})
