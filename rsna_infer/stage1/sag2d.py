"""sag-2d keypoints: a timm 2-D model on the centre of evenly sampled sagittal slices.

``input.extra.sampled_slices`` positions are spread evenly over the stack (10 in the method,
the first and last slice included); the model sees ``input.in_chans`` of them around the
stack's middle as channels (``input.n_slices`` = ``in_chans``: the slices per input, as in
every family) and regresses 5 points (one per level) as (x, y). The choice is symmetric: the
channels sit at the sample spacing around the exact middle of the stack (with 10 samples and
3 channels: the midpoint of the two middle samples and one sample spacing to each side),
linearly interpolated between native slices, so a study mirrored left/right in patient
coordinates gives the same input with the channel order reversed. The points' slice (z) is
that middle, never one side's sample.

- variant ``t2`` (Sagittal T2/STIR) -> ``sag2d_t2``, spinal: z = the stack's middle.
- variant ``t1`` (Sagittal T1) -> ``sag2d_t1``, foraminal: the 5 (x, y) are copied to both
  sides; each side's slice is the middle moved ``model_kwargs.foramen_offset_mm`` (default
  18 mm, the typical distance of a lumbar foramen from the midline) along patient +x for the
  left side and -x for the right side, through the stack's own geometry (so the slice order in
  the file does not matter), clipped into the stack. These z are heuristics, hence a lower
  default confidence (0.5 vs 0.6 for t2, 0.9 for sag3d) and, in the fusion grader, slice
  windows instead of a single slice (`rsna_infer.stage2.fusion`).

A left/right mirror (``aug.lr_flip`` in training, ``tta_lr`` at test time) reverses the
channel order; the outputs have no side, so nothing else changes.

Older manifests used ``input.n_slices`` for the sample count (``n_slices: 10, in_chans: 3``);
such entries (``n_slices`` > ``in_chans`` and no ``sampled_slices``) are read with that meaning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ..constants import N_LEVELS, SAG_T1, SAG_T2
from ..imaging import prepare_slices
from ..keypoints import KeypointSet, StudyKeypoints, truth_key
from ..models.family import Sample
from ..options import ExtraOptions, Options, option
from ..specs import SpecError
from .base import PerStackFamily, PointFamily, PointOptions

if TYPE_CHECKING:
    from ..io.volume import Study, Volume

logger = logging.getLogger(__name__)

#: Default lateral distance of a neural foramen from the mid-sagittal plane (mm).
FORAMEN_OFFSET_MM = 18.0
#: Evenly sampled slices per stack in the method.
SAMPLED_SLICES = 10
_PATIENT_LEFT = np.array([1.0, 0.0, 0.0])


@dataclass(frozen=True)
class Sag2dOptions(PointOptions):
    foramen_offset_mm: float = option(FORAMEN_OFFSET_MM, "t1: lateral distance (mm) of each side's slice from the middle")

    def check(self) -> None:
        super().check()
        self.need(self.foramen_offset_mm >= 0, f"foramen_offset_mm must be >= 0, got {self.foramen_offset_mm}")


@dataclass(frozen=True)
class Sag2dInput(ExtraOptions):
    sampled_slices: int | None = option(None, f"slices sampled evenly over the stack (None: {SAMPLED_SLICES})")

    def check(self) -> None:
        self.need(self.sampled_slices is None or self.sampled_slices >= 1, "sampled_slices must be >= 1")


def sample_positions(n_total: int, n_samples: int, n_channels: int) -> np.ndarray:
    """Canonical (fractional) slice positions of ``n_channels`` channels at the spacing of
    ``n_samples`` even samples over ``n_total`` slices, centred on the stack's middle and
    clipped into it (symmetric: mirrored stacks give the reversed positions)."""
    step = (n_total - 1) / (n_samples - 1) if n_samples > 1 else 1.0
    pos = (n_total - 1) / 2.0 + (np.arange(n_channels) - (n_channels - 1) / 2.0) * step
    return np.clip(pos, 0.0, n_total - 1.0)


class Sag2dFamily(PerStackFamily, PointFamily):
    name = "sag2d"
    view = "sagittal"
    dims = 2
    coord_axes = (1, 2)
    variants = ("t2", "t1")
    options_type: ClassVar[type[Options]] = Sag2dOptions
    input_options_type: ClassVar[type[ExtraOptions]] = Sag2dInput

    def check_entry(self) -> None:
        super().check_entry()
        spec, given = self.spec, self.input_options.sampled_slices
        if given is None and spec.n_slices > spec.in_chans:  # the old meaning of n_slices
            logger.debug("model %s: input.n_slices %d read as extra.sampled_slices (old sag2d manifest)",
                         self.entry.name, spec.n_slices)
            self.sampled_slices = spec.n_slices
        else:
            if spec.n_slices != spec.in_chans:
                raise SpecError(f"model {self.entry.name!r}: sag2d feeds input.n_slices slices as channels: "
                                f"n_slices ({spec.n_slices}) must equal in_chans ({spec.in_chans}); the sample "
                                "count is input.extra.sampled_slices")
            self.sampled_slices = int(given or SAMPLED_SLICES)
        if spec.in_chans > self.sampled_slices:
            raise SpecError(f"model {self.entry.name!r}: in_chans ({spec.in_chans}) must be <= the sampled slices "
                            f"({self.sampled_slices})")

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
    def default_confidence(self) -> float:  # type: ignore[override]
        return 0.6 if self.entry.variant == "t2" else 0.5

    @property
    def foramen_offset_mm(self) -> float:
        return float(self.options.foramen_offset_mm)

    @property
    def series_type(self) -> str:
        return SAG_T2 if self.entry.variant == "t2" else SAG_T1

    def channel_positions(self, n_total: int) -> tuple[np.ndarray, float]:
        """Canonical (fractional) positions of the input channels and of the points' slice
        (the stack's middle), for a stack of ``n_total`` slices."""
        return sample_positions(n_total, self.sampled_slices, self.spec.in_chans), (n_total - 1) / 2.0

    def stack_sample(self, study_id: int, vol: "Volume", rng: np.random.Generator | None) -> Sample:
        positions, centre = self.channel_positions(vol.shape[0])
        mirrored = rng is not None and self.aug.lr_flip > 0 and bool(rng.random() < self.aug.lr_flip)
        if mirrored:  # the patient mirrored left/right: the slices in the other order, nothing else
            positions = positions[::-1].copy()
        prep = prepare_slices(vol, self.view, positions, self.spec.size, self.spec.norm, rng, self.aug)  # type: ignore[arg-type]
        u_z = (centre + 0.5) / vol.shape[0]
        return Sample(study_id, {"image": prep.image}, self.base_meta(vol, prep.transform, u_fill={0: u_z}, lr_mirrored=mirrored))

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
