"""Percentiles by one-rank-at-a-time selection equal numpy's (linear method)."""

import numpy as np
import pytest

from rsna_infer.quantiles import MAX_VALUES, percentiles, subsample


@pytest.mark.parametrize("kind", ["gamma", "ties", "mostly_zero", "float64", "tiny"])
def test_percentiles_equal_numpy(kind):
    rng = np.random.default_rng(3)
    n = {"tiny": 7}.get(kind, 250_001)
    x = {
        "gamma": lambda: rng.gamma(2.0, 200.0, n).astype(np.float32),
        "ties": lambda: np.round(rng.normal(100, 30, n)).astype(np.float32),
        "mostly_zero": lambda: np.where(rng.random(n) < 0.02, rng.random(n), 0.0).astype(np.float32),
        "float64": lambda: rng.normal(0, 1, n),
        "tiny": lambda: rng.random(n).astype(np.float32),
    }[kind]()
    qs = [0.0, 1.0, 37.3, 50.0, 99.5, 100.0]
    np.testing.assert_allclose(percentiles(x, qs), np.percentile(x, qs), rtol=1e-12, atol=0)


def test_nan_gives_nan_and_subsample_bounds_the_work():
    x = np.arange(3 * MAX_VALUES, dtype=np.float32)
    assert subsample(x).size <= MAX_VALUES + 1
    x[5] = np.nan
    assert all(np.isnan(percentiles(x, [1.0, 99.5])))
