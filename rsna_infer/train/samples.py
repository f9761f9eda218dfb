"""Training and validation batches: study datasets on top of the `Family` interface.

Inputs come from ``family.prepare(study, keypoints, rng)`` (with an ``rng``: the family's
training augmentation), targets from ``family.targets`` (stage 1) or the study's labels and
``Sample.mask`` (stage 2). A study the family cannot prepare is logged and yields no
samples; it never stops a run.

Workers: data loaders keep their worker processes for the whole run (``persistent_workers``)
so that each worker's in-memory study cache keeps hitting; the loader's workers share the
cache's memory budget (`ShareCacheBudget`), so more workers do not mean more memory. The
epoch reaches the workers with every index (`EpochIndices` yields ``(epoch, index)``), so
augmentation still differs per epoch and stays reproducible whatever the number of workers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from ..constants import N_CONDITIONS, N_LEVELS
from ..keypoints import StudyKeypoints
from ..models.family import Family, GradingFamily, KeypointFamily, Sample
from .data import TrainingData

logger = logging.getLogger(__name__)


@dataclass
class StudyItem:
    """What the dataset yields for one study: its samples and their targets."""

    study_id: int
    samples: list[Sample]
    targets: list[dict[str, np.ndarray]] = field(default_factory=list)  # stage 1, aligned with samples
    labels: np.ndarray | None = None  # stage 2: [5, 5]
    error: str | None = None


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    samples: list[Sample]
    study_ids: list[int]
    targets: dict[str, torch.Tensor] | None = None  # stage 1
    labels: torch.Tensor | None = None  # stage 2 [B, 5, 5]
    mask: torch.Tensor | None = None  # stage 2 [B, 5, 5]

    def to(self, device: torch.device) -> "Batch":
        mv = lambda d: None if d is None else {k: v.to(device, non_blocking=True) for k, v in d.items()}  # noqa: E731
        return Batch(
            mv(self.inputs), self.samples, self.study_ids, mv(self.targets),
            None if self.labels is None else self.labels.to(device),
            None if self.mask is None else self.mask.to(device),
        )


class StudyDataset(Dataset):
    """Index (or ``(epoch, index)``) -> `StudyItem` of one study (``repeats`` passes over
    ``study_ids`` per epoch).

    Training items are augmented with an rng seeded by (seed, epoch, index): runs are
    reproducible and do not depend on the number of workers. ``keypoint_source`` says where
    stage-2 crops come from (``"truth"``, ``"predicted"``, ``"mixed"``); a study without
    predicted keypoints falls back to the truth (validation screens those out first,
    `rsna_infer.train.validation.validation_plan`).
    """

    def __init__(
        self,
        family: Family,
        data: TrainingData,
        study_ids: list[int],
        *,
        train: bool,
        seed: int = 0,
        repeats: int = 1,
        keypoint_source: str = "truth",
        predicted: dict[int, StudyKeypoints] | None = None,
        predicted_prob: float = 0.5,
    ) -> None:
        self.family, self.data, self.study_ids = family, data, [int(s) for s in study_ids]
        self.train, self.seed, self.repeats = train, seed, repeats if train else 1
        self.keypoint_source, self.predicted, self.predicted_prob = keypoint_source, predicted or {}, predicted_prob

    def __len__(self) -> int:
        return len(self.study_ids) * self.repeats

    def _keypoints(self, sid: int, truth: StudyKeypoints, rng: np.random.Generator | None) -> StudyKeypoints:
        """Truth for stage 1 (targets) and for stage 2 unless predicted keypoints are asked for
        (then without the truth sets, so that crops come from the predictions)."""
        pred = self.predicted.get(sid)
        if self.family.stage == 1 or self.keypoint_source == "truth" or pred is None:
            return truth
        if self.keypoint_source == "mixed" and rng is not None and rng.random() >= self.predicted_prob:
            return truth
        return StudyKeypoints(sid, {k: s for k, s in pred.sets.items() if not k.startswith("truth_")}, dict(pred.report))

    def __getitem__(self, key: int | tuple[int, int]) -> StudyItem:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        sid = self.study_ids[index % len(self.study_ids)]
        rng = np.random.default_rng([self.seed, epoch, index]) if self.train else None
        try:
            study = self.data.study(sid)
            truth = self.data.truth(sid, study)
            samples = self.family.prepare(study, self._keypoints(sid, truth, rng), rng)
            if isinstance(self.family, KeypointFamily):
                kept, targets = [], []
                for s in samples:
                    t = self.family.targets(s, study, truth)
                    if t is not None:
                        kept.append(s)
                        targets.append(t)
                # validation keeps every sample (all are decoded); training only those with targets
                return StudyItem(sid, kept if self.train else samples, targets if self.train else [])
            return StudyItem(sid, samples, labels=self.data.labels[sid])
        except Exception as e:  # one odd study never stops training
            logger.warning("study %s: %s cannot be prepared (%s: %s); skipped", sid, self.family.name, type(e).__name__, e)
            return StudyItem(sid, [], error=f"{type(e).__name__}: {e}")


def full_mask(sample: Sample) -> np.ndarray:
    """The [5, 5] targets a stage-2 sample predicts (all when it does not say)."""
    return np.ones((N_CONDITIONS, N_LEVELS), bool) if sample.mask is None else np.asarray(sample.mask, bool)


class Collate:
    """Flatten the studies' samples into one batch (None when no study yielded any)."""

    def __init__(self, family: Family, with_targets: bool) -> None:
        self.family, self.with_targets = family, with_targets

    def __call__(self, items: list[StudyItem]) -> Batch | None:
        samples = [s for it in items for s in it.samples]
        if not samples:
            return None
        sids = [it.study_id for it in items for _ in it.samples]
        batch = Batch(self.family.collate(samples), samples, sids)
        if self.family.stage == 1:
            if self.with_targets:
                tlist = [t for it in items for t in it.targets]
                custom = getattr(self.family, "collate_targets", None)  # a family may batch its targets itself
                batch.targets = custom(tlist) if custom is not None else {
                    k: torch.from_numpy(np.stack([np.asarray(t[k]) for t in tlist])) for k in tlist[0]}
        else:
            fam = self.family
            assert isinstance(fam, GradingFamily)
            batch.labels = torch.from_numpy(  # per sample: a left/right mirrored sample has swapped labels
                np.stack([np.asarray(fam.sample_labels(s, it.labels), np.int64) for it in items for s in it.samples])
            )
            batch.mask = torch.from_numpy(np.stack([full_mask(s) for s in samples]))
        return batch


class EpochShuffle(torch.utils.data.Sampler):
    """Single-process sampler: a fresh permutation per epoch from (seed, epoch)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


class EpochIndices(torch.utils.data.Sampler):
    """``(epoch, index)`` pairs from an index sampler, so that persistent workers (each with
    its own copy of the dataset) know the epoch of every item they prepare."""

    def __init__(self, sampler: Any) -> None:
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, int(i)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def progress_bar(loader: Any, total: int, desc: str, enabled: bool) -> Any:
    """``loader`` wrapped in a tqdm bar when ``enabled`` (rank 0 with progress on)."""
    if not enabled:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


class ShareCacheBudget:
    """``worker_init_fn``: each of a loader's ``n`` workers keeps at most 1/n of the study
    cache's in-memory budget (the workers' caches are separate copies)."""

    def __init__(self, n_workers: int) -> None:
        self.n = max(int(n_workers), 1)

    def __call__(self, worker_id: int) -> None:
        info = torch.utils.data.get_worker_info()
        cache = getattr(getattr(info.dataset, "data", None), "cache", None) if info is not None else None
        if cache is not None:
            cache.memory_bytes = cache.memory_bytes // self.n
