"""The main job: a Kaggle-layout test root in, ``submission.csv`` (+ ``run_report.json``) out.

`Predictor` owns every model of a manifest. It is built once: each model is built, loaded
strictly from its safetensors file and proved by one dummy forward *before any DICOM is
read*, so configuration errors fail in seconds, not hours. Then studies stream through it
in chunks (`rsna_infer.streaming`): workers decode and preprocess the next chunk while the
models run on the current one, model by model with batches across the chunk's studies:

    stage-1 prepare -> run (folds of a family/variant averaged) -> decode -> keypoint sets
    -> stage-1 finalize (cross-view check, projection fallback)
    -> stage-2 prepare (crops around the keypoints) -> run -> blend (per condition group,
       masked, softmax last) -> probabilities [5, 5, 3] per study

A failure inside one study (unreadable files, a prepare or decode exception, a non-finite
output) is caught, logged and recorded; that study keeps whatever views worked and its
remaining targets get prior rows. A `DeadlineGuard` sheds TTA and then low-weight members
when a time budget is given. On CUDA: fp16 autocast, ``inference_mode``, cudnn benchmark;
with several GPUs each holds a replica of the ensemble and chunks alternate between them
(one thread per device). On CPU everything runs in fp32.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .constants import N_CLASSES, N_CONDITIONS, N_LEVELS
from .deadline import DeadlineGuard, Plan, build_ladder
from .ensemble import blend_coverage, blend_logits, member_weights
from .manifest import Manifest, ManifestError, demo_entries, load_manifest, resolve_manifest_path
from .report import RunReport, StudyRecord, Timings, keypoints_dict
from .specs import STAGE1_FAMILIES, STAGE2_FAMILIES, ModelEntry

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from .family import Family, Sample
    from .io.discovery import StudyRef
    from .io.volume import Study
    from .members import LoadedMember
    from .stage1.keypoints import KeypointSet, StudyKeypoints
    from .streaming import LoadedStudy

logger = logging.getLogger(__name__)

DEMO_WARNING = (
    "USING THE PACKAGED DEMO WEIGHTS: they were trained on synthetic phantom studies and are "
    "meaningless on real MRI. Pass manifest=... (CLI --manifest, or $RSNA_INFER_MANIFEST) for real weights."
)
#: Default studies per chunk: large enough for full batches, small enough to bound memory.
DEFAULT_CHUNK_SIZE = 16


def default_num_workers() -> int:
    """One preprocessing worker per spare core, at most 4 (Kaggle has 4 CPUs)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(0, min(4, n - 1))


def resolve_devices(device: "str | Sequence[str] | None" = None) -> list["torch.device"]:
    """``None``/``"auto"``: every visible GPU, else CPU. ``"cuda"``: every GPU. ``"cuda:1"``,
    ``"cpu"``, ``"cuda:0,cuda:1"`` or a list: exactly those."""
    import torch

    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    names = [d.strip() for d in device.split(",")] if isinstance(device, str) else [str(d) for d in device]
    out: list[torch.device] = []
    for name in names:
        d = torch.device(name)
        if d.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {name!r} requested but CUDA is not available; use device='cpu'")
            if d.index is None:
                out += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
                continue
            if d.index >= torch.cuda.device_count():
                raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) visible")
        out.append(d)
    if not out:
        raise ValueError(f"no device in {device!r}")
    return out


@dataclass
class _Group:
    """Members that share one preprocessing: stage-1 folds of a family/variant (outputs
    averaged before decode) or stage-2 members with the same family/variant/input/kwargs."""

    key: str
    stage: int
    members: list[str]
    in_worker: bool  # prepared in the loading workers (needs no keypoints)


def _needs_keypoints(family: "Family") -> bool:
    """Whether ``prepare`` uses keypoints (then it runs after stage 1 in the main process).

    Families may say so with a ``needs_keypoints`` attribute; otherwise stage 2 does and
    stage 1 does not, except a stage-1 family that refines an earlier family's set (same
    ``set_key``, e.g. ``axial_xy`` on ``axial_level``; see `Predictor._assign_preparation`).
    """
    return bool(getattr(family, "needs_keypoints", family.stage == 2))


def _default_finalize() -> Callable[["Study", "StudyKeypoints"], "StudyKeypoints"]:
    from .stage1.assemble import finalize

    return finalize


