"""The main job: a Kaggle-layout test root in, ``submission.csv`` (+ ``run_report.json``) out.

`Predictor` owns every model of a manifest. It is built once: each model is built, loaded
strictly from its safetensors file and proved by one dummy forward *before any DICOM is
read*, so configuration errors fail in seconds, not hours. Then studies stream through it
in chunks (`rsna_infer.runtime.streaming`): workers decode and preprocess the next chunk while the
models run on the current one, model by model with batches across the chunk's studies:

    stage-1 prepare -> run (folds of a family/variant averaged) -> decode -> keypoint sets
    -> stage-1 finalize (cross-view check, projection fallback)
    -> stage-2 prepare (crops around the keypoints) -> run -> blend (per condition group,
       masked, softmax last) -> probabilities [5, 5, 3] per study

A failure inside one study (unreadable files, a prepare or decode exception, a non-finite
output) is caught, logged and recorded; that study keeps whatever views worked and its
remaining targets get prior rows. A `DeadlineGuard` sheds TTA and then low-weight members
when a time budget is given. On CUDA: fp16 autocast, ``inference_mode``, cudnn benchmark;
each device holds a replica of the ensemble and runs chunks on its own thread
(`rsna_infer.runtime.devices.ReplicaSet`: a chunk that fails on one replica is re-run on another).
On CPU everything runs in fp32. `predict` adds the run's safety net: a priors-only
``submission.csv`` right after discovery, replaced by the real one at the end.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..constants import CONDITION_GROUP_INDEX, GROUPS, N_CLASSES, N_CONDITIONS, N_LEVELS
from ..models.ensemble import blend_coverage, blend_logits, member_weights
from ..models.manifest import Manifest, ManifestError, demo_entries, load_manifest, resolve_manifest_path
from ..models.prep_groups import PrepGroup, default_num_workers, preparation_groups
from ..output import OutputError
from ..runtime.deadline import DeadlineGuard, Plan, build_ladder
from ..runtime.devices import DeviceError, is_device_fault, is_out_of_memory, resolve_devices
from ..runtime.memory import MemoryProbe
from ..specs import ModelEntry
from .report import RunReport, StudyRecord, Timings, keypoints_dict

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from ..estimate.typical import StudyGeometry
    from ..io.discovery import StudyRef
    from ..io.volume import Study
    from ..keypoints import KeypointSet, StudyKeypoints
    from ..models.family import Family, Sample
    from ..models.members import LoadedMember
    from ..runtime.devices import ChunkOutcome, ReplicaSet
    from ..runtime.memory import MemoryPlan
    from ..runtime.streaming import LoadedStudy, StudyStream

logger = logging.getLogger(__name__)

DEMO_WARNING = (
    "USING THE PACKAGED DEMO WEIGHTS: they were trained on synthetic phantom studies and are "
    "meaningless on real MRI. Pass manifest=... (CLI --manifest, or $RSNA_INFER_MANIFEST) for real weights."
)
#: Default studies per chunk: large enough for full batches, small enough to bound memory.
DEFAULT_CHUNK_SIZE = 16


def _family_or_manifest_error(entry: ModelEntry) -> "Family":
    """``entry``'s family object; a bad variant or bad kwargs is a `ManifestError` (as at load)."""
    from ..models.registry import make_family

    try:
        return make_family(entry)
    except Exception as e:
        raise ManifestError(f"model {entry.name!r}: cannot set up family {entry.family!r}: {e}") from e


def _default_finalize() -> Callable[["Study", "StudyKeypoints"], "StudyKeypoints"]:
    from ..stage1.assemble import finalize

    return finalize


@dataclass
class ChunkOutput:
    """What one chunk produced; merged by the caller (also across device threads)."""

    probs: dict[int, np.ndarray] = field(default_factory=dict)
    coverage: dict[int, np.ndarray] = field(default_factory=dict)
    records: dict[int, StudyRecord] = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)
    member_s: dict[str, float] = field(default_factory=dict)
    oom_retries: int = 0  # batches split after CUDA out-of-memory
    load_s: dict[str, float] = field(default_factory=dict)  # streamed: seconds moving each member's weights in
    memory: dict[str, int] = field(default_factory=dict)  # peak bytes of one forward per member, where measured
    #: What an observer (`RunObserver`, e.g. the QA pages of `rsna_infer.viz`) keeps of this
    #: chunk's samples and keypoints; None without an observer.
    capture: Any = None


class RunObserver(Protocol):
    """Watches a run without changing it (`rsna_infer.viz.QACollector` writes QA pages).

    ``new_chunk()`` returns a per-chunk capture with ``add(group, family, items)``, called
    with every group's ``(study_id, sample)`` list as stage 1 and stage 2 get them, and
    ``close(studies, keypoints, out)``, called once after the blend. A chunk that fails
    simply drops its capture. Without an observer none of this runs.
    """

    def new_chunk(self) -> Any: ...


@dataclass
class RunResult:
    """Per-study probabilities and coverage (targets a model predicted), records, timings."""

    study_ids: list[int]
    probs: dict[int, np.ndarray]
    coverage: dict[int, np.ndarray]
    records: dict[int, StudyRecord]
    timings: Timings
    deadline: dict[str, Any] | None
    wall_s: float
    warnings: list[str] = field(default_factory=list)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)  # main process / loading process(es)
    faults: dict[str, Any] = field(default_factory=dict)  # what the machine did: workers, devices, OOM
    memory: dict[str, Any] = field(default_factory=dict)  # device memory: mode, plan, what was measured


