"""Capture, during a run, what the models saw: model-input slices with keypoints, and crops.

`QACollector` is the `rsna_infer.inference.chunk.RunObserver` of a run with QA pages. Each chunk
gets a `ChunkCapture`: the predictor hands it every group's samples (``add``) and, after the
blend, the chunk's studies, keypoints and results (``close``). Nothing is read again from
disk and nothing is recomputed: pictures are the arrays in the samples, i.e. the model inputs
after canonical orientation, resizing and normalisation (shown back on the [0, 1] scale of
the normalisation's clip range).

At ``close`` every study is scored (`rsna_infer.viz.rank`); only a study that enters the
current worst ``worst`` (a bounded heap) is turned into a compact `StudyCapture` (uint8
slices and crop centre slices, keypoint tables); the chunk's samples are then released. So a
2,000-study run holds at most ``worst`` captures plus one score per study.

Where a keypoint is drawn: on the model input of its own stack whose slice (a 2-D input's
channel, or a resampled 3-D input's slice) is nearest to it, preferring inputs whose slice
contains the point, then the input of the family that produced the point, then the larger
input. A point is mapped into that input's pixels through the sample's `VoxelTransform`
(``u = to_norm(voxel)``, pixel ``= u * size - 0.5``), the same transform that decoded it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..constants import AXIAL_T2, LEVEL_TO_COORD_LEVEL, LEVELS, N_LEVELS, SAG_T1, SAG_T2, SIDES
from ..stage1.assemble import preferred_best
from .rank import KINDS, StudyScore, score_chunk_study

if TYPE_CHECKING:
    import pandas as pd

    from ..inference.chunk import ChunkOutput
    from ..io.volume import Study, Volume
    from ..keypoints import KeypointSet, StudyKeypoints
    from ..models.family import Family, Sample

logger = logging.getLogger(__name__)

#: Page order of the series types.
SERIES_ORDER: tuple[str, ...] = (SAG_T2, SAG_T1, AXIAL_T2)
SERIES_SHORT: dict[str, str] = {SAG_T2: "t2", SAG_T1: "t1", AXIAL_T2: "ax"}


# ----------------------------------------------------------------------------------------
# What is kept
# ----------------------------------------------------------------------------------------
@dataclass
class Mark:
    """One point drawn on a frame, in the frame's model-input pixels (centres at integers)."""

    kind: str
    index: int  # point index in its set (side * 5 + level; level for spinal)
    row: float
    col: float
    truth: bool  # ground truth (labels) rather than a prediction
    dz: float  # slices (of the source stack) between the point and the frame
    confidence: float = 1.0
    provenance: str = ""

    @property
    def level(self) -> int:
        return self.index % N_LEVELS

    @property
    def side(self) -> int | None:
        return None if self.kind == "spinal" else self.index // N_LEVELS

    @property
    def name(self) -> str:
        lv = LEVEL_TO_COORD_LEVEL[LEVELS[self.level]]
        return lv if self.side is None else f"{SIDES[self.side]} {lv}"


@dataclass
class Frame:
    """One 2-D slice of a model input, with the points drawn on it."""

    image: np.ndarray  # uint8 [H, W]: the model input on its [0, 1] clip range
    series_type: str | None
    series_id: int
    stack_index: int
    group: str  # the stage-1 group whose input this is ("sag2d/t2")
    label: str  # what the slice is, for captions
    canon_z: float  # canonical slice coordinate of the frame in its stack
    slab: float = 0.5  # half its thickness in source slices (a resampled 3-D slice is thicker)
    marks: list[Mark] = field(default_factory=list)
    name: str = ""  # file stem, set when the capture is finished


@dataclass
class Tile:
    """The centre slice of one stage-2 crop and what it grades."""

    image: np.ndarray | None  # uint8 [h, w]; None = no crop (missing keypoint or series)
    title: str  # "L4/L5 spinal"
    targets: list[tuple[int, int]]  # (condition, level) graded from this crop
    level: int
    center: tuple[float, float] | None = None  # the keypoint in tile pixels (row, col)
    note: str = ""  # where it came from


