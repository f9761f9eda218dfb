"""Study-level K-fold split, stratified on how diseased a study is, deterministic for a seed.

Every model of an ensemble must see the same split, or the out-of-fold predictions that the
blend is fitted on leak (stage-2 validation would see keypoints from stage-1 models trained
on those very studies). So the split is written once (``rsna-infer folds --data ROOT --out
folds.csv``) and passed to every run (``--folds``). Each run records the split's identity,
`split_id` (a hash of its ``study_id,fold`` rows), in its manifest, out-of-fold files and
run record; ``--oof-keypoints``, stage-2 training, ``--merge`` and ``fit-blend`` refuse
inputs from different splits (`check_same_split`) with a message that names both.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..output import atomic_write

logger = logging.getLogger(__name__)


class SplitError(ValueError):
    """Inputs come from different fold splits; the message names both."""


def split_id(folds: pd.DataFrame) -> str:
    """Identity of a split: sha256 (16 hex digits) of its ``study_id,fold`` rows sorted by study."""
    rows = folds[["study_id", "fold"]].astype(np.int64).sort_values("study_id")
    text = "".join(f"{s},{f}\n" for s, f in rows.itertuples(index=False))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same_split(items: list[tuple[str, str]], what: str = "inputs") -> str:
    """The one split of ``items`` (``(split id, where it comes from)``; empty ids are
    unrecorded and skipped). Raises `SplitError` naming two inputs that disagree."""
    known = [(s, where) for s, where in items if s]
    for s, where in known[1:]:
        if s != known[0][0]:
            raise SplitError(
                f"{what} come from different fold splits: {known[0][0]} ({known[0][1]}) vs {s} ({where}); "
                "train every model of the ensemble with one --folds FOLDS.csv (rsna-infer folds)")
    return known[0][0] if known else ""


def stratum(labels: np.ndarray) -> int:
    """Stratum of one study from its [5, 5] labels (-1 blank): any severe -> 3, else by the
    number of moderate-or-worse targets (0, 1-2, >= 3)."""
    labels = np.asarray(labels)
    if (labels == 2).any():
        return 3
    n = int((labels >= 1).sum())
    return 0 if n == 0 else (1 if n <= 2 else 2)


def make_folds(study_ids: list[int] | np.ndarray, labels: np.ndarray | None, n_folds: int, seed: int = 0) -> pd.DataFrame:
    """``study_id, fold`` for every study: within each stratum the studies are shuffled with
    ``seed`` and dealt round-robin, starting where the previous stratum stopped, so fold sizes
    differ by at most one and every fold gets its share of every stratum."""
    ids = np.asarray([int(s) for s in study_ids], dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ValueError("study ids must be unique")
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if len(ids) < n_folds:
        raise ValueError(f"{len(ids)} studies cannot fill {n_folds} folds")
    strata = np.zeros(len(ids), np.int64) if labels is None else np.array([stratum(lb) for lb in labels])
    order = np.argsort(ids, kind="stable")  # the input order never matters
    rng = np.random.default_rng(seed)
    fold = np.full(len(ids), -1, np.int64)
    start = 0
    for s in sorted(set(strata.tolist())):
        members = order[strata[order] == s]
        members = members[rng.permutation(len(members))]
        fold[members] = (start + np.arange(len(members))) % n_folds
        start = (start + len(members)) % n_folds
    return pd.DataFrame({"study_id": ids, "fold": fold}).sort_values("study_id").reset_index(drop=True)


def save_folds(folds: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: folds[["study_id", "fold"]].to_csv(fh, index=False))
    return path


def load_folds(path: str | Path, study_ids: list[int] | None = None) -> pd.DataFrame:
    """Read a ``folds.csv``; with ``study_ids``, check that it covers every one of them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"folds file {path} does not exist")
    df = pd.read_csv(path)
    if list(df.columns[:2]) != ["study_id", "fold"]:
        raise SplitError(f"{path}: expected columns study_id,fold, got {list(df.columns)}")
    df = df[["study_id", "fold"]].astype({"study_id": np.int64, "fold": np.int64})
    if df["study_id"].duplicated().any():
        raise SplitError(f"{path}: duplicate study ids")
    if study_ids is not None:
        missing = sorted(set(int(s) for s in study_ids) - set(df["study_id"].tolist()))
        if missing:
            raise SplitError(f"{path} has no fold for {len(missing)} studies, e.g. {missing[:5]} "
                             "(write the split from this data: rsna-infer folds)")
    return df


def split(folds: pd.DataFrame, fold: int) -> tuple[list[int], list[int]]:
    """(train ids, validation ids) of ``fold``; fold -1 trains on everything, validates on nothing."""
    ids = folds["study_id"].astype(np.int64)
    if fold < 0:
        return sorted(ids.tolist()), []
    known = sorted(set(folds["fold"].tolist()))
    if fold not in known:
        raise ValueError(f"fold {fold} is not in the split (folds {known})")
    val = folds["fold"] == fold
    return sorted(ids[~val].tolist()), sorted(ids[val].tolist())
