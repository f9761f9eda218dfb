"""The submission contract: 25 rows for every study, rows that sum to 1, written atomically.

One crash, missing row or NaN at the end of a long Kaggle run fails the whole submission, so
building the frame never raises on bad predictions: a study without predictions, a target its
mask marks invalid, or a row that is non-finite, negative or all zero is filled from a
fallback (class priors) and logged. Validation then checks the finished frame against the
study list, and the CSV is written to a temporary file and renamed, so that an interrupted
run never leaves a half-written ``submission.csv`` behind.

Fallback priors. A constant prediction ``p`` costs a group's weighted log loss least when
``p_k ∝ w_k·f_k`` (class frequency ``f_k`` times metric weight 1/2/4), not at the plain
frequencies. :data:`DEFAULT_PRIORS` applies that to :data:`DEFAULT_CLASS_FREQUENCIES`, the
approximate class shares of the competition's train.csv per condition group (rounded; a
manifest may carry exact per-target priors fitted with :func:`priors_from_labels`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .constants import (
    CLASS_WEIGHTS,
    CLASSES,
    CONDITION_GROUP,
    CONDITIONS,
    LEVELS,
    N_CLASSES,
    N_CONDITIONS,
    N_LEVELS,
    TARGETS,
    parse_row_id,
    study_row_ids,
)
from .validate import examples

logger = logging.getLogger(__name__)

#: Submission columns, in order.
COLUMNS: tuple[str, ...] = ("row_id", *CLASSES)
#: Tolerance on the row sums of a written submission.
SUM_TOLERANCE: float = 1e-6

#: Approximate class shares (Normal/Mild, Moderate, Severe) of the competition's train.csv
#: per condition group, rounded to two digits. Used only when no fitted priors are given.
DEFAULT_CLASS_FREQUENCIES: dict[str, tuple[float, float, float]] = {
    "spinal": (0.87, 0.07, 0.06),
    "foraminal": (0.71, 0.23, 0.06),
    "subarticular": (0.68, 0.21, 0.11),
}


class SubmissionError(ValueError):
    """A submission (or fallback prior) that breaks the contract; the message says what."""


def metric_priors(frequencies: np.ndarray) -> np.ndarray:
    """The constant prediction with the least weighted log loss: ``p_k ∝ w_k·f_k`` along the
    last axis (``w`` = 1/2/4). ``frequencies`` [..., 3] need not be normalised."""
    f = np.asarray(frequencies, dtype=np.float64)
    weighted = f * np.asarray(CLASS_WEIGHTS, dtype=np.float64)
    return weighted / weighted.sum(axis=-1, keepdims=True)


#: Default fallback [5 conditions, 3 classes]: metric-optimal constants from
#: :data:`DEFAULT_CLASS_FREQUENCIES`.
DEFAULT_PRIORS: np.ndarray = metric_priors(np.array([DEFAULT_CLASS_FREQUENCIES[CONDITION_GROUP[c]] for c in CONDITIONS]))
DEFAULT_PRIORS.setflags(write=False)


def priors_from_labels(labels: np.ndarray, weighted: bool = True, smoothing: float = 1.0) -> np.ndarray:
    """Per-target fallback priors [5, 5, 3] fitted on training labels.

    ``labels``: int [N, 5, 5] class indices, -1 unlabelled (see
    :func:`rsna_infer.metric.labels_to_array`). Counts get ``smoothing`` added per class so no
    class is ever 0; ``weighted=True`` returns the metric-optimal constants
    (:func:`metric_priors`), ``False`` the plain frequencies.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.shape[1:] != (N_CONDITIONS, N_LEVELS):
        raise SubmissionError(f"labels must have shape [N, {N_CONDITIONS}, {N_LEVELS}], got {labels.shape}")
    if smoothing < 0:
        raise SubmissionError(f"smoothing must be >= 0, got {smoothing}")
    counts = np.stack([(labels == k).sum(axis=0) for k in range(N_CLASSES)], axis=-1).astype(np.float64) + smoothing
    if (counts.sum(axis=-1) <= 0).any():
        raise SubmissionError("some targets have no labels; use smoothing > 0")
    return metric_priors(counts) if weighted else counts / counts.sum(axis=-1, keepdims=True)


