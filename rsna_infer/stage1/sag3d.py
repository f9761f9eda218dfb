"""sag-3d keypoints: a timm_3d model on a sagittal stack resampled to ``input.size`` (D, H, W).

Variant ``t2`` reads Sagittal T2/STIR stacks -> 5 spinal canal points (x, y, z each);
variant ``t1`` reads Sagittal T1 stacks -> 10 foraminal points, left 5 then right 5, each with
its own slice. The stack is put in canonical sagittal orientation first (slices toward
patient left, see `rsna_infer.imaging`), so "left" is decided in patient coordinates whatever
the DICOM slice order.
"""

from __future__ import annotations

from typing import ClassVar

from ..constants import SAG_T1, SAG_T2
from .base import VolumePointFamily


class Sag3dFamily(VolumePointFamily):
    name = "sag3d"
    view = "sagittal"
    variants = ("t2", "t1")
    series_types: ClassVar[dict[str, str]] = {"t2": SAG_T2, "t1": SAG_T1}
    kinds: ClassVar[dict[str, str]] = {"t2": "spinal", "t1": "foraminal"}
    default_confidence = 0.9
