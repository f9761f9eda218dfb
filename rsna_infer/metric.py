"""Kaggle's ``rsna-lumbar-metric``, reimplemented in numpy so that it is exact, fast and torch-free.

The score users pick models by must be the score Kaggle gives, so this module mirrors the
host's metric step by step (docs/foundation.md):

1. rows of solution and submission are aligned on ``row_id`` (their order never matters);
2. for each condition group (spinal; left+right foraminal pooled; left+right subarticular
   pooled) the sample-weighted log loss ``Σ wᵢ·(−log p̂ᵢ,true) / Σ wᵢ``, with sample weights
   1/2/4 for a true Normal/Mild / Moderate / Severe;
3. ``any_severe_spinal``, per study: label = any spinal level Severe, weight = the largest
   sample weight of its spinal rows, prediction = the largest submitted ``severe`` over its
   levels (as submitted, not renormalised); a weighted binary log loss;
4. the average of the four losses, the last one weighted by ``any_severe_scalar`` (1.0 on Kaggle).

How predictions enter the log loss follows ``sklearn.metrics.log_loss`` as Kaggle ran it in
2024 (scikit-learn 1.2–1.4): values are clipped to ``[ε, 1−ε]`` (ε = float64 machine epsilon)
and **each row is then divided by its sum**. scikit-learn ≥ 1.5 stopped renormalising (it
only warns); ``renormalize=False`` gives that behaviour. Both agree to ~1e-15 on rows that sum
to 1, which is what a submission must hold anyway. For the binary any_severe loss the 1.2–1.4
order is kept too: clip the severe probability first, then build ``[1−p, p]``.

Unscored rows: a solution row whose ``sample_weight`` is 0 (a blank in train.csv) is dropped
before anything is computed, including the any_severe maximum over levels. The result equals
Kaggle's metric on the labelled rows alone. The submission must still hold those rows (its
row set must equal the solution's), so a full 25-row-per-study submission scores as is.

Two departures, where Kaggle's code would crash rather than score: a set of studies with no
(or only) severe spinal label gets the binary loss computed directly (scikit-learn refuses to
infer two classes from one), and a group with no scored rows is an error that names the group.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .constants import (
    CLASS_WEIGHTS,
    CLASSES,
    CONDITION_GROUP_INDEX,
    CONDITIONS,
    GROUPS,
    N_CLASSES,
    N_CONDITIONS,
    N_LEVELS,
    ROW_ID_PATTERN,
    study_row_ids,
)
from .io.labels import DataError, labels_array
from .validate import examples

#: Clip bound of the log loss: float64 machine epsilon, as scikit-learn's ``eps="auto"``.
EPS: float = float(np.finfo(np.float64).eps)
#: Names of the four component losses, in the order Kaggle averages them.
COMPONENTS: tuple[str, ...] = (*GROUPS, "any_severe_spinal")
#: Columns of a solution frame besides the row id.
SOLUTION_COLUMNS: tuple[str, ...] = (*CLASSES, "sample_weight")

_SPINAL_INDEX = CONDITIONS.index("spinal_canal_stenosis")


class ScoringError(ValueError):
    """A solution or submission that cannot be scored; the message says what to fix."""


# --------------------------------------------------------------------------------------------
# public API


def score(
    solution: pd.DataFrame,
    submission: pd.DataFrame,
    row_id_column_name: str = "row_id",
    any_severe_scalar: float = 1.0,
) -> float:
    """Kaggle's rsna-lumbar-metric: the weighted mean of the four component log losses.

    ``solution`` has columns ``row_id, normal_mild, moderate, severe, sample_weight`` (one-hot
    truth; see :func:`labels_to_solution`); ``submission`` has ``row_id, normal_mild,
    moderate, severe``. Neither frame is modified. Raises :class:`ScoringError` on bad input.
    """
    return score_components(solution, submission, row_id_column_name, any_severe_scalar)["total"]


def score_components(
    solution: pd.DataFrame,
    submission: pd.DataFrame,
    row_id_column_name: str = "row_id",
    any_severe_scalar: float = 1.0,
    *,
    renormalize: bool = True,
) -> dict[str, float]:
    """The four component losses (``spinal``, ``foraminal``, ``subarticular``,
    ``any_severe_spinal``) and their weighted mean ``total``.

    ``renormalize=False`` skips the per-row division by the sum (scikit-learn ≥ 1.5 semantics);
    the default reproduces the scikit-learn Kaggle scored with.
    """
    truth = _read_solution(solution, row_id_column_name)
    pred = _align_submission(submission, truth.row_ids, row_id_column_name)
    keep = truth.weight > 0
    return _components(
        onehot=truth.onehot[keep],
        weight=truth.weight[keep],
        condition=truth.condition[keep],
        study=truth.study[keep],
        pred=pred[keep],
        any_severe_scalar=any_severe_scalar,
        renormalize=renormalize,
    )


def score_arrays(
    labels: np.ndarray,
    probs: np.ndarray,
    any_severe_scalar: float = 1.0,
    *,
    renormalize: bool = True,
) -> dict[str, float]:
    """:func:`score_components` on arrays, for training loops and blend fitting.

    ``labels``: int [N, 5, 5] class indices in canonical (condition, level) order, -1 where
    unlabelled; ``probs``: [N, 5, 5, 3] probabilities for the same N studies. Sample weights
    are 1/2/4 by true class.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.ndim != 3 or labels.shape[1:] != (N_CONDITIONS, N_LEVELS):
        raise ScoringError(f"labels must have shape [N, {N_CONDITIONS}, {N_LEVELS}], got {labels.shape}")
    if probs.shape != (*labels.shape, N_CLASSES):
        raise ScoringError(f"probs must have shape {(*labels.shape, N_CLASSES)}, got {probs.shape}")
    if not np.isin(labels, (-1, 0, 1, 2)).all():
        raise ScoringError("labels must be class indices 0, 1, 2 or -1 (unlabelled)")
    if not np.isfinite(probs).all():
        raise ScoringError("probs must be finite")
    if (probs < 0).any():
        raise ScoringError("probs must be >= 0")
    n = labels.shape[0]
    condition = np.broadcast_to(np.arange(N_CONDITIONS)[None, :, None], labels.shape).reshape(-1)
    study = np.broadcast_to(np.arange(n)[:, None, None], labels.shape).reshape(-1)
    cls = labels.reshape(-1).astype(np.int64)
    keep = cls >= 0
    onehot = np.eye(N_CLASSES)[cls[keep]]
    weight = np.asarray(CLASS_WEIGHTS, dtype=np.float64)[cls[keep]]
    return _components(
        onehot=onehot,
        weight=weight,
        condition=condition[keep],
        study=study[keep],
        pred=probs.reshape(-1, N_CLASSES)[keep],
        any_severe_scalar=any_severe_scalar,
        renormalize=renormalize,
    )


