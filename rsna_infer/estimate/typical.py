"""A typical competition study, built in memory, so that every family's own ``prepare``
says how many samples of which shapes a study gives it.

`StudyGeometry` holds the figures (defaults from the competition data's figures, docs/speed.md: one
Sagittal T1 and one Sagittal T2/STIR series of 15-20 slices, 1.2 Axial T2 series per study on
average with 30-60 slices each, ~18 MB of DICOM). `typical_study` makes `Volume` stacks with
exact DICOM geometry (sagittal IOP ``[0,1,0,0,0,-1]``, axial ``[1,0,0,0,1,0]``) and noise
pixels; `keypoints_in` places keypoints (patient coordinates) into the study as every
stage-1 family would report them, so stage-2 ``prepare`` cuts its real crops. The estimate
never guesses a sample count: it asks the families.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

from ..constants import AXIAL_T2, CONDITION_GROUP, CONDITION_SERIES_TYPE, CONDITIONS, N_LEVELS, SAG_T1, SAG_T2
from ..io.volume import Study, Volume
from ..keypoints import POINT_KINDS, KeypointSet, StudyKeypoints

#: Series type each keypoint kind lives on (from the condition -> series contract).
KIND_SERIES: dict[str, str] = {CONDITION_GROUP[c]: CONDITION_SERIES_TYPE[c] for c in CONDITIONS}


@dataclass(frozen=True)
class StudyGeometry:
    """What a typical test study holds (the competition data's figures; change them to model another cohort).

    - ``sagittal_slices``: per sagittal series (real: 15-20).
    - ``axial_slices``: per axial series (real: 30-60).
    - ``axial_series``: ``(count, share of studies)``: of 1,975 training studies ~1,640 have
      one Axial T2 series, 304 two, 28 three (mean 1.18). Some lack a type entirely and 7 have
      two Sagittal T1; both are ignored (the estimate stays on the full side).
    - ``image_px``: rows = columns of every slice (real: 256-1024; ~384 matches ~18 MB).
    - ``dicom_mb``: DICOM bytes per study (real: ~18 MB), scales the decode time.
    - ``sagittal_fov_mm`` / ``sagittal_spacing_mm`` / ``axial_fov_mm`` / ``level_spacing_mm``:
      fields of view, slice and disc spacing, only used to place the stacks and keypoints
      consistently (axial slices span the five discs).
    """

    sagittal_slices: int = 17
    axial_slices: int = 45
    axial_series: tuple[tuple[int, float], ...] = ((1, 0.832), (2, 0.154), (3, 0.014))
    image_px: int = 384
    dicom_mb: float = 18.0
    sagittal_fov_mm: float = 300.0
    sagittal_spacing_mm: float = 3.8
    axial_fov_mm: float = 200.0
    level_spacing_mm: float = 32.0

    def __post_init__(self) -> None:
        if self.sagittal_slices < 3 or self.axial_slices < 3:
            raise ValueError("a typical series needs at least 3 slices")
        if self.image_px < 16:
            raise ValueError(f"image_px must be >= 16, got {self.image_px}")
        mix = tuple((int(n), float(w)) for n, w in self.axial_series)
        if not mix or any(n < 1 or w < 0 for n, w in mix) or sum(w for _, w in mix) <= 0:
            raise ValueError(f"axial_series must be (count >= 1, share >= 0) pairs with a positive sum, got {self.axial_series}")
        total = sum(w for _, w in mix)
        object.__setattr__(self, "axial_series", tuple((n, w / total) for n, w in mix))

    @property
    def mean_axial_series(self) -> float:
        return float(sum(n * w for n, w in self.axial_series))

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["axial_series"] = [list(p) for p in self.axial_series]
        d["mean_axial_series"] = round(self.mean_axial_series, 3)
        return d

    @property
    def sagittal_half_width_mm(self) -> float:
        """Distance of the outermost sagittal slice from the midline."""
        return 0.5 * (self.sagittal_slices - 1) * self.sagittal_spacing_mm

    def level_z(self) -> np.ndarray:
        """Patient z (mm, cranial +) of the five discs, L1/L2 first."""
        return (2 - np.arange(N_LEVELS)) * self.level_spacing_mm


def _volume(pixels: np.ndarray, positions: np.ndarray, row_dir, col_dir, px_mm: float, series_id: int,
            description: str, study_id: int) -> Volume:
    return Volume(pixels, positions, np.asarray(row_dir, float), np.asarray(col_dir, float), (px_mm, px_mm),
                  np.arange(1, len(positions) + 1), study_id=study_id, series_id=series_id, description=description)


def typical_study(geometry: StudyGeometry, n_axial: int = 1, study_id: int = 1, seed: int = 0) -> Study:
    """One study of ``geometry`` with ``n_axial`` Axial T2 series (noise pixels)."""
    g = geometry
    rng = np.random.default_rng(seed)
    px = g.image_px

    def noise(n: int) -> np.ndarray:
        return (200.0 + 50.0 * rng.standard_normal((n, px, px))).astype(np.float32)

    vols: dict[str, list[Volume]] = {}
    s_mm = g.sagittal_fov_mm / px
    spacing = g.sagittal_spacing_mm
    half = g.sagittal_half_width_mm
    for k, desc in enumerate((SAG_T1, SAG_T2)):
        # row_dir posterior, col_dir caudal: normal = -x, so sorted slices run from patient left (+x) to right
        xs = half - np.arange(g.sagittal_slices) * spacing
        pos = np.stack([xs, np.full_like(xs, -g.sagittal_fov_mm / 2), np.full_like(xs, g.sagittal_fov_mm / 2)], axis=1)
        vols[desc] = [_volume(noise(g.sagittal_slices), pos, (0, 1, 0), (0, 0, -1), s_mm, 100 + k, desc, study_id)]
    a_mm = g.axial_fov_mm / px
    top = g.level_z()[0] + 0.5 * g.level_spacing_mm
    zs = np.linspace(-top, top, g.axial_slices)
    pos = np.stack([np.full_like(zs, -g.axial_fov_mm / 2), np.full_like(zs, -g.axial_fov_mm / 2), zs], axis=1)
    vols[AXIAL_T2] = [_volume(noise(g.axial_slices), pos, (1, 0, 0), (0, 1, 0), a_mm, 200 + k, AXIAL_T2, study_id)
                      for k in range(int(n_axial))]
    return Study(study_id=study_id, volumes=vols)


def typical_world_points(geometry: StudyGeometry) -> dict[str, np.ndarray]:
    """Patient coordinates of every keypoint kind in a `typical_study` (left side first)."""
    z = geometry.level_z()
    left, right = +1.0, -1.0  # LPS: +x is the patient's left
    foramen = min(18.0, 0.75 * geometry.sagittal_half_width_mm)  # ~18 mm off the midline, inside the stack

    def row(x: float, y: float) -> np.ndarray:
        return np.stack([np.full(N_LEVELS, x), np.full(N_LEVELS, y), z], axis=1)

    return {
        "spinal": row(0.0, 25.0),
        "foraminal": np.concatenate([row(foramen * left, 15.0), row(foramen * right, 15.0)]),
        "subarticular": np.concatenate([row(12.0 * left, 20.0), row(12.0 * right, 20.0)]),
    }


def keypoints_in(
    study: Study,
    world: Mapping[str, np.ndarray],
    set_keys: Mapping[str, Iterable[str]],
    confidence: float = 0.9,
) -> StudyKeypoints:
    """Keypoint sets for ``study`` from patient-space points per kind, each point placed in the
    first stack of its kind's series type that contains it (else missing). Every key of
    ``set_keys[kind]`` gets that set, so each consumer finds it under the name it prefers."""
    kps = StudyKeypoints(study.study_id)
    for kind, pts in world.items():
        n = POINT_KINDS[kind]
        pts = np.asarray(pts, dtype=np.float64).reshape(n, 3)
        voxel = np.full((n, 3), np.nan)
        sid, stk, conf = np.full(n, -1), np.zeros(n, np.int64), np.zeros(n)
        for i in range(n):
            if not np.all(np.isfinite(pts[i])):
                continue
            for vol in study.get(KIND_SERIES[kind]):
                if bool(vol.contains(pts[i])):
                    voxel[i], sid[i], stk[i], conf[i] = vol.to_voxel(pts[i]), vol.series_id, vol.stack_index, confidence
                    break
        world_i = np.where(conf[:, None] > 0, pts, np.nan)
        for key in set_keys.get(kind, ()):
            kps.sets[key] = KeypointSet(kind, world_i, voxel, sid, stk, conf, key)
    return kps