class Predictor:
    """Every model of a manifest, loaded once and validated, ready to run on studies.

    ``manifest``: a `Manifest` or a path. ``device``: see `resolve_devices`. ``tta``: flip
    TTA in every family's ``run``. ``verify``: check sha256 of every weight file.
    ``finalize``: the stage-1 finalisation ``(study, keypoints) -> keypoints`` (default
    `rsna_infer.stage1.assemble.finalize`). ``clock``: time source of the deadline guard
    (waits and watchdogs always use ``time.monotonic``). ``precision``, ``channels_last``:
    how the weights are held (`rsna_infer.models.members`). ``members``: ``auto`` | ``resident`` |
    ``streamed`` and ``device_memory_gb`` (a card's memory to plan with; on the CPU a
    stand-in): the device memory plan (`rsna_infer.runtime.memory`, made on ``memory_geometry``, a
    typical study by default). Raises `ManifestError` (models, weights, paths) or
    `rsna_infer.runtime.devices.DeviceError` before any study is read.
    """

    def __init__(
        self,
        manifest: "Manifest | str | os.PathLike",
        device: "str | Sequence[str] | None" = None,
        tta: bool = True,
        batch_size: int | None = None,
        verify: bool = True,
        finalize: Callable[["Study", "StudyKeypoints"], "StudyKeypoints"] | None = None,
        clock: Callable[[], float] = time.monotonic,
        precision: str = "auto",
        channels_last: bool = False,
        members: str = "auto",
        device_memory_gb: float | None = None,
        memory_geometry: "StudyGeometry | None" = None,
    ) -> None:
        import torch

        from ..models.members import load_member
        from ..runtime.memory import MODES, Residency

        self.timings = Timings()
        self._failed = _FailureLog()
        self._crop_s: dict[str, float] = {}  # stage-2 group -> seconds per study its crops took last
        self.notes: list[str] = []  # run warnings from setup (a GPU passed over for the CPU...)
        t0 = time.perf_counter()
        self.manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest, verify=verify)
        if isinstance(manifest, Manifest):
            self.manifest.check_files(verify=verify)
        self.manifest.check_for_prediction()
        self.devices = resolve_devices(device, self.notes)
        self.tta = bool(tta)
        self.clock = clock
        on_cuda = self.devices[0].type == "cuda"
        self.batch_size = int(batch_size or (32 if on_cuda else 8))
        if on_cuda:
            torch.backends.cudnn.benchmark = True
        if members not in MODES:
            raise ValueError(f"members must be one of {MODES}, got {members!r}")
        self.precision = precision
        self.channels_last = bool(channels_last)
        self.entries: dict[str, ModelEntry] = {m.name: m for m in self.manifest.models}
        self.groups1, self.groups2 = preparation_groups(self.manifest.models, _family_or_manifest_error)
        self._check_inputs()
        if self.manifest.stage1 and finalize is None:
            finalize = _default_finalize()
        self.finalize = finalize
        if not self.manifest.stage2:
            logger.warning("the manifest has no stage-2 models: every row will be the class priors")
        #: [5 conditions] bool: conditions of the manifest's ``prior_groups`` (see `_blend`)
        self._prior_conditions = np.array([GROUPS[g] in self.manifest.prior_groups for g in CONDITION_GROUP_INDEX])
        if self.manifest.prior_groups:
            note = (f"condition group(s) {list(self.manifest.prior_groups)} get the class priors: the manifest's blend fit "
                    "found no stage-2 member that beats them out of fold")
            logger.info("%s", note)
            self.notes.append(note)
        # The device memory plan decides whether the members stay on the device or are streamed.
        self.memory_plan = self._plan_memory(members, device_memory_gb, memory_geometry)
        self.streamed = self.memory_plan is not None and self.memory_plan.mode == "streamed"
        self._probe_cpu_memory = device_memory_gb is not None  # a budget stands in for a card: measure too
        if self.memory_plan is not None:
            log = logger.warning if not self.memory_plan.fits else logger.info
            log("device memory: %s", self.memory_plan.reason)
            for a in self.memory_plan.advice:
                logger.warning("device memory: %s", a)
                self.notes.append(f"device memory: {a}")
        # One replica of the ensemble per device; built and checked before any DICOM is read.
        self.replicas: list[dict[str, LoadedMember]] = []
        self.load_s: dict[str, float] = {}
        for dev in self.devices:
            replica = {}
            for entry in self.manifest.models:
                t = time.perf_counter()
                replica[entry.name] = load_member(entry, self.manifest.resolve(entry), device=dev, tta=self.tta,
                                                  precision=precision, channels_last=self.channels_last,
                                                  resident=not self.streamed)
                self.load_s[entry.name] = self.load_s.get(entry.name, 0.0) + time.perf_counter() - t
            self.replicas.append(replica)
        self.notes += [n for m in self.replicas[0].values() for n in m.notes]
        self.residency = [Residency(rep, self.streamed) for rep in self.replicas]
        self.timings.add("setup/models", time.perf_counter() - t0)
        logger.info(
            "predictor ready: %d model(s) (%d stage-1, %d stage-2) on %s in %.1fs",
            len(self.entries), len(self.manifest.stage1), len(self.manifest.stage2),
            ", ".join(map(str, self.devices)), time.perf_counter() - t0,
        )

    def _plan_memory(self, mode: str, device_memory_gb: float | None, geometry: "StudyGeometry | None") -> "MemoryPlan | None":
        """Each member's device memory on a typical study at this batch size, and the mode
        (`rsna_infer.runtime.memory.plan_memory`). None on the CPU without ``device_memory_gb`` and
        without ``members="streamed"``: nothing to plan for."""
        from ..estimate.cost import cost_manifest
        from ..models.members import dtype_name, weight_dtype
        from ..runtime.memory import device_memory_bytes, member_memory, plan_memory

        dev = self.devices[0]
        budget = device_memory_bytes(dev, device_memory_gb)
        if budget is None and mode != "streamed":
            return None
        t = time.perf_counter()
        cost = cost_manifest(self.manifest, geometry, measure_cpu=False, memory_batch=self.batch_size, count_flops=False)
        rows = {}
        for e in self.manifest.models:
            sc = cost.member(e.name)
            dtype = dtype_name(weight_dtype(e, dev, self.precision))
            rows[e.name] = member_memory(e.name, cost.member_prep[e.name], sc.memory, sc.memory_batch, sc.memory_batch_bytes,
                                         dtype, autocast=dev.type == "cuda")
        plan = plan_memory(rows, [(g.key, list(g.members)) for g in self.groups1 + self.groups2], budget, mode)
        self.timings.add("setup/memory_plan", time.perf_counter() - t)
        return plan

    # -- structure --------------------------------------------------------------------------
    def _check_inputs(self) -> None:
        """Stage-1 folds are averaged on raw outputs, so they must share one input."""
        for g in self.groups1:
            first = self.entries[g.members[0]]
            for name in g.members[1:]:
                e = self.entries[name]
                if e.input != first.input:
                    raise ManifestError(
                        f"stage-1 models {first.name!r} and {name!r} ({g.key}) have different input specs; "
                        "folds of one stage-1 family/variant are averaged on their raw outputs and must share one input"
                    )

    def family(self, group: PrepGroup, replica: int = 0) -> "Family":
        """The family object that prepares, collates and decodes for ``group``."""
        return self.replicas[replica][group.members[0]].family

    def preparers(self) -> list[tuple[str, "Family"]]:
        """``(group key, family)`` for the preprocessing the loading workers do."""
        return [(g.key, self.family(g)) for g in self.groups1 + self.groups2 if g.in_worker]

    def full_plan(self) -> Plan:
        return Plan(self.tta, frozenset(self.entries), "full")

    # -- running ----------------------------------------------------------------------------
    def run(
        self,
        refs: Sequence["StudyRef"],
        num_workers: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        time_budget_s: float | None = None,
        start: float | None = None,
        progress: bool = True,
        study_timeout_s: float | None = None,
        start_method: str | None = None,
        observer: RunObserver | None = None,
        read_ahead: int | None = None,
    ) -> RunResult:
        """Predict every study of ``refs`` (from `rsna_infer.io.discover_studies`).

        ``start``: clock value the time budget counts from (default: now).
        ``study_timeout_s``: the loading workers' per-study watchdog (default
        `rsna_infer.runtime.streaming.study_timeout_for` the budget); a device may take that long per
        study of a chunk before it counts as hung. ``start_method``: the workers' (default
        fork where it exists, else spawn). ``observer``: see `RunObserver` (None: nothing is
        captured). ``read_ahead``: studies the loading workers decode beyond the chunks taken
        (default `rsna_infer.runtime.streaming.default_read_ahead`: the chunk a device runs plus this
        many decoded studies bound the memory; more hides more loading behind the device).
        """
        from ..runtime.devices import ReplicaSet
        from ..runtime.streaming import StudyStream, default_read_ahead, study_timeout_for

        num_workers = default_num_workers() if num_workers is None else int(num_workers)
        read_ahead = default_read_ahead(num_workers) if read_ahead is None else max(1, int(read_ahead))
        chunk_size = max(1, int(chunk_size))
        guard = None
        if time_budget_s is not None:
            guard = DeadlineGuard(float(time_budget_s), build_ladder(self.manifest.models, self.tta), clock=self.clock, start=start,
                                  chunk_studies=chunk_size)
        timeout = float(study_timeout_s) if study_timeout_s else study_timeout_for(time_budget_s)
        state = _RunState(refs, guard, self.full_plan(), self.clock, [str(d) for d in self.devices], progress)
        run_chunk = self.run_chunk if observer is None else functools.partial(self.run_chunk, observer=observer)
        replicas = ReplicaSet(run_chunk, state.device_names, study_timeout_s=timeout)
        try:
            with StudyStream(refs, self.preparers(), num_workers, prefetch=read_ahead,
                             start_method=start_method, study_timeout_s=timeout) as stream:
                try:
                    self._feed(stream, replicas, state, chunk_size)
                finally:
                    state.note_stream(stream)
        except Exception as e:  # never lose the run: what is done is kept, the rest gets priors
            state.stopped_early(e, replicas)
        finally:
            replicas.close()
            state.close()
        return state.result(replicas, self.memory_report(state.memory))

    def _feed(self, stream: "StudyStream", replicas: "ReplicaSet", state: "_RunState", chunk_size: int) -> None:
        """Read a chunk whenever a device is free, settle each chunk as it ends.

        Devices: `rsna_infer.runtime.devices.ReplicaSet` (failover, hung devices); the deadline:
        `_RunState.decide` (a one-study probe chunk until costs are measured); results and
        prior rows: `_RunState.settle`."""
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

    def run_chunk(
        self, loaded: Sequence["LoadedStudy"], plan: Plan, replica: int = 0, observer: RunObserver | None = None
    ) -> ChunkOutput:
        """Stage 1, finalize, stage 2 and the blend for one chunk of decoded studies.

        The stage-2 crops are cut on a CPU thread (``prepare-N``) while the device runs: the
        thread prepares the groups in run order, and the device runs a group's members as
        soon as its crops are ready, so it waits only for the first group's crops."""
        out = ChunkOutput(capture=None if observer is None else observer.new_chunk())
        studies: dict[int, Study] = {}
        t_chunk = time.perf_counter()
        for ls in loaded:
            rec = out.records[ls.study_id] = StudyRecord(ls.study_id, warnings=list(ls.warnings), errors=list(ls.errors))
            if ls.study is None:
                rec.fallbacks.append("study could not be read; prior rows")
            else:
                studies[ls.study_id] = ls.study
        by_id = {ls.study_id: ls for ls in loaded}
        kps = self._stage1(studies, by_id, plan, replica, out)
        for sid, kp in kps.items():
            out.records[sid].keypoints = keypoints_dict(kp)
            out.records[sid].cross_view = _jsonable(kp.report)
        if studies:
            prep = ThreadPoolExecutor(1, thread_name_prefix=f"prepare-{replica}")
            try:
                names, logits, masks = self._stage2(studies, by_id, kps, plan, replica, out, prep)
            finally:
                prep.shutdown(wait=True, cancel_futures=True)
            self._blend(sorted(studies), names, logits, masks, out)
        if out.capture is not None:
            out.capture.close(studies, kps, out)
        per_study = (time.perf_counter() - t_chunk) / max(1, len(loaded))
        for ls in loaded:
            out.records[ls.study_id].seconds = per_study + ls.load_s + ls.prepare_s
        return out

    def _stage1(
        self, studies: dict[int, "Study"], by_id: dict[int, "LoadedStudy"], plan: Plan, replica: int, out: ChunkOutput
    ) -> dict[int, "StudyKeypoints"]:
        """Keypoints of every study: groups in family order, folds averaged, then finalize."""
        from ..keypoints import StudyKeypoints
        from ..stage1.assemble import merge_decoded

        members = self.replicas[replica]
        kps = {sid: StudyKeypoints(sid) for sid in studies}
        for g in self.groups1:
            active = [n for n in g.members if n in plan.members]
            if not active:
                continue
            family = members[g.members[0]].family
            if g.in_worker:
                items = [(sid, s) for sid in studies for s in by_id[sid].samples.get(g.key, [])]
            else:  # it reads keypoints of an earlier group: prepared now, on this thread
                items = self._take_prepared(g, family, self._prepare(g, family, studies, kps), out)
            if out.capture is not None and g.in_worker:
                out.capture.add(g, family, items)
            if not items:
                continue
            runs = self._run_group(replica, g.key, [members[n] for n in active], [s for _, s in items], plan.tta, out,
                                   [sid for sid, _ in items])
            sums: list[np.ndarray | None] = [None] * len(items)
            counts = np.zeros(len(items), np.int64)
            for outs in runs:  # folds averaged on run's output, before decode
                for i, o in enumerate(outs):
                    if o is not None:
                        sums[i] = o.astype(np.float64) if sums[i] is None else sums[i] + o
                        counts[i] += 1
            t = time.perf_counter()
            decoded: dict[int, list[KeypointSet]] = {}
            for i, (sid, sample) in enumerate(items):
                if counts[i] == 0:
                    continue
                try:
                    ks = family.decode((sums[i] / counts[i]).astype(np.float32), sample, studies[sid])
                except Exception as e:
                    self._failed(f"decode {g.key}", sid, e)
                    out.records[sid].error(f"decode {g.key}", e)
                    continue
                decoded.setdefault(sid, []).append(ks)
            for sid, sets in decoded.items():
                try:
                    kps[sid] = merge_decoded(family, sets, kps[sid])
                except Exception as e:
                    self._failed(f"merge {g.key}", sid, e)
                    out.records[sid].error(f"merge {g.key}", e)
            out.timings.add(f"stage1/{g.key}/decode", time.perf_counter() - t)
        if self.finalize is not None:
            t = time.perf_counter()
            for sid, study in studies.items():
                try:
                    done = self.finalize(study, kps[sid])
                    if done is not None:
                        kps[sid] = done
                except Exception as e:
                    self._failed("stage1 finalize", sid, e)
                    out.records[sid].error("stage1 finalize", e)
            out.timings.add("stage1/finalize", time.perf_counter() - t)
        return kps

    def _stage2(
        self,
        studies: dict[int, "Study"],
        by_id: dict[int, "LoadedStudy"],
        kps: dict[int, "StudyKeypoints"],
        plan: Plan,
        replica: int,
        out: ChunkOutput,
        prep: ThreadPoolExecutor,
    ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Per active stage-2 member: logits [S, 5, 5, 3] and masks [S, 5, 5] over the
        chunk's studies (sorted ids); a study's samples are averaged per target under their
        masks. Crops come from ``prep`` (a CPU thread), group by group, while the device runs."""
        members = self.replicas[replica]
        names = [m.name for m in self.manifest.stage2 if m.name in plan.members]
        col = {sid: j for j, sid in enumerate(sorted(studies))}
        logits = np.zeros((len(names), len(col), N_CONDITIONS, N_LEVELS, N_CLASSES))
        masks = np.zeros((len(names), len(col), N_CONDITIONS, N_LEVELS), dtype=bool)
        row = {n: i for i, n in enumerate(names)}
        todo = []
        # cheapest crops first (as measured on earlier chunks): the device waits only for the
        # first group's crops; every group writes its own rows, so the order changes nothing else
        for g in sorted(self.groups2, key=lambda g: self._crop_s.get(g.key, 0.0)):
            active = [n for n in g.members if n in row]
            if active:
                family = members[g.members[0]].family
                if g.in_worker:
                    ready: Future = Future()
                    ready.set_result(([(sid, s) for sid in studies for s in by_id[sid].samples.get(g.key, [])], [], 0.0))
                    todo.append((g, family, active, ready))
                else:  # the thread prepares the groups in order while the device runs the earlier ones
                    todo.append((g, family, active, prep.submit(self._prepare, g, family, studies, kps)))
        for g, family, active, fut in todo:
            t = time.perf_counter()
            prepared = fut.result()
            out.timings.add("stage2/wait_for_crops", time.perf_counter() - t)
            items = self._take_prepared(g, family, prepared, out)
            if not items:
                continue
            runs = self._run_group(replica, g.key, [members[n] for n in active], [s for _, s in items], plan.tta, out,
                                   [sid for sid, _ in items])
            for name, outs in zip(active, runs):
                acc = np.zeros(logits.shape[1:])
                cnt = np.zeros(masks.shape[1:])
                for (sid, sample), o in zip(items, outs):
                    if o is None:
                        continue
                    m = np.ones((N_CONDITIONS, N_LEVELS), bool) if sample.mask is None else np.asarray(sample.mask, bool)
                    m = m & np.all(np.isfinite(o), axis=-1)
                    acc[col[sid]] += np.where(m[..., None], o, 0.0)
                    cnt[col[sid]] += m
                have = cnt > 0
                logits[row[name]] = acc / np.where(have, cnt, 1.0)[..., None]
                masks[row[name]] = have
        return names, logits, masks

    def _blend(self, sids: list[int], names: list[str], logits: np.ndarray, masks: np.ndarray, out: ChunkOutput) -> None:
        """Blended probabilities and coverage of every study into ``out``."""
        t = time.perf_counter()
        weights = member_weights([self.entries[n] for n in names])
        p = blend_logits(logits, masks, weights, self.manifest.priors)
        cov = blend_coverage(logits, masks, weights)
        if self._prior_conditions.any():  # the fitted blend chose the priors there: covered, on purpose
            cov[:, self._prior_conditions] = True
        for j, sid in enumerate(sids):
            if np.all(np.isfinite(p[j])):
                out.probs[sid] = p[j]
                out.coverage[sid] = cov[j]
            else:  # cannot happen with finite masked inputs; never let it reach the CSV
                out.records[sid].fallbacks.append("blend produced non-finite values; prior rows")
        out.timings.add("blend", time.perf_counter() - t)

    @staticmethod
    def _prepare(
        g: PrepGroup, family: "Family", studies: dict[int, "Study"], kps: dict[int, "StudyKeypoints"]
    ) -> tuple[list[tuple[int, "Sample"]], list[tuple[int, BaseException]], float]:
        """``(study_id, sample)`` of every study for a group that reads keypoints, the
        per-study failures and the seconds it took. Touches nothing shared (it runs on the
        preparation thread); `_take_prepared` records the outcome."""
        items: list[tuple[int, Sample]] = []
        failures: list[tuple[int, BaseException]] = []
        t = time.perf_counter()
        for sid, study in studies.items():
            try:
                items += [(sid, s) for s in family.prepare(study, kps[sid])]
            except Exception as e:
                failures.append((sid, e))
        return items, failures, time.perf_counter() - t

    def _take_prepared(
        self, g: PrepGroup, family: "Family", prepared: tuple[list, list, float], out: ChunkOutput
    ) -> list[tuple[int, "Sample"]]:
        """Record what `_prepare` made (timing, per-study failures, the observer's capture)."""
        items, failures, seconds = prepared
        if g.stage == 2 and not g.in_worker:
            self._crop_s[g.key] = seconds / max(1, len({sid for sid, _ in items}) + len(failures))
        for sid, e in failures:
            self._failed(f"prepare {g.key}", sid, e)
            out.records[sid].error(f"prepare {g.key}", e)
        if not g.in_worker:
            out.timings.add(f"stage{g.stage}/{g.key}/prepare", seconds)
        if out.capture is not None and (g.stage == 2 or not g.in_worker):
            out.capture.add(g, family, items)
        return items

    def _run_group(
        self, replica: int, group: str, members: Sequence["LoadedMember"], samples: list["Sample"], tta: bool,
        out: ChunkOutput, sids: list[int],
    ) -> list[list[np.ndarray | None]]:
        """Outputs of each member for every sample (None where it failed).

        Samples are batched by shape (a family's ``length_axis`` by bucket, see
        `length_bucket`), at most ``batch_size`` per batch; each batch is collated and copied
        to the device once and run through every member of the group. A failing batch is
        retried in halves for the member that failed it, so one bad study costs only its own
        output; CUDA out-of-memory is handled the same way, after the cache is emptied. A
        device fault (`rsna_infer.runtime.devices.is_device_fault`) is not the studies' doing: it
        propagates, and the chunk is re-run on another replica.

        Streamed members (`rsna_infer.runtime.memory`) are loaded first: the whole group, or one
        member at a time when the plan says the group does not fit at once; a member that
        cannot be loaded costs these studies its output, nothing else."""
        results: list[list[np.ndarray | None]] = [[None] * len(samples) for _ in members]
        batches = batches_by_shape(members[0].family, samples, self.batch_size)
        every = list(range(len(members)))
        unit = "group" if self.memory_plan is None else self.memory_plan.units.get(group, "group")
        for which in [every] if not self.streamed or unit == "group" else [[w] for w in every]:
            t = time.perf_counter()
            held = self.residency[replica].hold([members[w].name for w in which])
            for w in which:
                got = held[members[w].name]
                if isinstance(got, BaseException):
                    for sid in dict.fromkeys(sids):
                        self._failed(f"load {members[w].name}", sid, got)
                        out.records[sid].error(f"run {members[w].name}: its weights could not be loaded", got)
                elif got:
                    out.load_s[members[w].name] = out.load_s.get(members[w].name, 0.0) + got
            out.timings.add("streaming/load_weights", time.perf_counter() - t)
            ok = [w for w in which if not isinstance(held[members[w].name], BaseException)]
            for idx in batches if ok else []:
                self._run_batch(members, ok, samples, idx, tta, out, sids, results)
        return results

    def _run_batch(self, members: Sequence["LoadedMember"], which: list[int], samples: list["Sample"], idx: list[int],
                   tta: bool, out: ChunkOutput, sids: list[int], results: list[list[np.ndarray | None]]) -> None:
        """Run ``members[which]`` on the samples ``idx`` (one collate and device copy for all)."""
        lead = members[which[0]]
        t = time.perf_counter()
        failed: dict[int, bool] = {}  # member position -> out of memory (split in halves)
        batch = None
        try:
            batch = _to_device(lead, [samples[i] for i in idx], _pad_length(lead.family, samples, idx))
        except Exception as e:
            if is_device_fault(e):
                raise
            failed = {w: False for w in which}
            self._note_failure(members, which, idx, sids, e, out)
        out.timings.add(f"stage{lead.entry.stage}/collate", time.perf_counter() - t)
        for w in which if batch is not None else []:
            m = members[w]
            c0, t0 = self.clock(), time.perf_counter()
            try:
                with MemoryProbe(m.device, cpu=self._probe_cpu_memory) as probe:
                    arr = _run_on_device(m, batch, tta)
                if probe.bytes:
                    used = probe.bytes + sum(v.numel() * v.element_size() for v in batch.values())
                    out.memory[m.name] = max(out.memory.get(m.name, 0), used)
                if arr.shape[0] != len(idx):
                    raise RuntimeError(f"{m.name}: run returned {arr.shape[0]} outputs for {len(idx)} samples")
            except Exception as e:
                if is_device_fault(e):
                    raise
                failed[w] = is_out_of_memory(e)
                self._note_failure(members, [w], idx, sids, e, out)
                arr = None
            finally:
                out.member_s[m.name] = out.member_s.get(m.name, 0.0) + (self.clock() - c0)
                out.timings.add(f"stage{m.entry.stage}/{m.name}/run", time.perf_counter() - t0)
            if arr is None:
                continue
            length = _length_of(m.family)
            for j, i in enumerate(idx):
                o = arr[j] if length is None else arr[j][: samples[i].inputs[length[0]].shape[length[1]]]
                if np.all(np.isfinite(o)):
                    results[w][i] = o
                else:
                    out.records[sids[i]].warn(f"model {m.name}: non-finite output dropped")
        del batch
        if failed and len(idx) > 1:
            # Split outside the except blocks: a live traceback still holds the failed attempt's
            # frames (its batch, its activations), which no empty_cache frees.
            oom = [w for w, o in failed.items() if o]
            for w in oom:
                out.oom_retries += 1
                logger.warning("%s: out of memory on a batch of %d on %s; cache emptied, retrying in halves",
                               members[w].name, len(idx), members[w].device)
            _release_cuda_cache(lead, collect=bool(oom))
            half = len(idx) // 2
            again = sorted(failed)
            self._run_batch(members, again, samples, idx[:half], tta, out, sids, results)
            self._run_batch(members, again, samples, idx[half:], tta, out, sids, results)

    def _note_failure(self, members: Sequence["LoadedMember"], which: list[int], idx: list[int], sids: list[int],
                      exc: BaseException, out: ChunkOutput) -> None:
        """A batch of one that failed costs its study that member's output (larger ones are split)."""
        if len(idx) != 1:
            return
        sid = sids[idx[0]]
        for w in which:
            self._failed(f"run {members[w].name}", sid, exc)
            out.records[sid].error(f"run {members[w].name}", exc)

    def set_streaming(self, streamed: bool) -> None:
        """Switch every replica between resident and streamed members (benchmarks compare the
        two on one loaded predictor; a run chooses at construction from the memory plan)."""
        from ..models.members import to_pinned_host
        from ..runtime.memory import Residency

        if streamed == self.streamed:
            return
        for rep in self.replicas:
            for m in rep.values():
                if streamed:
                    to_pinned_host(m)
                else:
                    m.to_device()
                    m._host_of.clear()  # resident from now on: nothing to go back to
        self.streamed = streamed
        self.residency = [Residency(rep, streamed) for rep in self.replicas]

    def memory_report(self, measured: dict[str, int] | None = None) -> dict[str, Any]:
        """Device memory for the run report: the mode, the plan (per member: weights and
        activations at the batch size), what was measured per member, and the peak."""
        import torch

        mb = 2**20
        rep: dict[str, Any] = {"mode": "streamed" if self.streamed else "resident",
                               "precision": self.precision_label(), "batch_size": self.batch_size}
        if self.memory_plan is not None:
            rep["plan"] = self.memory_plan.to_dict()
        rep["weights_mb"] = {n: round(m.weight_bytes / mb, 1) for n, m in self.replicas[0].items()}
        if measured:
            rep["measured_activation_mb"] = {n: round(b / mb, 1) for n, b in sorted(measured.items())}
        if self.streamed:
            rep["loads"] = sum(r.loads for r in self.residency)
            rep["load_s"] = round(sum(r.load_s for r in self.residency), 3)
        peak_w = max(r.peak_weight_bytes for r in self.residency)
        if self.devices[0].type == "cuda":
            rep["measured_peak_mb"] = {str(d): round(torch.cuda.max_memory_allocated(d) / mb, 1) for d in self.devices}
        elif measured:  # the CPU standing in for a card: the weights held at once plus the largest forward
            rep["measured_peak_mb"] = {"cpu": round((peak_w + max(measured.values())) / mb, 1)}
        rep["peak_weights_on_device_mb"] = round(peak_w / mb, 1)
        return rep

    def precision_label(self) -> str:
        """How the members run, for the report: ``"fp16 weights, fp16 autocast"`` (the most
        common), with the exceptions named."""
        kinds: dict[str, list[str]] = {}
        for n, m in self.replicas[0].items():
            kinds.setdefault(m.precision, []).append(n)
        main = max(kinds, key=lambda k: len(kinds[k]))
        rest = [f"{k}: {', '.join(v)}" for k, v in kinds.items() if k != main]
        return main + (f" ({'; '.join(rest)})" if rest else "")

    def models_info(self) -> list[dict[str, Any]]:
        """One line per member for the run report."""
        out = []
        for e in self.manifest.models:
            m = self.replicas[0][e.name].model
            out.append({
                "name": e.name, "stage": e.stage, "family": e.family, "variant": e.variant, "arch": e.arch,
                "fold": e.fold, "file": e.file, "sha256": e.sha256, "blend": dict(e.blend),
                "params": int(sum(p.numel() for p in m.parameters())),
                "load_s": round(self.load_s.get(e.name, 0.0), 3),
            })
        return out


class _RunState:
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

    def result(self, replicas: "ReplicaSet", memory: dict[str, Any] | None = None) -> RunResult:
        from ..runtime.streaming import peak_rss_mb

        self.warnings += replicas.warnings
        self.faults["devices"] = replicas.events
        self.faults["retired_devices"] = [{"device": r.name, "replica": r.index, "why": r.retired}
                                          for r in replicas.replicas if r.retired]
        return RunResult(
            study_ids=self.ids, probs=self.probs, coverage=self.coverage, records=self.records, timings=self.timings,
            deadline=None if self.guard is None else self.guard.to_dict(), wall_s=time.perf_counter() - self.t0,
            warnings=self.warnings, peak_rss_mb={"main": round(peak_rss_mb(), 1), "loader": round(self.loader_rss, 1)},
            faults=self.faults, memory=memory or {},
        )


def _describe_filled(targets: Sequence[str]) -> str:
    """``'priors for 7 target(s): spinal_canal_stenosis x5, left_subarticular_stenosis x2'``."""
    from ..constants import CONDITIONS

    counts = {c: sum(t.startswith(c + "_l") for t in targets) for c in CONDITIONS}
    parts = [f"{c} x{n}" for c, n in counts.items() if n]
    return f"priors for {len(targets)} target(s) no model covered: " + ", ".join(parts)


class _FailureLog:
    """Logs a failure with its traceback the first time per kind (``"decode sag3d/t2"``),
    then as one line, so a systematic failure over 2,000 studies stays readable."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, kind: str, study_id: int, exc: BaseException) -> None:
        first = kind not in self.seen
        self.seen.add(kind)
        logger.error("study %s: %s failed: %s: %s%s", study_id, kind, type(exc).__name__, exc,
                     "" if first else " (traceback logged at the first occurrence)", exc_info=exc if first else None)


def length_bucket(n: int) -> int:
    """The length a stack of ``n`` is padded to along a family's ``length_axis``: the next of
    8, 12, 16, 24, 32, 48, 64, 96, ... (each at most 1.5x the one before), so stacks of
    different lengths share batches and the model sees a few shapes, not one per length."""
    b = 8
    while b < n:
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3
    return b


def _length_of(family: "Family") -> tuple[str, int] | None:
    """A family's ``length_axis``: (input key, axis of the sample) whose length may differ
    between the samples of one batch (see `rsna_infer.models.family.Family.length_axis`)."""
    return getattr(family, "length_axis", None)


def _pad_length(family: "Family", samples: list["Sample"], idx: list[int]) -> int | None:
    length = _length_of(family)
    if length is None:
        return None
    return length_bucket(max(samples[i].inputs[length[0]].shape[length[1]] for i in idx))


def batches_by_shape(family: "Family", samples: Sequence["Sample"], batch_size: int) -> list[list[int]]:
    """Indices of ``samples`` in batches of at most ``batch_size`` that can be collated
    together: equal shapes and dtypes, a ``length_axis`` compared by `length_bucket` (the
    family pads it and masks the padding). Batches follow the samples' order, so they are
    the same whatever the timing of the run."""
    length = _length_of(family)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        sig = []
        for k, v in sorted(s.inputs.items()):
            shape = list(v.shape)
            if length is not None and k == length[0]:
                shape[length[1]] = length_bucket(shape[length[1]])
            sig.append((k, tuple(shape), str(v.dtype)))
        groups.setdefault(tuple(sig), []).append(i)
    return [idx[k : k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]


def _to_device(member: "LoadedMember", samples: list["Sample"], pad_to: int | None) -> dict[str, "torch.Tensor"]:
    """Collate ``samples`` and copy the batch to the member's device (through pinned host
    memory on CUDA, so the copy is asynchronous)."""
    family = member.family
    batch = family.collate(samples) if pad_to is None else family.collate(samples, pad_to=pad_to)  # type: ignore[call-arg]
    if member.device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(member.device, non_blocking=True) for k, v in batch.items()}


def _run_on_device(member: "LoadedMember", batch: dict[str, "torch.Tensor"], tta: bool) -> np.ndarray:
    import torch

    with torch.inference_mode(), member.autocast():
        y = member.family.run(member.model, batch, tta=tta)
    return y.float().cpu().numpy()


def _release_cuda_cache(member: "LoadedMember", collect: bool = False) -> None:
    """Give cached device memory back (after out-of-memory, also collect garbage cycles)."""
    if collect:
        import gc

        gc.collect()
    if member.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


def _jsonable(obj: Any) -> Any:
    """Plain JSON types from a report dict that may hold numpy values."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


# -- the one-call API ------------------------------------------------------------------------


def predict(
    test_dir: str | os.PathLike,
    out_csv: str | os.PathLike = "submission.csv",
    manifest: "str | os.PathLike | Manifest | None" = None,
    device: "str | Sequence[str] | None" = None,
    tta: bool = True,
    num_workers: int | None = None,
    time_budget_s: float | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    batch_size: int | None = None,
    split: str = "test",
    report_path: str | os.PathLike | None = None,
    progress: bool = True,
    clock: Callable[[], float] = time.monotonic,
    finalize: Callable[["Study", "StudyKeypoints"], "StudyKeypoints"] | None = None,
    study_timeout_s: float | None = None,
    study_ids: Sequence[int] | None = None,
    qa_dir: str | os.PathLike | None = None,
    qa_worst: int = 10,
    qa_labels: str | os.PathLike | None = None,
    read_ahead: int | None = None,
    precision: str = "auto",
    channels_last: bool = False,
    members: str = "auto",
    device_memory_gb: float | None = None,
) -> "pd.DataFrame":
    """Write ``out_csv`` (25 rows per study of ``test_dir``'s series CSV) and
    ``run_report.json`` beside it; return the submission frame.

    ``manifest``: path or `Manifest`; default ``$RSNA_INFER_MANIFEST``, else the packaged
    demo manifest (phantom-trained weights, with a loud warning). ``device``: ``"cuda"``,
    ``"cuda:1"``, ``"cpu"``, ``"cuda:0,cuda:1"``; default every GPU, else CPU.
    ``num_workers``: preprocessing processes (0 = in-process; default one per spare core, at
    most 4). ``time_budget_s``: finish within this many seconds of the call (TTA, then
    low-weight members are shed; studies that cannot fit get prior rows).
    ``study_timeout_s``: a loading worker still busy with one study after this long is
    killed and the study gets priors (default 600 s, or a tenth of the budget). ``study_ids``:
    run only these studies of the series CSV (debugging; the CSV then holds only their rows).
    ``qa_dir``: write QA pages there (`rsna_infer.viz`, needs Pillow): the ``qa_worst`` most
    problematic studies get a page with what the models saw, plus an index page of the run;
    ``qa_labels``: a ``train_label_coordinates.csv`` whose points are drawn as ground truth.
    ``read_ahead``: studies decoded ahead of the running chunks (default: workers + 2; more
    hides more loading behind the device, at ~60 MB of memory per realistic study).
    ``precision``: ``"auto"`` (fp16 weights on a GPU, fp32 on the CPU), ``"fp32"`` or
    ``"fp16"`` (see `rsna_infer.models.members`). ``channels_last``: convolution weights in
    channels-last format (``benchmarks/gpu_check.py`` measures whether it helps).
    ``members``: ``"auto"`` (resident when the ensemble fits the card, else streamed),
    ``"resident"`` or ``"streamed"`` (`rsna_infer.runtime.memory`); ``device_memory_gb``: the card's
    memory to plan with instead of its free memory (on the CPU: a stand-in card).

    Order, so that every configuration or path mistake fails before a model runs, with an
    error that says what to fix (`ManifestError`, `rsna_infer.output.OutputError`,
    `rsna_infer.io.NoStudiesError`, `rsna_infer.runtime.devices.DeviceError`): the manifest is
    validated (files, sha256, paths, blend groups) -> the output folder is probed -> studies
    are discovered -> a priors-only ``out_csv`` is written (the safety net: a run killed
    later still leaves a valid submission) -> the models are built and checked -> the
    studies stream through them -> the real ``out_csv`` replaces the safety net. Everything
    runs with ``HF_HUB_OFFLINE=1``.
    """
    from ..models.backbones import hub_offline

    start = clock()
    for name, value in (("time_budget_s", time_budget_s), ("study_timeout_s", study_timeout_s)):
        if value is not None and not (float(value) > 0 and np.isfinite(float(value))):
            raise ValueError(f"{name} must be a positive number of seconds, got {value}")
    with hub_offline():
        return _predict(
            test_dir, Path(out_csv), manifest, device=device, tta=tta, num_workers=num_workers,
            time_budget_s=time_budget_s, chunk_size=chunk_size, batch_size=batch_size, split=split,
            report_path=report_path, progress=progress, clock=clock, finalize=finalize, start=start,
            study_timeout_s=study_timeout_s, select=study_ids, qa_dir=qa_dir, qa_worst=qa_worst, qa_labels=qa_labels,
            read_ahead=read_ahead, precision=precision, channels_last=channels_last, members=members,
            device_memory_gb=device_memory_gb,
        )


def _predict(test_dir: str | os.PathLike, out_csv: Path, manifest: "str | os.PathLike | Manifest | None", *,
             device: Any, tta: bool, num_workers: int | None, time_budget_s: float | None, chunk_size: int,
             batch_size: int | None, split: str, report_path: str | os.PathLike | None, progress: bool,
             clock: Callable[[], float], finalize: Any, start: float, study_timeout_s: float | None,
             select: Sequence[int] | None, qa_dir: str | os.PathLike | None, qa_worst: int,
             qa_labels: str | os.PathLike | None, read_ahead: int | None, precision: str, channels_last: bool,
             members: str, device_memory_gb: float | None) -> "pd.DataFrame":
    from ..io import NoStudiesError, describe_no_studies, discover_studies
    from ..output import probe_writable
    from ..runtime.streaming import default_read_ahead, study_timeout_for
    from ..submission import assemble_submission

    t0 = time.perf_counter()
    collector = None
    if qa_dir is not None:  # before any model is loaded: a missing Pillow or a bad labels file fails in seconds
        from ..viz.capture import QACollector

        collector = QACollector(qa_dir, worst=qa_worst, labels=qa_labels)
    report = RunReport(test_dir=str(test_dir), out_csv=str(out_csv))
    rpath = Path(report_path) if report_path else out_csv.with_name("run_report.json")
    man, man_path, is_demo = _manifest_for_prediction(manifest, report)
    for folder in dict.fromkeys([out_csv.parent, rpath.parent]):
        probe_writable(folder)
    t = time.perf_counter()
    refs = discover_studies(test_dir, split=split)
    if not refs:
        raise NoStudiesError(describe_no_studies(test_dir, split))
    if select is not None:
        refs = _select_studies(refs, select, test_dir)
    for ref in refs:
        logger.debug("study %s: %s", ref.study_id, ref.problems)
    study_ids = [int(r.study_id) for r in refs]
    discover_s = time.perf_counter() - t
    _write_csv(None, out_csv, study_ids, man.priors)
    predictor = Predictor(man, device=device, tta=tta, batch_size=batch_size, verify=False, finalize=finalize, clock=clock,
                          precision=precision, channels_last=channels_last, members=members,
                          device_memory_gb=device_memory_gb)
    report.manifest = {"path": str(man_path) if man_path else None, "sha256": man.sha256, "demo": is_demo,
                       "notes": man.notes, "priors": "manifest" if man.priors_given else "default"}
    report.devices = [str(d) for d in predictor.devices]
    report.warnings += predictor.notes
    report.models = predictor.models_info()
    workers = default_num_workers() if num_workers is None else num_workers
    report.settings = {"tta": tta, "num_workers": workers,
                       "read_ahead": default_read_ahead(workers) if read_ahead is None else read_ahead,
                       "chunk_size": chunk_size, "batch_size": predictor.batch_size, "time_budget_s": time_budget_s,
                       "study_timeout_s": study_timeout_s or study_timeout_for(time_budget_s), "split": split,
                       "precision": predictor.precision_label(), "members": "streamed" if predictor.streamed else "resident",
                       "channels_last": predictor.channels_last}
    result = predictor.run(refs, num_workers=num_workers, chunk_size=chunk_size, time_budget_s=time_budget_s,
                           start=start, progress=progress, study_timeout_s=study_timeout_s, observer=collector,
                           read_ahead=read_ahead)
    t = time.perf_counter()
    assembled = assemble_submission(result.probs, result.study_ids, masks=result.coverage, priors=man.priors)
    _record_result(report, result, assembled)
    try:
        _write_csv(assembled.frame, out_csv, result.study_ids)
    except OutputError as e:
        report.warnings.append(str(e))
        _write_report(report, rpath, out_csv, complete=False)
        raise
    timings = Timings()
    timings.merge(predictor.timings)
    timings.merge(result.timings)
    timings.add("discover", discover_s)
    timings.add("write", time.perf_counter() - t)
    report.timings = timings.to_dict()
    report.wall_s = round(time.perf_counter() - t0, 3)
    report.studies_per_s = round(len(result.study_ids) / result.wall_s, 4) if result.wall_s > 0 else 0.0
    _write_report(report, rpath, out_csv, complete=True)
    logger.info("%d studies in %.1fs (%.2f studies/s); %s; report: %s", report.n_studies, report.wall_s,
                report.studies_per_s, report.summary, rpath)
    if collector is not None:  # the submission is written: a QA problem is logged, never raised
        try:
            collector.write(report.to_dict(), rpath)
        except Exception:
            logger.exception("writing the QA pages under %s failed", qa_dir)
    return assembled.frame


def _record_result(report: RunReport, result: RunResult, assembled: Any) -> None:
    """The run's outcome in the report: every study's record (a study without one fell back
    whole), the prior targets the submission filled, deadline, faults, memory and warnings."""
    for sid in result.study_ids:
        rec = result.records.setdefault(sid, StudyRecord(sid, status="fallback", fallbacks=["no result; prior rows"]))
        filled = assembled.filled.get(sid, [])
        rec.set_prior_targets(len(filled))
        if filled and rec.status != "skipped":
            rec.fallbacks.append(_describe_filled(filled))
    report.deadline = result.deadline or {}
    report.warnings += result.warnings
    report.faults = result.faults
    report.memory = result.memory
    report.peak_rss_mb = result.peak_rss_mb
    report.n_studies = len(result.study_ids)
    report.add_studies([result.records[s] for s in result.study_ids])


def _select_studies(refs: list["StudyRef"], study_ids: Sequence[int], test_dir: str | os.PathLike) -> list["StudyRef"]:
    """The refs of ``study_ids``, in their order; an unknown id is a configuration error."""
    by_id = {int(r.study_id): r for r in refs}
    missing = [int(s) for s in study_ids if int(s) not in by_id]
    if missing:
        some = ", ".join(str(s) for s in sorted(by_id)[:5])
        raise ValueError(f"study {missing[0]} is not in {test_dir} ({len(by_id)} studies, e.g. {some})")
    return [by_id[int(s)] for s in dict.fromkeys(study_ids)]


def _manifest_for_prediction(manifest: "str | os.PathLike | Manifest | None", report: RunReport) -> tuple[Manifest, Path | None, bool]:
    """The manifest, validated for prediction (files present, sha256, paths, blend groups)."""
    if isinstance(manifest, Manifest):
        man, man_path, is_demo = manifest, manifest.path, False
        man.check_files(verify=True)
    else:
        man_path, is_demo = resolve_manifest_path(manifest)
        man = load_manifest(man_path, verify=True)
    copied = [] if is_demo else demo_entries(man)  # demo weights copied elsewhere are still demo weights
    if is_demo or copied:
        is_demo = True
        logger.warning("%s\n%s\n%s", "!" * 88, DEMO_WARNING, "!" * 88)
        report.warnings.append(DEMO_WARNING + (f" (recognised by sha256: {', '.join(copied)})" if copied else ""))
    man.check_for_prediction()
    return man, man_path, is_demo


def _write_csv(frame: "pd.DataFrame | None", out_csv: Path, study_ids: list[int], priors: np.ndarray | None = None) -> None:
    """The submission (``frame``), or with ``frame=None`` the priors-only safety net."""
    from ..submission import prior_submission, write_submission

    try:
        if frame is None:
            write_submission(prior_submission(study_ids, priors), out_csv, study_ids)
            logger.info("safety net: a priors-only %s for %d studies is in place; the real one replaces it at the end",
                        out_csv, len(study_ids))
        else:
            write_submission(frame, out_csv, study_ids)
    except OSError as e:
        what = "the safety-net submission" if frame is None else "the final submission"
        kept = "" if frame is None else "; the priors-only safety net written at the start is still there"
        raise OutputError(f"cannot write {what} {out_csv}: {e.strerror or e}{kept}") from None


def _write_report(report: RunReport, path: Path, out_csv: Path, complete: bool) -> None:
    """The run report; failing to write it never fails a run whose CSV is written."""
    try:
        report.write(path)
    except OSError as e:
        logger.error("could not write the run report %s (%s); the submission %s is %s", path, e.strerror or e,
                     out_csv, "complete" if complete else "the priors-only safety net")


# -- command line -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("test_dir", type=Path, help="Kaggle-layout root holding test_images/ and test_series_descriptions.csv")
    parser.add_argument("--out", type=Path, default=Path("submission.csv"), help="submission CSV (default: submission.csv); run_report.json goes beside it")
    parser.add_argument("--manifest", type=Path, default=None, help="weights manifest JSON (default: $RSNA_INFER_MANIFEST, else the packaged demo weights)")
    parser.add_argument("--device", default=None, help="cuda | cuda:1 | cuda:0,cuda:1 | cpu (default: every GPU, else CPU)")
    parser.add_argument("--no-tta", action="store_true", help="no flip TTA (about half the model time)")
    parser.add_argument("--workers", type=int, default=None, metavar="N", help="preprocessing processes; 0 = in-process (default: spare cores, at most 4)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS", help="finish within this many seconds: shed TTA, then low-weight members")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help=f"studies per chunk (default {DEFAULT_CHUNK_SIZE})")
    parser.add_argument("--batch-size", type=int, default=None, help="model batch size (default 32 on CUDA, 8 on CPU)")
    parser.add_argument("--split", default="test", help="which {split}_images folder to read (default: test)")
    parser.add_argument("--qa-dir", type=Path, default=None, help="write QA pages (what the models saw) of the worst studies here (needs Pillow)")
    parser.add_argument("--qa-worst", type=int, default=10, metavar="N", help="studies that get a QA page (default 10; see docs/viz.md for the ranking)")
    parser.add_argument("--qa-labels", type=Path, default=None, metavar="CSV", help="train_label_coordinates.csv: draw the ground-truth points on the QA pages")
    parser.add_argument("--precision", choices=("auto", "fp32", "fp16"), default="auto",
                        help="weights on a GPU: auto = fp16 (bf16 where a member asks), fp32 = full precision")
    parser.add_argument("--channels-last", action="store_true", help="convolution weights in channels-last format")
    parser.add_argument("--members", choices=("auto", "resident", "streamed"), default="auto",
                        help="auto: every member on the card when they fit, else streamed (loaded group by group)")
    parser.add_argument("--device-memory", type=float, default=None, metavar="GB",
                        help="plan with this much device memory instead of the card's free memory")
    parser.add_argument("--read-ahead", type=int, default=None, metavar="N",
                        help="studies decoded ahead of the running chunks (default: workers + 2; more overlaps more "
                             "loading with the device, at ~60 MB per study)")
    parser.add_argument("--study-timeout", type=float, default=None, metavar="SECONDS",
                        help="kill a loading worker still busy with one study after this long; the study gets priors "
                             "(default 600, or a tenth of --time-budget)")


def run_cli(args: argparse.Namespace) -> int:
    """Exit 0 with a complete CSV; 1 with one line on stderr saying what to fix."""
    import sys

    from ..viz import VizUnavailable

    try:
        df = predict(
            args.test_dir, out_csv=args.out, manifest=args.manifest, device=args.device, tta=not args.no_tta,
            num_workers=args.workers, time_budget_s=args.time_budget, chunk_size=args.chunk_size,
            batch_size=args.batch_size, split=args.split, study_timeout_s=args.study_timeout,
            qa_dir=args.qa_dir, qa_worst=args.qa_worst, qa_labels=args.qa_labels, read_ahead=args.read_ahead,
            precision=args.precision, channels_last=args.channels_last, members=args.members,
            device_memory_gb=args.device_memory,
        )
    except (ManifestError, DeviceError, OutputError, FileNotFoundError, ValueError, OSError, VizUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({len(df)} rows) and {args.out.with_name('run_report.json')}")
    if args.qa_dir is not None:
        print(f"QA pages: {args.qa_dir / 'index.html'}")
    return 0