@dataclass
class ChunkOutput:
    """What one chunk produced; merged by the caller (also across device threads)."""

    probs: dict[int, np.ndarray] = field(default_factory=dict)
    coverage: dict[int, np.ndarray] = field(default_factory=dict)
    records: dict[int, StudyRecord] = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)
    member_s: dict[str, float] = field(default_factory=dict)


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


class Predictor:
    """Every model of a manifest, loaded once and validated, ready to run on studies.

    ``manifest``: a `Manifest` or a path. ``device``: see `resolve_devices`. ``tta``: flip
    TTA in every family's ``run``. ``verify``: check sha256 of every weight file.
    ``finalize``: the stage-1 finalisation ``(study, keypoints) -> keypoints`` (default
    `rsna_infer.stage1.assemble.finalize`). ``clock``: time source of the deadline guard.
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
    ) -> None:
        import torch

        from .members import load_member

        self.timings = Timings()
        self._failed = _FailureLog()
        t0 = time.perf_counter()
        self.manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest, verify=verify)
        if isinstance(manifest, Manifest):
            self.manifest.check_files(verify=verify)
        self.devices = resolve_devices(device)
        self.tta = bool(tta)
        self.clock = clock
        on_cuda = self.devices[0].type == "cuda"
        self.batch_size = int(batch_size or (32 if on_cuda else 8))
        if on_cuda:
            torch.backends.cudnn.benchmark = True
        self.entries: dict[str, ModelEntry] = {m.name: m for m in self.manifest.models}
        self.groups1, self.groups2 = self._group(self.manifest.models)
        self._check_inputs()
        if self.manifest.stage1 and finalize is None:
            finalize = _default_finalize()
        self.finalize = finalize
        if not self.manifest.stage2:
            logger.warning("the manifest has no stage-2 models: every row will be the class priors")
        # One replica of the ensemble per device; built and checked before any DICOM is read.
        self.replicas: list[dict[str, LoadedMember]] = []
        self.load_s: dict[str, float] = {}
        for dev in self.devices:
            replica = {}
            for entry in self.manifest.models:
                t = time.perf_counter()
                replica[entry.name] = load_member(entry, self.manifest.resolve(entry), device=dev, tta=self.tta)
                self.load_s[entry.name] = self.load_s.get(entry.name, 0.0) + time.perf_counter() - t
            self.replicas.append(replica)
        self._assign_preparation()
        self.timings.add("setup/models", time.perf_counter() - t0)
        logger.info(
            "predictor ready: %d model(s) (%d stage-1, %d stage-2) on %s in %.1fs",
            len(self.entries), len(self.manifest.stage1), len(self.manifest.stage2),
            ", ".join(map(str, self.devices)), time.perf_counter() - t0,
        )

    # -- structure --------------------------------------------------------------------------
    @staticmethod
    def _group(entries: Sequence[ModelEntry]) -> tuple[list[_Group], list[_Group]]:
        g1: dict[str, _Group] = {}
        g2: dict[tuple[str, str], _Group] = {}
        rank = {f: i for i, f in enumerate(STAGE1_FAMILIES + STAGE2_FAMILIES)}
        for e in sorted(entries, key=lambda e: (rank[e.family], e.variant)):
            if e.stage == 1:
                key = f"{e.family}/{e.variant}"
                g1.setdefault(key, _Group(key, 1, [], False)).members.append(e.name)
                continue
            base = f"{e.family}/{e.variant}"
            sig = json.dumps([e.input.to_dict(), e.model_kwargs], sort_keys=True, default=str)
            if (base, sig) not in g2:
                n = sum(b == base for b, _ in g2)
                g2[(base, sig)] = _Group(f"{base}#{n}", 2, [], False)
            g2[(base, sig)].members.append(e.name)
        return list(g1.values()), list(g2.values())

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

    def _assign_preparation(self) -> None:
        """Which groups the loading workers prepare (those that need no keypoints)."""
        written: set[str] = set()
        for g in self.groups1:
            family = self.family(g)
            key = getattr(family, "set_key", g.key)
            # a group that writes a set an earlier group made refines it: it needs those keypoints
            g.in_worker = not (_needs_keypoints(family) or key in written)
            written.add(key)
        for g in self.groups2:
            g.in_worker = not _needs_keypoints(self.family(g))

    def family(self, group: _Group, replica: int = 0) -> "Family":
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
    ) -> RunResult:
        """Predict every study of ``refs`` (from `rsna_infer.io.discover_studies`).

        ``start``: clock value the time budget counts from (default: now).
        """
        from concurrent.futures import Future, ThreadPoolExecutor

        from tqdm.auto import tqdm

        from .streaming import StudyStream, peak_rss_mb

        t_run = time.perf_counter()
        num_workers = default_num_workers() if num_workers is None else int(num_workers)
        chunk_size = max(1, int(chunk_size))
        timings = Timings()
        records: dict[int, StudyRecord] = {}
        probs: dict[int, np.ndarray] = {}
        coverage: dict[int, np.ndarray] = {}
        guard = None
        if time_budget_s is not None:
            guard = DeadlineGuard(float(time_budget_s), build_ladder(self.manifest.models, self.tta), clock=self.clock, start=start)
        n_dev = len(self.replicas)
        pool = ThreadPoolExecutor(n_dev, thread_name_prefix="device") if n_dev > 1 else None
        in_flight: list[tuple[Future[ChunkOutput], bool]] = []
        run_warnings: list[str] = []
        loader_rss = 0.0
        remaining = len(refs)
        last = self.clock()
        bar = tqdm(total=len(refs), unit="study", desc="predict", disable=not progress, smoothing=0.1)

        def collect(out: ChunkOutput, plan_tta: bool) -> None:
            nonlocal last
            probs.update(out.probs)
            coverage.update(out.coverage)
            records.update(out.records)
            timings.merge(out.timings)
            now = self.clock()
            if guard is not None:
                guard.observe(len(out.records), now - last, out.member_s, plan_tta, n_devices=n_dev)
            last = now
            bar.update(len(out.records))

        try:
            with StudyStream(refs, self.preparers(), num_workers, prefetch=chunk_size + num_workers) as stream:
                index = 0
                while remaining > 0:
                    n = min(chunk_size, remaining)
                    plan = self.full_plan() if guard is None else guard.choose(remaining)
                    take = n if guard is None else guard.admit(n)
                    t = time.perf_counter()
                    loaded = stream.take(take) if take > 0 else []
                    timings.add("wait_for_data", time.perf_counter() - t)
                    remaining -= len(loaded)
                    if take > 0 and not loaded:  # the stream ended early; the rest get priors
                        break
                    if take < n:  # out of time: everything after this gets priors, unread
                        skipped = stream.skip(remaining)
                        stream.stop()
                        for sid in skipped:
                            rec = StudyRecord(sid, status="skipped")
                            rec.fallbacks.append("deadline: no time left to run the models; prior rows")
                            records[sid] = rec
                        bar.update(len(skipped))
                        assert guard is not None
                        guard.gave_priors(len(skipped))
                        remaining = 0
                    if not loaded:
                        continue
                    for ls in loaded:
                        timings.add("load", ls.load_s)
                        timings.add("prepare_at_load", ls.prepare_s)
                        loader_rss = max(loader_rss, ls.peak_rss_mb)
                    if pool is None:
                        collect(self.safe_chunk(loaded, plan, 0), plan.tta)
                    else:
                        replica = index % n_dev
                        if len(in_flight) >= n_dev:
                            fut, tta_flag = in_flight.pop(0)
                            collect(fut.result(), tta_flag)
                        in_flight.append((pool.submit(self.safe_chunk, loaded, plan, replica), plan.tta))
                    index += 1
                    bar.set_postfix_str(plan.label if plan.label != "full" else "", refresh=False)
                for fut, tta_flag in in_flight:
                    collect(fut.result(), tta_flag)
                in_flight.clear()
                run_warnings += stream.warnings
        except Exception as e:  # never lose the run: what is done is kept, the rest gets priors
            logger.exception("the run stopped early after %d of %d studies", len(records), len(refs))
            run_warnings.append(f"run stopped early after {len(records)} of {len(refs)} studies: {type(e).__name__}: {e}; "
                                "the remaining studies got prior rows")
            for fut, tta_flag in in_flight:
                try:
                    collect(fut.result(), tta_flag)
                except Exception as err:
                    logger.error("a chunk in flight was lost: %s: %s", type(err).__name__, err)
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(wait=True)
        wall = time.perf_counter() - t_run
        return RunResult(
            study_ids=[int(r.study_id) for r in refs], probs=probs, coverage=coverage, records=records,
            timings=timings, deadline=None if guard is None else guard.to_dict(), wall_s=wall,
            warnings=run_warnings,
            peak_rss_mb={"main": round(peak_rss_mb(), 1), "loader": round(loader_rss, 1)},
        )

    def safe_chunk(self, loaded: Sequence["LoadedStudy"], plan: Plan, replica: int = 0) -> ChunkOutput:
        """`run_chunk`, but an unexpected exception costs only this chunk: its studies get
        an error line and prior rows, and the run goes on."""
        try:
            return self.run_chunk(loaded, plan, replica)
        except Exception as e:
            logger.exception("chunk of studies %s failed", [ls.study_id for ls in loaded])
            out = ChunkOutput()
            for ls in loaded:
                rec = out.records[ls.study_id] = StudyRecord(ls.study_id, warnings=list(ls.warnings), errors=list(ls.errors))
                rec.error("chunk", e)
                rec.fallbacks.append("the chunk holding this study failed; prior rows")
            return out

    def run_chunk(self, loaded: Sequence["LoadedStudy"], plan: Plan, replica: int = 0) -> ChunkOutput:
        """Stage 1, finalize, stage 2 and the blend for one chunk of decoded studies."""
        out = ChunkOutput()
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
            names, logits, masks = self._stage2(studies, by_id, kps, plan, replica, out)
            self._blend(sorted(studies), names, logits, masks, out)
        per_study = (time.perf_counter() - t_chunk) / max(1, len(loaded))
        for ls in loaded:
            out.records[ls.study_id].seconds = per_study + ls.load_s + ls.prepare_s
        return out

    def _stage1(
        self, studies: dict[int, "Study"], by_id: dict[int, "LoadedStudy"], plan: Plan, replica: int, out: ChunkOutput
    ) -> dict[int, "StudyKeypoints"]:
        """Keypoints of every study: groups in family order, folds averaged, then finalize."""
        from .stage1.assemble import merge_decoded
        from .stage1.keypoints import StudyKeypoints

        members = self.replicas[replica]
        kps = {sid: StudyKeypoints(sid) for sid in studies}
        for g in self.groups1:
            active = [n for n in g.members if n in plan.members]
            if not active:
                continue
            family = members[g.members[0]].family
            items = self._samples(g, family, studies, by_id, kps, out)
            if not items:
                continue
            sums: list[np.ndarray | None] = [None] * len(items)
            counts = np.zeros(len(items), np.int64)
            for name in active:
                outs = self._run_member(members[name], [s for _, s in items], plan.tta, out, [sid for sid, _ in items])
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
    ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Per active stage-2 member: logits [S, 5, 5, 3] and masks [S, 5, 5] over the
        chunk's studies (sorted ids); a study's samples are averaged per target under their
        masks."""
        members = self.replicas[replica]
        names = [m.name for m in self.manifest.stage2 if m.name in plan.members]
        col = {sid: j for j, sid in enumerate(sorted(studies))}
        logits = np.zeros((len(names), len(col), N_CONDITIONS, N_LEVELS, N_CLASSES))
        masks = np.zeros((len(names), len(col), N_CONDITIONS, N_LEVELS), dtype=bool)
        row = {n: i for i, n in enumerate(names)}
        for g in self.groups2:
            active = [n for n in g.members if n in row]
            if not active:
                continue
            family = members[g.members[0]].family
            items = self._samples(g, family, studies, by_id, kps, out)
            if not items:
                continue
            for name in active:
                outs = self._run_member(members[name], [s for _, s in items], plan.tta, out, [sid for sid, _ in items])
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
        for j, sid in enumerate(sids):
            if np.all(np.isfinite(p[j])):
                out.probs[sid] = p[j]
                out.coverage[sid] = cov[j]
            else:  # cannot happen with finite masked inputs; never let it reach the CSV
                out.records[sid].fallbacks.append("blend produced non-finite values; prior rows")
        out.timings.add("blend", time.perf_counter() - t)

    def _samples(
        self,
        g: _Group,
        family: "Family",
        studies: dict[int, "Study"],
        by_id: dict[int, "LoadedStudy"],
        kps: dict[int, "StudyKeypoints"],
        out: ChunkOutput,
    ) -> list[tuple[int, "Sample"]]:
        """``(study_id, sample)`` of every study for group ``g`` (worker-made or made now)."""
        items: list[tuple[int, Sample]] = []
        t = time.perf_counter()
        for sid, study in studies.items():
            if g.in_worker:
                items += [(sid, s) for s in by_id[sid].samples.get(g.key, [])]
                continue
            try:
                items += [(sid, s) for s in family.prepare(study, kps[sid])]
            except Exception as e:
                self._failed(f"prepare {g.key}", sid, e)
                out.records[sid].error(f"prepare {g.key}", e)
        if not g.in_worker:
            out.timings.add(f"stage{g.stage}/{g.key}/prepare", time.perf_counter() - t)
        return items

    def _run_member(
        self, member: "LoadedMember", samples: list["Sample"], tta: bool, out: ChunkOutput, sids: list[int]
    ) -> list[np.ndarray | None]:
        """Outputs of one member for every sample (None where it failed), in batches of
        equal-shaped samples. A failing batch is retried in halves, so one bad study costs
        only its own output; CUDA out-of-memory is handled the same way."""
        results: list[np.ndarray | None] = [None] * len(samples)
        by_shape: dict[tuple, list[int]] = {}
        for i, s in enumerate(samples):
            sig = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in s.inputs.items()))
            by_shape.setdefault(sig, []).append(i)
        c0 = self.clock()
        t0 = time.perf_counter()

        def go(idx: list[int]) -> None:
            try:
                arr = self._forward(member, [samples[i] for i in idx], tta)
                if arr.shape[0] != len(idx):
                    raise RuntimeError(f"{member.name}: run returned {arr.shape[0]} outputs for {len(idx)} samples")
            except Exception as e:
                if len(idx) > 1:
                    _release_cuda_cache(member)
                    half = len(idx) // 2
                    go(idx[:half])
                    go(idx[half:])
                    return
                sid = sids[idx[0]]
                self._failed(f"run {member.name}", sid, e)
                out.records[sid].error(f"run {member.name}", e)
                return
            for j, i in enumerate(idx):
                if np.all(np.isfinite(arr[j])):
                    results[i] = arr[j]
                else:
                    out.records[sids[i]].warn(f"model {member.name}: non-finite output dropped")

        for idx in by_shape.values():
            for k in range(0, len(idx), self.batch_size):
                go(idx[k : k + self.batch_size])
        out.member_s[member.name] = out.member_s.get(member.name, 0.0) + (self.clock() - c0)
        out.timings.add(f"stage{member.entry.stage}/{member.name}/run", time.perf_counter() - t0)
        return results

    @staticmethod
    def _forward(member: "LoadedMember", samples: list["Sample"], tta: bool) -> np.ndarray:
        import torch

        from .members import autocast_for

        batch = member.family.collate(samples)
        non_blocking = member.device.type == "cuda"
        batch = {k: v.to(member.device, non_blocking=non_blocking) for k, v in batch.items()}
        with torch.inference_mode(), autocast_for(member.device):
            y = member.family.run(member.model, batch, tta=tta)
        return y.float().cpu().numpy()

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


