"""`Predictor`: every model of a manifest, set up once, and one chunk of studies through them.

It is built once: each model is built, loaded strictly from its safetensors file and proved
by one dummy forward *before any DICOM is read* (`rsna_infer.inference.setup`), so
configuration errors fail in seconds, not hours. Then studies stream through it in chunks
(`run`, the loop in `rsna_infer.inference.schedule`): workers decode and preprocess the next
chunk while the models run on the current one, model by model with batches across the
chunk's studies (`run_chunk`):

    stage-1 prepare -> run (folds of a family/variant averaged) -> decode -> keypoint sets
    -> stage-1 finalize (cross-view check, projection fallback)      [rsna_infer.stage1.chain]
    -> stage-2 prepare (crops around the keypoints) -> run -> per-study masked mean
    -> blend (per condition group, masked, softmax last)             [rsna_infer.models.ensemble]
    -> probabilities [5, 5, 3] per study

A failure inside one study (unreadable files, a prepare or decode exception, a non-finite
output) is caught, logged and recorded; that study keeps whatever views worked and its
remaining targets get prior rows. Batches, their device copies and out-of-memory halving:
`rsna_infer.inference.batches`. On CUDA: fp16 autocast, ``inference_mode``, cudnn benchmark;
each device holds a replica of the ensemble and runs chunks on its own thread
(`rsna_infer.runtime.devices.ReplicaSet`: a chunk that fails on one replica is re-run on
another). On CPU everything runs in fp32. The one call with its safety net, CSV and report
is `rsna_infer.api.predict`.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from ..constants import N_CLASSES, N_CONDITIONS, N_LEVELS
from ..models.ensemble import StudyLogitMean, blend_coverage, blend_logits, member_weights
from ..models.manifest import Manifest
from ..models.prep_groups import PrepGroup, preparation_groups
from ..runtime.deadline import DeadlineGuard, Plan, build_ladder
from ..runtime.devices import resolve_devices
from ..settings import RunSettings, part_options
from ..specs import ModelEntry
from ..stage1.chain import Finalize, Stage1Group, default_finalize, stage1_chain
from . import setup
from .batches import BatchRunner, Results
from .chunk import ChunkOutput, FailureLog, RunObserver
from .report import RunResult, StudyRecord, Timings, jsonable, keypoints_dict
from .schedule import run_studies

if TYPE_CHECKING:
    from ..estimate.typical import StudyGeometry
    from ..io.discovery import StudyRef
    from ..io.volume import Study
    from ..keypoints import StudyKeypoints
    from ..models.family import Family, Sample
    from ..models.members import LoadedMember
    from ..runtime.memory import MemoryPlan
    from ..runtime.streaming import LoadedStudy

logger = logging.getLogger(__name__)

#: What `Predictor._prepare` makes of a group: ``(study_id, sample)`` pairs, per-study
#: failures, seconds.
Prepared = tuple[list[tuple[int, "Sample"]], list[tuple[int, BaseException]], float]


class Predictor:
    """Every model of a manifest, loaded once and validated, ready to run on studies.

    ``manifest``: a `Manifest` or a path. ``settings``: the run's options
    (`rsna_infer.settings.RunSettings`; ``**options`` replace single fields, e.g.
    ``device="cpu", tta=False``): the predictor resolves them once for its devices and
    keeps the result in ``settings`` (what the run report writes). ``verify``: check sha256
    of every weight file. ``finalize``: the stage-1 finalisation ``(study, keypoints) ->
    keypoints`` (default `rsna_infer.stage1.assemble.finalize`). ``clock``: time source of
    the deadline guard (waits and watchdogs always use ``time.monotonic``).
    ``memory_geometry``: the typical study the device memory plan is made on
    (`rsna_infer.runtime.memory`). Raises `ManifestError` (models, weights, paths) or
    `rsna_infer.runtime.devices.DeviceError` before any study is read.
    """

    def __init__(
        self,
        manifest: "Manifest | str | os.PathLike",
        settings: RunSettings | None = None,
        *,
        verify: bool = True,
        finalize: Finalize | None = None,
        clock: Callable[[], float] = time.monotonic,
        memory_geometry: "StudyGeometry | None" = None,
        **options: Any,
    ) -> None:
        import torch

        from ..runtime.memory import Residency

        #: The options as given (unresolved): ``run(**options)`` resolves changes from them.
        self.given = RunSettings.of(settings, **options)
        self.timings = Timings()
        self.notes: list[str] = []  # run warnings from setup (a GPU passed over for the CPU...)
        self._failed = FailureLog()
        self._crop_s: dict[str, float] = {}  # stage-2 group -> seconds per study its crops took last
        t0 = time.perf_counter()
        self.manifest = setup.manifest_for_run(manifest, verify)
        self.devices = resolve_devices(self.given.device, self.notes)
        resolved = self.given.resolve(self.devices)
        self.tta, self.batch_size, self.channels_last, self.clock = (resolved.tta, resolved.batch_size,
                                                                     resolved.channels_last, clock)
        if self.devices[0].type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.entries: dict[str, ModelEntry] = {m.name: m for m in self.manifest.models}
        self.groups1, self.groups2 = preparation_groups(self.manifest.models, setup.family_or_manifest_error)
        setup.check_stage1_inputs(self.groups1, self.entries)
        self.finalize = default_finalize() if finalize is None and self.manifest.stage1 else finalize
        #: [5 conditions] bool: conditions of the manifest's ``prior_groups`` (see `_blend`)
        self._prior_conditions = setup.prior_conditions(self.manifest, self.notes)
        # The device memory plan decides whether the members stay on the device or are streamed.
        self.memory_plan: MemoryPlan | None = setup.plan_memory(
            self.manifest, self.devices[0], resolved, self.groups1 + self.groups2, memory_geometry, self.timings, self.notes)
        self.streamed = self.memory_plan is not None and self.memory_plan.mode == "streamed"
        probe_cpu_memory = resolved.device_memory_gb is not None  # a budget stands in for a card: measure too
        self.batches = BatchRunner(self.batch_size, clock, probe_cpu_memory, self._failed)
        # One replica of the ensemble per device; built and checked before any DICOM is read.
        self.replicas, self.load_s = setup.load_replicas(self.manifest, self.devices, resolved, resident=not self.streamed)
        self.notes += [n for m in self.replicas[0].values() for n in m.notes]
        self.residency = [Residency(rep, self.streamed) for rep in self.replicas]
        #: The settings as this predictor runs them: resolved for its devices, with the
        #: members' mode and precision its setup decided.
        self.settings = resolved.set_up(members=self._mode(), precision=self.precision_label())
        self.timings.add("setup/models", time.perf_counter() - t0)
        logger.info(
            "predictor ready: %d model(s) (%d stage-1, %d stage-2) on %s in %.1fs",
            len(self.entries), len(self.manifest.stage1), len(self.manifest.stage2),
            ", ".join(map(str, self.devices)), time.perf_counter() - t0,
        )

    # -- structure --------------------------------------------------------------------------
    def family(self, group: PrepGroup, replica: int = 0) -> "Family":
        """The family object that prepares, collates and decodes for ``group``."""
        return self.replicas[replica][group.members[0]].family

    def preparers(self) -> list[tuple[str, "Family"]]:
        """``(group key, family)`` for the preprocessing the loading workers do."""
        return [(g.key, self.family(g)) for g in self.groups1 + self.groups2 if g.in_worker]

    def full_plan(self) -> Plan:
        return Plan(self.tta, frozenset(self.entries), "full")

    def _mode(self) -> str:
        return "streamed" if self.streamed else "resident"

    # -- running ----------------------------------------------------------------------------
    def run(
        self,
        refs: Sequence["StudyRef"],
        *,
        start: float | None = None,
        observer: RunObserver | None = None,
        start_method: str | None = None,
        **options: Any,
    ) -> RunResult:
        """Predict every study of ``refs`` (from `rsna_infer.io.discover_studies`) with
        ``settings`` (see `rsna_infer.inference.schedule.run_studies`).

        ``start``: clock value the time budget counts from (default: now). ``observer``: see
        `RunObserver` (None: nothing is captured). ``start_method``: the loading workers'
        (default fork where it exists, else spawn). ``options``: run options that differ
        from this predictor's settings for this run (``num_workers=2``, ``time_budget_s=...``;
        not those the models were built with).
        """
        settings = self.settings if not options else self._settings_for_run(options)
        guard = None
        if settings.time_budget_s is not None:
            guard = DeadlineGuard(settings.time_budget_s, build_ladder(self.manifest.models, self.tta), clock=self.clock,
                                  start=start, chunk_studies=settings.chunk_size)
        run_chunk = self.run_chunk if observer is None else functools.partial(self.run_chunk, observer=observer)
        result, measured = run_studies(refs, run_chunk, self.preparers(), [str(d) for d in self.devices], self.full_plan(),
                                       guard, self.clock, settings, start_method)
        result.memory = self.memory_report(measured)
        return result

    def _settings_for_run(self, options: dict[str, Any]) -> RunSettings:
        """This predictor's settings with some run options changed, resolved again."""
        others = sorted(set(options) - part_options("run"))
        if others:
            raise ValueError(f"{others} cannot change for one run: the models' options are fixed when the Predictor "
                             "is built (Predictor(...)), the call's belong to rsna_infer.predict")
        given = RunSettings.of(self.given, **options)
        return given.resolve(self.devices).set_up(members=self.settings.members, precision=self.settings.precision)

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
            out.records[sid].cross_view = jsonable(kp.report)
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
        """Keypoints of every study through the stage-1 chain (`rsna_infer.stage1.chain`):
        groups in family order with their active folds, batched across the chunk."""
        members = self.replicas[replica]
        groups = []
        for g in self.groups1:
            active = [n for n in g.members if n in plan.members]
            if active:
                groups.append(Stage1Group(g.key, members[g.members[0]].family, (g, active)))

        def samples(sg: Stage1Group, kps: dict[int, "StudyKeypoints"]) -> list[tuple[int, "Sample"]]:
            g = sg.folds[0]
            if not g.in_worker:  # it reads keypoints of an earlier group: prepared now, on this thread
                return self._take_prepared(g, sg.family, self._prepare(g, sg.family, studies, kps), out)
            items = [(sid, s) for sid in studies for s in by_id[sid].samples.get(g.key, [])]
            if out.capture is not None:
                out.capture.add(g, sg.family, items)
            return items

        def run(sg: Stage1Group, items: list[tuple[int, "Sample"]]) -> Results:
            g, active = sg.folds
            return self._run_group(replica, g.key, [members[n] for n in active], [s for _, s in items], plan.tta, out,
                                   [sid for sid, _ in items])

        return stage1_chain(studies, groups, samples, run, self.finalize, functools.partial(self._failed.record, out),
                            timed=out.timings.add)

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
        chunk's studies (sorted ids), a study's samples averaged per target under their
        masks (`rsna_infer.models.ensemble.StudyLogitMean`). Crops come from ``prep`` (a CPU
        thread), group by group, while the device runs."""
        members = self.replicas[replica]
        names = [m.name for m in self.manifest.stage2 if m.name in plan.members]
        logits = np.zeros((len(names), len(studies), N_CONDITIONS, N_LEVELS, N_CLASSES))
        masks = np.zeros((len(names), len(studies), N_CONDITIONS, N_LEVELS), dtype=bool)
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
                mean = StudyLogitMean(sorted(studies))
                for (sid, sample), o in zip(items, outs):
                    if o is not None:
                        mean.add(sid, o, sample.mask)
                logits[row[name]], masks[row[name]] = mean.result()
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
    def _prepare(g: PrepGroup, family: "Family", studies: dict[int, "Study"], kps: dict[int, "StudyKeypoints"]) -> Prepared:
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

    def _take_prepared(self, g: PrepGroup, family: "Family", prepared: Prepared, out: ChunkOutput) -> list[tuple[int, "Sample"]]:
        """Record what `_prepare` made (timing, per-study failures, the observer's capture)."""
        items, failures, seconds = prepared
        if g.stage == 2 and not g.in_worker:
            self._crop_s[g.key] = seconds / max(1, len({sid for sid, _ in items}) + len(failures))
        for sid, e in failures:
            self._failed.record(out, f"prepare {g.key}", sid, e)
        if not g.in_worker:
            out.timings.add(f"stage{g.stage}/{g.key}/prepare", seconds)
        if out.capture is not None and (g.stage == 2 or not g.in_worker):
            out.capture.add(g, family, items)
        return items

    def _run_group(self, replica: int, group: str, members: Sequence["LoadedMember"], samples: list["Sample"], tta: bool,
                   out: ChunkOutput, sids: list[int]) -> Results:
        """Outputs of each member for every sample (None where it failed), batch by batch
        (`rsna_infer.inference.batches`). Streamed members (`rsna_infer.runtime.memory`) are
        loaded first: the whole group, or one member at a time when the plan says the group
        does not fit at once; a member that cannot be loaded costs these studies its output,
        nothing else."""
        results: Results = [[None] * len(samples) for _ in members]
        batches = self.batches.batches(members[0].family, samples)
        every = list(range(len(members)))
        unit = "group" if self.memory_plan is None else self.memory_plan.units.get(group, "group")
        for which in [every] if not self.streamed or unit == "group" else [[w] for w in every]:
            ok = self._hold(replica, members, which, sids, out)
            for idx in batches if ok else []:
                self.batches.run_batch(members, ok, samples, idx, tta, out, sids, results)
        return results

    def _hold(self, replica: int, members: Sequence["LoadedMember"], which: list[int], sids: list[int],
              out: ChunkOutput) -> list[int]:
        """Members ``which`` on the device (streamed: moved in now); those that could be."""
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
        return [w for w in which if not isinstance(held[members[w].name], BaseException)]

    # -- what the report says ---------------------------------------------------------------
    def set_streaming(self, streamed: bool) -> None:
        """Switch every replica between resident and streamed members (benchmarks compare the
        two on one loaded predictor; a run chooses at construction from the memory plan)."""
        if streamed == self.streamed:
            return
        self.residency = setup.set_streaming(self.replicas, streamed)
        self.streamed = streamed
        self.settings = self.settings.set_up(members=self._mode(), precision=self.settings.precision)

    def memory_report(self, measured: dict[str, int] | None = None) -> dict[str, Any]:
        """Device memory for the run report (`rsna_infer.inference.setup.memory_report`)."""
        return setup.memory_report(self.settings, self.memory_plan, self.replicas, self.residency, self.devices, measured)

    def precision_label(self) -> str:
        """How the members run, for the report (`rsna_infer.inference.setup.precision_label`)."""
        return setup.precision_label(self.replicas[0])

    def models_info(self) -> list[dict[str, Any]]:
        """One line per member for the run report."""
        return setup.models_info(self.manifest, self.replicas[0], self.load_s)
