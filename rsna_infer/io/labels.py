"""The competition's label files: ``train.csv`` (grades) and ``train_label_coordinates.csv``
(where each graded point was marked), read one way for training, scoring and the QA pages.

- grades: a train.csv-style table -> int8 ``[N, 5, 5]`` (conditions x levels in submission
  order; 0/1/2 = Normal-Mild/Moderate/Severe, -1 = blank, i.e. unscored), `labels_array`;
  `read_labels` reads the file; `rsna_infer.metric` builds its solution frame from the same;
- ground-truth keypoints: each coordinate row (series, instance, x, y) is located in that
  series' decoded stacks by its instance number and mapped to patient coordinates through
  the stack's geometry (`Volume.to_world`). The points become the sets ``truth_spinal``,
  ``truth_foraminal`` and ``truth_subarticular`` of a `StudyKeypoints`
  (`truth_keypoints`); from there every family maps them into whatever series it reads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..constants import (
    COORD_CONDITION_TO_CONDITION,
    COORD_LEVEL_TO_LEVEL,
    LEVELS,
    N_CONDITIONS,
    N_LEVELS,
    TARGETS,
    label_to_class,
)
from ..keypoints import POINT_KINDS, KeypointSet, StudyKeypoints, point_index, truth_key
from ..validate import examples
from .volume import Study, Volume

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
    """A label file (or the training root holding it) is unusable; the message names the
    file and what is wrong."""


def labels_array(table: pd.DataFrame, where: str = "label table") -> tuple[list[int], np.ndarray]:
    """``(study_ids, labels)`` from a train.csv-style table (``study_id`` + the 25 label
    columns): ``labels`` is int8 [N, 5, 5] in canonical order, -1 where a label is blank
    (unscored). `DataError` names the column, study or duplicate that is wrong."""
    missing = [c for c in ("study_id", *TARGETS) if c not in table.columns]
    if missing:
        raise DataError(
            f"{where} lacks {len(missing)} column(s), missing column(s) {examples(missing)}; expected study_id and the "
            "25 '{condition}_{level}' columns of train.csv"
        )
    try:
        study_ids = [int(s) for s in table["study_id"].tolist()]
    except (TypeError, ValueError) as err:
        raise DataError(f"{where}: study_id must be integers ({err})") from None
    dup = pd.Series(study_ids)
    dup = dup[dup.duplicated()].tolist()
    if dup:
        raise DataError(f"{where} has duplicate study ids: {examples(dup)}")
    raw = table[list(TARGETS)].to_numpy(dtype=object)
    labels = np.empty(raw.shape, dtype=np.int8)
    for i, j in np.ndindex(raw.shape):
        try:
            labels[i, j] = label_to_class(raw[i, j])
        except ValueError as err:
            raise DataError(f"{where}, study {study_ids[i]}, column {TARGETS[j]}: {err}") from None
    return study_ids, labels.reshape(len(study_ids), N_CONDITIONS, N_LEVELS)


def read_labels(path: str | Path) -> dict[int, np.ndarray]:
    """``train.csv`` -> {study_id: int64 [5, 5]} with -1 for blanks."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labels file {path} does not exist")
    ids, labels = labels_array(pd.read_csv(path, dtype={t: object for t in TARGETS}), str(path))
    return {sid: lab.astype(np.int64) for sid, lab in zip(ids, labels)}


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