def labels_to_array(train_df: pd.DataFrame) -> tuple[list[int], np.ndarray]:
    """``(study_ids, labels)`` from a train.csv-style table: ``labels`` is int8 [N, 5, 5] in
    canonical order, -1 where the label is blank (unscored); `rsna_infer.io.labels.labels_array`
    with its errors as `ScoringError`."""
    try:
        return labels_array(train_df)
    except DataError as err:
        raise ScoringError(str(err)) from None


def labels_to_solution(train_df: pd.DataFrame, study_ids: Iterable[int] | None = None) -> pd.DataFrame:
    """Solution frame (``row_id, normal_mild, moderate, severe, sample_weight``) from a
    train.csv-style table (``study_id`` + 25 label columns of strings; blank = unlabelled).

    Every study gets its 25 rows in canonical order. An unlabelled row is kept with an
    all-zero one-hot and ``sample_weight`` 0, so that a complete submission has exactly the
    solution's row set; :func:`score` leaves such rows out. ``study_ids`` restricts the frame
    to those studies (each must be in the table).
    """
    ids, labels = labels_to_array(train_df)
    if study_ids is not None:
        wanted = [int(s) for s in study_ids]
        index = {s: i for i, s in enumerate(ids)}
        absent = [s for s in wanted if s not in index]
        if absent:
            raise ScoringError(f"{len(absent)} study id(s) not in the label table: {examples(absent)}")
        labels = labels[[index[s] for s in wanted]]
        ids = wanted
    cls = labels.reshape(-1).astype(np.int64)
    onehot = np.zeros((cls.size, N_CLASSES), dtype=np.float64)
    scored = cls >= 0
    onehot[np.flatnonzero(scored), cls[scored]] = 1.0
    weight = np.where(scored, np.asarray(CLASS_WEIGHTS, dtype=np.float64)[np.clip(cls, 0, None)], 0.0)
    frame = pd.DataFrame(onehot, columns=list(CLASSES))
    frame.insert(0, "row_id", [rid for s in ids for rid in study_row_ids(s)])
    frame["sample_weight"] = weight
    return frame


# --------------------------------------------------------------------------------------------
# the computation


def _weighted_log_loss(onehot: np.ndarray, pred: np.ndarray, weight: np.ndarray, renormalize: bool) -> float:
    """scikit-learn's multi-class log loss: clip, (renormalise), weighted mean of −log p̂_true."""
    p = np.clip(pred, EPS, 1.0 - EPS)
    if renormalize:
        p = p / p.sum(axis=1)[:, None]
    loss = -(onehot * np.log(p)).sum(axis=1)
    return float(np.average(loss, weights=weight))


