"""axial-3d keypoints: a timm_3d model on an axial stack resampled to ``input.size`` (D, H, W)
-> 10 subarticular points (left 5 then right 5, x, y, z each) with a visibility each.

An axial series often covers only some levels: the visibility head (trained on whether the
labelled point lies inside the stack) drives the confidence of missing levels to ~0, so the
most confident stack wins per point when a study has several.
"""

from __future__ import annotations

from typing import ClassVar

from ..constants import AXIAL_T2
from .base import VolumePointFamily


class Axial3dFamily(VolumePointFamily):
    name = "axial3d"
    view = "axial"
    variants = ("default",)
    series_types: ClassVar[dict[str, str]] = {"default": AXIAL_T2}
    kinds: ClassVar[dict[str, str]] = {"default": "subarticular"}
    default_confidence = 0.9