def resolve_priors(
    priors: np.ndarray | Sequence[float] | None = None, name: str = "fallback priors", sum_tolerance: float | None = None
) -> np.ndarray:
    """Fallback priors as a [5, 5, 3] array with rows summing to 1 (the one reading of priors:
    the run's fallback and a manifest's ``priors``).

    Accepts ``None`` (:data:`DEFAULT_PRIORS`), [3] (every target), [5, 3] (per condition) or
    [5, 5, 3] (per target). Rows must be finite, non-negative and not all zero (with
    ``sum_tolerance``, also sum to 1 within it): a bad prior is a configuration error and fails
    here, before any study is processed. ``name`` starts the messages.
    """
    try:
        p = np.array(DEFAULT_PRIORS if priors is None else priors, dtype=np.float64)
    except (TypeError, ValueError):
        raise SubmissionError(f"{name} must be a [5 conditions][5 levels][3 classes] list of numbers") from None
    if p.shape == (N_CLASSES,):
        p = np.broadcast_to(p, (N_CONDITIONS, N_LEVELS, N_CLASSES))
    elif p.shape == (N_CONDITIONS, N_CLASSES):
        p = np.broadcast_to(p[:, None, :], (N_CONDITIONS, N_LEVELS, N_CLASSES))
    elif p.shape != (N_CONDITIONS, N_LEVELS, N_CLASSES):
        raise SubmissionError(
            f"{name} must have shape [3], [5, 3] or [5, 5, 3] (conditions {CONDITIONS} x levels x classes {CLASSES}), "
            f"got {list(p.shape)}"
        )
    if not np.isfinite(p).all() or (p < 0).any():
        raise SubmissionError(f"{name} must be finite and >= 0")
    sums = p.sum(axis=-1, keepdims=True)
    if (sums <= 0).any():
        raise SubmissionError(f"every row of {name} needs a positive entry")
    if sum_tolerance is not None and np.any(np.abs(sums - 1.0) > sum_tolerance):
        raise SubmissionError(f"{name}: each target's 3 class probabilities must sum to 1 "
                              f"(got sums from {sums.min():.4f} to {sums.max():.4f})")
    return np.ascontiguousarray(p / sums)


@dataclass
class Assembled:
    """A built submission and what had to be filled from the fallback.

    ``filled`` maps study id -> the targets (``{condition}_{level}``) taken from the priors;
    ``reasons`` maps study id -> why (one line per cause), for the run report.
    """

    frame: pd.DataFrame
    filled: dict[int, list[str]] = field(default_factory=dict)
    reasons: dict[int, list[str]] = field(default_factory=dict)


def _row_defects(p: np.ndarray) -> np.ndarray:
    """[5, 5] True where a probability row cannot be used (non-finite, negative, zero sum)."""
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(p).all(axis=-1) | (p < 0).any(axis=-1) | ~(p.sum(axis=-1) > 0)


