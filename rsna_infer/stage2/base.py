"""What both stage-2 families share: option validation, keypoint preferences, per-volume
normalisation and augmented cropping, zero inputs for missing views, and flip TTA."""

from __future__ import annotations

import logging
from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..imaging import volume_bounds
from ..keypoints import POINT_KINDS
from ..models.family import GradingFamily, Sample, swap_lr_labels
from ..options import Options, option
from ..specs import ModelEntry, SpecError
from .augment import CropAugment
from .crops import CropInfo, Located, crop_2d5
from .tta import ViewAxes, mirror_sample, run_tta

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..io.volume import Volume
    from ..keypoints import KeypointSet, StudyKeypoints
    from ..specs import NormSpec

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class GradingOptions(Options):
    """``model_kwargs`` every grading family accepts."""

    prefer: dict | None = option(None, "{kind: [set keys]}: keypoint preference per kind (family defaults)")
    tta_lr: bool = option(False, "flip TTA adds the left/right mirror and the combined one (outputs swapped back)")
    dropout: float = option(0.0, "dropout before the heads")

    def check(self) -> None:
        self.need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")


class CropContext:
    """Crops for one ``prepare`` call: caches each volume's normalisation bounds (computed once
    per volume) and applies training augmentation when an ``rng`` is given."""

    def __init__(self, norm: NormSpec, augment: CropAugment, rng: np.random.Generator | None) -> None:
        self.norm = norm
        self.augment = augment
        self.rng = rng

    def bounds(self, volume: Volume) -> tuple[float, float]:
        return volume_bounds(volume, self.norm)  # cached on the volume itself

    def crop(
        self,
        volume: Volume,
        zyx: np.ndarray,
        n_slices: int,
        out_size: tuple[int, int],
        crop_mm: float,
        slice_positions: np.ndarray | None = None,
    ) -> tuple[np.ndarray, CropInfo]:
        unit_fn = None
        if self.rng is not None:
            zyx = self.augment.jitter(volume, zyx, self.rng)
            crop_mm = crop_mm * self.augment.crop_scale(self.rng)
            unit_fn = self.augment.intensity_fn(self.rng)
        return crop_2d5(
            volume, zyx, n_slices, out_size, crop_mm=crop_mm, norm=self.norm, bounds=self.bounds(volume), unit_transform=unit_fn,
            slice_positions=slice_positions,
        )

    def crop_located(self, loc: Located, n_slices: int, out_size: tuple[int, int], crop_mm: float,
                     slice_positions: np.ndarray | None = None) -> tuple[np.ndarray, CropInfo]:
        return self.crop(loc.volume, loc.zyx, n_slices, out_size, crop_mm, slice_positions)


