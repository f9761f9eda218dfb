"""Validation measures: the competition metric for grading models (on logits that cover only
some targets) and keypoint errors in mm for keypoint models."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..constants import GROUPS, N_CONDITIONS, N_LEVELS
from ..keypoints import POINT_KINDS, KeypointSet, StudyKeypoints, truth_key
from ..models.ensemble import StudyLogitMean, blend_logits
from ..stage1.assemble import preferred_best

if TYPE_CHECKING:
    from ..io.volume import Study


def covered_groups(mask: np.ndarray) -> list[str]:
    """Condition groups in which ``mask`` ([S, 5, 5] or [5, 5]) predicts anything."""
    from ..constants import CONDITION_GROUP_INDEX

    m = np.asarray(mask, bool).reshape(-1, N_CONDITIONS, N_LEVELS).any(axis=(0, 2))
    return [g for gi, g in enumerate(GROUPS) if any(m[c] for c in range(N_CONDITIONS) if CONDITION_GROUP_INDEX[c] == gi)]


def score_logits(logits: np.ndarray, mask: np.ndarray, labels: np.ndarray, priors: np.ndarray) -> dict[str, float]:
    """The metric's components for one model's logits [S, 5, 5, 3] where ``mask`` [S, 5, 5],
    priors elsewhere (so a spinal-only model scores its spinal group against priors in the
    others). Adds ``covered``: the mean loss over the groups the model predicts."""
    from ..metric import score_arrays

    probs = blend_logits(np.asarray(logits)[None], np.asarray(mask)[None], np.ones((1, len(GROUPS))), priors)
    out = score_arrays(labels, probs)
    groups = covered_groups(mask)
    out["covered"] = float(np.mean([out[g] for g in groups])) if groups else float("nan")
    return out


class LogitAccumulator(StudyLogitMean):
    """The per-study masked logit mean of `rsna_infer.models.ensemble.StudyLogitMean` (the
    one the predictor blends), kept in float32 as the out-of-fold files store it."""

    def result(self, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(logits float32 [S, 5, 5, 3], mask bool [S, 5, 5])."""
        return super().result(dtype)


def keypoint_errors(pred: StudyKeypoints, truth: StudyKeypoints, study: "Study | None" = None) -> dict[str, np.ndarray]:
    """Distance (mm) from each predicted point to its ground truth, per kind: for every kind
    that ``pred`` holds a set of, the merged best prediction vs ``truth_<kind>``. NaN where
    the point is not labelled, +inf where it is labelled but was not predicted.

    With ``study``, also ``z_<kind>``: the distance along the normal of the stack the point
    was predicted in (the through-plane part, what a slice-picking model gets right or not).
    """
    out: dict[str, np.ndarray] = {}
    for kind in POINT_KINDS:
        p = preferred_best(pred, kind)
        t: KeypointSet | None = truth.get(truth_key(kind))
        if p is None or t is None:
            continue
        diff = p.world - t.world
        out[kind] = np.where(t.valid, np.where(p.valid, np.linalg.norm(diff, axis=1), np.inf), np.nan)
        if study is not None:
            z = np.full(len(p), np.inf)
            for i in np.flatnonzero(p.valid):
                vol = study.find(int(p.series_id[i]), int(p.stack_index[i]))
                z[i] = abs(float(diff[i] @ vol.normal)) if vol is not None else np.inf
            out[f"z_{kind}"] = np.where(t.valid, z, np.nan)
    return out


def summarise_errors(errors: dict[int, dict[str, np.ndarray]]) -> dict[str, float]:
    """Mean error (mm) per kind (``err_mm_<kind>``) and over every point (``err_mm``), and
    ``coverage``: the fraction of labelled points that got a prediction. Through-plane errors
    (``z_<kind>`` entries) give ``err_z_mm_<kind>`` and ``err_z_mm``."""
    by_kind: dict[str, list[np.ndarray]] = {}
    for per_study in errors.values():
        for kind, e in per_study.items():
            by_kind.setdefault(kind, []).append(e)
    out: dict[str, float] = {}
    found: dict[str, list[np.ndarray]] = {"": [], "z_": []}
    labelled = 0
    for kind, arrs in by_kind.items():
        e = np.concatenate(arrs)
        ok = e[np.isfinite(e)]
        z = kind.startswith("z_")
        name = f"err_z_mm_{kind[2:]}" if z else f"err_mm_{kind}"
        out[name] = float(ok.mean()) if ok.size else float("nan")
        found["z_" if z else ""].append(ok)
        if not z:
            labelled += int((~np.isnan(e)).sum())
    for prefix, name in (("", "err_mm"), ("z_", "err_z_mm")):
        if found[prefix]:
            cat = np.concatenate(found[prefix])
            out[name] = float(cat.mean()) if cat.size else float("nan")
            if not prefix:
                out["coverage"] = float(cat.size / labelled) if labelled else float("nan")
    return out
