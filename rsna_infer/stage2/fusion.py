"""model1, three-view fusion (family ``fusion``, variant ``default``).

Per level, five sagittal crops (one per condition) and one axial crop:

====================  =============  ==================================================
condition slot        series         centre
====================  =============  ==================================================
spinal                Sagittal T2    spinal keypoint (its slice: the T2 centre slices)
left/right foraminal  Sagittal T1    that side's foraminal keypoint (its own slice)
left/right subartic.  Sagittal T2    that side's subarticular keypoint mapped into T2
                                     through patient coordinates (the paramedian
                                     slices); falls back to the spinal crop
axial (per level)     Axial T2       midpoint of the level's left/right subarticular
                                     keypoints in the stack of the more confident one;
                                     falls back to the spinal keypoint projected into
                                     an axial stack that covers it
====================  =============  ==================================================

Network: a 2.5-D sagittal backbone (slices as channels) whose features are gated by a
condition (+ level) embedding, projected to ``emb_dim`` and read by a per-condition head
(the sagittal logits); an axial encoder runs each slice through a 1-channel backbone and a
bidirectional GRU across the slices. Per level, the five sagittal embeddings and the axial
one are concatenated and a linear layer gives 5 conditions x 3 classes, added to the
sagittal logits. Missing crops are zeros and their embeddings are zeroed by the presence
flags, so the network never sees garbage and never produces NaN.

A target is predicted (``Sample.mask``) when the crop of the series it is graded on exists:
spinal -> the spinal T2 crop, foraminal -> that side's T1 crop, subarticular -> the level's
axial crop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..constants import AXIAL_T2, LEVEL_TO_COORD_LEVEL, LEVELS, LR_SWAP, N_CLASSES, N_CONDITIONS, N_LEVELS, SAG_T1, SAG_T2
from ..keypoints import RULE_SLICE_SETS, slice_source
from ..models.backbones import create_backbone
from ..models.family import Sample
from ..options import ExtraOptions, Options, option
from ..stage1.assemble import DEFAULT_PREFER
from ..stage1.sag2d import sample_positions
from .base import GradingBase, GradingOptions
from .crops import Located, locate_point
from .layers import ConditionGate, SliceSequenceEncoder
from .tta import ViewAxes

if TYPE_CHECKING:
    from ..io.volume import Study, Volume
    from ..keypoints import KeypointSet, StudyKeypoints

logger = logging.getLogger(__name__)

#: Default physical crop sides (mm): sagittal crops (``input.crop_mm``) and axial crops
#: (``input.extra.axial_crop_mm``, wide enough for both subarticular zones and the canal).
DEFAULT_SAG_CROP_MM = 48.0
DEFAULT_AXIAL_CROP_MM = 64.0


@dataclass(frozen=True)
class FusionOptions(GradingOptions):
    emb_dim: int = option(128, "sagittal embedding width per condition")
    gru_hidden: int = option(64, "axial slice-GRU width")
    axial_arch: str | None = option(None, "axial encoder backbone (None: the entry's arch)")

    def check(self) -> None:
        super().check()
        self.need(self.emb_dim >= 1 and self.gru_hidden >= 1, "emb_dim and gru_hidden must be >= 1")


@dataclass(frozen=True)
class FusionInput(ExtraOptions):
    axial_crop_mm: float = option(DEFAULT_AXIAL_CROP_MM, "side (mm) of the axial crops")
    axial_size: list | None = option(None, "[H, W] of the axial crops (None: input.size)")
    axial_slices: int | None = option(None, "slices per axial crop (None: input.n_slices)")
    sag_windows: bool = option(True, "sagittal points whose slice is a rule (sag-2d): crop the write-up's window of "
                               "slices (T2: around the middle; T1: each side's half of the stack) instead of one slice")
    window_samples: int = option(10, "even samples per sagittal stack that the windows take their slices from")
    window_prob: float = option(0.2, "training: chance that a sample's sagittal crops use the windows anyway, so "
                                "that the model knows both kinds of crop")

    def check(self) -> None:
        self.need(np.isfinite(self.axial_crop_mm) and self.axial_crop_mm > 0, f"axial_crop_mm must be > 0, got {self.axial_crop_mm}")
        self.need(self.axial_size is None or (len(self.axial_size) == 2 and all(
            isinstance(v, int) and v >= 1 for v in self.axial_size)),
            f"axial_size must be [H, W] of positive ints, got {self.axial_size}")
        self.need(self.axial_slices is None or self.axial_slices >= 1, f"axial_slices must be >= 1, got {self.axial_slices}")
        self.need(self.window_samples >= 1, f"window_samples must be >= 1, got {self.window_samples}")
        self.need(0.0 <= self.window_prob <= 1.0, f"window_prob must be in [0, 1], got {self.window_prob}")


class FusionFamily(GradingBase):
    """Three-view fusion grader; see the module docstring for crops and network.

    ``model_kwargs``: ``emb_dim`` (128), ``gru_hidden`` (64), ``axial_arch`` (None: same as
    ``arch``), ``dropout`` (0.0), ``prefer`` ({kind: set keys}), ``tta_lr`` (False).
    ``input``: ``size`` (H, W) of sagittal crops,
    ``n_slices`` sagittal slices (= ``in_chans``), ``crop_mm`` sagittal side; ``extra``:
    ``axial_crop_mm`` (64), ``axial_size`` ([H, W], default ``size``), ``axial_slices``
    (default ``n_slices``), ``aug`` (training augmentation, `CropAugment`).
    """

    name = "fusion"
    VARIANTS: ClassVar[tuple[str, ...]] = ("default",)
    options_type: ClassVar[type[Options]] = FusionOptions
    input_options_type: ClassVar[type[ExtraOptions]] = FusionInput
    DEFAULT_PREFER: ClassVar[dict[str, tuple[str, ...]]] = dict(DEFAULT_PREFER)

    def __init__(self, entry: Any) -> None:
        super().__init__(entry)
        self.require_chans(self.spec.n_slices, "the sagittal encoder reads the slices as channels")
        self.sag_crop_mm = float(self.spec.crop_mm or DEFAULT_SAG_CROP_MM)
        x = self.input_options
        self.axial_crop_mm = float(x.axial_crop_mm)
        ax_size = x.axial_size or self.out_size
        self.axial_size = (int(ax_size[0]), int(ax_size[1]))
        self.axial_slices = int(x.axial_slices or self.spec.n_slices)

    # -- shapes and flips ----------------------------------------------------------------
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        s, (h, w) = self.spec.n_slices, self.out_size
        return {
            "sag": (N_CONDITIONS, N_LEVELS, s, h, w),
            "sag_present": (N_CONDITIONS, N_LEVELS),
            "axial": (N_LEVELS, self.axial_slices, *self.axial_size),
            "axial_present": (N_LEVELS,),
        }

    def view_axes(self) -> dict[str, ViewAxes]:
        return {
            "sag": ViewAxes("sagittal", LR_SWAP),
            "sag_present": ViewAxes(None, LR_SWAP),
            "axial": ViewAxes("axial", None),
            "axial_present": ViewAxes(None, None),
        }

    # -- model ----------------------------------------------------------------------------
    def build(self) -> nn.Module:
        return FusionNet(
            arch=self.entry.arch,
            axial_arch=self.options.axial_arch or self.entry.arch,
            n_slices=self.spec.n_slices,
            emb_dim=self.options.emb_dim,
            gru_hidden=self.options.gru_hidden,
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
        spinal = self.best_points(keypoints, "spinal")
        foraminal = self.best_points(keypoints, "foraminal")
        subart = self.best_points(keypoints, "subarticular")
        ctx = self.crop_context(rng)
        inputs = self.zero_inputs()
        crops_meta: dict[str, list[Any]] = {"sag": [[None] * N_LEVELS for _ in range(N_CONDITIONS)], "axial": [None] * N_LEVELS}
        missing: list[str] = []

        windows = rng is not None and self.input_options.window_prob > 0 and bool(rng.random() < self.input_options.window_prob)
        for lv in range(N_LEVELS):
            slots: list[Located | None] = [locate_point(study, SAG_T2, spinal, lv)]
            slots += [locate_point(study, SAG_T1, foraminal, side * N_LEVELS + lv) for side in (0, 1)]
            # a window of slices where the slice is a rule (sag-2d), or at random in training
            use_window = [windows or self._rule_slice(spinal, lv)]
            use_window += [windows or self._rule_slice(foraminal, side * N_LEVELS + lv) for side in (0, 1)]
            for side in (0, 1):  # paramedian T2 slices through the subarticular point, else the canal's
                sub = locate_point(study, SAG_T2, subart, side * N_LEVELS + lv)
                slots.append(sub or slots[0])
                use_window.append(sub is None and use_window[0])
            for c, loc in enumerate(slots):
                if loc is None:
                    continue
                window = self.slice_window(loc.volume, c) if use_window[c] else None
                arr, info = ctx.crop_located(loc, self.spec.n_slices, self.out_size, self.sag_crop_mm, window)
                inputs["sag"][c, lv] = arr
                inputs["sag_present"][c, lv] = 1.0
                crops_meta["sag"][c][lv] = info
            ax = self._axial_centre(study, subart, spinal, lv)
            if ax is not None:
                arr, info = ctx.crop(ax[0], ax[1], self.axial_slices, self.axial_size, self.axial_crop_mm)
                inputs["axial"][lv] = arr
                inputs["axial_present"][lv] = 1.0
                crops_meta["axial"][lv] = info
            name = LEVEL_TO_COORD_LEVEL[LEVELS[lv]]
            for c, what in ((0, "spinal T2"), (1, "left foraminal T1"), (2, "right foraminal T1")):
                if not inputs["sag_present"][c, lv]:
                    missing.append(f"{what} {name}")
            if not inputs["axial_present"][lv]:
                missing.append(f"axial {name}")

        mask = np.zeros((N_CONDITIONS, N_LEVELS), dtype=bool)
        mask[0:3] = inputs["sag_present"][0:3] > 0
        mask[3:5] = inputs["axial_present"][None, :] > 0
        nothing = f"fusion model {self.entry.name} has no view to grade (no keypoints/series)"
        return self.single_sample(study.study_id, inputs, mask, crops_meta, missing, rng, "fusion", nothing)

    def _rule_slice(self, points: KeypointSet | None, index: int) -> bool:
        """Whether the point's slice is a rule (`RULE_SLICE_SETS`) and slice windows are on."""
        if points is None or not self.input_options.sag_windows or not bool(points.valid[index]):
            return False
        return slice_source(points.origin[index]) in RULE_SLICE_SETS

    def slice_window(self, volume: "Volume", slot: int) -> np.ndarray | None:
        """Canonical slice positions of the write-up's sagittal window for condition ``slot``
        (0 spinal, 1/2 left/right foraminal, 3/4 left/right subarticular): ``window_samples``
        even samples over the stack; T2 slots take the ``n_slices`` around the middle, the left
        (right) foraminal slot the last (first) ``n_slices`` of them: canonical sagittal slices
        run toward patient left."""
        n_total, k = volume.shape[0], self.spec.n_slices
        samples = self.input_options.window_samples
        if slot in (1, 2):
            pos = sample_positions(n_total, samples, samples)
            return pos[-k:] if slot == 1 else pos[:k]
        return sample_positions(n_total, samples, k)

    def _axial_centre(
        self, study: Study, subart: KeypointSet | None, spinal: KeypointSet | None, level: int
    ) -> tuple[Any, np.ndarray] | None:
        """(axial volume, voxel centre) of ``level``'s axial crop, or None."""
        found = [loc for side in (0, 1) if (loc := locate_point(study, AXIAL_T2, subart, side * N_LEVELS + level))]
        if found:
            best = max(found, key=lambda loc: loc.confidence)
            vol = best.volume
            worlds = [loc.world for loc in found if bool(vol.contains(loc.world, margin_mm=self.axial_crop_mm / 2))]
            return vol, vol.to_voxel(np.mean(worlds, axis=0))
        loc = locate_point(study, AXIAL_T2, spinal, level, margin_mm=0.0)
        if loc is not None:
            logger.debug("study %s level %s: axial crop centred on the projected spinal keypoint", study.study_id, LEVELS[level])
            return loc.volume, loc.zyx
        return None