class GradingBase(GradingFamily):
    """Validated options of a stage-2 family; subclasses declare what they accept.

    Subclasses set ``VARIANTS``, ``options_type`` / ``input_options_type`` (dataclasses derived
    from `GradingOptions` / `ExtraOptions`, see `rsna_infer.options`) and ``DEFAULT_PREFER``
    ({kind: set keys}), and implement ``view_axes`` (flip behaviour of each batch entry) and
    ``input_shapes``.
    """

    VARIANTS: ClassVar[tuple[str, ...]]
    DEFAULT_PREFER: ClassVar[dict[str, tuple[str, ...]]]
    options_type: ClassVar[type[Options]] = GradingOptions

    def __init__(self, entry: ModelEntry) -> None:
        super().__init__(entry)
        where = f"model {entry.name!r} ({self.name})"
        if entry.variant not in self.VARIANTS:
            raise SpecError(f"{where}: unknown variant {entry.variant!r}; expected one of {self.VARIANTS}")
        try:
            self.augment = CropAugment.from_extra(self.spec.extra)
        except SpecError as e:
            raise SpecError(f"{where}: {e}") from None
        self.prefer = self._resolve_prefer(where)
        self.tta_lr = bool(self.options.tta_lr)
        size = self.spec.size
        if len(size) == 3 and size[0] != self.spec.n_slices:
            raise SpecError(f"{where}: input.size {list(size)} is (D, H, W) but D != n_slices {self.spec.n_slices}")
        self.out_size: tuple[int, int] = (int(size[-2]), int(size[-1]))
        self.where = where

    def _resolve_prefer(self, where: str) -> dict[str, tuple[str, ...]]:
        given = self.options.prefer or {}
        if not isinstance(given, dict):
            raise SpecError(f"{where}: model_kwargs.prefer must map a keypoint kind to a list of set keys")
        bad = set(given) - set(POINT_KINDS)
        if bad:
            raise SpecError(f"{where}: model_kwargs.prefer has unknown kind(s) {sorted(bad)}; expected {sorted(POINT_KINDS)}")
        out = dict(self.DEFAULT_PREFER)
        for kind, keys in given.items():
            if isinstance(keys, str) or not all(isinstance(k, str) for k in keys):
                raise SpecError(f"{where}: model_kwargs.prefer[{kind!r}] must be a list of set keys, got {keys!r}")
            out[kind] = tuple(keys)
        return out

    def require_chans(self, want: int, why: str) -> None:
        """For subclasses: the entry's ``input.in_chans`` must be ``want`` (``why`` says what reads them)."""
        if self.spec.in_chans != want:
            raise SpecError(f"{self.where}: input.in_chans must be {want} ({why}), got {self.spec.in_chans}")

    def best_points(self, keypoints: StudyKeypoints | None, kind: str) -> KeypointSet | None:
        if keypoints is None:
            return None
        return keypoints.best(kind, prefer=self.prefer.get(kind, ()))

    def crop_context(self, rng: np.random.Generator | None) -> CropContext:
        return CropContext(self.spec.norm, self.augment, rng)

    # -- batches ------------------------------------------------------------------------
    @abstractmethod
    def view_axes(self) -> dict[str, ViewAxes]:
        """Flip behaviour of each batch entry (see `rsna_infer.stage2.tta`)."""

    @abstractmethod
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of each batch entry (no batch axis)."""

    def zero_inputs(self) -> dict[str, np.ndarray]:
        """Zeros of every entry: the defined input of a missing view."""
        return {k: np.zeros(s, dtype=np.float32) for k, s in self.input_shapes().items()}

    def finish(self, study_id: int, inputs: dict[str, np.ndarray], mask: np.ndarray, meta: dict[str, Any], rng: np.random.Generator | None) -> Sample:
        """The sample; when training, mirrored anterior/posterior (``meta["ap_mirrored"]``) and
        left/right (``meta["lr_mirrored"]``: inputs, mask and, through `sample_labels`, the
        labels of the left and right conditions swapped) at random."""
        ap = rng is not None and self.augment.mirror_ap(rng)
        lr = rng is not None and self.augment.mirror_lr(rng)
        if ap or lr:
            inputs = mirror_sample(inputs, self.view_axes(), ap=ap, lr=lr)
        if lr:
            mask = swap_lr_labels(mask)
        meta = {"family": self.name, "variant": self.entry.variant, "model": self.entry.name, **meta,
                "ap_mirrored": ap, "lr_mirrored": lr}
        return Sample(int(study_id), inputs, meta, mask)

    def single_sample(
        self,
        study_id: int,
        inputs: dict[str, np.ndarray],
        mask: np.ndarray,
        crops: dict[str, list[Any]],
        missing: list[str],
        rng: np.random.Generator | None,
        label: str,
        nothing: str,
    ) -> list[Sample]:
        """The study's one sample, or none when no target has a crop (all-zero inputs are not worth
        grading). Logs the ``missing`` crops under ``label`` and, when skipped, why (``nothing``)."""
        if missing:
            logger.debug("study %s %s: no crop for %s", study_id, label, ", ".join(missing))
        if not mask.any():
            logger.info("study %s: %s", study_id, nothing)
            return []
        return [self.finish(study_id, inputs, mask, {"crops": crops, "missing": missing}, rng)]

    def example_batch(self, batch_size: int = 2) -> dict[str, torch.Tensor]:
        import torch

        out = {}
        for k, s in self.input_shapes().items():
            fill = torch.ones if k.endswith("present") else torch.zeros
            out[k] = fill((batch_size, *s), dtype=torch.float32)
        return out

    def run(self, model: nn.Module, batch: dict[str, torch.Tensor], tta: bool = False) -> torch.Tensor:
        """Canonical logits ``[B, 5, 5, 3]``; with ``tta`` averaged over the ap mirror (and the
        lr mirror when ``model_kwargs.tta_lr``), left/right swapped back."""
        return run_tta(model, batch, self.view_axes(), tta=tta, lr=self.tta_lr)
