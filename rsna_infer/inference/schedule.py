"""The run loop: chunks read whenever a device is free, the deadline's decisions, and the one
place where the end of a chunk is recorded.

`run_studies` is three parts: `feed` reads a chunk whenever a device is free
(`rsna_infer.runtime.streaming.StudyStream`); `rsna_infer.runtime.devices.ReplicaSet` runs
it and decides what a failure costs (re-run elsewhere, retire, abandon); `RunState.settle`
records the end of each chunk (results merged, or prior rows with the reason), and
`RunState.decide` asks the deadline guard (`rsna_infer.runtime.deadline.DeadlineGuard`)
which plan the next chunk runs and how many studies it may read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..runtime.deadline import DeadlineGuard, Plan
from .chunk import ChunkOutput
from .report import RunResult, StudyRecord, Timings

if TYPE_CHECKING:
    from ..io.discovery import StudyRef
    from ..models.family import Family
    from ..runtime.devices import ChunkOutcome, ReplicaSet
    from ..runtime.streaming import LoadedStudy, StudyStream
    from ..settings import RunSettings

logger = logging.getLogger(__name__)

#: ``(loaded studies, plan, replica index) -> ChunkOutput``: one chunk on one device.
RunChunk = Callable[[Sequence["LoadedStudy"], Plan, int], ChunkOutput]


def run_studies(
    refs: Sequence["StudyRef"],
    run_chunk: RunChunk,
    preparers: list[tuple[str, "Family"]],
    device_names: list[str],
    full_plan: Plan,
    guard: DeadlineGuard | None,
    clock: Callable[[], float],
    settings: "RunSettings",
    start_method: str | None = None,
) -> tuple[RunResult, dict[str, int]]:
    """Every study of ``refs`` through ``run_chunk`` on the devices, with resolved
    ``settings`` (workers, read-ahead, chunk size, study watchdog, progress bar). The result,
    and the peak bytes of one forward measured per member (for the memory report). Never
    raises for a study or a device: what is done is kept, the rest gets priors."""
    from ..runtime.devices import ReplicaSet
    from ..runtime.streaming import StudyStream

    state = RunState(refs, guard, full_plan, clock, device_names, settings.progress)
    replicas = ReplicaSet(run_chunk, state.device_names, study_timeout_s=settings.study_timeout_s)
    try:
        with StudyStream(refs, preparers, settings.num_workers, prefetch=settings.read_ahead,
                         start_method=start_method, study_timeout_s=settings.study_timeout_s) as stream:
            try:
                feed(stream, replicas, state, settings.chunk_size)
            finally:
                state.note_stream(stream)
    except Exception as e:  # never lose the run: what is done is kept, the rest gets priors
        state.stopped_early(e, replicas)
    finally:
        replicas.close()
        state.close()
    return state.result(replicas), state.memory


def feed(stream: "StudyStream", replicas: "ReplicaSet", state: "RunState", chunk_size: int) -> None:
    """Read a chunk whenever a device is free, settle each chunk as it ends.

    Devices: `rsna_infer.runtime.devices.ReplicaSet` (failover, hung devices); the deadline:
    `RunState.decide` (a one-study probe chunk until costs are measured); results and prior
    rows: `RunState.settle`."""
    while True:
        while state.to_take and replicas.can_take() and not state.probing(replicas):
            n = state.next_chunk_size(chunk_size)
            plan, admitted = state.decide(n)
            t = time.perf_counter()
            loaded = stream.take(admitted, deadline=state.wait_deadline) if admitted else []
            state.timings.add("wait_for_data", time.perf_counter() - t)
            state.took(loaded)
            got = len(loaded)
            if loaded:
                replicas.submit(loaded, plan)
            del loaded  # else the next take() would read a chunk while this one is still held here
            if got < n:
                state.rest_get_priors(stream, out_of_time=admitted < n or stream.out_of_time)
        if not replicas.busy:
            if state.to_take:  # no device is left to take them (all retired or given up)
                state.rest_get_priors(stream, out_of_time=state.past_deadline(), no_device=True)
            return
        state.settle(replicas.next(state.hard_deadline))


class RunState:
    """What a run has produced so far, the deadline decisions, and the one place where the
    end of a chunk is recorded (`settle`: merged results, or prior rows and the reason)."""

    def __init__(self, refs: Sequence["StudyRef"], guard: DeadlineGuard | None, full_plan: Plan,
                 clock: Callable[[], float], device_names: list[str], progress: bool) -> None:
        from tqdm.auto import tqdm

        self.ids = [int(r.study_id) for r in refs]
        self.guard, self.full_plan, self.clock = guard, full_plan, clock
        self.device_names = device_names
        self.to_take = len(self.ids)  # studies not read yet
        self.probs: dict[int, np.ndarray] = {}
        self.coverage: dict[int, np.ndarray] = {}
        self.records: dict[int, StudyRecord] = {}
        self.timings = Timings()
        self.warnings: list[str] = []
        self.faults: dict[str, Any] = {"oom_retries": 0}
        self.memory: dict[str, int] = {}  # measured peak bytes of one forward, per member
        self.loader_rss = 0.0
        self.last: float | None = None  # clock at the last settled chunk: the guard's chunk wall time
        self.t0 = time.perf_counter()
        # Waits run on the real clock; the guard's deadlines are translated once, here.
        self.wait_deadline = self.hard_deadline = None
        if guard is not None:
            real, now = time.monotonic(), clock()
            self.wait_deadline = real + (guard.deadline - now)
            self.hard_deadline = real + (guard.hard_deadline - now)
        self.bar = tqdm(total=len(self.ids), unit="study", desc="predict", disable=not progress, smoothing=0.1)

    # -- the deadline ----------------------------------------------------------------------
    def probing(self, replicas: "ReplicaSet") -> bool:
        """Costs unknown and the probe chunk still running: wait for it before reading more."""
        return self.guard is not None and not self.guard.measured and replicas.busy

    def next_chunk_size(self, chunk_size: int) -> int:
        """A one-study probe until the guard has measured a chunk, then ``chunk_size``."""
        probe = self.guard is not None and not self.guard.measured
        return min(self.to_take, 1 if probe else chunk_size)

    def decide(self, n: int) -> tuple[Plan, int]:
        """The plan for the next chunk and how many of its ``n`` studies to read."""
        if self.guard is None:
            return self.full_plan, n
        return self.guard.choose(self.to_take), self.guard.admit(n)

    def past_deadline(self) -> bool:
        return self.hard_deadline is not None and time.monotonic() >= self.hard_deadline

    def rest_get_priors(self, stream: "StudyStream", out_of_time: bool, no_device: bool = False) -> None:
        """Every study not read yet gets prior rows unread; the stream stops."""
        if out_of_time and self.guard is not None:
            self.guard.give_up("waiting for the loading workers reached the deadline" if stream.out_of_time
                               else "a chunk was still running at the end of the budget" if no_device
                               else "the cheapest plan does not fit")
        skipped = stream.skip(self.to_take)
        stream.stop()
        if no_device and not out_of_time:
            msg = f"no working device left: the {len(skipped)} studies not read yet got prior rows"
            logger.error("%s", msg)
            self.warnings.append(msg)
        for sid in skipped:
            rec = self.records[sid] = StudyRecord(sid, status="skipped" if out_of_time else "fallback")
            rec.fallbacks.append("deadline: no time left to run the models; prior rows" if out_of_time
                                 else "no working device left; prior rows" if no_device
                                 else "the study stream ended early; prior rows")
        if self.guard is not None:
            self.guard.gave_priors(len(skipped))
        self.bar.update(len(skipped))
        self.to_take = 0

    # -- collection --------------------------------------------------------------------------
    def took(self, loaded: Sequence["LoadedStudy"]) -> None:
        self.to_take -= len(loaded)
        for ls in loaded:
            self.timings.add("load", ls.load_s)
            self.timings.add("prepare_at_load", ls.prepare_s)
            self.loader_rss = max(self.loader_rss, ls.peak_rss_mb)
        if loaded and self.last is None:  # the first chunk's time counts from its start, not the workers' start-up
            self.last = self.clock()

    def settle(self, outcome: "ChunkOutcome") -> None:
        """A chunk ended: merge what it produced, or give its studies prior rows with why."""
        from ..runtime.devices import FINISHED

        chunk, now = outcome.chunk, self.clock()
        if outcome.status == FINISHED:
            out: ChunkOutput = outcome.output
            self.probs.update(out.probs)
            self.coverage.update(out.coverage)
            self.records.update(out.records)
            self.timings.merge(out.timings)
            self.faults["oom_retries"] += out.oom_retries
            for name, b in out.memory.items():
                self.memory[name] = max(self.memory.get(name, 0), b)
            if self.guard is not None and self.last is not None:
                self.guard.observe(len(out.records), now - self.last, out.member_s, chunk.plan.tta,
                                   n_devices=len(self.device_names), load_s=out.load_s)
        else:
            one = len(self.device_names) == 1
            for ls in chunk.loaded:
                rec = self.records[ls.study_id] = StudyRecord(ls.study_id, warnings=list(ls.warnings), errors=list(ls.errors))
                rec.errors += [f"chunk: {why}" if one else f"chunk on {self.device_names[r]}: {why}" for r, why in chunk.failures]
                rec.fallbacks.append(f"the chunk holding this study {outcome.status} on every device tried; prior rows")
        self.last = now
        self.bar.update(len(chunk.loaded))
        self.bar.set_postfix_str(chunk.plan.label if chunk.plan.label != "full" else "", refresh=False)

    def note_stream(self, stream: "StudyStream") -> None:
        self.warnings += stream.warnings
        self.faults["workers"] = [e.to_dict() for e in stream.events]
        self.faults["worker_processes"] = dict(stream.worker_stats)

    def stopped_early(self, exc: BaseException, replicas: "ReplicaSet") -> None:
        """The loop itself failed: keep what is done (chunks in flight included), the rest
        get priors (predict fills in every study without a record)."""
        logger.error("the run stopped early after %d of %d studies", len(self.records), len(self.ids), exc_info=exc)
        limit = time.monotonic() + 60.0
        try:
            for outcome in replicas.drain(limit if self.hard_deadline is None else min(limit, self.hard_deadline)):
                self.settle(outcome)
        except Exception as err:
            logger.error("a chunk in flight was lost: %s: %s", type(err).__name__, err)
        self.warnings.append(f"run stopped early after {len(self.records)} of {len(self.ids)} studies: "
                             f"{type(exc).__name__}: {exc}; the remaining studies got prior rows")

    def close(self) -> None:
        self.bar.close()

    def result(self, replicas: "ReplicaSet") -> RunResult:
        from ..runtime.streaming import peak_rss_mb

        self.warnings += replicas.warnings
        self.faults["devices"] = replicas.events
        self.faults["retired_devices"] = [{"device": r.name, "replica": r.index, "why": r.retired}
                                          for r in replicas.replicas if r.retired]
        return RunResult(
            study_ids=self.ids, probs=self.probs, coverage=self.coverage, records=self.records, timings=self.timings,
            deadline=None if self.guard is None else self.guard.to_dict(), wall_s=time.perf_counter() - self.t0,
            warnings=self.warnings, peak_rss_mb={"main": round(peak_rss_mb(), 1), "loader": round(self.loader_rss, 1)},
            faults=self.faults,
        )
