"""Which studies deserve a look first: the QA ranking.

A study's `StudyScore` orders it first by how badly the run went for it (the *tier*), then by
how unsure the models were (*uncertainty*), then by its number of warnings:

==== ============ =========================================================================
tier name         when
==== ============ =========================================================================
3    ``fallback`` no model predicted any of its 25 targets (unreadable study, failed chunk,
                  deadline skip, or no keypoints/series to grade): all rows are priors
2    ``errors``   an exception was recorded for it (a prepare/run/decode/finalize step)
1    ``partial``  some targets fell back to priors, or a fallback was recorded
0    ``ok``       every target came from the models
==== ============ =========================================================================

``uncertainty = (1 - keypoint confidence + predictive entropy) / 2``, both in [0, 1]:
keypoint confidence is the mean confidence of the 25 merged best keypoints (5 spinal, 10
foraminal, 10 subarticular; a missing point counts 0), predictive entropy the mean entropy of
the blended class distributions of the targets the models predicted, divided by ln 3 (1 =
uniform). A study without predictions has uncertainty 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..constants import N_CLASSES, N_CONDITIONS, N_LEVELS
from ..stage1.assemble import preferred_best

if TYPE_CHECKING:
    from ..inference.report import StudyRecord
    from ..keypoints import StudyKeypoints

TIER_NAMES: dict[int, str] = {3: "fallback", 2: "errors", 1: "partial", 0: "ok"}
KINDS: tuple[str, ...] = ("spinal", "foraminal", "subarticular")
N_POINTS = 25


@dataclass(frozen=True)
class StudyScore:
    """A study's place in the QA ranking; larger `key` = look at it first."""

    study_id: int
    tier: int
    uncertainty: float
    keypoint_confidence: float | None  # None: no keypoints were made
    entropy: float | None  # None: no target was predicted
    n_warnings: int = 0
    captured: bool = True  # False: scored from the report alone (the study never reached the models)

    @property
    def key(self) -> tuple[int, float, int, int]:
        """Sort key, worst first when sorted descending (ties: the lower study id first)."""
        return (self.tier, round(self.uncertainty, 9), self.n_warnings, -self.study_id)

    @property
    def reason(self) -> str:
        """One line for the index page: ``'partial; keypoint conf 0.52, entropy 0.71'``."""
        parts = [TIER_NAMES[self.tier]]
        if self.keypoint_confidence is not None:
            parts.append(f"keypoint conf {self.keypoint_confidence:.2f}")
        if self.entropy is not None:
            parts.append(f"entropy {self.entropy:.2f}")
        if self.n_warnings:
            parts.append(f"{self.n_warnings} warning(s)")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"study_id": self.study_id, "tier": TIER_NAMES[self.tier], "uncertainty": round(self.uncertainty, 4),
                "keypoint_confidence": None if self.keypoint_confidence is None else round(self.keypoint_confidence, 4),
                "entropy": None if self.entropy is None else round(self.entropy, 4), "n_warnings": self.n_warnings}


def keypoint_confidence(kp: "StudyKeypoints | None") -> float | None:
    """Mean confidence of the 25 best points (missing = 0); None without any keypoint set."""
    if kp is None or not kp.sets:
        return None
    total = 0.0
    for kind in KINDS:
        best = preferred_best(kp, kind)
        if best is not None:
            total += float(np.where(best.valid, best.confidence, 0.0).sum())
    return total / N_POINTS


def predictive_entropy(probs: np.ndarray | None, coverage: np.ndarray | None) -> float | None:
    """Mean normalised entropy (0 = certain, 1 = uniform) over the predicted targets."""
    if probs is None:
        return None
    p = np.asarray(probs, dtype=np.float64).reshape(N_CONDITIONS, N_LEVELS, N_CLASSES)
    cov = np.ones((N_CONDITIONS, N_LEVELS), bool) if coverage is None else np.asarray(coverage, bool)
    if not cov.any():
        return None
    q = np.clip(p[cov], 1e-12, 1.0)
    h = -(q * np.log(q)).sum(-1) / np.log(N_CLASSES)
    return float(np.clip(h.mean(), 0.0, 1.0))


def _uncertainty(conf: float | None, entropy: float | None) -> float:
    return 0.5 * (1.0 - (conf or 0.0)) + 0.5 * (1.0 if entropy is None else entropy)


def score_chunk_study(
    record: "StudyRecord",
    probs: np.ndarray | None,
    coverage: np.ndarray | None,
    keypoints: "StudyKeypoints | None",
) -> StudyScore:
    """Score of a study right after its chunk's blend (before the prior fill of `predict`)."""
    covered = 0 if probs is None else int(np.asarray(coverage, bool).sum()) if coverage is not None else N_POINTS
    if probs is None or covered == 0 or record.status in ("fallback", "skipped"):
        tier = 3
    elif record.errors:
        tier = 2
    elif covered < N_POINTS or record.fallbacks:
        tier = 1
    else:
        tier = 0
    conf = keypoint_confidence(keypoints)
    ent = predictive_entropy(probs, coverage)
    return StudyScore(int(record.study_id), tier, _uncertainty(conf, ent), conf, ent, len(record.warnings))


def score_record(record: dict[str, Any]) -> StudyScore:
    """Score of a study from its ``run_report.json`` entry alone (no probabilities kept): used
    for studies that never reached a chunk's end (deadline skips, failed chunks)."""
    status = record.get("status", "fallback")
    prior = int(record.get("prior_targets", N_POINTS))
    if status in ("fallback", "skipped") or prior >= N_POINTS:
        tier = 3
    elif record.get("errors"):
        tier = 2
    elif prior > 0 or record.get("fallbacks"):
        tier = 1
    else:
        tier = 0
    return StudyScore(int(record["study_id"]), tier, 1.0, None, None, len(record.get("warnings", [])), captured=False)
