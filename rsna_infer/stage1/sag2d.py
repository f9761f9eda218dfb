"""sag-2d keypoints: a timm 2-D model on the centre of evenly sampled sagittal slices.

``input.n_slices`` slices are sampled evenly over the stack (10 in the method); the sample
nearest the stack's middle is the *centre slice*; the model sees ``input.in_chans`` consecutive
samples around it as channels and regresses 5 points (one per level) as (x, y) on that slice.

- variant ``t2`` (Sagittal T2/STIR) -> ``sag2d_t2``, spinal: z = the centre slice.
- variant ``t1`` (Sagittal T1) -> ``sag2d_t1``, foraminal: the 5 (x, y) are copied to both
  sides; each side's slice is the centre slice moved ``model_kwargs.foramen_offset_mm``
  (default 18 mm, the typical distance of a lumbar foramen from the midline) along patient
  +x for the left side and -x for the right side, through the stack's own geometry (so the
  slice order in the file does not matter), clipped into the stack. These z are heuristics,
  hence a lower default confidence (0.5 vs 0.6 for t2, 0.9 for sag3d).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..constants import N_LEVELS, SAG_T1, SAG_T2
from ..family import Sample
from ..imaging import prepare_slices, sample_slice_indices
from ..specs import SpecError
from .common import POINT_MODEL_KWARGS, PerStackFamily, PointFamily
from .keypoints import KeypointSet, StudyKeypoints, truth_key

if TYPE_CHECKING:
    from ..io.volume import Study, Volume

#: Default lateral distance of a neural foramen from the mid-sagittal plane (mm).
FORAMEN_OFFSET_MM = 18.0
_PATIENT_LEFT = np.array([1.0, 0.0, 0.0])


class Sag2dFamily(PerStackFamily, PointFamily):
    name = "sag2d"
    view = "sagittal"
    dims = 2
    coord_axes = (1, 2)
    variants = ("t2", "t1")
    model_kwarg_keys = (*POINT_MODEL_KWARGS, "foramen_offset_mm")

    def _validate(self) -> None:
        super()._validate()
        if self.spec.in_chans > self.spec.n_slices:
            raise SpecError(f"model {self.entry.name!r}: sag2d feeds in_chans of the n_slices sampled slices; "
                            f"in_chans ({self.spec.in_chans}) must be <= n_slices ({self.spec.n_slices})")
        if self.foramen_offset_mm < 0:
            raise SpecError(f"model {self.entry.name!r}: model_kwargs.foramen_offset_mm must be >= 0")

    @property
    def kind(self) -> str:
        return "spinal" if self.entry.variant == "t2" else "foraminal"

    @property
    def n_points(self) -> int:
        return N_LEVELS  # t1: one (x, y) per level, shared by both sides

    @property
    def lr_permutation(self) -> np.ndarray | None:
        return None

    @property
    def confidence(self) -> float:
        return self._kw("confidence", 0.6 if self.entry.variant == "t2" else 0.5)

    @property
    def foramen_offset_mm(self) -> float:
        return self._kw("foramen_offset_mm", FORAMEN_OFFSET_MM)

    @property
    def series_type(self) -> str:
        return SAG_T2 if self.entry.variant == "t2" else SAG_T1

    def channel_slices(self, n_total: int) -> tuple[np.ndarray, int]:
        """Canonical indices of the input channels and of the centre slice, for a stack of ``n_total``."""
        sampled = sample_slice_indices(n_total, self.spec.n_slices)
        centre = int(np.argmin(np.abs(sampled - (n_total - 1) / 2.0)))
        c = self.spec.in_chans
        pos = np.clip(centre - c // 2 + np.arange(c), 0, len(sampled) - 1)
        return sampled[pos], int(sampled[centre])

    def stack_sample(self, study_id: int, vol: "Volume", rng: np.random.Generator | None) -> Sample:
        channels, centre = self.channel_slices(vol.shape[0])
        prep = prepare_slices(vol, self.view, channels, self.spec.size, self.spec.norm, rng, self.aug)  # type: ignore[arg-type]
        u_z = (centre + 0.5) / vol.shape[0]
        return Sample(study_id, {"image": prep.image}, self.base_meta(vol, prep.transform, u_fill={0: u_z}))

    def decode(self, output: np.ndarray, sample: Sample, study: "Study") -> KeypointSet:
        vol = self.find_volume(sample, study)
        u, vis = self.points_u(output, sample)
        voxel = sample.meta["transform"].to_voxel(u)
        conf = self.confidence * vis
        if self.kind == "spinal":
            return self.to_set("spinal", voxel, conf, vol)
        sides = [self.side_voxels(vol, voxel, +1.0), self.side_voxels(vol, voxel, -1.0)]
        return self.to_set("foraminal", np.concatenate(sides), np.concatenate([conf, conf]), vol)

    def side_voxels(self, vol: "Volume", voxel: np.ndarray, sign: float) -> np.ndarray:
        """``voxel`` points moved to the slice ``foramen_offset_mm`` toward patient left (+1) or
        right (-1); in-plane (y, x) are kept, z is clipped into the stack."""
        ok = np.all(np.isfinite(voxel), axis=1)
        safe = np.where(ok[:, None], voxel, 0.0)
        target = vol.to_world(safe) + sign * self.foramen_offset_mm * _PATIENT_LEFT
        out = safe.copy()
        out[:, 0] = np.clip(vol.to_voxel(target)[:, 0], 0.0, vol.shape[0] - 1)
        out[~ok] = np.nan
        return out

    def targets(self, sample: Sample, study: "Study", truth: StudyKeypoints) -> dict[str, np.ndarray] | None:
        t = truth.get(truth_key(self.kind))
        if t is None:
            return None
        world, valid = t.world, t.valid
        if self.kind == "foraminal":  # one (x, y) per level: the mean of the labelled sides
            w = np.where(valid[:, None], world, np.nan).reshape(2, N_LEVELS, 3)
            v = valid.reshape(2, N_LEVELS)
            n = v.sum(0)
            world = np.where(n[:, None] > 0, np.nansum(np.where(v[..., None], w, 0.0), 0) / np.maximum(n, 1)[:, None], np.nan)
            valid = n > 0
        return self.point_targets(world, valid, sample, self.find_volume(sample, study))
