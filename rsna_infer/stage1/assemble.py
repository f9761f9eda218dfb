"""From decoded sets to a study's final keypoints: combine stacks, cross-check views, fall back.

- `merge_decoded`: the sets decoded from one family's samples of a study (one per stack, or
  per slice for ``axial_xy``) -> a new `StudyKeypoints` with the family's set (`set_key`).
- `merge_sagittal`: the sagittal sets of one kind (``sag3d_*`` and ``sag2d_*``) merged point
  by point into ``sagittal_t2`` / ``sagittal_t1``: where sag-3d has the point, its slice (z)
  and, within ``refine_max_mm``, its in-plane position moved ``refine_weight`` of the way to
  sag-2d's (the 2-D model sees the slice at full resolution); where only sag-2d has it, the
  sag-2d point (its slice is a rule: origin ``sag2d_*``). Per-point origins say which.
- `reconcile_levels`: an axial point whose z lies more than ``max_level_mm`` (along its stack's
  normal) from the canal point of its level is on another level (a short axial stack covering
  one disc says little about *which* disc): it is replaced by the projection point.
- `finalize`: the cross-view step. The sagittal canal points (best spinal set) are projected
  into every axial stack: (1) the ``"projection"`` subarticular set = each canal point on the
  nearest slice of the axial stack that contains it, moved `LATERAL_OFFSET_MM` toward the
  patient's left / right in that slice's plane; (2) a report of how far (mm, along the stack
  normal) each axial prediction's z is from the canal point's projection; (3) axial points
  below ``min_axial_confidence`` or on the wrong level (`reconcile_levels`) are dropped where
  the projection has a point, so that `StudyKeypoints.best` falls back to it; with no axial
  series the projection is all there is.

Sets are never mutated: every step builds new `KeypointSet`/`StudyKeypoints` objects.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from ..constants import AXIAL_T2, N_LEVELS
from ..imaging import view_alignment
from ..keypoints import KeypointSet, StudyKeypoints

if TYPE_CHECKING:
    from ..io.volume import Study, Volume
    from ..models.family import KeypointFamily

logger = logging.getLogger(__name__)

#: Lateral distance (mm) of the subarticular zone (lateral recess) from the canal centre,
#: about half the lumbar canal's transverse diameter.
LATERAL_OFFSET_MM = 12.0
#: Confidence of a projected point relative to the canal point it comes from: low, so any
#: usable axial prediction wins over it.
PROJECTION_CONFIDENCE = 0.3
#: Axial predictions less confident than this are replaced by the projection when it exists.
MIN_AXIAL_CONFIDENCE = 0.3
#: An axial point further than this (mm, along its stack's normal) from its level's canal
#: point is on another level: lumbar discs are 30-45 mm apart, a good z is within a few mm.
MAX_LEVEL_MM = 12.0
#: Sagittal merge: in-plane refinement of a sag-3d point toward the sag-2d one (0 = none, 1 =
#: the sag-2d position: a 2-D model sees its slice at full resolution, a 3-D one resamples the
#: whole stack, so sag-2d's in-plane error is the smaller one, 2.6 vs 6.7 mm on the demo
#: phantoms) and the largest in-plane disagreement that still counts as the same point (when
#: the two disagree by a disc or more, the 2-D model is still the likelier one to be right).
REFINE_WEIGHT = 1.0
REFINE_MAX_MM = 50.0
#: Merged sagittal set of each kind, and the sets it merges (3-D first: it places the slice).
SAGITTAL_SETS: dict[str, tuple[str, str, str]] = {
    "spinal": ("sagittal_t2", "sag3d_t2", "sag2d_t2"),
    "foraminal": ("sagittal_t1", "sag3d_t1", "sag2d_t1"),
}
SPINAL_PREFER: tuple[str, ...] = SAGITTAL_SETS["spinal"]
FORAMINAL_PREFER: tuple[str, ...] = SAGITTAL_SETS["foraminal"]
AXIAL_KEYS: tuple[str, ...] = ("axial_level", "axial3d")
SUBARTICULAR_PREFER: tuple[str, ...] = (*AXIAL_KEYS, "projection")
#: The keypoint preference of the final sets (what the run report calls ``best/<kind>``, and
#: the graders' default): the merged sagittal sets, then their parts; the axial models, then
#: the projection of the canal.
DEFAULT_PREFER: dict[str, tuple[str, ...]] = {
    "spinal": SPINAL_PREFER, "foraminal": FORAMINAL_PREFER, "subarticular": SUBARTICULAR_PREFER,
}
_PATIENT_LEFT = np.array([1.0, 0.0, 0.0])


def preferred_best(keypoints: StudyKeypoints, kind: str) -> KeypointSet | None:
    """``keypoints.best(kind)`` in the default preference (`DEFAULT_PREFER`): the points the
    graders crop around unless a model says otherwise, the ones the run report records, the
    pictures mark and the keypoint errors measure."""
    return keypoints.best(kind, prefer=DEFAULT_PREFER.get(kind, ()))


def merge_decoded(family: "KeypointFamily", sets: list[KeypointSet], keypoints: StudyKeypoints) -> StudyKeypoints:
    """``keypoints`` plus the family's set combined from ``sets`` (a new object)."""
    merge = getattr(family, "merge_sets", None)
    previous = keypoints.get(family.set_key)
    if merge is not None:
        merged = merge(sets, previous)
    else:
        merged = previous
        for s in sets:
            merged = s if merged is None else merged.merge_most_confident(s)
    new_sets = dict(keypoints.sets)
    if merged is not None:
        new_sets[family.set_key] = merged
    return StudyKeypoints(keypoints.study_id, new_sets, dict(keypoints.report))