def _describe_filled(targets: Sequence[str]) -> str:
    """``'priors for 7 target(s): spinal_canal_stenosis x5, left_subarticular_stenosis x2'``."""
    from .constants import CONDITIONS

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


def _release_cuda_cache(member: "LoadedMember") -> None:
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
) -> "pd.DataFrame":
    """Write ``out_csv`` (25 rows per study of ``test_dir``'s series CSV) and
    ``run_report.json`` beside it; return the submission frame.

    ``manifest``: path or `Manifest`; default ``$RSNA_INFER_MANIFEST``, else the packaged
    demo manifest (phantom-trained weights, with a loud warning). ``device``: ``"cuda"``,
    ``"cuda:1"``, ``"cpu"``, ``"cuda:0,cuda:1"``; default every GPU, else CPU.
    ``num_workers``: preprocessing processes (0 = in-process; default one per spare core, at
    most 4). ``time_budget_s``: finish within this many seconds of the call (TTA, then
    low-weight members are shed; studies that cannot fit get prior rows).
    """
    from .io import discover_studies
    from .submission import assemble_submission, write_submission

    start = clock()
    t0 = time.perf_counter()
    if time_budget_s is not None and not (float(time_budget_s) > 0 and np.isfinite(float(time_budget_s))):
        raise ValueError(f"time_budget_s must be a positive number of seconds, got {time_budget_s}")
    out_csv = Path(out_csv)
    report = RunReport(test_dir=str(test_dir), out_csv=str(out_csv))
    if isinstance(manifest, Manifest):
        man_path, is_demo = manifest.path, False
    else:
        man_path, is_demo = resolve_manifest_path(manifest)
    if is_demo:
        logger.warning("%s\n%s\n%s", "!" * 88, DEMO_WARNING, "!" * 88)
        report.warnings.append(DEMO_WARNING)
    predictor = Predictor(manifest if isinstance(manifest, Manifest) else man_path, device=device, tta=tta,
                          batch_size=batch_size, finalize=finalize, clock=clock)
    man = predictor.manifest
    if not is_demo and demo_entries(man):  # demo weights copied elsewhere are still demo weights
        is_demo = True
        logger.warning("%s\n%s\n%s", "!" * 88, DEMO_WARNING, "!" * 88)
        report.warnings.append(DEMO_WARNING + f" (recognised by sha256: {', '.join(demo_entries(man))})")
    report.manifest = {"path": str(man_path) if man_path else None, "sha256": man.sha256, "demo": is_demo,
                       "notes": man.notes, "priors": "manifest" if man.priors_given else "default"}
    report.devices = [str(d) for d in predictor.devices]
    report.models = predictor.models_info()
    report.settings = {"tta": tta, "num_workers": default_num_workers() if num_workers is None else num_workers,
                       "chunk_size": chunk_size, "batch_size": predictor.batch_size, "time_budget_s": time_budget_s,
                       "precision": "fp16 autocast" if predictor.devices[0].type == "cuda" else "fp32"}
    t = time.perf_counter()
    refs = discover_studies(test_dir, split=split)
    discover_s = time.perf_counter() - t
    if not refs:
        logger.warning("no studies found under %s: writing an empty submission", test_dir)
    for ref in refs:
        logger.debug("study %s: %s", ref.study_id, ref.problems)
    result = predictor.run(refs, num_workers=num_workers, chunk_size=chunk_size, time_budget_s=time_budget_s,
                           start=start, progress=progress)
    t = time.perf_counter()
    assembled = assemble_submission(result.probs, result.study_ids, masks=result.coverage, priors=man.priors)
    for sid in result.study_ids:
        rec = result.records.setdefault(sid, StudyRecord(sid, status="fallback", fallbacks=["no result; prior rows"]))
        filled = assembled.filled.get(sid, [])
        rec.set_prior_targets(len(filled))
        if filled and rec.status != "skipped":
            rec.fallbacks.append(_describe_filled(filled))
    write_submission(assembled.frame, out_csv, result.study_ids)
    write_s = time.perf_counter() - t
    timings = Timings()
    timings.merge(predictor.timings)
    timings.merge(result.timings)
    timings.add("discover", discover_s)
    timings.add("write", write_s)
    report.timings = timings.to_dict()
    report.n_studies = len(result.study_ids)
    report.wall_s = round(time.perf_counter() - t0, 3)
    report.studies_per_s = round(len(result.study_ids) / result.wall_s, 4) if result.wall_s > 0 else 0.0
    report.deadline = result.deadline or {}
    report.warnings += result.warnings
    report.peak_rss_mb = result.peak_rss_mb
    report.add_studies([result.records[s] for s in result.study_ids])
    rpath = Path(report_path) if report_path else out_csv.with_name("run_report.json")
    report.write(rpath)
    logger.info("%d studies in %.1fs (%.2f studies/s); %s; report: %s", report.n_studies, report.wall_s,
                report.studies_per_s, report.summary, rpath)
    return assembled.frame


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


def run_cli(args: argparse.Namespace) -> int:
    try:
        df = predict(
            args.test_dir, out_csv=args.out, manifest=args.manifest, device=args.device, tta=not args.no_tta,
            num_workers=args.workers, time_budget_s=args.time_budget, chunk_size=args.chunk_size,
            batch_size=args.batch_size, split=args.split,
        )
    except (ManifestError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 1
    print(f"wrote {args.out} ({len(df)} rows) and {args.out.with_name('run_report.json')}")
    return 0