def assemble_submission(
    probs: Mapping[int, np.ndarray],
    study_ids: Iterable[int] | None = None,
    masks: Mapping[int, np.ndarray] | None = None,
    priors: np.ndarray | Sequence[float] | None = None,
) -> Assembled:
    """Build the submission frame from per-study probabilities, filling gaps from ``priors``.

    ``probs``: study id -> [5, 5, 3] probabilities (condition, level, class; canonical order).
    ``study_ids``: the studies that must appear (e.g. :func:`read_study_ids` of the series
    CSV); default: the keys of ``probs``, sorted. ``masks``: study id -> [5, 5] bool, True
    where the prediction is valid. Rows are divided by their sum. Targets that are masked out,
    missing or unusable take the fallback; predictions for studies outside ``study_ids`` are
    dropped. Nothing here raises on bad predictions; each fill is logged and recorded.
    """
    fallback = resolve_priors(priors)
    given = {int(k): v for k, v in probs.items()}
    given_masks = {int(k): v for k, v in (masks or {}).items()}
    ids = sorted(given) if study_ids is None else [int(s) for s in study_ids]
    if len(set(ids)) != len(ids):
        raise SubmissionError("study ids must be unique")
    extra = sorted(set(given) - set(ids))
    if extra:
        logger.warning("dropping predictions for %d study id(s) not in the study list: %s", len(extra), extra[:5])

    out = np.empty((len(ids), N_CONDITIONS, N_LEVELS, N_CLASSES), dtype=np.float64)
    result = Assembled(frame=pd.DataFrame())
    for i, sid in enumerate(ids):
        use = np.zeros((N_CONDITIONS, N_LEVELS), dtype=bool)
        reasons: list[str] = []
        p = given.get(sid)
        if p is None:
            reasons.append("no predictions")
        else:
            p = np.asarray(p, dtype=np.float64)
            if p.shape != (N_CONDITIONS, N_LEVELS, N_CLASSES):
                reasons.append(f"prediction shape {list(p.shape)} is not [5, 5, 3]")
                p = None
        if p is not None:
            use[:] = True
            mask = given_masks.get(sid)
            if mask is not None:
                mask = np.asarray(mask, dtype=bool)
                if mask.shape != (N_CONDITIONS, N_LEVELS):
                    reasons.append(f"mask shape {list(mask.shape)} is not [5, 5]; ignoring every prediction")
                    use[:] = False
                else:
                    use &= mask
                    if (~mask).any():
                        reasons.append(f"{int((~mask).sum())} target(s) masked invalid")
            defects = _row_defects(p) & use
            if defects.any():
                reasons.append(f"{int(defects.sum())} row(s) non-finite, negative or all zero")
                use &= ~defects
        out[i] = fallback
        if use.any():
            rows = p[use]
            out[i][use] = rows / rows.sum(axis=-1, keepdims=True)
        if not use.all():
            result.filled[sid] = [TARGETS[k] for k in np.flatnonzero(~use.reshape(-1))]
            result.reasons[sid] = reasons
            logger.warning("study %d: %d target(s) from fallback priors (%s)", sid, int((~use).sum()), "; ".join(reasons))

    result.frame = _frame(ids, out)
    return result


def build_submission(
    probs: Mapping[int, np.ndarray],
    study_ids: Iterable[int] | None = None,
    masks: Mapping[int, np.ndarray] | None = None,
    priors: np.ndarray | Sequence[float] | None = None,
) -> pd.DataFrame:
    """The submission frame (``row_id, normal_mild, moderate, severe``); see :func:`assemble_submission`."""
    return assemble_submission(probs, study_ids, masks, priors).frame


