import numpy as np
import pytest

from rsna_infer.keypoints import KeypointSet, StudyKeypoints, point_index, truth_key


def _set(kind, conf, offset=0.0, source="a"):
    n = len(conf)
    world = np.arange(n * 3, dtype=float).reshape(n, 3) + offset
    return KeypointSet(kind, world, world[:, ::-1], np.full(n, 7), np.zeros(n, int), np.asarray(conf, float), source)


def test_point_index_layout():
    assert point_index("spinal", 3) == 3
    assert point_index("foraminal", 0, side=0) == 0
    assert point_index("subarticular", 4, side=1) == 9
    with pytest.raises(ValueError):
        point_index("foraminal", 1)


def test_shapes_are_checked_and_arrays_frozen():
    with pytest.raises(ValueError, match="shape"):
        KeypointSet("spinal", np.zeros((4, 3)), np.zeros((5, 3)), np.zeros(5), np.zeros(5), np.ones(5))
    s = _set("spinal", [1] * 5)
    with pytest.raises(ValueError):
        s.world[0, 0] = 3.0


def test_empty_set_is_all_invalid():
    e = KeypointSet.empty("foraminal")
    assert len(e) == 10 and not e.valid.any()


def test_merge_keeps_most_confident_valid_point():
    a = _set("spinal", [0.9, 0.1, 0.0, 0.5, 0.5], offset=0.0, source="a")
    b = _set("spinal", [0.2, 0.8, 0.3, 0.0, 0.6], offset=100.0, source="b")
    m = a.merge_most_confident(b)
    np.testing.assert_allclose(m.confidence, [0.9, 0.8, 0.3, 0.5, 0.6])
    assert m.world[0, 0] == a.world[0, 0] and m.world[1, 0] == b.world[1, 0] and m.world[4, 0] == b.world[4, 0]
    assert m.source == "a+b"
    assert m.origin.tolist() == ["a", "b", "b", "a", "b"]
    # a merge names only the sets its points came from
    only_b = a.merge_most_confident(_set("spinal", [1.0] * 5, source="b"))
    assert only_b.source == "b" and set(only_b.origin) == {"b"}
    # inputs untouched
    np.testing.assert_allclose(a.confidence, [0.9, 0.1, 0.0, 0.5, 0.5])


def test_best_prefers_order_then_fills_gaps_and_truth_first():
    kp = StudyKeypoints(1)
    kp.sets["low"] = _set("spinal", [0.9, 0.9, 0.9, 0.0, 0.0], offset=0.0)
    kp.sets["high"] = _set("spinal", [0.1, 0.1, 0.1, 0.1, 0.0], offset=100.0)
    best = kp.best("spinal", prefer=("high",))
    assert best.world[0, 0] == 100.0  # preferred set wins where valid, whatever the confidence
    assert best.valid.tolist() == [True, True, True, True, False]
    kp.sets[truth_key("spinal")] = _set("spinal", [1, 1, 1, 1, 1], offset=1000.0)
    assert kp.best("spinal", prefer=("high",)).world[0, 0] == 1000.0
    assert kp.best("foraminal") is None


def test_best_fills_gaps_by_confidence_and_names_each_points_origin():
    kp = StudyKeypoints(1)
    kp.sets["pref"] = _set("spinal", [0.5, 0.0, 0.0, 0.0, 0.0], offset=0.0, source="pref")
    kp.sets["weak"] = _set("spinal", [0.9, 0.2, 0.7, 0.0, 0.0], offset=100.0, source="weak")  # inserted first
    kp.sets["strong"] = _set("spinal", [0.9, 0.8, 0.3, 0.4, 0.0], offset=200.0, source="strong")
    best = kp.best("spinal", prefer=("pref",))
    assert best.origin.tolist() == ["pref", "strong", "weak", "strong", ""]
    np.testing.assert_allclose(best.confidence, [0.5, 0.8, 0.7, 0.4, 0.0])
    assert best.world[1, 0] == 200.0 + 3 and best.world[2, 0] == 100.0 + 6
    assert best.source == "pref+strong+weak"
    missing = KeypointSet.empty("spinal", source="x")
    assert missing.origin.tolist() == [""] * 5 and missing.sources_of_points() == ""


def test_describe_names_points():
    s = _set("foraminal", [1] * 10)
    assert s.describe(8) == "foraminal right L4/L5"
