"""Severity of the 25 targets of one phantom study, drawn from realistic priors.

Grades come from a latent Gaussian model thresholded per (condition, level): the marginal
class frequencies match the priors below exactly, while a shared study factor, a per-level
factor (smooth across neighbouring levels) and a per-(group, level) side factor make
neighbouring levels and the two sides of one level degenerate together, as in real spines.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

from ..constants import CONDITION_GROUP, CONDITIONS, GROUPS, N_CONDITIONS, N_LEVELS

#: Prior (Normal/Mild, Moderate, Severe) per condition group and level (L1/L2 .. L5/S1).
#: Lower lumbar levels degenerate more; overall about 74 / 19 / 7 %.
GRADE_PRIORS: dict[str, np.ndarray] = {
    "spinal": np.array(
        [[0.92, 0.05, 0.03], [0.86, 0.09, 0.05], [0.78, 0.13, 0.09], [0.64, 0.21, 0.15], [0.92, 0.06, 0.02]]
    ),
    "foraminal": np.array(
        [[0.93, 0.06, 0.01], [0.86, 0.12, 0.02], [0.74, 0.21, 0.05], [0.56, 0.34, 0.10], [0.55, 0.33, 0.12]]
    ),
    "subarticular": np.array(
        [[0.88, 0.09, 0.03], [0.78, 0.17, 0.05], [0.66, 0.25, 0.09], [0.48, 0.33, 0.19], [0.76, 0.18, 0.06]]
    ),
}

# Loadings of the latent factors (their squares sum to < 1; the rest is independent noise).
_STUDY_LOADING = 0.45
_LEVEL_LOADING = 0.50
_SIDE_LOADING = 0.45
_LEVEL_RHO = 0.5  # AR(1) correlation of the level factor between neighbouring levels


def _thresholds() -> np.ndarray:
    """[N_CONDITIONS, N_LEVELS, 2] latent cut points for Moderate and Severe."""
    inv = NormalDist().inv_cdf
    out = np.empty((N_CONDITIONS, N_LEVELS, 2))
    for c, cond in enumerate(CONDITIONS):
        prior = GRADE_PRIORS[CONDITION_GROUP[cond]]
        for lv in range(N_LEVELS):
            p0, p1, _ = prior[lv] / prior[lv].sum()
            out[c, lv] = inv(p0), inv(min(p0 + p1, 1 - 1e-9))
    return out


_CUTS = _thresholds()


def sample_grades(rng: np.random.Generator) -> np.ndarray:
    """[5 conditions, 5 levels] int grades (0 Normal/Mild, 1 Moderate, 2 Severe), canonical order."""
    study = rng.standard_normal()
    level = np.empty(N_LEVELS)
    level[0] = rng.standard_normal()
    for lv in range(1, N_LEVELS):
        level[lv] = _LEVEL_RHO * level[lv - 1] + np.sqrt(1 - _LEVEL_RHO**2) * rng.standard_normal()
    side = {g: rng.standard_normal(N_LEVELS) for g in GROUPS}
    noise_sd = np.sqrt(1 - _STUDY_LOADING**2 - _LEVEL_LOADING**2 - _SIDE_LOADING**2)
    latent = np.empty((N_CONDITIONS, N_LEVELS))
    for c, cond in enumerate(CONDITIONS):
        g = CONDITION_GROUP[cond]
        latent[c] = (
            _STUDY_LOADING * study
            + _LEVEL_LOADING * level
            + _SIDE_LOADING * side[g]
            + noise_sd * rng.standard_normal(N_LEVELS)
        )
    return (latent > _CUTS[..., 0]).astype(np.int64) + (latent > _CUTS[..., 1]).astype(np.int64)


def narrowing_factor(grade: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Continuous size factor of a structure for each grade (1 = full size).

    The ranges overlap a little between studies (anatomy varies too) but not within a
    grade boundary, so the grade is readable from the image relative to the neighbours.
    """
    grade = np.asarray(grade)
    lo = np.choose(grade, [0.80, 0.46, 0.16])
    hi = np.choose(grade, [1.05, 0.62, 0.32])
    return lo + (hi - lo) * rng.random(grade.shape)
