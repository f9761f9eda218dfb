"""model2, per-view ROI graders (family ``roi``).

One crop ``[z_imgs, h, w]`` (``z_imgs = input.n_slices``, typically 3 or 5) per keypoint:

=============  ==============  ======================  ==================================
variant        series          points                  default keypoint preference
=============  ==============  ======================  ==================================
spinal         Sagittal T2     5 (levels)              sag3d_t2, sag2d_t2
foraminal      Sagittal T1     10 (left 5, right 5)    sag3d_t1, sag2d_t1
subarticular   Axial T2        10 (left 5, right 5)    axial_level, axial3d, projection
=============  ==============  ======================  ==================================

The subarticular variant adds a *sagittal companion* crop per point: the Sagittal T2 slices
through the same patient-space point (``model_kwargs.companion``, default on), read by a
second encoder of the same kind; a missing companion is zeros with ``sag_present = 0``.

Heads (``model_kwargs.head``):

- ``gated``: 2.5-D backbone (slices as channels), features gated by a condition + level
  embedding, linear -> 3 classes;
- ``plain``: 2.5-D backbone, one linear layer shared by all points;
- ``level_lstm``: 2.5-D backbone, a bidirectional LSTM across the 5 levels of each side;
- ``slice_gru``: each slice through a 1-channel backbone, a bidirectional GRU across the slices.

Output: canonical logits ``[B, 5, 5, 3]``; the conditions of other variants are 0 and
masked out (`Sample.mask` marks the points that have a crop).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..constants import AXIAL_T2, N_CLASSES, N_LEVELS, SAG_T1, SAG_T2
from ..keypoints import POINT_KINDS, KeypointSet
from ..models.backbones import create_backbone
from ..models.family import Sample
from ..options import ExtraOptions, Options, option
from ..stage1.assemble import DEFAULT_PREFER
from .base import GradingBase, GradingOptions
from .crops import locate_point
from .layers import ConditionGate, SliceSequenceEncoder, SliceStackEncoder
from .layout import point_lr_perm, point_targets, points_mask, scatter_points
from .tta import ViewAxes

if TYPE_CHECKING:
    from ..io.volume import Study
    from ..keypoints import StudyKeypoints

logger = logging.getLogger(__name__)

HEADS: tuple[str, ...] = ("gated", "plain", "level_lstm", "slice_gru")
VARIANT_SERIES: dict[str, str] = {"spinal": SAG_T2, "foraminal": SAG_T1, "subarticular": AXIAL_T2}
VARIANT_PLANE: dict[str, str] = {"spinal": "sagittal", "foraminal": "sagittal", "subarticular": "axial"}
#: Default physical crop side (mm) per variant (``input.crop_mm`` overrides) and of the
#: subarticular variant's sagittal companion crop (``input.extra.sag_crop_mm``).
DEFAULT_CROP_MM: dict[str, float] = {"spinal": 48.0, "foraminal": 40.0, "subarticular": 40.0}
DEFAULT_COMPANION_CROP_MM = 48.0


@dataclass(frozen=True)
class RoiOptions(GradingOptions):
    head: str = option("gated", "per-point head (see the module docstring)", choices=HEADS)
    hidden: int = option(64, "LSTM / GRU width")
    companion: bool = option(True, "subarticular: add the sagittal T2 companion crop per point")

    def check(self) -> None:
        super().check()
        self.need(self.hidden >= 1, f"hidden must be >= 1, got {self.hidden}")


@dataclass(frozen=True)
class RoiInput(ExtraOptions):
    sag_crop_mm: float = option(DEFAULT_COMPANION_CROP_MM, "subarticular: side (mm) of the sagittal companion crops")

    def check(self) -> None:
        self.need(np.isfinite(self.sag_crop_mm) and self.sag_crop_mm > 0, f"sag_crop_mm must be > 0, got {self.sag_crop_mm}")


class RoiFamily(GradingBase):
    """Per-view ROI grader; see the module docstring.

    ``model_kwargs``: ``head`` ("gated"), ``hidden`` (64, LSTM/GRU width), ``companion``
    (True; subarticular only), ``dropout``, ``prefer``, ``tta_lr``.
    ``input``: ``size`` (H, W) or (n_slices, H, W); ``n_slices`` = z_imgs; ``in_chans`` =
    ``n_slices`` for 2.5-D heads, 1 for ``slice_gru``; ``crop_mm``; ``extra.sag_crop_mm``, ``extra.aug`` (`CropAugment`).
    """

    name = "roi"
    VARIANTS: ClassVar[tuple[str, ...]] = ("spinal", "foraminal", "subarticular")
    options_type: ClassVar[type[Options]] = RoiOptions
    input_options_type: ClassVar[type[ExtraOptions]] = RoiInput
    DEFAULT_PREFER: ClassVar[dict[str, tuple[str, ...]]] = dict(DEFAULT_PREFER)

    def __init__(self, entry: Any) -> None:
        super().__init__(entry)
        self.kind = self.entry.variant
        self.head = self.options.head
        if self.head == "slice_gru":
            self.require_chans(1, "the slice_gru head reads one slice at a time")
        else:
            self.require_chans(self.spec.n_slices, f"the {self.head} head reads the slices as channels")
        self.companion = self.kind == "subarticular" and self.options.companion
        self.crop_mm = float(self.spec.crop_mm or DEFAULT_CROP_MM[self.kind])
        self.sag_crop_mm = float(self.input_options.sag_crop_mm)
        self.n_points = POINT_KINDS[self.kind]

    # -- shapes and flips ----------------------------------------------------------------
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        crop = (self.n_points, self.spec.n_slices, *self.out_size)
        shapes = {"crops": crop, "present": (self.n_points,)}
        if self.companion:
            shapes.update({"sag": crop, "sag_present": (self.n_points,)})
        return shapes

    def view_axes(self) -> dict[str, ViewAxes]:
        perm = point_lr_perm(self.kind)
        axes = {"crops": ViewAxes(VARIANT_PLANE[self.kind], perm), "present": ViewAxes(None, perm)}
        if self.companion:
            axes.update({"sag": ViewAxes("sagittal", perm), "sag_present": ViewAxes(None, perm)})
        return axes

    # -- model ----------------------------------------------------------------------------
    def build(self) -> nn.Module:
        return RoiNet(
            kind=self.kind,
            head=self.head,
            arch=self.entry.arch,
            n_slices=self.spec.n_slices,
            companion=self.companion,
            hidden=self.options.hidden,
            dropout=self.options.dropout,
            arch_kwargs=self.entry.arch_kwargs,
        )

    # -- inputs ---------------------------------------------------------------------------
    def prepare(
        self,
        study: Study,
        keypoints: StudyKeypoints | None = None,
        rng: np.random.Generator | None = None,
    ) -> list[Sample]:
        points = self.best_points(keypoints, self.kind)
        series = VARIANT_SERIES[self.kind]
        ctx = self.crop_context(rng)
        inputs = self.zero_inputs()
        crops_meta: dict[str, list[Any]] = {"crops": [None] * self.n_points}
        if self.companion:
            crops_meta["sag"] = [None] * self.n_points
        missing: list[str] = []
        for i in range(self.n_points):
            loc = locate_point(study, series, points, i)
            if loc is None:
                missing.append((points or KeypointSet.empty(self.kind)).describe(i))
                continue
            inputs["crops"][i], crops_meta["crops"][i] = ctx.crop_located(loc, self.spec.n_slices, self.out_size, self.crop_mm)
            inputs["present"][i] = 1.0
            if self.companion:
                sag = locate_point(study, SAG_T2, points, i)
                if sag is not None:
                    inputs["sag"][i], crops_meta["sag"][i] = ctx.crop_located(sag, self.spec.n_slices, self.out_size, self.sag_crop_mm)
                    inputs["sag_present"][i] = 1.0
        mask = points_mask(self.kind, inputs["present"] > 0)
        nothing = f"roi model {self.entry.name} has nothing to grade (no {self.kind} keypoints in {series})"
        return self.single_sample(study.study_id, inputs, mask, crops_meta, missing, rng, f"roi {self.kind}", nothing)


class RoiNet(nn.Module):
    """Per-point encoder (+ sagittal companion encoder) and one of the `HEADS`;
    ``forward(batch) -> [B, 5, 5, 3]`` canonical logits."""

    def __init__(
        self,
        kind: str,
        head: str,
        arch: str,
        n_slices: int,
        companion: bool = False,
        hidden: int = 64,
        dropout: float = 0.0,
        arch_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
        self.kind, self.head = kind, head
        kw = dict(arch_kwargs or {})

        def encoder() -> nn.Module:
            if head == "slice_gru":
                return SliceSequenceEncoder(create_backbone(arch, dims=2, in_chans=1, **kw), hidden)
            return SliceStackEncoder(create_backbone(arch, dims=2, in_chans=n_slices, **kw))

        self.encoder = encoder()
        self.sag_encoder = encoder() if companion else None
        dim = self.encoder.out_dim * (2 if companion else 1)
        tg = torch.as_tensor(point_targets(kind))
        self.register_buffer("cond_index", tg[:, 0].clone(), persistent=False)
        self.register_buffer("level_index", tg[:, 1].clone(), persistent=False)
        self.gate = ConditionGate(dim) if head == "gated" else None
        self.lstm = nn.LSTM(dim, hidden, batch_first=True, bidirectional=True) if head == "level_lstm" else None
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * hidden if self.lstm is not None else dim, N_CLASSES))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        crops = batch["crops"]  # [B, P, S, H, W]
        b, p = crops.shape[:2]
        f = self.encoder(crops.flatten(0, 1)).view(b, p, -1) * batch["present"][..., None]
        if self.sag_encoder is not None:
            g = self.sag_encoder(batch["sag"].flatten(0, 1)).view(b, p, -1) * batch["sag_present"][..., None]
            f = torch.cat([f, g], dim=-1)
        if self.gate is not None:
            f = self.gate(f.flatten(0, 1), self.cond_index.repeat(b), self.level_index.repeat(b)).view(b, p, -1)
        if self.lstm is not None:  # sequences of the 5 levels of each side
            seq, _ = self.lstm(f.reshape(b * (p // N_LEVELS), N_LEVELS, -1))
            f = seq.reshape(b, p, -1)
        return scatter_points(self.out(f), self.kind)