def merge_sagittal(
    study: "Study",
    keypoints: StudyKeypoints,
    kind: str,
    refine_weight: float = REFINE_WEIGHT,
    refine_max_mm: float = REFINE_MAX_MM,
) -> KeypointSet | None:
    """The merged sagittal set of ``kind`` (see the module docstring), or None when neither
    a sag-3d nor a sag-2d set of that kind exists. Origins: ``sag3d_x`` (3-D point),
    ``sag3d_x+sag2d_x`` (3-D slice, in-plane refined by the 2-D model), ``sag2d_x`` (2-D only)."""
    _, key3, key2 = SAGITTAL_SETS[kind]
    s3, s2 = keypoints.get(key3), keypoints.get(key2)
    if s3 is None and s2 is None:
        return None
    if s3 is None or s2 is None:
        return s3 if s2 is None else s2
    out = s3.take_points(~s3.valid & s2.valid, s2)  # gaps of the 3-D model: the 2-D point
    if refine_weight <= 0:
        return out
    world, voxel, origin = out.world.copy(), out.voxel.copy(), out.origin.copy()
    for i in np.flatnonzero(s3.valid & s2.valid):
        vol = study.find(int(s3.series_id[i]), int(s3.stack_index[i]))
        if vol is None:
            continue
        d = s2.world[i] - s3.world[i]
        d_plane = d - float(d @ vol.normal) * vol.normal  # the slice stays the 3-D model's
        if float(np.linalg.norm(d_plane)) > refine_max_mm:
            continue
        world[i] = s3.world[i] + refine_weight * d_plane
        voxel[i] = vol.to_voxel(world[i])
        origin[i] = f"{key3}+{key2}"
    return KeypointSet.from_points(kind, world, voxel, out.series_id, out.stack_index, out.confidence, origin)


def canal_points(study: "Study", keypoints: StudyKeypoints, spinal_prefer: tuple[str, ...] = SPINAL_PREFER) -> KeypointSet | None:
    """The canal points the axial keypoints are checked against: the merged sagittal spinal set
    (`merge_sagittal`) where it can be built, else the best spinal set."""
    merged = merge_sagittal(study, keypoints, "spinal")
    if merged is not None and "sagittal_t2" not in keypoints.sets:
        keypoints = StudyKeypoints(keypoints.study_id, {**keypoints.sets, "sagittal_t2": merged})
    return keypoints.best("spinal", prefer=spinal_prefer)


