"""Axial level classifier (z per side and level) and the axial (x, y) regressor on its slices.

`AxialLevelFamily` (``axial_level``): every slice of an axial stack, with ``input.n_slices``
neighbouring slices as channels (2.5-D), goes through a 2-D CNN; a bidirectional LSTM (and
self-attention, ``model_kwargs.attention``) over the slices gives, per slice and side, the
probabilities of the 5 levels and "none". Per stack, side and level: z = the
probability-weighted source slice index within ``model_kwargs.z_window`` slices of the most
probable slice, confidence = that maximum probability; (x, y) = the slice centre. Several
stacks / series: the most confident per (side, level) wins (`merge_sets`).

`AxialXYFamily` (``axial_xy``, set key ``"axial_level"`` too): one sample per chosen slice
(the stack slice nearest each level point of the ``axial_level`` set, or, for training
without predictions, of ``truth_subarticular``) with neighbours as channels; a 2-D model
regresses the left and right (x, y). `merge_sets` writes the refined (x, y) into the
``axial_level`` set (z and confidence kept). Run it after ``axial_level``.

Side is decided in patient coordinates: stacks are put in canonical axial orientation
(columns toward patient left) before the model sees them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ..constants import AXIAL_T2, N_LEVELS
from ..imaging import (
    LATERAL_AXIS,
    canonical_slice_index,
    orient,
    prepare_slices,
    sample_slice_indices,
    source_slice_index,
    view_alignment,
)
from ..keypoints import KeypointSet, StudyKeypoints, truth_key
from ..models.backbones import create_backbone
from ..models.family import Sample
from ..options import ExtraOptions, Options, option
from ..specs import SpecError
from .base import MIN_VIEW_ALIGNMENT, PerStackFamily, PointFamily, Stage1Family

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..io.volume import Study, Volume

logger = logging.getLogger(__name__)

NONE_CLASS = N_LEVELS  # class index of "no level on this slice"
N_CLASSES = N_LEVELS + 1


class _AxialSlices(Stage1Family):
    """What both axial families share: subarticular points, from 2-D slices fed with their
    neighbours as channels (an odd ``n_slices`` equal to ``in_chans``)."""

    @property
    def kind(self) -> str:
        return "subarticular"

    def check_entry(self) -> None:
        super().check_entry()
        spec, name = self.spec, self.entry.name
        if len(spec.size) != 2:
            raise SpecError(f"model {name!r}: {self.name} needs input.size (H, W), got {list(spec.size)}")
        if spec.n_slices % 2 != 1 or spec.in_chans != spec.n_slices:
            raise SpecError(f"model {name!r}: {self.name} feeds each slice with its neighbours as channels: "
                            f"input.n_slices must be odd and input.in_chans equal to it, got n_slices={spec.n_slices}, "
                            f"in_chans={spec.in_chans}")


@dataclass(frozen=True)
class AxialLevelOptions(Options):
    """``model_kwargs`` of the level classifier."""

    hidden: int = option(64, "LSTM width (per direction)")
    attention: bool = option(True, "self-attention over the slices after the LSTM")
    heads: int = option(4, "attention heads (2 * hidden must be divisible by it)")
    dropout: float = option(0.0, "dropout in the projection and attention")
    z_window: int = option(2, "z = probability-weighted slice index within this many slices of the most probable one")
    none_weight: float = option(1.0, "loss weight of the 'none' class")
    tta_lr: bool = option(False, "flip TTA adds the left/right mirror and the combined A/P + L/R one (sides swapped back)")

    def check(self) -> None:
        self.need(self.hidden >= 1 and self.heads >= 1, "hidden and heads must be >= 1")
        self.need(not self.attention or (2 * self.hidden) % self.heads == 0,
                  f"heads ({self.heads}) must divide 2 * hidden ({2 * self.hidden})")
        self.need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        self.need(self.z_window >= 0, f"z_window must be >= 0, got {self.z_window}")
        self.need(self.none_weight >= 0, f"none_weight must be >= 0, got {self.none_weight}")


@dataclass(frozen=True)
class AxialLevelInput(ExtraOptions):
    max_slices: int = option(0, "slices read per stack, sampled evenly (0: every slice)")

    def check(self) -> None:
        self.need(self.max_slices >= 0, "max_slices must be >= 0 (0 = every slice)")


class AxialLevelFamily(_AxialSlices, PerStackFamily):
    """Per-slice level classification over axial stacks -> z and confidence per (side, level)."""

    name = "axial_level"
    view = "axial"
    series_type = AXIAL_T2
    options_type: ClassVar[type[Options]] = AxialLevelOptions
    input_options_type: ClassVar[type[ExtraOptions]] = AxialLevelInput
    length_axis = ("image", 0)  # stacks of different lengths share a batch: padded, masked (slice_mask)


    # -- network ------------------------------------------------------------------------
    def build(self) -> "nn.Module":
        from .nets import SliceLevelNet

        o = self.options
        backbone = create_backbone(self.entry.arch, dims=2, in_chans=self.spec.n_slices, **self.entry.arch_kwargs)
        return SliceLevelNet(backbone, self.spec.n_slices, hidden=o.hidden, attention=o.attention, heads=o.heads,
                             dropout=o.dropout, n_sides=2, n_classes=N_CLASSES)

    def example_batch(self, batch_size: int = 2) -> dict[str, "torch.Tensor"]:
        import torch

        s = max(3, self.spec.n_slices)
        return {"image": torch.randn(batch_size, s, *self.spec.size), "slice_mask": torch.ones(batch_size, s, dtype=torch.bool)}

    def collate(self, samples: list[Sample], pad_to: int | None = None) -> dict[str, "torch.Tensor"]:
        """Stacks of different lengths padded to the longest (or ``pad_to``), with
        ``slice_mask`` marking real slices."""
        import torch

        s_max = max([pad_to or 0] + [len(s.inputs["image"]) for s in samples])
        h, w = samples[0].inputs["image"].shape[1:]
        image = np.zeros((len(samples), s_max, h, w), np.float32)
        mask = np.zeros((len(samples), s_max), bool)
        for i, s in enumerate(samples):
            n = len(s.inputs["image"])
            image[i, :n], mask[i, :n] = s.inputs["image"], True
        return {"image": torch.from_numpy(image), "slice_mask": torch.from_numpy(mask)}

    def collate_targets(self, targets: list[dict[str, np.ndarray]]) -> dict[str, "torch.Tensor"]:
        """``cls`` padded with -1 (ignored) to the longest stack, like `collate`."""
        import torch

        s_max = max(len(t["cls"]) for t in targets)
        cls = np.full((len(targets), s_max, 2), -1, np.int64)
        for i, t in enumerate(targets):
            cls[i, : len(t["cls"])] = t["cls"]
        return {"cls": torch.from_numpy(cls)}

    def run(self, model: "nn.Module", batch: dict[str, "torch.Tensor"], tta: bool = False) -> "torch.Tensor":
        """``[B, S, 2 sides, 6]`` probabilities (5 levels + none); zero on padded slices."""
        out = self._probs(model, batch)
        if not tta:
            return out
        outs = [out]
        for axes in self.tta_flips:  # canonical axis k is tensor dim k - 3
            probs = self._probs(model, dict(batch, image=batch["image"].flip([a - 3 for a in axes])))
            outs.append(probs.flip(2) if LATERAL_AXIS[self.view] in axes else probs)  # a left/right mirror swaps the sides
        return sum(outs) / len(outs)

    @staticmethod
    def _probs(model: "nn.Module", batch: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        import torch

        logits = model(batch).float()
        probs = torch.softmax(logits, dim=-1)
        mask = batch.get("slice_mask")
        return probs if mask is None else probs * mask.to(probs.device)[:, :, None, None]

    def loss(self, output: "torch.Tensor", targets: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """Cross entropy per slice and side (targets -1 ignored; "none" weighted by ``none_weight``)."""
        import torch
        import torch.nn.functional as F

        cls = targets["cls"].to(output.device)
        s = min(output.shape[1], cls.shape[1])
        logits, cls = output[:, :s].float().reshape(-1, N_CLASSES), cls[:, :s].reshape(-1)
        if not bool((cls >= 0).any()):
            return output.sum() * 0.0
        weight = torch.ones(N_CLASSES, device=output.device)
        weight[NONE_CLASS] = self.options.none_weight
        return F.cross_entropy(logits, cls, weight=weight, ignore_index=-1)

    # -- data ---------------------------------------------------------------------------
    def stack_sample(self, study_id: int, vol: "Volume", rng: np.random.Generator | None) -> Sample:
        max_slices = self.input_options.max_slices
        n = vol.shape[0]
        idx = np.unique(sample_slice_indices(n, max_slices)) if 0 < max_slices < n else np.arange(n)
        prep = prepare_slices(vol, self.view, idx, self.spec.size, self.spec.norm, rng, self.aug)  # type: ignore[arg-type]
        src = source_slice_index(prep.transform, idx)
        return Sample(study_id, {"image": prep.image}, self.base_meta(vol, prep.transform, source_slices=src))

    def decode(self, output: np.ndarray, sample: Sample, study: "Study") -> KeypointSet:
        vol = self.find_volume(sample, study)
        src = np.asarray(sample.meta["source_slices"], dtype=np.float64)
        probs = np.asarray(output, dtype=np.float64)[: len(src)]
        if sample.meta["transform"].lr_swapped:
            probs = probs[:, ::-1]
        window = self.options.z_window
        voxel = np.full((2 * N_LEVELS, 3), np.nan)
        conf = np.zeros(2 * N_LEVELS)
        centre = ((vol.shape[1] - 1) / 2.0, (vol.shape[2] - 1) / 2.0)
        for side in range(2):
            for level in range(N_LEVELS):
                p = probs[:, side, level]
                if not np.all(np.isfinite(p)) or len(p) == 0:
                    continue
                i = int(np.argmax(p))
                lo, hi = max(0, i - window), min(len(p), i + window + 1)
                w = p[lo:hi]
                z = float((w * src[lo:hi]).sum() / w.sum()) if w.sum() > 0 else float(src[i])
                k = side * N_LEVELS + level
                voxel[k] = (z, *centre)
                conf[k] = p[i]
        return self.to_set("subarticular", voxel, conf, vol)

    def targets(self, sample: Sample, study: "Study", truth: StudyKeypoints) -> dict[str, np.ndarray] | None:
        """``cls`` [S, 2]: per input slice and side, the level whose labelled point is nearest
        (one slice per level), "none" for slices clearly away from every level (only when all 5
        levels of that side are labelled somewhere), -1 (ignored) next to a level or unknown."""
        t = truth.get(truth_key("subarticular"))
        if t is None:
            return None
        vol = self.find_volume(sample, study)
        src = np.asarray(sample.meta["source_slices"], dtype=np.float64)
        step = float(np.median(np.abs(np.diff(src)))) if len(src) > 1 else 1.0
        cls = np.full((len(src), 2), -1, np.int64)
        for side in range(2):
            ks = side * N_LEVELS + np.arange(N_LEVELS)
            labels = np.full(len(src), NONE_CLASS if t.valid[ks].all() else -1, np.int64)
            nearest = []
            for level, k in enumerate(ks):
                if not t.valid[k] or not vol.contains(t.world[k]):
                    continue
                z = float(vol.to_voxel(t.world[k])[0])
                d = np.abs(src - z)
                labels[d <= 1.5 * step] = -1
                nearest.append((int(np.argmin(d)), level))
            for i, level in nearest:
                labels[i] = level
            slot = 1 - side if sample.meta["transform"].lr_swapped else side
            cls[:, slot] = labels
        return {"cls": cls}


class AxialXYFamily(_AxialSlices, PointFamily):
    """Left/right (x, y) on the slices chosen by the level classifier."""

    name = "axial_xy"
    view = "axial"
    dims = 2
    coord_axes = (1, 2)
    visibility = False
    needs_keypoints = True  # prepare reads the axial_level set: runs after it, in the main process
    source_keys: ClassVar[tuple[str, ...]] = ("axial_level", truth_key("subarticular"))


    @property
    def set_key(self) -> str:
        return "axial_level"  # refines the level classifier's set

    @property
    def n_points(self) -> int:
        return 2  # left, right

    @property
    def lr_permutation(self) -> np.ndarray | None:
        return np.array([1, 0])

    def source_set(self, keypoints: StudyKeypoints | None) -> KeypointSet | None:
        """The set whose slices are refined: ``axial_level``, else the truth (training)."""
        if keypoints is None:
            return None
        for key in self.source_keys:
            s = keypoints.get(key)
            if s is not None:
                return s
        return None

    def prepare(
        self,
        study: "Study",
        keypoints: StudyKeypoints | None = None,
        rng: np.random.Generator | None = None,
    ) -> list[Sample]:
        src = self.source_set(keypoints)
        if src is None:
            return []
        if keypoints is not None and src is keypoints.get("axial_level"):
            src = self.reconciled(study, keypoints, src)
        groups: dict[tuple[int, int, int], list[int]] = {}
        vols: dict[tuple[int, int], "Volume"] = {}
        for k in np.flatnonzero(src.valid):
            key = (int(src.series_id[k]), int(src.stack_index[k]))
            vol = vols.get(key) or study.find(*key)
            if vol is None or view_alignment(vol, self.view) < MIN_VIEW_ALIGNMENT:
                logger.info("study %s: %s point %s is on series %s stack %s, not an axial stack of this study; skipped",
                            study.study_id, src.source, src.describe(int(k)), key[0], key[1])
                continue
            vols[key] = vol
            z = int(np.clip(np.rint(src.voxel[k, 0]), 0, vol.shape[0] - 1))
            groups.setdefault((*key, z), []).append(int(k))
        samples = []
        c = self.spec.n_slices
        for (series_id, stack_index, z), points in sorted(groups.items()):
            vol = vols[(series_id, stack_index)]
            kc = round(float(canonical_slice_index(orient(vol, self.view), z)))
            idx = kc - c // 2 + np.arange(c)
            prep = prepare_slices(vol, self.view, idx, self.spec.size, self.spec.norm, rng, self.aug)  # type: ignore[arg-type]
            meta = self.base_meta(
                vol, prep.transform,
                u_fill={0: (kc + 0.5) / vol.shape[0]},
                points=np.asarray(points, np.int64),
                z=src.voxel[points, 0].astype(np.float64),
                confidence=src.confidence[points].astype(np.float64),
                origin=[str(src.origin[k]).split("+")[0] for k in points],
            )
            samples.append(Sample(study.study_id, {"image": prep.image}, meta))
        return samples

    def decode(self, output: np.ndarray, sample: Sample, study: "Study") -> KeypointSet:
        """Only this slice's points are valid in the returned set (others empty)."""
        vol = self.find_volume(sample, study)
        u, _ = self.points_u(output, sample)
        side_voxel = sample.meta["transform"].to_voxel(u)  # [2, 3]: (slice centre z, y, x) per side
        voxel = np.full((2 * N_LEVELS, 3), np.nan)
        conf = np.zeros(2 * N_LEVELS)
        origin = np.full(2 * N_LEVELS, "", dtype=object)
        slice_from = sample.meta.get("origin") or ["axial_level"] * len(sample.meta["points"])
        for k, z, c, o in zip(sample.meta["points"], sample.meta["z"], sample.meta["confidence"], slice_from):
            voxel[k] = (z, *side_voxel[k // N_LEVELS, 1:])
            conf[k] = c
            origin[k] = f"{o or 'axial_level'}+{self.name}"
        out = self.to_set("subarticular", voxel, conf, vol)
        return replace(out, origin=origin)

    def reconciled(self, study: "Study", keypoints: StudyKeypoints, src: KeypointSet) -> KeypointSet:
        """The level set with its weak and wrong-level points moved onto the sagittal canal's
        projection (`rsna_infer.stage1.assemble`), so that this model refines them on the
        right slice (their origin then reads ``projection+axial_xy``)."""
        from .assemble import MIN_AXIAL_CONFIDENCE, canal_points, projection_set, reconcile_levels

        canal = canal_points(study, keypoints)  # the sagittal merge finalize will make
        if canal is None or not canal.valid.any():
            return src
        proj = projection_set(study, canal, sagittal_fallback=False)
        weak = src.valid & (src.confidence < MIN_AXIAL_CONFIDENCE) & proj.valid
        src = src.take_points(weak | (~src.valid & proj.valid), proj)
        out, moved = reconcile_levels(study, src, canal, proj)
        if moved:
            logger.info("study %s: axial level points %s moved to the sagittal canal's level before the xy model",
                        study.study_id, moved)
        return out

    def targets(self, sample: Sample, study: "Study", truth: StudyKeypoints) -> dict[str, np.ndarray] | None:
        t = truth.get(truth_key("subarticular"))
        if t is None:
            return None
        world, valid = np.zeros((2, 3)), np.zeros(2, bool)
        for k in sample.meta["points"]:  # the first point of each side on this slice
            side = int(k) // N_LEVELS
            if not valid[side] and t.valid[k]:
                world[side], valid[side] = t.world[k], True
        return self.point_targets(world, valid, sample, self.find_volume(sample, study))

    def merge_sets(self, sets: list[KeypointSet], previous: KeypointSet | None = None) -> KeypointSet | None:
        """The level set (``previous``) with the refined (x, y) of every decoded point (whose
        origin becomes ``"axial_level+axial_xy"``)."""
        out = previous
        for s in sets:
            out = s if out is None else out.take_points(s.valid, s)
        return out
