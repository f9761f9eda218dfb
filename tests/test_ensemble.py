import numpy as np
import pytest

from rsna_infer.constants import CONDITION_GROUP_INDEX
from rsna_infer.models.ensemble import blend_coverage, blend_logits, member_weights, softmax
from rsna_infer.specs import ModelEntry


def _entry(name, blend):
    return ModelEntry.from_dict({"name": name, "family": "roi", "variant": "spinal", "arch": "a",
                                 "input": {"size": [8, 8]}, "file": "f", "blend": blend})


def _reference(logits, masks, weights, priors):
    """Per-target loop: weighted mean of the available members' logits, softmax, else priors."""
    m, s = logits.shape[:2]
    out = np.empty((s, 5, 5, 3))
    for j in range(s):
        for c in range(5):
            for lv in range(5):
                w = np.array([weights[i, CONDITION_GROUP_INDEX[c]] * masks[i, j, c, lv] for i in range(m)], float)
                if w.sum() == 0:
                    out[j, c, lv] = priors[c, lv]
                    continue
                z = (w[:, None] * logits[:, j, c, lv]).sum(0) / w.sum()
                e = np.exp(z - z.max())
                out[j, c, lv] = e / e.sum()
    return out


def test_blend_matches_a_per_target_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 3, 5, 5, 3)) * 3
    masks = rng.random((4, 3, 5, 5)) > 0.4
    weights = rng.random((4, 3)) * np.array([[1, 1, 0]] * 2 + [[1, 1, 1]] * 2)
    priors = np.tile([0.6, 0.3, 0.1], (5, 5, 1))
    got = blend_logits(logits, masks, weights, priors)
    np.testing.assert_allclose(got, _reference(logits, masks, weights, priors), atol=1e-12)
    np.testing.assert_allclose(got.sum(-1), 1.0)


def test_a_member_without_input_drops_out_and_weights_renormalise():
    logits = np.zeros((2, 1, 5, 5, 3))
    logits[0, ..., 0] = 5.0  # member 0 says class 0
    logits[1, ..., 2] = 5.0  # member 1 says class 2
    masks = np.ones((2, 1, 5, 5), bool)
    masks[1, 0, 0] = False  # member 1 has no spinal input for this study
    p = blend_logits(logits, masks, np.array([[1.0] * 3, [3.0] * 3]))
    np.testing.assert_allclose(p[0, 0], softmax(np.array([5.0, 0, 0]))[None].repeat(5, 0))
    z = (1 * np.array([5.0, 0, 0]) + 3 * np.array([0, 0, 5.0])) / 4
    np.testing.assert_allclose(p[0, 1, 0], softmax(z))


def test_uncovered_targets_get_priors_and_nonfinite_logits_are_ignored():
    logits = np.zeros((1, 2, 5, 5, 3))
    logits[0, 1, 2, 3] = np.nan
    masks = np.ones((1, 2, 5, 5), bool)
    masks[0, 0, 4] = False
    priors = np.tile([0.7, 0.2, 0.1], (5, 5, 1))
    p = blend_logits(logits, masks, np.ones((1, 3)), priors)
    np.testing.assert_allclose(p[0, 4], priors[4])
    np.testing.assert_allclose(p[1, 2, 3], priors[2, 3])
    np.testing.assert_allclose(p[1, 0, 0], [1 / 3] * 3)
    cov = blend_coverage(logits, masks, np.ones((1, 3)))
    assert not cov[0, 4].any() and not cov[1, 2, 3] and cov[1, 2, 2]
    assert np.isfinite(p).all()


def test_zero_weight_in_a_group_means_no_vote_there():
    logits = np.zeros((2, 1, 5, 5, 3))
    logits[1, ..., 2] = 9.0
    w = np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # member 1 votes for spinal only
    p = blend_logits(logits, np.ones((2, 1, 5, 5), bool), w)
    np.testing.assert_allclose(p[0, 1:], 1 / 3)
    assert p[0, 0, 0, 2] > 0.9


def test_extreme_logits_stay_finite():
    logits = np.full((1, 1, 5, 5, 3), -1e4)
    logits[..., 1] = 1e4
    p = blend_logits(logits, np.ones((1, 1, 5, 5), bool), np.ones((1, 3)))
    assert np.isfinite(p).all() and np.allclose(p[..., 1], 1.0)


def test_member_weights_default_and_missing_groups():
    w = member_weights([_entry("a", {}), _entry("b", {"spinal": 0.5})])
    np.testing.assert_array_equal(w, [[1, 1, 1], [0.5, 0, 0]])


@pytest.mark.parametrize(
    "kw, match",
    [({"weights": np.ones((2, 3))}, "members"), ({"weights": np.ones((1, 2))}, r"\[M, 3\]"),
     ({"weights": -np.ones((1, 3))}, ">= 0"), ({"masks": np.ones((1, 1, 5), bool)}, "masks")],
)
def test_shape_errors_say_what_is_wrong(kw, match):
    args = {"logits": np.zeros((1, 1, 5, 5, 3)), "masks": np.ones((1, 1, 5, 5), bool), "weights": np.ones((1, 3))}
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        blend_logits(**args)


def test_study_logit_mean_averages_samples_under_their_masks():
    """The one masked per-study mean (prediction and training validation): a sample counts
    where its mask is set and its logits are finite; targets no sample covers are masked."""
    from rsna_infer.models.ensemble import StudyLogitMean
    from rsna_infer.train.evaluate import LogitAccumulator

    rng = np.random.default_rng(0)
    a, b, c = (rng.normal(size=(5, 5, 3)).astype(np.float32) for _ in range(3))
    c[1, 2, 0] = np.nan
    left = np.zeros((5, 5), bool)
    left[:, :2] = True
    acc = StudyLogitMean([7, 3])
    train = LogitAccumulator([7, 3])
    for m in (acc, train):
        m.add(3, a, None)
        m.add(3, b, left)
        m.add(7, c, None)
    logits, mask = acc.result()
    assert logits.dtype == np.float64 and mask[1].all()
    np.testing.assert_allclose(logits[1][:, :2], (a[:, :2].astype(np.float64) + b[:, :2]) / 2)
    np.testing.assert_array_equal(logits[1][:, 2:], a[:, 2:])
    assert not mask[0, 1, 2] and mask[0].sum() == 24 and np.all(logits[0, 1, 2] == 0)
    t_logits, t_mask = train.result()
    assert t_logits.dtype == np.float32
    np.testing.assert_array_equal(t_mask, mask)
    np.testing.assert_array_equal(t_logits, logits.astype(np.float32))  # the same mean, stored in float32