def _binary_log_loss(label: np.ndarray, prob: np.ndarray, weight: np.ndarray, renormalize: bool) -> float:
    """scikit-learn's binary log loss on the positive-class probability, in its 1.2–1.4 order
    (clip p, build [1−p, p], renormalise) or its ≥ 1.5 order (build, then clip both columns)."""
    if renormalize:
        q = np.clip(prob, EPS, 1.0 - EPS)
        p = np.stack([1.0 - q, q], axis=1)
        p = p / p.sum(axis=1)[:, None]
    else:
        p = np.clip(np.stack([1.0 - prob, prob], axis=1), EPS, 1.0 - EPS)
    onehot = np.stack([1.0 - label, label], axis=1)
    loss = -(onehot * np.log(p)).sum(axis=1)
    return float(np.average(loss, weights=weight))


def _components(
    onehot: np.ndarray,
    weight: np.ndarray,
    condition: np.ndarray,
    study: np.ndarray,
    pred: np.ndarray,
    any_severe_scalar: float,
    renormalize: bool,
) -> dict[str, float]:
    """The four losses over scored rows only (flat arrays, one entry per row)."""
    if not np.isfinite(any_severe_scalar) or any_severe_scalar < 0:
        raise ScoringError(f"any_severe_scalar must be finite and >= 0, got {any_severe_scalar}")
    group = np.asarray(CONDITION_GROUP_INDEX)[condition]
    out: dict[str, float] = {}
    for g, name in enumerate(GROUPS):
        rows = group == g
        if not rows.any():
            raise ScoringError(f"no scored rows in the {name} group; the metric needs all three groups")
        out[name] = _weighted_log_loss(onehot[rows], pred[rows], weight[rows], renormalize)

    spinal = condition == _SPINAL_INDEX
    studies, inverse = np.unique(study[spinal], return_inverse=True)
    label = np.zeros(len(studies))
    top_weight = np.zeros(len(studies))
    top_severe = np.full(len(studies), -np.inf)
    np.maximum.at(label, inverse, onehot[spinal, 2])
    np.maximum.at(top_weight, inverse, weight[spinal])
    np.maximum.at(top_severe, inverse, pred[spinal, 2])
    out["any_severe_spinal"] = _binary_log_loss(label, top_severe, top_weight, renormalize)

    losses = [out[c] for c in COMPONENTS]
    out["total"] = float(np.average(losses, weights=[1.0, 1.0, 1.0, float(any_severe_scalar)]))
    return out


# --------------------------------------------------------------------------------------------
# input checks


@dataclass(frozen=True)
class _Truth:
    """A checked solution as flat arrays, one entry per row, sorted by row id."""

    row_ids: np.ndarray
    onehot: np.ndarray  # [N, 3] 0/1
    weight: np.ndarray  # [N]; 0 = unscored
    study: np.ndarray  # [N] study id
    condition: np.ndarray  # [N] index into CONDITIONS


def _numeric_columns(frame: pd.DataFrame, columns: Sequence[str], ids: pd.Series, what: str) -> np.ndarray:
    """The columns as float64 [N, len(columns)], or an error naming a non-numeric column and rows."""
    out = np.empty((len(frame), len(columns)), dtype=np.float64)
    for j, col in enumerate(columns):
        values = frame[col]
        if pd.api.types.is_bool_dtype(values):
            raise ScoringError(f"{what}: column {col!r} must be numeric, got booleans")
        if not pd.api.types.is_numeric_dtype(values):
            parsed = pd.to_numeric(values, errors="coerce")
            bad = ids[parsed.isna() & values.notna()].tolist()
            if bad:
                raise ScoringError(f"{what}: column {col!r} must be numeric; non-numeric values at rows {examples(bad)}")
            values = parsed
        out[:, j] = values.to_numpy(dtype=np.float64, na_value=np.nan)
    return out


def _row_id_series(frame: pd.DataFrame, row_id_column_name: str, what: str) -> pd.Series:
    if not isinstance(frame, pd.DataFrame):
        raise ScoringError(f"{what} must be a pandas DataFrame, got {type(frame).__name__}")
    if row_id_column_name not in frame.columns:
        raise ScoringError(f"{what} has no {row_id_column_name!r} column; columns are {list(frame.columns)}")
    ids = frame[row_id_column_name].astype(str).reset_index(drop=True)
    dup = ids[ids.duplicated()].unique().tolist()
    if dup:
        raise ScoringError(f"{what} has {len(dup)} duplicated row id(s): {examples(dup)}")
    return ids


