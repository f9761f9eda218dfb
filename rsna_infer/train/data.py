"""A Kaggle-layout training root as training data: labels, ground-truth keypoints, studies.

- labels and ground-truth keypoints: ``train.csv`` and ``train_label_coordinates.csv`` as
  read by `rsna_infer.io.labels` (the QA pages read the same files the same way);
- studies: decoded once, then served from the on-disk cache (`rsna_infer.train.cache`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..constants import N_CONDITIONS, N_LEVELS
from ..io.labels import DataError, read_coordinates, read_labels, truth_keypoints
from ..io.volume import Study
from ..keypoints import StudyKeypoints
from .cache import StudyCache

logger = logging.getLogger(__name__)

def _default_loader(root: Path, split: str) -> tuple[Callable[[int], Study], list[int]]:
    """Study loader and the studies of the series CSV, through `rsna_infer.io`."""
    from ..io import discover_studies, load_study

    infos = {int(info.study_id): info for info in discover_studies(root, split=split)}
    return (lambda sid: load_study(infos[int(sid)])), sorted(infos)


@dataclass
class TrainingData:
    """Labels, label coordinates and studies of a Kaggle-layout training root."""

    root: Path
    study_ids: list[int]
    labels: dict[int, np.ndarray]
    coords: dict[int, pd.DataFrame]
    cache: StudyCache
    _truth: dict[int, StudyKeypoints] = field(default_factory=dict, repr=False)

    @classmethod
    def open(
        cls,
        root: str | Path,
        cache_dir: str | Path | None = None,
        split: str = "train",
        loader: Callable[[int], Study] | None = None,
        memory_mb: float = 2048.0,
    ) -> "TrainingData":
        """Read the CSVs of ``root``; studies are decoded lazily (``cache_dir`` defaults to
        ``{root}/.rsna_infer_cache``; pass one outside read-only inputs such as Kaggle's)."""
        root = Path(root)
        labels = read_labels(root / f"{split}.csv")
        coords = read_coordinates(root / f"{split}_label_coordinates.csv")
        if loader is None:
            loader, listed = _default_loader(root, split)
            ids = [s for s in labels if s in set(listed)]
            dropped = len(labels) - len(ids)
            if dropped:
                logger.warning("%d labelled studies have no series in %s; they are skipped", dropped, root)
        else:
            ids = sorted(labels)
        if not ids:
            raise DataError(f"{root}: no labelled study with images")
        images = root / f"{split}_images"
        cache = StudyCache(
            Path(cache_dir) if cache_dir is not None else root / ".rsna_infer_cache",
            loader,
            folder_of=lambda sid: images / str(sid),
            memory_mb=memory_mb,
        )
        return cls(root=root, study_ids=sorted(ids), labels=labels, coords=coords, cache=cache)

    def study(self, study_id: int) -> Study:
        return self.cache.get(study_id)

    def truth(self, study_id: int, study: Study | None = None) -> StudyKeypoints:
        """Ground-truth keypoints (computed once per study and kept)."""
        study_id = int(study_id)
        kp = self._truth.get(study_id)
        if kp is None:
            kp = truth_keypoints(study if study is not None else self.study(study_id), self.coords.get(study_id))
            self._truth[study_id] = kp
        return StudyKeypoints(kp.study_id, dict(kp.sets), dict(kp.report))

    def label_array(self, study_ids: list[int]) -> np.ndarray:
        """int64 [S, 5, 5] labels of ``study_ids`` in order."""
        return np.stack([self.labels[int(s)] for s in study_ids]) if study_ids else np.zeros((0, N_CONDITIONS, N_LEVELS), np.int64)


__all__ = ["TrainingData"]
