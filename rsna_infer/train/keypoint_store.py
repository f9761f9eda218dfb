"""Keypoint sets of many studies in one ``.npz`` (out-of-fold stage-1 predictions).

Stage-2 models train on crops from *predicted* keypoints when asked (``keypoints:
"predicted"``), so that they learn the errors they will see at test time. Those predictions
must be out-of-fold: each stage-1 fold run writes the keypoints it decoded for its own
validation studies, and a stage-2 run loads the files of all folds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..keypoints import KeypointSet, StudyKeypoints
from ..output import atomic_write

_FIELDS = ("world", "voxel", "series_id", "stack_index", "confidence")


def save_keypoints(path: str | Path, keypoints: dict[int, StudyKeypoints], split: str = "") -> Path:
    """Write every set of every study; sets missing for a study are stored as empty.
    ``split``: id of the fold split the predicting models were trained on (checked by the
    stage-2 runs that read the file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = sorted(int(s) for s in keypoints)
    kinds: dict[str, str] = {}
    for kp in keypoints.values():
        for key, s in kp.sets.items():
            kinds.setdefault(key, s.kind)
    arrays: dict[str, np.ndarray] = {"study_ids": np.asarray(ids, np.int64)}
    for key, kind in kinds.items():
        sets = [keypoints[s].sets.get(key) or KeypointSet.empty(kind, key) for s in ids]
        for f in _FIELDS:
            arrays[f"{key}/{f}"] = np.stack([getattr(s, f) for s in sets]) if sets else np.zeros((0,))
        arrays[f"{key}/origin"] = np.stack([s.origin.astype(str) for s in sets]) if sets else np.zeros((0,), str)
    arrays["meta"] = np.frombuffer(json.dumps({"kinds": kinds, "split": split}).encode(), dtype=np.uint8)
    return atomic_write(path, lambda fh: np.savez_compressed(fh, **arrays), binary=True)


def load_keypoints(*paths: str | Path) -> dict[int, StudyKeypoints]:
    """Read and merge files: per study, the union of their sets (a later file's set of the
    same key replaces an earlier one's for that study)."""
    out: dict[int, StudyKeypoints] = {}
    for path in paths:
        with np.load(path, allow_pickle=False) as z:
            kinds = json.loads(bytes(z["meta"]).decode())["kinds"]
            ids = z["study_ids"].tolist()
            data = {k: {f: z[f"{k}/{f}"] for f in _FIELDS} for k in kinds}
            origins = {k: z[f"{k}/origin"] if f"{k}/origin" in z.files else None for k in kinds}  # older files: none
        for i, sid in enumerate(ids):
            kp = out.setdefault(int(sid), StudyKeypoints(int(sid)))
            for key, kind in kinds.items():
                s = KeypointSet(kind, source=key, **{f: data[key][f][i] for f in _FIELDS})
                if origins[key] is not None:
                    s = KeypointSet.from_points(kind, s.world, s.voxel, s.series_id, s.stack_index, s.confidence,
                                                origins[key][i].astype(object))
                if s.valid.any():
                    kp.sets[key] = s
    return out


def keypoints_split(path: str | Path) -> str:
    """The fold split id recorded in a keypoints file ("" when unrecorded)."""
    with np.load(path, allow_pickle=False) as z:
        return str(json.loads(bytes(z["meta"]).decode()).get("split", ""))
