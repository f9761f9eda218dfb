"""Shared machinery of the point-regression keypoint families (sag2d, sag3d, axial3d, axial_xy).

A point family's network outputs, per point, normalised coordinates ``u`` on some canonical
axes (see `rsna_infer.imaging`) plus, optionally, a visibility logit. ``run`` turns the logit
into a probability (so fold means are meaningful) and applies flip TTA exactly: flipping the
input along an axis maps ``u -> 1 - u`` on that axis, and a left/right mirror also swaps the
left/right points. ``decode`` maps ``u`` through the sample's `VoxelTransform` to the
volume's voxels and `Volume.to_world` to patient coordinates.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..imaging import AP_AXIS, LATERAL_AXIS, AugSpec, prepare_volume, view_alignment
from ..keypoints import POINT_KINDS, KeypointSet, StudyKeypoints, truth_key
from ..models.backbones import create_backbone, create_feature_backbone
from ..models.family import KeypointFamily, Sample
from ..options import Options, option
from ..specs import ModelEntry, SpecError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..io.volume import Study, Volume

logger = logging.getLogger(__name__)

#: Stacks whose normal is further than ~60 degrees from the view's slice axis are skipped
#: (a localiser stack inside a sagittal series, say).
MIN_VIEW_ALIGNMENT = 0.5

LR_HALVES = np.r_[5:10, 0:5]  # left 5 <-> right 5
POINT_HEADS: tuple[str, ...] = ("pool", "heatmap")


@dataclass(frozen=True)
class PointOptions(Options):
    """``model_kwargs`` of every point-regression family."""

    head: str = option("pool", "pool: pooled features -> linear; heatmap: feature pyramid -> per-point "
                       "heatmap -> soft-argmax (sub-pixel, better for several points)", choices=POINT_HEADS)
    heatmap_stride: int = option(4, "heatmap head: finest backbone stride used (the heatmap's cell size)")
    heatmap_width: int = option(32, "heatmap head: channels of the feature pyramid")
    spread_weight: float = option(1.0, "heatmap head: weight of the loss on each heatmap's spread (keeps them peaked)")
    dropout: float = option(0.0, "dropout before the head")
    confidence: float | None = option(None, "confidence of a fully visible point (None: the family's default)")
    coord_weight: float = option(10.0, "weight of the smooth-L1 coordinate loss")
    vis_weight: float = option(1.0, "weight of the visibility BCE loss")
    beta: float = option(0.02, "smooth-L1 beta in normalised units")
    tta_lr: bool = option(False, "flip TTA adds the left/right mirror and the combined A/P + L/R one")

    def check(self) -> None:
        self.need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        self.need(self.confidence is None or 0.0 < self.confidence <= 1.0,
                  f"confidence must be in (0, 1], got {self.confidence}")
        self.need(self.heatmap_stride >= 1 and self.heatmap_width >= 1, "heatmap_stride and heatmap_width must be >= 1")
        for key in ("coord_weight", "vis_weight", "beta", "spread_weight"):
            self.need(getattr(self, key) >= 0, f"{key} must be >= 0, got {getattr(self, key)}")


def tta_flip_sets(view: str, lr: bool) -> list[tuple[int, ...]]:
    """Canonical axes flipped in each extra TTA pass: the anterior/posterior mirror (never
    changes laterality), and with ``lr`` the left/right mirror and both together, so that the
    passes (with the identity) form a group and the mean is exactly flip-equivariant."""
    ap, lat = AP_AXIS[view], LATERAL_AXIS[view]
    return [(ap,), (lat,), (ap, lat)] if lr else [(ap,)]


class Stage1Family(KeypointFamily):
    """What every stage-1 family shares: config validation, stack selection, decoding helpers
    and how decoded sets of several samples (stacks) combine (`merge_sets`)."""

    view: ClassVar[str]  # "sagittal" | "axial"
    variants: ClassVar[tuple[str, ...]] = ("default",)

    def __init__(self, entry: ModelEntry) -> None:
        super().__init__(entry)
        self.check_entry()
        self.aug = AugSpec.from_extra(self.spec.extra)

    def check_entry(self) -> None:
        """Reject an entry this family cannot serve (variant, channels...); subclasses extend it."""
        e = self.entry
        if e.variant not in self.variants:
            raise SpecError(f"model {e.name!r}: {self.name} variant must be one of {self.variants}, got {e.variant!r}")

    @property
    def tta_flips(self) -> list[tuple[int, ...]]:
        """Canonical axes flipped in each extra TTA pass (`tta_flip_sets`; L/R with ``tta_lr``)."""
        return tta_flip_sets(self.view, bool(getattr(self.options, "tta_lr", False)))

    def merge_sets(self, sets: list[KeypointSet], previous: KeypointSet | None = None) -> KeypointSet | None:
        """One set from the decoded sets of a study's samples (one per stack): per point the most
        confident valid one. ``previous`` (the set already stored under `set_key`) takes part."""
        out = previous
        for s in sets:
            out = s if out is None else out.merge_most_confident(s)
        return out

    def collate_targets(self, targets: list[dict[str, np.ndarray]]) -> dict[str, "torch.Tensor"]:
        """Stack each target key into a batch tensor (aligned with `collate` of the samples)."""
        import torch

        return {k: torch.from_numpy(np.stack([np.asarray(t[k]) for t in targets])) for k in targets[0]}

    def volumes(self, study: "Study", series_type: str) -> list["Volume"]:
        """The stacks of ``series_type`` this family can read (oriented like its view)."""
        out = []
        for vol in study.get(series_type):
            if view_alignment(vol, self.view) < MIN_VIEW_ALIGNMENT:
                logger.info("study %s series %s stack %d: not %s (normal %s); skipped by %s",
                            study.study_id, vol.series_id, vol.stack_index, self.view, np.round(vol.normal, 2), self.set_key)
                continue
            out.append(vol)
        return out

    @staticmethod
    def find_volume(sample: Sample, study: "Study") -> "Volume":
        vol = study.find(int(sample.meta["series_id"]), int(sample.meta.get("stack_index", 0)))
        if vol is None:
            raise ValueError(f"study {study.study_id}: series {sample.meta['series_id']} stack "
                             f"{sample.meta.get('stack_index', 0)} of this sample is not in the study")
        return vol

    @staticmethod
    def base_meta(vol: "Volume", transform: Any, **more: Any) -> dict[str, Any]:
        return {"series_id": int(vol.series_id), "stack_index": int(vol.stack_index), "transform": transform, **more}

    def to_set(self, kind: str, voxel: np.ndarray, confidence: np.ndarray, vol: "Volume") -> KeypointSet:
        """Voxel points of ``vol`` -> a `KeypointSet` (points outside the stack are clipped into it
        at half confidence; non-finite points are dropped)."""
        voxel = np.asarray(voxel, dtype=np.float64)
        conf = np.asarray(confidence, dtype=np.float64).copy()
        ok = np.all(np.isfinite(voxel), axis=1) & np.isfinite(conf)
        lim = np.asarray(vol.shape, dtype=np.float64) - 1
        outside = np.any((voxel < -0.5) | (voxel > lim + 0.5), axis=1) & ok
        conf[outside] *= 0.5
        voxel = np.where(ok[:, None], np.clip(voxel, 0.0, lim), np.nan)
        world = vol.to_world(np.where(ok[:, None], voxel, 0.0))
        world[~ok] = np.nan
        n = len(voxel)
        return KeypointSet(
            kind,
            world,
            voxel,
            np.where(ok, vol.series_id, -1),
            np.full(n, vol.stack_index),
            np.where(ok, np.clip(conf, 0.0, 1.0), 0.0),
            self.set_key,
        )


class PerStackFamily(Stage1Family):
    """A family with one sample per stack of `series_type` that it can read."""

    @property
    @abstractmethod
    def series_type(self) -> str:
        """Series type whose stacks are read."""

    @abstractmethod
    def stack_sample(self, study_id: int, vol: "Volume", rng: np.random.Generator | None) -> Sample:
        """The sample of one stack (``rng``: training augmentation)."""

    def prepare(
        self,
        study: "Study",
        keypoints: StudyKeypoints | None = None,
        rng: np.random.Generator | None = None,
    ) -> list[Sample]:
        return [self.stack_sample(study.study_id, vol, rng) for vol in self.volumes(study, self.series_type)]


class PointFamily(Stage1Family):
    """A keypoint family whose network regresses a fixed list of points."""

    dims: ClassVar[int]  # 2 or 3: input (and backbone) dimensionality
    coord_axes: ClassVar[tuple[int, ...]]  # canonical axes (0=z, 1=y, 2=x) the head predicts
    visibility: ClassVar[bool] = True
    default_confidence: ClassVar[float] = 0.9
    options_type: ClassVar[type[Options]] = PointOptions

    # -- configuration ------------------------------------------------------------------
    def check_entry(self) -> None:
        super().check_entry()
        e = self.entry
        if len(self.spec.size) != self.dims:
            shape = "(H, W)" if self.dims == 2 else "(D, H, W)"
            raise SpecError(f"model {e.name!r}: {self.name} needs input.size {shape}, got {list(self.spec.size)}")

    @property
    @abstractmethod
    def kind(self) -> str:
        """Keypoint kind of the decoded set."""

    @property
    def n_points(self) -> int:
        """Points the network predicts (may differ from the decoded set's size, see sag2d t1)."""
        return POINT_KINDS[self.kind]

    @property
    def lr_permutation(self) -> np.ndarray | None:
        """Output-slot permutation of a left/right mirror (None: the outputs have no side)."""
        return LR_HALVES if self.n_points == 10 else None

    @property
    def confidence(self) -> float:
        """Confidence of a fully visible point: ``model_kwargs.confidence`` or the family default."""
        c = self.options.confidence
        return float(self.default_confidence if c is None else c)

    # -- network ------------------------------------------------------------------------
    def build(self) -> "nn.Module":
        from .nets import HeatmapPointRegressor, PointRegressor

        o, e = self.options, self.entry
        if o.head == "heatmap":
            if len(self.coord_axes) != self.dims:
                raise SpecError(f"model {e.name!r}: the heatmap head needs every input axis predicted")
            backbone = create_feature_backbone(e.arch, dims=self.dims, in_chans=self.spec.in_chans,
                                               min_stride=o.heatmap_stride, **e.arch_kwargs)
            return HeatmapPointRegressor(backbone, self.n_points, self.dims, self.visibility, o.heatmap_width, o.dropout)
        backbone = create_backbone(e.arch, dims=self.dims, in_chans=self.spec.in_chans, **e.arch_kwargs)
        return PointRegressor(backbone, self.n_points, len(self.coord_axes), self.visibility, o.dropout)

    def example_batch(self, batch_size: int = 2) -> dict[str, "torch.Tensor"]:
        import torch

        return {"image": torch.randn(batch_size, self.spec.in_chans, *self.spec.size)}

    def run(self, model: "nn.Module", batch: dict[str, "torch.Tensor"], tta: bool = False) -> "torch.Tensor":
        """``[B, n_points, n_coords (+1)]``: normalised coordinates (+ visibility probability)."""
        out = self._forward(model, batch)
        if not tta:
            return out
        outs = [out]
        for axes in self.tta_flips:
            flipped = dict(batch, image=batch["image"].flip([a - 3 for a in axes]))  # canonical axis k is tensor dim k - 3
            o = self._forward(model, flipped)
            for axis in axes:
                o = self.unflip(o, axis)
            outs.append(o)
        return sum(outs) / len(outs)

    def _forward(self, model: "nn.Module", batch: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        import torch

        raw = model(batch).float()
        a = len(self.coord_axes)
        if not self.visibility:
            return raw
        return torch.cat([raw[..., :a], torch.sigmoid(raw[..., a:])], dim=-1)

    def unflip(self, out: "torch.Tensor", axis: int) -> "torch.Tensor":
        """Output of the input flipped along canonical ``axis`` -> output of the original input."""
        out = out.clone()
        if axis in self.coord_axes:
            j = self.coord_axes.index(axis)
            out[..., j] = 1.0 - out[..., j]
        if axis == LATERAL_AXIS[self.view] and self.lr_permutation is not None:
            out = out[:, self.lr_permutation]
        return out

    # -- training -------------------------------------------------------------------------
    def loss(self, output: "torch.Tensor", targets: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """Smooth-L1 on the available coordinates + BCE on visibility (where the truth is known)
        + the heatmap head's spread (its training output's last columns) on labelled points."""
        import torch.nn.functional as F

        a = len(self.coord_axes)
        out = output.float()
        m = targets["coord_mask"].float()
        o = self.options
        per_point = F.smooth_l1_loss(out[..., :a], targets["coords"].float(), beta=o.beta, reduction="none").sum(-1)
        loss = o.coord_weight * (per_point * m).sum() / (m.sum() * a).clamp(min=1.0)
        if self.visibility:
            vm = targets["vis_mask"].float()
            bce = F.binary_cross_entropy_with_logits(out[..., a], targets["vis"].float(), reduction="none")
            loss = loss + o.vis_weight * (bce * vm).sum() / vm.sum().clamp(min=1.0)
        n_spread = out.shape[-1] - a - int(self.visibility)
        if n_spread == a and o.spread_weight > 0:
            spread = out[..., -a:].sum(-1)
            loss = loss + o.spread_weight * (spread * m).sum() / (m.sum() * a).clamp(min=1.0)
        return loss

    # -- helpers for decode / targets ---------------------------------------------------
    def points_u(self, output: np.ndarray, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """Output ``[n_points, k]`` -> full normalised ``u`` ``[n_points, 3]`` and visibility, in
        patient-side order (slots swapped back when the sample was mirrored left/right)."""
        out = np.asarray(output, dtype=np.float64).reshape(self.n_points, -1)
        u = np.zeros((self.n_points, 3))
        for axis, value in (sample.meta.get("u_fill") or {}).items():
            u[:, int(axis)] = value
        a = len(self.coord_axes)
        u[:, list(self.coord_axes)] = out[:, :a]
        vis = np.clip(out[:, a], 0.0, 1.0) if self.visibility else np.ones(self.n_points)
        if sample.meta["transform"].lr_swapped and self.lr_permutation is not None:
            u, vis = u[self.lr_permutation], vis[self.lr_permutation]
        return u, vis

    def point_targets(self, world: np.ndarray, valid: np.ndarray, sample: Sample, vol: "Volume") -> dict[str, np.ndarray]:
        """Targets from ground-truth world points (in patient-side order) for this sample.

        ``coords`` are the normalised coordinates on the predicted axes, ``coord_mask`` marks
        points that are labelled and inside the input, ``vis`` is the inside flag and
        ``vis_mask`` the labelled flag.
        """
        valid = np.asarray(valid, dtype=bool) & np.all(np.isfinite(world), axis=1)
        world = np.where(valid[:, None], world, 0.0)
        u = sample.meta["transform"].to_norm(vol.to_voxel(world))
        if sample.meta["transform"].lr_swapped and self.lr_permutation is not None:
            u, valid = u[self.lr_permutation], valid[self.lr_permutation]
        ua = u[:, list(self.coord_axes)]
        inside = valid & np.all((ua >= 0.0) & (ua <= 1.0), axis=1)
        return {
            "coords": np.where(valid[:, None], ua, 0.5).astype(np.float32),
            "coord_mask": inside.astype(np.float32),
            "vis": inside.astype(np.float32),
            "vis_mask": valid.astype(np.float32),
        }


class VolumePointFamily(PerStackFamily, PointFamily):
    """A 3-D model on a whole stack resampled to ``input.size`` (D, H, W) -> xyz per point."""

    dims = 3
    coord_axes = (0, 1, 2)
    series_types: ClassVar[dict[str, str]]  # variant -> series type
    kinds: ClassVar[dict[str, str]]  # variant -> keypoint kind

    @property
    def kind(self) -> str:
        return self.kinds[self.entry.variant]

    @property
    def series_type(self) -> str:
        return self.series_types[self.entry.variant]

    def stack_sample(self, study_id: int, vol: "Volume", rng: np.random.Generator | None) -> Sample:
        prep = prepare_volume(vol, self.view, self.spec.size, self.spec.norm, rng, self.aug)  # type: ignore[arg-type]
        image = np.repeat(prep.image[None], self.spec.in_chans, axis=0)
        return Sample(study_id, {"image": image}, self.base_meta(vol, prep.transform))

    def decode(self, output: np.ndarray, sample: Sample, study: "Study") -> KeypointSet:
        vol = self.find_volume(sample, study)
        u, vis = self.points_u(output, sample)
        return self.to_set(self.kind, sample.meta["transform"].to_voxel(u), self.confidence * vis, vol)

    def targets(self, sample: Sample, study: "Study", truth: StudyKeypoints) -> dict[str, np.ndarray] | None:
        t = truth.get(truth_key(self.kind))
        if t is None:
            return None
        return self.point_targets(t.world, t.valid, sample, self.find_volume(sample, study))