class FusionNet(nn.Module):
    """Condition-gated sagittal encoder + axial slice-GRU encoder, fused per level;
    ``forward(batch) -> [B, 5, 5, 3]`` canonical logits."""

    def __init__(
        self,
        arch: str,
        axial_arch: str,
        n_slices: int,
        emb_dim: int = 128,
        gru_hidden: int = 64,
        dropout: float = 0.0,
        arch_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        kw = dict(arch_kwargs or {})
        self.sag_backbone = create_backbone(arch, dims=2, in_chans=n_slices, **kw)
        feats = int(self.sag_backbone.num_features)
        self.gate = ConditionGate(feats)
        self.sag_proj = nn.Sequential(nn.Linear(feats, emb_dim), nn.GELU())
        self.sag_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(emb_dim, N_CLASSES))
        self.axial = SliceSequenceEncoder(create_backbone(axial_arch, dims=2, in_chans=1, **kw), gru_hidden)
        fused_in = N_CONDITIONS * emb_dim + self.axial.out_dim
        self.fuse = nn.Sequential(nn.Dropout(dropout), nn.Linear(fused_in, N_CONDITIONS * N_CLASSES))
        self.register_buffer("cond_index", torch.arange(N_CONDITIONS).repeat_interleave(N_LEVELS), persistent=False)
        self.register_buffer("level_index", torch.arange(N_LEVELS).repeat(N_CONDITIONS), persistent=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        sag = batch["sag"]  # [B, 5 cond, 5 level, S, H, W]
        b = sag.shape[0]
        f = self.sag_backbone(sag.flatten(0, 2))  # [B*25, F]
        f = self.gate(f, self.cond_index.repeat(b), self.level_index.repeat(b))
        emb = self.sag_proj(f).view(b, N_CONDITIONS, N_LEVELS, -1) * batch["sag_present"][..., None]
        sag_logits = self.sag_head(emb)  # [B, 5, 5, 3]
        ax = self.axial(batch["axial"].flatten(0, 1)).view(b, N_LEVELS, -1) * batch["axial_present"][..., None]
        per_level = torch.cat([emb.permute(0, 2, 1, 3).reshape(b, N_LEVELS, -1), ax], dim=-1)
        fused = self.fuse(per_level).view(b, N_LEVELS, N_CONDITIONS, N_CLASSES).permute(0, 2, 1, 3)
        return sag_logits + fused
