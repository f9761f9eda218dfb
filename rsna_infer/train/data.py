"""A Kaggle-layout training root as training data: labels, ground-truth keypoints, studies.

- labels: ``train.csv`` -> per study an int64 [5, 5] array (conditions x levels in
  submission order; 0/1/2 = Normal-Mild/Moderate/Severe, -1 = blank, i.e. unscored).
- ground-truth keypoints: each row of ``train_label_coordinates.csv`` (series, instance,
  x, y) is located in that series' decoded stacks by its instance number and mapped to
  patient coordinates through the stack's geometry (`Volume.to_world`). The points become
  the sets ``truth_spinal``, ``truth_foraminal`` and ``truth_subarticular`` of a
  `StudyKeypoints`; from there every family maps them into whatever series it reads.
- studies: decoded once, then served from the on-disk cache (`rsna_infer.train.cache`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..constants import (
    CONDITIONS,
    COORD_CONDITION_TO_CONDITION,
    COORD_LEVEL_TO_LEVEL,
    LEVELS,
    N_CONDITIONS,
    N_LEVELS,
    TARGETS,
    label_to_class,
)
from ..io.volume import Study, Volume
from ..keypoints import (
    POINT_KINDS,
    KeypointSet,
    StudyKeypoints,
    point_index,
    truth_key,
)
from .cache import StudyCache

logger = logging.getLogger(__name__)

#: condition -> (keypoint kind, side or None)
CONDITION_POINT: dict[str, tuple[str, int | None]] = {
    "spinal_canal_stenosis": ("spinal", None),
    "left_neural_foraminal_narrowing": ("foraminal", 0),
    "right_neural_foraminal_narrowing": ("foraminal", 1),
    "left_subarticular_stenosis": ("subarticular", 0),
    "right_subarticular_stenosis": ("subarticular", 1),
}


class DataError(ValueError):
    """The training root is unusable; the message names the file and what is wrong."""


def read_labels(path: str | Path) -> dict[int, np.ndarray]:
    """``train.csv`` -> {study_id: int64 [5, 5]} with -1 for blanks."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labels file {path} does not exist")
    df = pd.read_csv(path, dtype={t: object for t in TARGETS})
    missing = [c for c in ("study_id", *TARGETS) if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing[:5]}{'...' if len(missing) > 5 else ''}")
    out: dict[int, np.ndarray] = {}
    for row in df.itertuples(index=False):
        rec = row._asdict()
        sid = int(rec["study_id"])
        if sid in out:
            raise DataError(f"{path}: study {sid} appears twice")
        try:
            out[sid] = np.array([label_to_class(rec[t]) for t in TARGETS], np.int64).reshape(N_CONDITIONS, N_LEVELS)
        except ValueError as e:
            raise DataError(f"{path}: study {sid}: {e}") from None
    return out


def read_coordinates(path: str | Path) -> dict[int, pd.DataFrame]:
    """``train_label_coordinates.csv`` -> {study_id: rows with our condition/level names}.
    Rows naming an unknown condition or level are dropped with a warning."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label coordinates file {path} does not exist")
    df = pd.read_csv(path)
    need = ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}")
    df = df[need].copy()
    df["condition"] = df["condition"].map(COORD_CONDITION_TO_CONDITION)
    df["level"] = df["level"].map(COORD_LEVEL_TO_LEVEL)
    bad = df["condition"].isna() | df["level"].isna() | df[["x", "y"]].isna().any(axis=1)
    if bad.any():
        logger.warning("%s: dropping %d row(s) with an unknown condition/level or no x/y", path, int(bad.sum()))
        df = df[~bad]
    df = df.astype({"study_id": np.int64, "series_id": np.int64, "instance_number": np.int64})
    return {int(sid): g.reset_index(drop=True) for sid, g in df.groupby("study_id", sort=True)}


def _find_slice(study: Study, series_id: int, instance_number: int) -> tuple[Volume, int] | None:
    """The stack of ``series_id`` holding ``instance_number`` and that slice's sorted index."""
    for vols in study.volumes.values():
        for v in vols:
            if v.series_id != series_id:
                continue
            hit = np.flatnonzero(v.instance_numbers == instance_number)
            if hit.size:
                return v, int(hit[0])
    return None


def truth_keypoints(study: Study, coords: pd.DataFrame | None) -> StudyKeypoints:
    """Ground-truth keypoint sets of one study (confidence 1 where labelled, 0 elsewhere)."""
    kp = StudyKeypoints(study.study_id)
    buf = {
        kind: {
            "world": np.full((n, 3), np.nan), "voxel": np.full((n, 3), np.nan),
            "series_id": np.full(n, -1, np.int64), "stack_index": np.zeros(n, np.int64), "confidence": np.zeros(n),
        }
        for kind, n in POINT_KINDS.items()
    }
    unplaced = []
    for row in ([] if coords is None else coords.itertuples(index=False)):
        kind, side = CONDITION_POINT[row.condition]
        i = point_index(kind, LEVELS.index(row.level), side)
        b = buf[kind]
        if b["confidence"][i] > 0:
            continue  # a duplicated label row: the first one wins
        found = _find_slice(study, int(row.series_id), int(row.instance_number))
        if found is None:
            unplaced.append(f"{row.condition}/{row.level} (series {row.series_id}, instance {row.instance_number})")
            continue
        vol, z = found
        # Label pixels are in the labelled file's own grid; a slice resampled onto the stack's
        # grid (another matrix size) maps through its own spacing.
        voxel = vol.pixel_to_voxel(z, float(row.x), float(row.y))
        b["world"][i] = vol.to_world(voxel)
        b["voxel"][i] = voxel
        b["series_id"][i] = vol.series_id
        b["stack_index"][i] = vol.stack_index
        b["confidence"][i] = 1.0
    if unplaced:
        logger.warning("study %s: %d label point(s) not found in the decoded series: %s",
                       study.study_id, len(unplaced), "; ".join(unplaced[:3]))
    for kind, b in buf.items():
        kp.sets[truth_key(kind)] = KeypointSet(kind, source=truth_key(kind), **b)
    kp.report["truth_unplaced"] = unplaced
    return kp


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


__all__ = [
    "CONDITIONS",
    "DataError",
    "TrainingData",
    "read_coordinates",
    "read_labels",
    "truth_keypoints",
]
