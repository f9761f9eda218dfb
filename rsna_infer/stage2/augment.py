"""Training augmentation of stage-2 crops, applied by ``prepare`` only when given an ``rng``.

Read from ``input.extra.aug`` (the same place as stage 1's `rsna_infer.imaging.AugSpec`, with
fields that suit crops around keypoints). Each perturbation is drawn per crop, except the
mirror, drawn per sample:

- ``jitter_mm``: Gaussian keypoint offset in **mm** along the volume's normal, column and row
  axes, converted to voxels with that volume's spacing (2 mm is 2 mm on every scanner);
- ``scale``: the crop side is multiplied by ``1 + U(-scale, scale)``;
- ``intensity``: gamma/contrast/brightness on the [0, 1] crop (`imaging.augment_intensity`);
- ``ap_flip``: probability of mirroring the whole sample anterior/posterior (sagittal hflip,
  axial vflip), which changes no label;
- ``lr_flip``: probability of mirroring it left/right (axial hflip, sagittal slice order
  reversed, left/right slots swapped, exactly as the ``lr`` TTA pass): the sample then shows
  the mirrored patient, so its mask and labels swap left and right
  (`GradingFamily.sample_labels`). A model trained this way grades a mirrored study as the
  mirror of the original.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from ..imaging import augment_intensity
from ..specs import SpecError
from ..validate import parse_fields

if TYPE_CHECKING:
    from ..io.volume import Volume


@dataclass(frozen=True)
class CropAugment:
    """Augmentation strengths; zeros switch a perturbation off."""

    jitter_mm: float = 2.0
    scale: float = 0.1
    intensity: float = 0.1
    ap_flip: float = 0.5
    lr_flip: float = 0.5

    def __post_init__(self) -> None:
        for f in fields(self):
            v = float(getattr(self, f.name))
            if not np.isfinite(v) or v < 0:
                raise SpecError(f"input.extra.aug.{f.name} must be finite and >= 0, got {v}")
        if self.scale >= 0.5 or self.intensity >= 1.0 or self.ap_flip > 1.0 or self.lr_flip > 1.0:
            raise SpecError(f"input.extra.aug: need scale < 0.5, intensity < 1 and ap_flip, lr_flip <= 1, got {self}")

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> CropAugment:
        return cls(**parse_fields(cls, extra.get("aug") or {}, "input.extra.aug", error=SpecError))

    def jitter(self, volume: Volume, zyx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``zyx`` moved by a Gaussian offset of ``jitter_mm`` per axis of the volume."""
        if self.jitter_mm <= 0:
            return np.asarray(zyx, dtype=np.float64)
        d_mm = rng.normal(0.0, self.jitter_mm, size=3)
        d_row, d_col = volume.spacing
        step = np.array([max(volume.slice_spacing, 1e-3), d_row, d_col])
        return np.asarray(zyx, dtype=np.float64) + d_mm / step

    def crop_scale(self, rng: np.random.Generator) -> float:
        return float(1.0 + rng.uniform(-self.scale, self.scale)) if self.scale > 0 else 1.0

    def intensity_fn(self, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray] | None:
        """A [0, 1]-crop intensity perturbation for `crop_2d5`'s ``unit_transform`` (None when off)."""
        if self.intensity <= 0:
            return None
        return lambda unit: augment_intensity(unit, rng, self.intensity)

    def mirror_ap(self, rng: np.random.Generator) -> bool:
        return self.ap_flip > 0 and bool(rng.random() < self.ap_flip)

    def mirror_lr(self, rng: np.random.Generator) -> bool:
        return self.lr_flip > 0 and bool(rng.random() < self.lr_flip)