def _read_solution(solution: pd.DataFrame, row_id_column_name: str) -> _Truth:
    ids = _row_id_series(solution, row_id_column_name, "solution")
    missing = [c for c in SOLUTION_COLUMNS if c not in solution.columns]
    if missing:
        raise ScoringError(f"solution lacks column(s) {missing}; expected {row_id_column_name}, {', '.join(SOLUTION_COLUMNS)}")
    frame = solution.reset_index(drop=True)
    values = _numeric_columns(frame, SOLUTION_COLUMNS, ids, "solution")
    onehot, weight = values[:, :N_CLASSES], values[:, N_CLASSES]
    if not np.isfinite(values).all():
        raise ScoringError(f"solution has non-finite values at rows {examples(ids[~np.isfinite(values).all(axis=1)].tolist())}")
    if (weight < 0).any():
        raise ScoringError(f"solution has negative sample weights at rows {examples(ids[weight < 0].tolist())}")
    if not np.isin(onehot, (0.0, 1.0)).all():
        bad = ids[~np.isin(onehot, (0.0, 1.0)).all(axis=1)].tolist()
        raise ScoringError(f"solution class columns must be one-hot 0/1; other values at rows {examples(bad)}")
    bad_scored = (weight > 0) & (onehot.sum(axis=1) != 1)
    if bad_scored.any():
        raise ScoringError(
            f"solution rows with sample_weight > 0 need exactly one true class; rows {examples(ids[bad_scored].tolist())}"
        )
    parts = ids.str.extract(ROW_ID_PATTERN)
    malformed = ids[parts[0].isna()].tolist()
    if malformed:
        raise ScoringError(f"solution has malformed row ids {examples(malformed)}; expected '{{study_id}}_{{condition}}_{{level}}'")
    order = np.argsort(ids.to_numpy(), kind="stable")
    study = parts[0].astype(np.int64).to_numpy()
    condition = parts[1].map({c: i for i, c in enumerate(CONDITIONS)}).to_numpy(dtype=np.int64)
    return _Truth(ids.to_numpy()[order], onehot[order], weight[order], study[order], condition[order])


def _align_submission(submission: pd.DataFrame, row_ids: np.ndarray, row_id_column_name: str) -> np.ndarray:
    """Checked submission probabilities [N, 3], in the order of ``row_ids``."""
    ids = _row_id_series(submission, row_id_column_name, "submission")
    missing_cols = [c for c in CLASSES if c not in submission.columns]
    extra_cols = [c for c in submission.columns if c not in (*CLASSES, row_id_column_name)]
    if missing_cols or extra_cols:
        raise ScoringError(
            f"submission columns must be exactly {row_id_column_name}, {', '.join(CLASSES)}; "
            + (f"missing {missing_cols}" if missing_cols else "")
            + ("; " if missing_cols and extra_cols else "")
            + (f"unexpected {extra_cols}" if extra_cols else "")
        )
    frame = submission.reset_index(drop=True)
    values = _numeric_columns(frame, CLASSES, ids, "submission")
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        raise ScoringError(f"submission values must be finite; NaN or inf at {int((~finite).sum())} row(s): {examples(ids[~finite].tolist())}")
    negative = (values < 0).any(axis=1)
    if negative.any():
        raise ScoringError(f"submission values must be >= 0; negative at {int(negative.sum())} row(s): {examples(ids[negative].tolist())}")
    position = pd.Series(np.arange(len(ids)), index=ids.to_numpy())
    wanted = pd.Index(row_ids)
    absent = wanted.difference(position.index)
    extra = position.index.difference(wanted)
    if len(absent) or len(extra):
        parts = []
        if len(absent):
            parts.append(f"{len(absent)} solution row(s) missing from the submission: {examples(sorted(absent))}")
        if len(extra):
            parts.append(f"{len(extra)} submission row(s) not in the solution: {examples(sorted(extra))}")
        raise ScoringError("submission rows must be exactly the solution's rows; " + "; ".join(parts))
    return values[position.loc[wanted].to_numpy()]


def submission_studies(submission: pd.DataFrame) -> list[int]:
    """Study ids named by a submission's row ids, in first-seen order (``rsna-infer score`` scores those)."""
    if "row_id" not in submission.columns:
        raise ScoringError(f"submission has no 'row_id' column; columns are {list(submission.columns)}")
    parts = submission["row_id"].astype(str).str.extract(ROW_ID_PATTERN)
    bad = submission["row_id"][parts[0].isna()].astype(str).tolist()
    if bad:
        raise ScoringError(f"submission has malformed row ids {examples(bad)}; expected '{{study_id}}_{{condition}}_{{level}}'")
    return list(dict.fromkeys(int(s) for s in parts[0]))