def _frame(study_ids: Sequence[int], probs: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame(probs.reshape(-1, N_CLASSES), columns=list(CLASSES))
    frame.insert(0, "row_id", [rid for s in study_ids for rid in study_row_ids(s)])
    return frame


def validate_submission(frame: pd.DataFrame, study_ids: Iterable[int] | None = None, tolerance: float = SUM_TOLERANCE) -> None:
    """Raise :class:`SubmissionError` listing every way ``frame`` breaks the contract.

    Contract: columns exactly ``row_id, normal_mild, moderate, severe``; unique, well-formed
    row ids; with ``study_ids``, exactly their 25 rows each; values numeric, finite, >= 0;
    each row sums to 1 within ``tolerance``.
    """
    problems: list[str] = []
    if list(frame.columns) != list(COLUMNS):
        raise SubmissionError(f"submission columns must be {list(COLUMNS)}, got {list(frame.columns)}")
    ids = frame["row_id"].astype(str).reset_index(drop=True)
    dup = ids[ids.duplicated()].unique().tolist()
    if dup:
        problems.append(f"{len(dup)} duplicated row id(s): {examples(dup)}")
    malformed = []
    for rid in ids.unique():
        try:
            parse_row_id(rid)
        except ValueError:
            malformed.append(rid)
    if malformed:
        problems.append(f"{len(malformed)} malformed row id(s): {examples(malformed)}")
    if study_ids is not None:
        expected = [rid for s in study_ids for rid in study_row_ids(s)]
        have, wanted = set(ids), set(expected)
        missing = [rid for rid in expected if rid not in have]
        extra = [rid for rid in ids.unique() if rid not in wanted]
        if missing:
            problems.append(f"{len(missing)} missing row(s): {examples(missing)}")
        if extra:
            problems.append(f"{len(extra)} row(s) for no listed study: {examples(extra)}")
    values = frame[list(CLASSES)].reset_index(drop=True)
    numeric = all(pd.api.types.is_numeric_dtype(values[c]) and not pd.api.types.is_bool_dtype(values[c]) for c in CLASSES)
    if not numeric:
        bad = [c for c in CLASSES if not pd.api.types.is_numeric_dtype(values[c]) or pd.api.types.is_bool_dtype(values[c])]
        problems.append(f"non-numeric column(s) {bad}")
    else:
        v = values.to_numpy(dtype=np.float64, na_value=np.nan)
        finite = np.isfinite(v).all(axis=1)
        if not finite.all():
            problems.append(f"{int((~finite).sum())} row(s) with NaN or inf: {examples(ids[~finite].tolist())}")
        negative = (v < 0).any(axis=1) & finite
        if negative.any():
            problems.append(f"{int(negative.sum())} row(s) with negative values: {examples(ids[negative].tolist())}")
        off = finite & (np.abs(v.sum(axis=1) - 1.0) > tolerance)
        if off.any():
            worst = float(np.abs(v[off].sum(axis=1) - 1.0).max())
            problems.append(
                f"{int(off.sum())} row(s) do not sum to 1 within {tolerance:g} (worst off by {worst:.3g}): "
                f"{examples(ids[off].tolist())}"
            )
    if problems:
        raise SubmissionError("invalid submission: " + "; ".join(problems))


def write_submission(frame: pd.DataFrame, path: str | Path, study_ids: Iterable[int] | None = None) -> Path:
    """Validate ``frame`` and write it to ``path`` atomically (temporary file + rename).

    On a validation error nothing is written and an existing file at ``path`` is untouched.
    """
    from .output import atomic_write

    study_ids = None if study_ids is None else list(study_ids)
    validate_submission(frame, study_ids)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: frame.to_csv(fh, index=False))
    logger.info("wrote %s (%d rows)", path, len(frame))
    return path


def prior_submission(study_ids: Iterable[int], priors: np.ndarray | Sequence[float] | None = None) -> pd.DataFrame:
    """Every study's 25 rows from the fallback priors: the safety-net submission a run
    writes before any model runs (valid on its own, replaced by the real one)."""
    ids = [int(s) for s in study_ids]
    p = resolve_priors(priors)
    return _frame(ids, np.broadcast_to(p, (len(ids), *p.shape)))


def read_submission(path: str | Path) -> pd.DataFrame:
    """A submission CSV as a frame with string row ids."""
    return pd.read_csv(path, dtype={"row_id": str})


def submission_to_arrays(frame: pd.DataFrame) -> dict[int, np.ndarray]:
    """Inverse of :func:`build_submission`: study id -> [5, 5, 3] (NaN where a row is absent)."""
    out: dict[int, np.ndarray] = {}
    values = frame[list(CLASSES)].to_numpy(dtype=np.float64)
    cond_index = {c: i for i, c in enumerate(CONDITIONS)}
    level_index = {lv: i for i, lv in enumerate(LEVELS)}
    for rid, row in zip(frame["row_id"].astype(str), values):
        sid, cond, level = parse_row_id(rid)
        arr = out.setdefault(sid, np.full((N_CONDITIONS, N_LEVELS, N_CLASSES), np.nan))
        arr[cond_index[cond], level_index[level]] = row
    return out


def read_study_ids(series_csv: str | Path) -> list[int]:
    """Sorted unique study ids of a ``{split}_series_descriptions.csv``: the studies a
    submission must cover."""
    path = Path(series_csv)
    if not path.is_file():
        raise FileNotFoundError(f"series descriptions file {path} does not exist")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise SubmissionError(f"{path}: not a readable CSV ({type(err).__name__}: {err})") from None
    if "study_id" not in df.columns:
        raise SubmissionError(f"{path} has no study_id column; columns are {list(df.columns)}")
    try:
        return sorted({int(s) for s in df["study_id"].dropna()})
    except (TypeError, ValueError) as err:
        raise SubmissionError(f"{path}: study_id values must be integers ({err})") from None
