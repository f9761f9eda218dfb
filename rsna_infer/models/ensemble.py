"""The stage-2 blend: a weighted mean of member logits per condition group, softmax last.

Blending logits (not probabilities) is what the blend weights were fitted for (DESIGN §5).
A member that has no input for a study (its mask is False there, or its logits are not
finite) drops out of that study's target and the remaining weights are renormalised; a
target no member covers gets the class priors. Pure numpy, so the trainer's fit-blend and
the predictor share exactly this code.

What is blended is, per member, `StudyLogitMean`: a study's samples (one per axial stack, per
side...) averaged per target under their masks. Training validation computes the
out-of-fold logits the blend is fitted on with it, and the predictor the logits the blend
is applied to, so the two cannot drift.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..constants import CONDITION_GROUP_INDEX, GROUPS, N_CLASSES, N_CONDITIONS, N_LEVELS
from ..specs import ModelEntry


def member_weights(entries: Sequence[ModelEntry]) -> np.ndarray:
    """[M, 3] blend weights per condition group (`GROUPS` order).

    An entry without ``blend`` weighs 1.0 in every group; an entry with ``blend`` weighs 0.0
    in the groups it does not list.
    """
    w = np.zeros((len(entries), len(GROUPS)), dtype=np.float64)
    for i, e in enumerate(entries):
        w[i] = [float(e.blend.get(g, 0.0)) for g in GROUPS] if e.blend else 1.0
    return w


def _expand(weights: np.ndarray) -> np.ndarray:
    """[M, 3] group weights -> [M, 5] condition weights."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != len(GROUPS):
        raise ValueError(f"weights must be [M, {len(GROUPS)}] (groups {GROUPS}), got {weights.shape}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("blend weights must be finite and >= 0")
    return weights[:, list(CONDITION_GROUP_INDEX)]


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = logits - np.max(logits, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def _effective(logits: np.ndarray, masks: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-(member, study, condition, level) weight after masks and non-finite outputs."""
    logits = np.asarray(logits, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    m = logits.shape[0]
    if logits.ndim != 5 or logits.shape[2:] != (N_CONDITIONS, N_LEVELS, N_CLASSES):
        raise ValueError(f"logits must be [M, S, 5, 5, 3], got {logits.shape}")
    if masks.shape != logits.shape[:4]:
        raise ValueError(f"masks must be [M, S, 5, 5] = {logits.shape[:4]}, got {masks.shape}")
    wc = _expand(weights)
    if wc.shape[0] != m:
        raise ValueError(f"{m} members' logits but {wc.shape[0]} rows of weights")
    usable = masks & np.all(np.isfinite(logits), axis=-1)
    eff = usable * wc[:, None, :, None]  # [M, S, 5, 5]
    return eff, np.where(usable[..., None], logits, 0.0)


def blend_coverage(logits: np.ndarray, masks: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[S, 5, 5] bool: targets with at least one usable member of positive weight."""
    eff, _ = _effective(logits, masks, weights)
    return eff.sum(0) > 0


def blend_logits(
    logits: np.ndarray,
    masks: np.ndarray,
    weights: np.ndarray,
    priors: np.ndarray | None = None,
) -> np.ndarray:
    """Blend member logits into probabilities.

    ``logits`` [M, S, 5, 5, 3] (members, studies, conditions, levels, classes), ``masks``
    [M, S, 5, 5] (member predicts that target for that study), ``weights`` [M, 3] per
    condition group. Returns probabilities [S, 5, 5, 3]; targets no usable member covers get
    ``priors`` ([5, 5, 3]; uniform when None).
    """
    eff, clean = _effective(logits, masks, weights)
    total = eff.sum(0)  # [S, 5, 5]
    covered = total > 0
    mean = (eff[..., None] * clean).sum(0) / np.where(covered, total, 1.0)[..., None]
    probs = softmax(mean)
    fallback = np.full((N_CONDITIONS, N_LEVELS, N_CLASSES), 1.0 / N_CLASSES) if priors is None else np.asarray(priors, np.float64)
    if fallback.shape != (N_CONDITIONS, N_LEVELS, N_CLASSES):
        raise ValueError(f"priors must be [5, 5, 3], got {fallback.shape}")
    return np.where(covered[..., None], probs, fallback[None])


class StudyLogitMean:
    """Per study, the mean of its samples' logits over the targets each sample predicts.

    ``add(study_id, logits [5, 5, 3], mask [5, 5] or None)``: a sample counts for the targets
    of its mask (None: all) where its logits are finite; `result` gives the mean per study
    and target, and where no sample counted, 0 with a False mask. Sums in float64, in the
    order the samples are added.
    """

    def __init__(self, study_ids: Sequence[int]) -> None:
        self.study_ids = [int(s) for s in study_ids]
        self._index = {s: i for i, s in enumerate(self.study_ids)}
        self._sum = np.zeros((len(self.study_ids), N_CONDITIONS, N_LEVELS, N_CLASSES))
        self._count = np.zeros((len(self.study_ids), N_CONDITIONS, N_LEVELS))

    def add(self, study_id: int, logits: np.ndarray, mask: np.ndarray | None = None) -> None:
        i = self._index[int(study_id)]
        m = np.ones((N_CONDITIONS, N_LEVELS), bool) if mask is None else np.asarray(mask, bool)
        m = m & np.all(np.isfinite(logits), axis=-1)
        self._sum[i][m] += np.asarray(logits, np.float64)[m]
        self._count[i][m] += 1

    def result(self, dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray]:
        """(logits [S, 5, 5, 3] in ``dtype``, mask bool [S, 5, 5]), studies in the given order."""
        mask = self._count > 0
        logits = self._sum / np.maximum(self._count, 1)[..., None]
        return logits.astype(dtype, copy=False), mask