@dataclass
class CropGrid:
    """Every crop of one stage-2 group's sample, row by row."""

    group: str
    members: list[str]
    n_slices: int
    rows: list[tuple[str, list[Tile]]]
    name: str = ""


@dataclass
class StudyCapture:
    """Everything a study page needs that the run report does not hold."""

    study_id: int
    score: StudyScore
    frames: list[Frame] = field(default_factory=list)
    grids: list[CropGrid] = field(default_factory=list)
    probs: np.ndarray | None = None  # [5, 5, 3] blended
    coverage: np.ndarray | None = None  # [5, 5] bool: predicted by a model (else priors)
    points: list[dict[str, Any]] = field(default_factory=list)  # table rows of the best keypoints
    sets: list[dict[str, Any]] = field(default_factory=list)  # every keypoint set, summarised
    volumes: list[dict[str, Any]] = field(default_factory=list)  # stacks of the study
    truth_unplaced: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------
# Stage-1 inputs: which slices they hold and where a voxel lands in them
# ----------------------------------------------------------------------------------------
def _to_uint8(arr: np.ndarray, family: "Family") -> np.ndarray:
    """A normalised model-input slice back on [0, 1] (the clip range), as uint8."""
    norm = family.spec.norm
    unit = np.asarray(arr, dtype=np.float32) * norm.std + norm.mean
    return np.rint(np.clip(np.nan_to_num(unit, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)


class _Input:
    """A stage-1 sample as a stack of displayable slices in its volume's canonical frame."""

    def __init__(self, group: str, order: int, family: "Family", sample: "Sample") -> None:
        from ..imaging import VoxelTransform, canonical_slice_index

        t = sample.meta.get("transform")
        image = sample.inputs.get("image")
        if not isinstance(t, VoxelTransform) or image is None or image.ndim not in (3, 4):
            raise ValueError("not a transform-carrying image sample")
        self.group, self.order, self.family, self.sample = group, order, family, sample
        self.transform: VoxelTransform = t
        self.image = image
        self.series_id = int(sample.meta["series_id"])
        self.stack_index = int(sample.meta.get("stack_index", 0))
        self.h, self.w = (int(s) for s in image.shape[-2:])
        self.tokens = {str(family.name), str(getattr(family, "set_key", family.name))}
        if image.ndim == 4:  # [C, D, H, W]: a resampled 3-D volume, D slices across the stack
            d = int(image.shape[1])
            lo, hi = float(t.lo[0]), float(t.hi[0])
            self.slices = [(k, lo + (k + 0.5) / d * (hi - lo)) for k in range(d)]
            self.slab = 0.5 * abs(hi - lo) / d
            self.kind = f"3-D input, {d} resampled slices"
        elif "source_slices" in sample.meta:  # every (or every sampled) slice, one per entry
            canon = canonical_slice_index(t, np.asarray(sample.meta["source_slices"], np.float64))
            self.slices = [(k, float(c)) for k, c in enumerate(np.atleast_1d(canon))]
            self.slab = 0.5
            self.kind = f"2.5-D input, {len(self.slices)} slices"
        else:  # 2.5-D: neighbouring slices as channels around a centre slice (u_fill z)
            uz = (sample.meta.get("u_fill") or {}).get(0)
            if uz is None:
                raise ValueError("2-D sample without a centre slice")
            z_canon = float(t.to_canonical(np.array([float(uz), 0.0, 0.0]))[0])
            self.slices = [(k, float(c)) for k, c in enumerate(self._channel_slices(z_canon))]
            self.slab = 0.5
            self.kind = f"{image.shape[0]} slices as channels"

    def _channel_slices(self, z_canon: float) -> np.ndarray:
        """Canonical slice of each channel: the family's own ``channel_slices`` (sag2d: sampled
        slices around the centre), else consecutive slices centred on the centre slice (axial_xy)."""
        c = int(self.image.shape[0])
        n_total = int(self.transform.orientation.shape[0])
        fn = getattr(self.family, "channel_slices", None)
        if callable(fn):
            try:
                channels, _ = fn(n_total)
                channels = np.asarray(channels, np.float64)
                if channels.shape == (c,):
                    return channels
            except Exception:  # a family whose channel_slices means something else
                pass
        kc = int(round(z_canon))
        return np.clip(kc - c // 2 + np.arange(c), 0, n_total - 1).astype(np.float64)

    def nearest(self, c: float) -> tuple[int, float]:
        """(frame index, canonical z) of the slice nearest canonical z ``c``."""
        k, z = min(self.slices, key=lambda kz: abs(kz[1] - c))
        return k, z

    def pixel(self, voxel: np.ndarray) -> tuple[float, float, float]:
        """Source voxel -> (row, col, canonical z) in this input (pixel centres at integers)."""
        u = self.transform.to_norm(np.asarray(voxel, np.float64))
        c = float(self.transform.orientation.to_canonical(np.asarray(voxel, np.float64))[0])
        return float(u[1] * self.h - 0.5), float(u[2] * self.w - 0.5), c

    def frame_image(self, k: int) -> np.ndarray:
        arr = self.image[0, k] if self.image.ndim == 4 else self.image[k]
        return _to_uint8(arr, self.family)

    def label(self, k: int, z_canon: float) -> str:
        src = float(self.transform.orientation.to_source(np.array([z_canon, 0.0, 0.0]))[0])
        return f"{self.group} ({self.kind}): slice {k + 1}/{len(self.slices)}, source slice {src:.1f}, {self.h}x{self.w} px"


# ----------------------------------------------------------------------------------------
# Stage-2 crops
# ----------------------------------------------------------------------------------------
FUSION_ROWS: tuple[str, ...] = ("spinal (Sag T2)", "left foraminal (Sag T1)", "right foraminal (Sag T1)",
                                "left subarticular (Sag T2)", "right subarticular (Sag T2)")
COND_SHORT: tuple[str, ...] = ("spinal", "L foramen", "R foramen", "L subart", "R subart")


def _tile(arr: np.ndarray | None, present: bool, info: Any, family: "Family", title: str,
          targets: list[tuple[int, int]], level: int) -> Tile:
    if arr is None or not present or info is None:
        return Tile(None, title, targets, level, note="no crop")
    s = int(arr.shape[0])
    img = _to_uint8(arr[s // 2], family)
    center = (float(info.center[1]), float(info.center[2]))
    used = [z for z in info.slices if z >= 0]
    flags = [f for f, on in (("shifted", info.shifted), ("padded", info.padded)) if on]
    note = (f"series {info.series_id}/{info.stack_index}, source slices {min(used)}-{max(used)}" if used else "padding only")
    note += f", {info.mm_per_px[0]:.2f} mm/px" + (f", {', '.join(flags)}" if flags else "")
    return Tile(img, title, targets, level, center, note)


def crop_grid(group: Any, family: "Family", sample: "Sample") -> CropGrid | None:
    """The crops of one stage-2 sample laid out by target; None for a family whose inputs
    viz does not know (only ``fusion`` and ``roi`` are laid out)."""
    from ..stage2.layout import point_targets

    lv_name = [LEVEL_TO_COORD_LEVEL[lv] for lv in LEVELS]
    meta = sample.meta.get("crops") or {}
    inp = sample.inputs
    rows: list[tuple[str, list[Tile]]] = []
    if family.name == "fusion" and "sag" in inp and "axial" in inp:
        for c, row_name in enumerate(FUSION_ROWS):
            infos = (meta.get("sag") or [[None] * N_LEVELS] * len(FUSION_ROWS))[c]
            rows.append((row_name, [
                _tile(inp["sag"][c, lv], bool(inp["sag_present"][c, lv]), infos[lv], family, f"{lv_name[lv]} {COND_SHORT[c]}",
                      [(c, lv)], lv) for lv in range(N_LEVELS)]))
        infos = meta.get("axial") or [None] * N_LEVELS
        rows.append(("axial (Axial T2)", [
            _tile(inp["axial"][lv], bool(inp["axial_present"][lv]), infos[lv], family, f"{lv_name[lv]} axial",
                  [(3, lv), (4, lv)], lv) for lv in range(N_LEVELS)]))
    elif family.name == "roi" and "crops" in inp:
        kind = str(family.entry.variant)
        tg = point_targets(kind)
        series = {"spinal": "Sag T2", "foraminal": "Sag T1", "subarticular": "Axial T2"}.get(kind, "")
        for key, what in (("crops", series), ("sag", "Sag T2 companion")):
            if key not in inp:
                continue
            infos = meta.get(key) or [None] * len(tg)
            present = inp["present" if key == "crops" else "sag_present"]
            for side0 in range(0, len(tg), N_LEVELS):
                side = "" if len(tg) == N_LEVELS else f"{SIDES[side0 // N_LEVELS]} "
                tiles = [_tile(inp[key][i], bool(present[i]), infos[i], family,
                               f"{lv_name[i % N_LEVELS]} {COND_SHORT[int(tg[i, 0])]}", [(int(tg[i, 0]), int(tg[i, 1]))],
                               i % N_LEVELS) for i in range(side0, side0 + N_LEVELS)]
                rows.append((f"{side}{kind} ({what})", tiles))
    else:
        return None
    return CropGrid(str(group.key), list(group.members), int(family.spec.n_slices), rows)


# ----------------------------------------------------------------------------------------
# Keypoints: per-point provenance, frame choice
# ----------------------------------------------------------------------------------------
def point_provenance(kp: "StudyKeypoints", best: "KeypointSet") -> list[str]:
    """Per point of a merged best set, the key of the set it came from ("" where missing).

    A set that carries its own per-point ``provenance`` is trusted; otherwise the point is
    matched (world position and confidence) against the study's sets of that kind.
    """
    given = getattr(best, "provenance", None)
    if given is not None and len(given) == len(best):
        return [str(p) for p in given]
    out = []
    for i in range(len(best)):
        if not best.valid[i]:
            out.append("")
            continue
        hit = ""
        for key, s in kp.sets.items():
            if s.kind != best.kind or key.startswith("truth_") or not s.valid[i]:
                continue
            if np.allclose(s.world[i], best.world[i], atol=1e-6) and abs(s.confidence[i] - best.confidence[i]) < 1e-9:
                hit = key if s.source in ("", key) else f"{key} ({s.source})"
                break
        out.append(hit)
    return out


def _tokens(provenance: str) -> set[str]:
    """Family names in a provenance string (``'axial_level (axial_level+axial_xy)'``)."""
    return {t for t in provenance.replace("(", " ").replace(")", " ").replace("+", " ").split() if t}


@dataclass
class _Point:
    kind: str
    index: int
    series_id: int
    stack_index: int
    voxel: np.ndarray
    world: np.ndarray
    confidence: float
    provenance: str
    truth: bool


def _points(kp: "StudyKeypoints | None", truth: "StudyKeypoints | None") -> tuple[list[_Point], dict[str, list[str]]]:
    out: list[_Point] = []
    prov_by_kind: dict[str, list[str]] = {}
    for kind in KINDS:
        best = preferred_best(kp, kind) if kp is not None else None
        if best is not None:
            prov = point_provenance(kp, best)  # type: ignore[arg-type]
            prov_by_kind[kind] = prov
            for i in np.flatnonzero(best.valid):
                out.append(_Point(kind, int(i), int(best.series_id[i]), int(best.stack_index[i]), best.voxel[i], best.world[i],
                                  float(best.confidence[i]), prov[i], False))
        t = truth.get(f"truth_{kind}") if truth is not None else None
        if t is not None:
            for i in np.flatnonzero(t.valid):
                out.append(_Point(kind, int(i), int(t.series_id[i]), int(t.stack_index[i]), t.voxel[i], t.world[i], 1.0,
                                  "ground truth", True))
    return out, prov_by_kind


def _place(p: _Point, inputs: list[_Input], study: "Study") -> tuple[_Input, int, float, Mark] | None:
    """The input and slice a point is drawn on (see the module docstring), or None."""
    own = [inp for inp in inputs if (inp.series_id, inp.stack_index) == (p.series_id, p.stack_index)]
    cands: list[tuple[_Input, np.ndarray]] = [(inp, p.voxel) for inp in own if np.all(np.isfinite(p.voxel))]
    if not cands:  # not on its own stack's inputs: any input of that series type holding the point
        own_vol = study.find(p.series_id, p.stack_index)
        want = own_vol.series_type if own_vol is not None else None
        for inp in inputs:
            vol = study.find(inp.series_id, inp.stack_index)
            if vol is not None and (want is None or vol.series_type == want) and bool(vol.contains(p.world)):
                cands.append((inp, vol.to_voxel(p.world)))
    best: tuple[tuple, tuple[_Input, int, float, Mark]] | None = None
    tokens = _tokens(p.provenance)
    for inp, voxel in cands:
        row, col, c = inp.pixel(voxel)
        k, z = inp.nearest(c)
        dz = abs(c - z)
        in_plane = -0.5 <= row <= inp.h - 0.5 and -0.5 <= col <= inp.w - 0.5
        producer = bool(tokens & inp.tokens) and not p.truth
        key = (not in_plane, dz > inp.slab + 1e-6, not producer, round(dz, 6), -inp.h * inp.w, inp.order)
        if best is None or key < best[0]:
            mark = Mark(p.kind, p.index, row, col, p.truth, dz, p.confidence, p.provenance)
            best = (key, (inp, k, z, mark))
    return None if best is None or best[0][0] else best[1]


def build_frames(study: "Study", inputs: list[_Input], kp: "StudyKeypoints | None",
                 truth: "StudyKeypoints | None") -> tuple[list[Frame], list[dict[str, Any]]]:
    """Frames with their marks, and the table rows of the best keypoints (+ truth distance)."""
    points, prov = _points(kp, truth)
    frames: dict[tuple[int, int], Frame] = {}
    where: dict[tuple[str, int, bool], tuple[int, int]] = {}
    for p in points:
        placed = _place(p, inputs, study)
        if placed is None:
            continue
        inp, k, z, mark = placed
        fk = (id(inp), k)
        if fk not in frames:
            vol = study.find(inp.series_id, inp.stack_index)
            frames[fk] = Frame(inp.frame_image(k), vol.series_type if vol is not None else None, inp.series_id,
                               inp.stack_index, inp.group, inp.label(k, z), z, inp.slab)
        frames[fk].marks.append(mark)
        where[(p.kind, p.index, p.truth)] = fk
    order = {s: i for i, s in enumerate(SERIES_ORDER)}
    by_input = {id(inp): inp.order for inp in inputs}
    keys = sorted(frames, key=lambda fk: (order.get(frames[fk].series_type or "", 9), frames[fk].series_id,
                                          frames[fk].stack_index, by_input[fk[0]], frames[fk].canon_z))
    out = []
    for n, fk in enumerate(keys):
        f = frames[fk]
        f.name = f"{n + 1:02d}_{SERIES_SHORT.get(f.series_type or '', 'x')}_{f.group.replace('/', '-')}_s{fk[1]}"
        out.append(f)
    names = {fk: frames[fk].name for fk in keys}
    rows = []
    for kind in KINDS:
        best = preferred_best(kp, kind) if kp is not None else None
        t = truth.get(f"truth_{kind}") if truth is not None else None
        if best is None and t is None:
            continue
        n = len(best) if best is not None else len(t)  # type: ignore[arg-type]
        for i in range(n):
            valid = best is not None and bool(best.valid[i])
            has_truth = t is not None and bool(t.valid[i])
            row: dict[str, Any] = {
                "kind": kind, "index": i, "name": Mark(kind, i, 0, 0, False, 0).name, "valid": valid,
                "confidence": float(best.confidence[i]) if valid else 0.0,  # type: ignore[union-attr]
                "provenance": prov.get(kind, [""] * n)[i] if valid else "",
                "series_id": int(best.series_id[i]) if valid else None,  # type: ignore[union-attr]
                "stack_index": int(best.stack_index[i]) if valid else None,  # type: ignore[union-attr]
                "voxel": np.round(best.voxel[i], 2).tolist() if valid else None,  # type: ignore[union-attr]
                "world": np.round(best.world[i], 2).tolist() if valid else None,  # type: ignore[union-attr]
                "frame": names.get(where.get((kind, i, False))),  # type: ignore[arg-type]
                "truth_frame": names.get(where.get((kind, i, True))),  # type: ignore[arg-type]
                "truth_mm": (round(float(np.linalg.norm(best.world[i] - t.world[i])), 2)  # type: ignore[union-attr]
                             if valid and has_truth else None),
                "has_truth": has_truth,
            }
            rows.append(row)
    return out, rows


def set_summaries(kp: "StudyKeypoints | None") -> list[dict[str, Any]]:
    if kp is None:
        return []
    out = []
    for key, s in sorted(kp.sets.items()):
        v = s.valid
        out.append({"key": key, "kind": s.kind, "source": s.source, "valid": int(v.sum()), "points": len(s),
                    "mean_confidence": round(float(s.confidence[v].mean()), 4) if v.any() else None,
                    "confidence": np.round(s.confidence, 3).tolist()})
    return out


def volume_summaries(study: "Study | None") -> list[dict[str, Any]]:
    if study is None:
        return []
    out = []
    for stype, vols in study.volumes.items():
        for v in vols:
            out.append({"series_type": stype, "series_id": int(v.series_id), "stack_index": int(v.stack_index),
                        "shape": list(v.shape), "spacing_mm": [round(v.spacing[0], 3), round(v.spacing[1], 3)],
                        "slice_spacing_mm": round(v.slice_spacing, 3)})
    return out


# ----------------------------------------------------------------------------------------
# The observer
# ----------------------------------------------------------------------------------------
class ChunkCapture:
    """What one chunk shows the collector; lives and dies with its `ChunkOutput`."""

    def __init__(self, collector: "QACollector") -> None:
        self.collector = collector
        self._inputs: dict[int, list[_Input]] = {}
        self._grids: dict[int, list[CropGrid]] = {}
        self._order = itertools.count()
        self._notes: dict[int, list[str]] = {}
        self.seconds = 0.0

    def add(self, group: Any, family: "Family", items: list[tuple[int, "Sample"]]) -> None:
        """Keep references to a stage-1 group's samples; lay out a stage-2 group's crops now
        (uint8 centre slices, so the big crop arrays are not held until the chunk ends)."""
        t0 = time.perf_counter()
        order = next(self._order)
        for sid, sample in items:
            try:
                if int(group.stage) == 1:
                    self._inputs.setdefault(int(sid), []).append(_Input(str(group.key), order, family, sample))
                else:
                    grid = crop_grid(group, family, sample)
                    if grid is not None:
                        self._grids.setdefault(int(sid), []).append(grid)
            except ValueError:
                continue  # a sample without image geometry (nothing to draw)
            except Exception as e:  # a QA problem must never hurt the run
                self._notes.setdefault(int(sid), []).append(f"capture of {group.key} failed: {type(e).__name__}: {e}")
        self.seconds += time.perf_counter() - t0

    def close(self, studies: dict[int, "Study"], keypoints: dict[int, "StudyKeypoints"], out: "ChunkOutput") -> None:
        """Score every study of the chunk; capture those that enter the worst-N; release the rest."""
        t0 = time.perf_counter()
        try:
            for sid, rec in out.records.items():
                kp = keypoints.get(sid)
                score = score_chunk_study(rec, out.probs.get(sid), out.coverage.get(sid), kp)
                if not self.collector.consider(score):
                    continue
                cap = StudyCapture(int(sid), score, probs=out.probs.get(sid), coverage=out.coverage.get(sid),
                                   notes=list(self._notes.get(sid, [])))
                try:
                    self._fill(cap, studies.get(sid), kp)
                except Exception as e:
                    logger.warning("QA capture of study %s failed: %s: %s", sid, type(e).__name__, e, exc_info=e)
                    cap.notes.append(f"capture failed: {type(e).__name__}: {e}")
                self.collector.offer(cap)
        finally:
            self._inputs.clear()
            self._grids.clear()
            self.seconds += time.perf_counter() - t0
            out.timings.add("qa/capture", self.seconds)

    def _fill(self, cap: StudyCapture, study: "Study | None", kp: "StudyKeypoints | None") -> None:
        sid = cap.study_id
        cap.grids = self._grids.get(sid, [])
        for n, g in enumerate(cap.grids):
            g.name = f"crops_{n + 1:02d}_{g.group.replace('/', '-').replace('#', '-')}"
        cap.sets = set_summaries(kp)
        cap.volumes = volume_summaries(study)
        if study is None:
            return
        truth = self.collector.truth(study)
        if truth is not None:
            cap.truth_unplaced = list(truth.report.get("truth_unplaced", []))
        cap.frames, cap.points = build_frames(study, self._inputs.get(sid, []), kp, truth)


class QACollector:
    """Keeps the ``worst`` most problematic studies of a run (see `rsna_infer.viz.rank`) and
    writes their pages (`write`). ``labels``: a ``train_label_coordinates.csv`` (path, or the
    dict of `rsna_infer.train.data.read_coordinates`) whose points are drawn as ground truth."""

    def __init__(self, out_dir: "str | Path", worst: int = 10, labels: "str | Path | dict[int, pd.DataFrame] | None" = None) -> None:
        from . import require_pillow

        require_pillow()
        if int(worst) < 0:
            raise ValueError(f"qa_worst must be >= 0, got {worst}")
        self.out_dir = Path(out_dir)
        self.worst = int(worst)
        self.labels_path: str | None = None
        self.coords: dict[int, pd.DataFrame] | None = None
        if labels is not None:
            if isinstance(labels, dict):
                self.coords = labels
            else:
                from ..train.data import read_coordinates

                self.labels_path = str(labels)
                self.coords = read_coordinates(labels)
        self.scores: dict[int, StudyScore] = {}
        self._heap: list[tuple[tuple, int, StudyCapture]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()

    # -- the RunObserver side -------------------------------------------------------------
    def new_chunk(self) -> ChunkCapture:
        return ChunkCapture(self)

    def consider(self, score: StudyScore) -> bool:
        """Record ``score``; True when the study would enter the current worst-N."""
        with self._lock:
            self.scores[score.study_id] = score
            return self.worst > 0 and (len(self._heap) < self.worst or score.key > self._heap[0][0])

    def offer(self, cap: StudyCapture) -> None:
        with self._lock:
            item = (cap.score.key, next(self._seq), cap)
            if len(self._heap) < self.worst:
                heapq.heappush(self._heap, item)
            elif self.worst > 0 and item[0] > self._heap[0][0]:
                heapq.heapreplace(self._heap, item)

    def truth(self, study: "Study") -> "StudyKeypoints | None":
        """Ground-truth keypoint sets of ``study`` from the labels (None without labels)."""
        if self.coords is None:
            return None
        from ..train.data import truth_keypoints

        return truth_keypoints(study, self.coords.get(int(study.study_id)))

    # -- after the run --------------------------------------------------------------------
    def captures(self) -> dict[int, StudyCapture]:
        with self._lock:
            return {c.study_id: c for _, _, c in self._heap}

    def write(self, report: dict[str, Any], report_path: "str | Path | None" = None) -> Path:
        """Pages of the worst studies and the run's index page; returns the index path."""
        from .pages import write_pages

        return write_pages(self, report, report_path)