def reconcile_levels(
    study: "Study", axial: KeypointSet, canal: KeypointSet | None, projection: KeypointSet | None,
    max_level_mm: float = MAX_LEVEL_MM,
) -> tuple[KeypointSet, list[str]]:
    """``axial`` with every point further than ``max_level_mm`` along its stack's normal from its
    level's canal point replaced by the ``projection`` point (dropped when there is none), and
    the names of those points."""
    if canal is None or not canal.valid.any():
        return axial, []
    d = cross_view_distances(study, canal, axial)
    wrong = np.isfinite(d) & (d > max_level_mm)
    if not wrong.any():
        return axial, []
    names = [axial.describe(int(k)) for k in np.flatnonzero(wrong)]
    if projection is None:
        projection = KeypointSet.empty(axial.kind, "projection")
    return axial.take_points(wrong, projection), names


def axial_stacks(study: "Study") -> list["Volume"]:
    """The study's axial T2 stacks that really are axial."""
    return [v for v in study.get(AXIAL_T2) if view_alignment(v, "axial") >= 0.5]


def projection_set(
    study: "Study",
    canal: KeypointSet,
    lateral_offset_mm: float = LATERAL_OFFSET_MM,
    confidence: float = PROJECTION_CONFIDENCE,
    sagittal_fallback: bool = True,
) -> KeypointSet:
    """Subarticular points projected from the canal points into the axial stacks.

    Per level: among the axial stacks containing the canal point, the one where it lies
    deepest (most slices from either end); the point goes onto that stack's nearest slice,
    shifted ``lateral_offset_mm`` along patient +x (left) / -x (right) projected onto the slice
    plane. Confidence = ``confidence`` x the canal point's. With ``sagittal_fallback``, a level
    that no axial stack covers (or a study without axial series) gets the canal point moved
    ``lateral_offset_mm`` toward each side in the canal point's own (sagittal) stack, on the
    nearest slice, at half that confidence: still a usable patient coordinate.
    """
    out = KeypointSet.empty("subarticular", source="projection")
    stacks = axial_stacks(study)
    voxel = np.full((2 * N_LEVELS, 3), np.nan)
    world = np.full((2 * N_LEVELS, 3), np.nan)
    series = np.full(2 * N_LEVELS, -1)
    stack_idx = np.zeros(2 * N_LEVELS, np.int64)
    conf = np.zeros(2 * N_LEVELS)
    for level in range(N_LEVELS):
        if not canal.valid[level]:
            continue
        p = canal.world[level]
        best, depth = None, -np.inf
        for vol in stacks:
            if not bool(vol.contains(p)):
                continue
            z = float(vol.to_voxel(p)[0])
            d = min(z, vol.shape[0] - 1 - z)
            if d > depth:
                best, depth = vol, d
        level_conf = confidence * float(canal.confidence[level])
        if best is None and sagittal_fallback:  # no axial stack covers the level: stay in the canal's stack
            best = study.find(int(canal.series_id[level]), int(canal.stack_index[level]))
            level_conf *= 0.5
        if best is None:
            continue
        axial = any(best is v for v in stacks)
        if axial:  # shift within the slice plane, onto the canal point's nearest slice
            lateral = _PATIENT_LEFT - (_PATIENT_LEFT @ best.normal) * best.normal
            if float(np.linalg.norm(lateral)) < 1e-6:
                continue
            shift = lateral / float(np.linalg.norm(lateral))
        else:  # sagittal: the lateral shift crosses slices
            shift = _PATIENT_LEFT
        z_axial = float(best.nearest_slice(p))
        for side, sign in ((0, 1.0), (1, -1.0)):
            v = best.to_voxel(p + sign * lateral_offset_mm * shift)
            v[0] = z_axial if axial else float(np.clip(np.rint(v[0]), 0, best.shape[0] - 1))
            w = best.to_world(v)
            if not bool(best.contains(w)):
                continue
            k = side * N_LEVELS + level
            voxel[k], world[k], series[k], stack_idx[k] = v, w, best.series_id, best.stack_index
            conf[k] = level_conf
    return KeypointSet(out.kind, world, voxel, series, stack_idx, np.clip(conf, 0.0, 1.0), "projection")


