"""Keypoints as data: what stage 1 produces and stage 2 consumes.

A `KeypointSet` holds one family's points of one kind for a study. Point layout by kind:

- ``spinal``: 5 points, index = level (canal centre at each disc, on Sagittal T2/STIR).
- ``foraminal``: 10 points, index = side * 5 + level, left side first (on Sagittal T1).
- ``subarticular``: 10 points, index = side * 5 + level, left side first (on Axial T2).

Every point carries its patient coordinate (``world``, mm) *and* its voxel coordinate in its
own volume (``series_id``/``stack_index``), plus a confidence in [0, 1]; confidence 0 marks a
missing point. Sets are never mutated after creation: merging returns a new set.

Provenance is per point: ``origin[i]`` names the set point ``i`` came from (``"sag3d_t2"``; a
point refined by a second model names both, ``"axial_level+axial_xy"``; ``""`` where missing),
and a set's ``source`` names the sets its valid points came from, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .constants import N_LEVELS, SIDES

POINT_KINDS: dict[str, int] = {"spinal": N_LEVELS, "foraminal": 2 * N_LEVELS, "subarticular": 2 * N_LEVELS}
#: Sets whose points' slice is a rule, not a model's output (sag-2d: the stack's middle, or
#: a fixed distance from it): graders may crop a window of slices around such points.
RULE_SLICE_SETS: tuple[str, ...] = ("sag2d_t2", "sag2d_t1")


def slice_source(origin: str) -> str:
    """The set that placed a point's slice: the first name of its origin (a refined point's
    origin names the slice's set first, e.g. ``"sag3d_t2+sag2d_t2"``)."""
    return str(origin).split("+")[0]


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
    origin: np.ndarray | None = None  # str [N]: the set each point came from ("" where missing); default ``source``

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
        origin = np.full(n, self.source, dtype=object) if self.origin is None else np.array(self.origin, dtype=object)
        if origin.shape != (n,):
            raise ValueError(f"KeypointSet[{self.kind}].origin must have shape {(n,)}, got {origin.shape}")
        origin = np.where(self.valid, origin, "").astype(object)
        origin.setflags(write=False)
        object.__setattr__(self, "origin", origin)

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
        """Per point, keep whichever of ``self``/``other`` is valid and more confident (ties: ``self``)."""
        if other.kind != self.kind:
            raise ValueError(f"cannot merge {self.kind} with {other.kind}")
        take = other.valid & (~self.valid | (other.confidence > self.confidence))
        return self.take_points(take, other)

    def take_points(self, mask: np.ndarray, other: "KeypointSet") -> "KeypointSet":
        """Copy with the points under ``mask`` (all their fields and origins) taken from ``other``."""
        mask = np.asarray(mask, dtype=bool)
        pick = lambda a, b: np.where(mask[:, None] if a.ndim == 2 else mask, b, a)  # noqa: E731
        return KeypointSet.from_points(
            self.kind, pick(self.world, other.world), pick(self.voxel, other.voxel), pick(self.series_id, other.series_id),
            pick(self.stack_index, other.stack_index), pick(self.confidence, other.confidence), pick(self.origin, other.origin))

    @classmethod
    def from_points(cls, kind: str, world: np.ndarray, voxel: np.ndarray, series_id: np.ndarray, stack_index: np.ndarray,
                    confidence: np.ndarray, origin: np.ndarray) -> "KeypointSet":
        """A set whose ``source`` is derived from its points' origins."""
        out = cls(kind, world, voxel, series_id, stack_index, confidence, "", origin)
        return replace(out, source=out.sources_of_points())

    def sources_of_points(self) -> str:
        """``"+"``-joined distinct sets the valid points came from, in point order."""
        names: dict[str, None] = {}
        for o in self.origin[self.valid]:
            for part in str(o).split("+"):
                if part:
                    names.setdefault(part, None)
        return "+".join(names)

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
        from .constants import LEVEL_TO_COORD_LEVEL, LEVELS

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
        """One set of ``kind``, point by point: the first set in ``prefer`` order that has the
        point; where none of them has it, the most confident point of any other set of ``kind``.
        A ground-truth set (``truth_<kind>``, present only in training) comes before everything.
        The result's ``origin`` names each point's set. None when no set of that kind exists."""
        truth = [truth_key(kind)] if truth_key(kind) in self.sets else []
        ordered = truth + [k for k in prefer if k in self.sets and self.sets[k].kind == kind and k not in truth]
        others = [k for k, s in self.sets.items() if s.kind == kind and k not in ordered and not k.startswith("truth_")]
        out: KeypointSet | None = None
        for k in ordered:  # earlier keys win where valid; later ones only fill gaps
            s = self.sets[k]
            out = s if out is None else out.take_points(~out.valid & s.valid, s)
        fill: KeypointSet | None = None
        for k in others:  # the rest compete by confidence
            fill = self.sets[k] if fill is None else fill.merge_most_confident(self.sets[k])
        if fill is not None:
            out = fill if out is None else out.take_points(~out.valid & fill.valid, fill)
        return out
