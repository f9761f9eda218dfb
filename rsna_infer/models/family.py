"""The contract between model families and the code that runs or trains them.

A *family* is one kind of model of the method (sag-2d keypoints, ROI grader, ...). It knows
how to build its network, turn a `Study` into input `Sample`s (CPU, numpy, runs in worker
processes), run a batch with flip TTA, and read the output. The predictor and the trainer
only talk to this interface, so adding a family never touches them.

Conventions
-----------
- ``nn.Module.forward(batch: dict[str, Tensor]) -> Tensor`` for every family's network.
- ``run`` returns outputs in a space where the mean over folds is meaningful (normalised
  coordinates, probabilities, logits): the predictor averages folds of one family/variant
  on ``run``'s output before ``decode``.
- Stage-2 ``run`` output is the canonical layout: logits ``[B, 5 conditions, 5 levels, 3]``
  in submission order; ``Sample.mask`` ([5, 5] bool) says which targets a sample predicts.
- ``prepare(..., rng=None)`` is deterministic inference preprocessing; with an ``rng`` it
  applies training augmentation (jitter, intensity), never otherwise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..constants import LR_SWAP
from ..options import ExtraOptions, Options
from ..specs import InputSpec, ModelEntry

if TYPE_CHECKING:  # torch stays out of torch-free imports (manifest validation, CLI help)
    import torch
    from torch import nn

    from ..io.volume import Study
    from ..keypoints import KeypointSet, StudyKeypoints


def swap_lr_labels(labels: np.ndarray) -> np.ndarray:
    """Labels (or masks) ``[5, 5, ...]`` in the canonical layout of a study mirrored
    left/right: left and right conditions swapped (`rsna_infer.constants.LR_SWAP`)."""
    return np.asarray(labels)[list(LR_SWAP)]


@dataclass
class Sample:
    """One model input for one study (or one volume / stack of a study)."""

    study_id: int
    inputs: dict[str, np.ndarray]  # float32 arrays without batch axis; collated by stacking
    meta: dict[str, Any] = field(default_factory=dict)  # series_id, stack_index, transforms
    mask: np.ndarray | None = None  # stage 2: [5, 5] bool, the targets this sample predicts


class Family(ABC):
    """Base of every family. Subclasses set ``name`` and implement the abstract methods."""

    name: ClassVar[str]
    stage: ClassVar[int]
    #: The family's ``model_kwargs`` and ``input.extra`` options (typed dataclasses with
    #: defaults, `rsna_infer.options`), parsed and validated once into `options` / `input_options`.
    options_type: ClassVar[type[Options]] = Options
    input_options_type: ClassVar[type[ExtraOptions]] = ExtraOptions
    #: ``(input key, axis of a sample)`` whose length may differ between the samples of one
    #: batch (e.g. the slices of an axial stack). Set it only when ``collate(samples,
    #: pad_to=n)`` pads that axis to ``n`` *and the network masks the padding*, so a sample's
    #: output does not depend on it; ``run``'s output then has the padded length on its first
    #: per-sample axis and the predictor cuts it back. None: batches hold equal shapes only.
    length_axis: ClassVar[tuple[str, int] | None] = None

    def __init__(self, entry: ModelEntry) -> None:
        if entry.family != self.name:
            raise ValueError(f"entry {entry.name!r} is family {entry.family!r}, not {self.name!r}")
        self.entry = entry
        where = f"model {entry.name!r} ({self.name})"
        self.options: Any = self.options_type.parse(entry.model_kwargs, where)
        self.input_options: Any = self.input_options_type.parse(entry.input.extra, where)

    @property
    def spec(self) -> InputSpec:
        return self.entry.input

    @abstractmethod
    def build(self) -> "nn.Module":
        """The network, randomly initialised (``pretrained=False``); weights are loaded by the caller."""

    @abstractmethod
    def prepare(
        self,
        study: "Study",
        keypoints: "StudyKeypoints | None" = None,
        rng: np.random.Generator | None = None,
    ) -> list[Sample]:
        """Inputs for ``study`` (empty list when the study lacks what this family needs)."""

    @abstractmethod
    def example_batch(self, batch_size: int = 2) -> dict[str, "torch.Tensor"]:
        """A batch of the right shapes and dtypes (zeros or noise), for the load-time check."""

    def collate(self, samples: list[Sample]) -> dict[str, "torch.Tensor"]:
        """Stack each input key of ``samples`` into a batch tensor."""
        import torch

        keys = samples[0].inputs.keys()
        return {k: torch.from_numpy(np.stack([s.inputs[k] for s in samples])) for k in keys}

    @abstractmethod
    def run(self, model: "nn.Module", batch: dict[str, "torch.Tensor"], tta: bool = False) -> "torch.Tensor":
        """Forward (plus flip TTA when ``tta``), output in fold-averageable space."""


class KeypointFamily(Family):
    """Stage 1: outputs become keypoints."""

    stage = 1

    @abstractmethod
    def decode(self, output: np.ndarray, sample: Sample, study: "Study") -> "KeypointSet":
        """One sample's (fold-averaged) ``run`` output -> keypoints in voxel and patient coords."""

    @property
    def set_key(self) -> str:
        """Key of this family's set in `StudyKeypoints.sets` (e.g. ``"sag3d_t2"``)."""
        return self.name if self.entry.variant in ("", "default") else f"{self.name}_{self.entry.variant}"

    @abstractmethod
    def targets(self, sample: Sample, study: "Study", truth: "StudyKeypoints") -> dict[str, np.ndarray] | None:
        """Training targets for ``sample`` from ground-truth keypoints (sets ``truth_<kind>``);
        None when the truth does not cover this sample."""

    @abstractmethod
    def loss(self, output: "torch.Tensor", targets: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """Scalar training loss of a batch (``output`` is the raw forward output)."""


class GradingFamily(Family):
    """Stage 2: outputs are canonical logits ``[B, 5, 5, 3]``."""

    stage = 2

    def sample_labels(self, sample: Sample, labels: np.ndarray) -> np.ndarray:
        """The study's labels ``[5, 5]`` as ``sample`` sees them: left and right conditions
        swapped when training augmentation mirrored the sample left/right."""
        if sample.meta.get("lr_mirrored"):
            return swap_lr_labels(labels)
        return np.asarray(labels)

    def loss(self, output: "torch.Tensor", labels: "torch.Tensor", mask: "torch.Tensor") -> "torch.Tensor":
        """Class-weighted (1/2/4) cross entropy over labelled, predicted targets.

        ``labels`` is int64 [B, 5, 5] with -1 for unlabelled; ``mask`` bool [B, 5, 5]. The
        weighting mirrors the metric's sample weights, normalised by the weight sum.
        """
        import torch
        import torch.nn.functional as F

        from ..constants import CLASS_WEIGHTS

        keep = mask & (labels >= 0)
        if not bool(keep.any()):
            return output.sum() * 0.0
        logits = output[keep].float()
        y = labels[keep]
        w = torch.tensor(CLASS_WEIGHTS, device=logits.device, dtype=logits.dtype)[y]
        return (F.cross_entropy(logits, y, reduction="none") * w).sum() / w.sum()
