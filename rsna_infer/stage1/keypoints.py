"""Keypoints as data: what stage 1 produces and stage 2 consumes.

A `KeypointSet` holds one family's points of one kind for a study. Point layout by kind:

- ``spinal``: 5 points, index = level (canal centre at each disc, on Sagittal T2/STIR).
- ``foraminal``: 10 points, index = side * 5 + level, left side first (on Sagittal T1).
- ``subarticular``: 10 points, index = side * 5 + level, left side first (on Axial T2).

Every point carries its patient coordinate (``world``, mm) *and* its voxel coordinate in its
own volume (``series_id``/``stack_index``), plus a confidence in [0, 1]; confidence 0 marks a
missing point. Sets are never mutated after creation: merging returns a new set.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..constants import N_LEVELS, SIDES

POINT_KINDS: dict[str, int] = {"spinal": N_LEVELS, "foraminal": 2 * N_LEVELS, "subarticular": 2 * N_LEVELS}


def point_index(kind: str, level: int, side: int | None = None) -> int:
    """Index of (side, level) in a set of ``kind`` (side 0 = left, 1 = right)."""
    if kind == "spinal":
        return level
    if side not in (0, 1):
        raise ValueError(f"{kind} points need side 0 (left) or 1 (right), got {side}")
    return side * N_LEVELS + level


def truth_key(kind: str) -> str:
    """Key of the ground-truth set of ``kind`` in a training `StudyKeypoints`."""
    return f"truth_{kind}"


@dataclass(frozen=True)
class KeypointSet:
    kind: str
    world: np.ndarray  # float64 [N, 3] patient mm; NaN where missing
    voxel: np.ndarray  # float64 [N, 3] (z, y, x) in the point's own volume; NaN where missing
    series_id: np.ndarray  # int64 [N]; -1 where missing
    stack_index: np.ndarray  # int64 [N]
    confidence: np.ndarray  # float64 [N] in [0, 1]; 0 where missing
    source: str = ""

    def __post_init__(self) -> None:
        n = POINT_KINDS.get(self.kind)
        if n is None:
            raise ValueError(f"unknown keypoint kind {self.kind!r}; expected one of {list(POINT_KINDS)}")
        for name, shape in (("world", (n, 3)), ("voxel", (n, 3)), ("series_id", (n,)), ("stack_index", (n,)), ("confidence", (n,))):
            arr = np.array(getattr(self, name), dtype=np.int64 if name in ("series_id", "stack_index") else np.float64)
            if arr.shape != shape:
                raise ValueError(f"KeypointSet[{self.kind}].{name} must have shape {shape}, got {arr.shape}")
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @classmethod
    def empty(cls, kind: str, source: str = "") -> "KeypointSet":
        n = POINT_KINDS[kind]
        nan = np.full((n, 3), np.nan)
        return cls(kind, nan, nan, np.full(n, -1), np.zeros(n, np.int64), np.zeros(n), source)

    @property
    def valid(self) -> np.ndarray:
        """Boolean [N]: the point exists (confidence > 0 and finite coordinates)."""
        return (self.confidence > 0) & np.all(np.isfinite(self.world), axis=1) & (self.series_id >= 0)

    def __len__(self) -> int:
        return POINT_KINDS[self.kind]

    def merge_most_confident(self, other: "KeypointSet") -> "KeypointSet":
        """Per point, keep whichever of ``self``/``other`` is valid and more confident."""
        if other.kind != self.kind:
            raise ValueError(f"cannot merge {self.kind} with {other.kind}")
        take = other.valid & (~self.valid | (other.confidence > self.confidence))
        pick = lambda a, b: np.where(take[:, None] if a.ndim == 2 else take, b, a)  # noqa: E731
        sources = {s for s in (self.source, other.source) if s}
        return KeypointSet(
            self.kind,
            pick(self.world, other.world),
            pick(self.voxel, other.voxel),
            pick(self.series_id, other.series_id),
            pick(self.stack_index, other.stack_index),
            pick(self.confidence, other.confidence),
            "+".join(sorted(sources)),
        )

    def with_points(self, mask: np.ndarray, **fields: np.ndarray) -> "KeypointSet":
        """Copy with the points under ``mask`` replaced by ``fields`` (full-length arrays)."""
        mask = np.asarray(mask, dtype=bool)
        new = {}
        for name, values in fields.items():
            cur = getattr(self, name)
            m = mask[:, None] if cur.ndim == 2 else mask
            new[name] = np.where(m, np.asarray(values, dtype=cur.dtype), cur)
        return replace(self, **new)

    def describe(self, i: int) -> str:
        """Human name of point ``i`` for logs, e.g. ``'foraminal left L4/L5'``."""
        from ..constants import LEVEL_TO_COORD_LEVEL, LEVELS

        if self.kind == "spinal":
            return f"spinal {LEVEL_TO_COORD_LEVEL[LEVELS[i]]}"
        return f"{self.kind} {SIDES[i // N_LEVELS]} {LEVEL_TO_COORD_LEVEL[LEVELS[i % N_LEVELS]]}"


@dataclass
class StudyKeypoints:
    """All keypoint sets of one study, keyed by their source (e.g. ``"sag3d_t2"``,
    ``"axial_level"``, ``"truth_spinal"``), plus the cross-view report."""

    study_id: int
    sets: dict[str, KeypointSet] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str) -> KeypointSet | None:
        return self.sets.get(key)

    def best(self, kind: str, prefer: tuple[str, ...] = ()) -> KeypointSet | None:
        """Per point, the first valid one in ``prefer`` order, then any other set of ``kind``
        by confidence. A ground-truth set (``truth_<kind>``, present only in training) comes
        before everything. None when no set of that kind exists."""
        keys = [truth_key(kind)] if truth_key(kind) in self.sets else []
        keys += [k for k in prefer if k in self.sets and self.sets[k].kind == kind and k not in keys]
        keys += [k for k, s in self.sets.items() if s.kind == kind and k not in keys and not k.startswith("truth_")]
        out: KeypointSet | None = None
        for k in keys:
            s = self.sets[k]
            if out is None:
                out = s
            else:  # earlier keys win where valid; later ones only fill gaps
                out = out.merge_most_confident(s.with_points(out.valid, confidence=np.zeros(len(s))))
        return out