def cross_view_distances(study: "Study", canal: KeypointSet, axial: KeypointSet) -> np.ndarray:
    """Per subarticular point [10]: distance (mm) along its axial stack's normal between the
    axial prediction and the canal point of its level; NaN where either is missing."""
    out = np.full(2 * N_LEVELS, np.nan)
    for k in np.flatnonzero(axial.valid):
        level = k % N_LEVELS
        if not canal.valid[level]:
            continue
        vol = study.find(int(axial.series_id[k]), int(axial.stack_index[k]))
        if vol is None:
            continue
        out[k] = abs(float((axial.world[k] - canal.world[level]) @ vol.normal))
    return out


def _summary(d: np.ndarray) -> dict[str, Any]:
    ok = np.isfinite(d)
    return {
        "distance_mm": [None if not np.isfinite(x) else round(float(x), 2) for x in d],
        "n": int(ok.sum()),
        "median_mm": round(float(np.median(d[ok])), 2) if ok.any() else None,
        "max_mm": round(float(np.max(d[ok])), 2) if ok.any() else None,
    }


def finalize(
    study: "Study",
    keypoints: StudyKeypoints,
    *,
    lateral_offset_mm: float = LATERAL_OFFSET_MM,
    projection_confidence: float = PROJECTION_CONFIDENCE,
    min_axial_confidence: float = MIN_AXIAL_CONFIDENCE,
    max_level_mm: float = MAX_LEVEL_MM,
    refine_weight: float = REFINE_WEIGHT,
    spinal_prefer: tuple[str, ...] = SPINAL_PREFER,
    axial_keys: tuple[str, ...] = AXIAL_KEYS,
) -> StudyKeypoints:
    """Sagittal merge, cross-view check and projection fallback (see the module docstring);
    returns a new `StudyKeypoints` whose ``report["cross_view"]`` holds, per axial set, the
    distances (mm) and, under ``"replaced"`` / ``"wrong_level"``, the axial points that fell
    back to the projection."""
    sets = dict(keypoints.sets)
    for kind, (key, *_) in SAGITTAL_SETS.items():
        merged = merge_sagittal(study, keypoints, kind, refine_weight=refine_weight)
        if merged is not None:
            sets[key] = merged
    keypoints = StudyKeypoints(keypoints.study_id, sets, dict(keypoints.report))
    report: dict[str, Any] = {}
    canal = keypoints.best("spinal", prefer=spinal_prefer)
    proj = None
    if canal is not None and canal.valid.any():
        proj = projection_set(study, canal, lateral_offset_mm, projection_confidence)
        sets["projection"] = proj
        report["projection_points"] = int(proj.valid.sum())
        axial_ids = {(v.series_id, v.stack_index) for v in axial_stacks(study)}
        report["projection_points_sagittal"] = int(sum(
            1 for k in np.flatnonzero(proj.valid) if (int(proj.series_id[k]), int(proj.stack_index[k])) not in axial_ids))
    else:
        report["projection_points"] = 0
    replaced: dict[str, list[str]] = {}
    wrong_level: dict[str, list[str]] = {}
    for key in axial_keys:
        s = keypoints.get(key)
        if s is None or s.kind != "subarticular":
            continue
        if canal is not None:
            report[key] = _summary(cross_view_distances(study, canal, s))
        if proj is not None:
            placed = np.array([str(o).split("+")[0] == "projection" for o in s.origin])  # already on the projection
            weak = s.valid & (s.confidence < min_axial_confidence) & proj.valid & ~placed
            if weak.any():
                s = s.take_points(weak, KeypointSet.empty(s.kind))
                replaced[key] = [s.describe(int(k)) for k in np.flatnonzero(weak)]
            s, moved = reconcile_levels(study, s, canal, KeypointSet.empty(s.kind), max_level_mm)
            if moved:
                wrong_level[key] = moved
            sets[key] = s
    if replaced:
        report["replaced"] = replaced
        logger.info("study %s: low-confidence axial points replaced by the sagittal projection: %s", study.study_id, replaced)
    if wrong_level:
        report["wrong_level"] = wrong_level
        logger.info("study %s: axial points on another level than the sagittal canal's replaced by the projection: %s",
                    study.study_id, wrong_level)
    if not any(k in keypoints.sets for k in axial_keys):
        report["axial_source"] = "projection" if proj is not None and proj.valid.any() else "none"
    new_report = dict(keypoints.report)
    new_report["cross_view"] = report
    return StudyKeypoints(keypoints.study_id, sets, new_report)
