import numpy as np
import pandas as pd
import pytest

from rsna_infer.train.folds import load_folds, make_folds, save_folds, split, stratum


def _labels(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.choice([-1, 0, 1, 2], size=(n, 5, 5), p=[0.05, 0.75, 0.15, 0.05])


def test_stratum_orders_disease_burden():
    z = np.zeros((5, 5), int)
    assert stratum(z) == 0
    z[0, 0] = 1
    assert stratum(z) == 1
    z[1:4, 1] = 1
    assert stratum(z) == 2
    z[4, 4] = 2
    assert stratum(z) == 3
    assert stratum(np.full((5, 5), -1)) == 0


def test_folds_are_study_level_balanced_and_deterministic():
    ids = list(range(1000, 1103))
    labels = _labels(len(ids))
    a = make_folds(ids, labels, 5, seed=7)
    b = make_folds(list(reversed(ids)), labels[::-1], 5, seed=7)
    pd.testing.assert_frame_equal(a, b)  # input order does not matter
    assert sorted(a["study_id"]) == ids and a["study_id"].is_unique  # every study exactly once
    sizes = a["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 1
    strata = pd.Series([stratum(lb) for lb in labels], index=ids)
    for s, members in strata.groupby(strata):
        counts = a.set_index("study_id").loc[members.index, "fold"].value_counts().reindex(range(5), fill_value=0)
        assert counts.max() - counts.min() <= 1, f"stratum {s} unevenly split"
    c = make_folds(ids, labels, 5, seed=8)
    assert not c["fold"].equals(a["fold"])


def test_split_partitions_and_all():
    folds = make_folds(range(20), None, 4, seed=0)
    seen = set()
    for k in range(4):
        tr, va = split(folds, k)
        assert not set(tr) & set(va) and set(tr) | set(va) == set(range(20))
        seen |= set(va)
    assert seen == set(range(20))
    tr, va = split(folds, -1)
    assert tr == list(range(20)) and va == []
    with pytest.raises(ValueError, match="fold 9"):
        split(folds, 9)


def test_save_load_round_trip_and_checks(tmp_path):
    folds = make_folds(range(10), None, 2)
    p = save_folds(folds, tmp_path / "folds.csv")
    pd.testing.assert_frame_equal(load_folds(p, list(range(10))), folds)
    with pytest.raises(ValueError, match="no fold for 1 studies"):
        load_folds(p, list(range(11)))
    with pytest.raises(ValueError):
        make_folds([1, 1, 2], None, 2)
    with pytest.raises(ValueError, match="cannot fill"):
        make_folds([1, 2], None, 3)
