"""Competition constants: orders, row ids, label maps and the left/right swap."""

from __future__ import annotations

import pytest

from rsna_infer import constants as C


def test_orders_and_sizes() -> None:
    assert C.CONDITIONS[0] == "spinal_canal_stenosis"
    assert C.LEVELS == ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")
    assert C.CLASSES == ("normal_mild", "moderate", "severe")
    assert (C.N_CONDITIONS, C.N_LEVELS, C.N_CLASSES) == (5, 5, 3)
    assert len(C.TARGETS) == 25 and len(set(C.TARGETS)) == 25
    # condition-major: the first five targets are the spinal levels in order
    assert C.TARGETS[:5] == tuple(f"spinal_canal_stenosis_{lv}" for lv in C.LEVELS)
    assert C.TARGETS[5] == "left_neural_foraminal_narrowing_l1_l2"


def test_class_weights_and_labels() -> None:
    assert C.CLASS_WEIGHTS == (1.0, 2.0, 4.0)
    for label, k in C.LABEL_TO_CLASS.items():
        assert C.CLASS_TO_LABEL[k] == label
        assert C.label_to_class(label) == k
        assert C.label_to_class(f" {label} ") == k
    for blank in (None, float("nan"), ""):
        assert C.label_to_class(blank) == -1
    with pytest.raises(ValueError, match="unknown label"):
        C.label_to_class("Mild")


def test_groups() -> None:
    assert C.GROUPS == ("spinal", "foraminal", "subarticular")
    assert [C.GROUPS[g] for g in C.CONDITION_GROUP_INDEX] == [C.CONDITION_GROUP[c] for c in C.CONDITIONS]
    assert C.CONDITION_GROUP_INDEX == (0, 1, 1, 2, 2)


def test_row_id_round_trip() -> None:
    rid = C.row_id(4003253, "left_subarticular_stenosis", "l5_s1")
    assert rid == "4003253_left_subarticular_stenosis_l5_s1"
    assert C.parse_row_id(rid) == (4003253, "left_subarticular_stenosis", "l5_s1")
    ids = C.study_row_ids("17")
    assert len(ids) == 25 and ids[0] == "17_spinal_canal_stenosis_l1_l2" and ids[-1] == "17_right_subarticular_stenosis_l5_s1"
    assert [C.parse_row_id(r)[1] + "_" + C.parse_row_id(r)[2] for r in ids] == list(C.TARGETS)


@pytest.mark.parametrize(
    "bad",
    ["abc_spinal_canal_stenosis_l1_l2", "1_spinal_canal_stenosis_l1_l3", "1_spinal_stenosis_l1_l2", "1_spinal_canal_stenosis_l1_l2_x"],
)
def test_parse_row_id_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="malformed row_id"):
        C.parse_row_id(bad)


def test_row_id_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown condition"):
        C.row_id(1, "spinal", "l1_l2")
    with pytest.raises(ValueError, match="unknown level"):
        C.row_id(1, "spinal_canal_stenosis", "L1/L2")


def test_coordinate_names() -> None:
    assert C.COORD_CONDITION_TO_CONDITION["Left Neural Foraminal Narrowing"] == "left_neural_foraminal_narrowing"
    assert C.COORD_LEVEL_TO_LEVEL["L4/L5"] == "l4_l5"
    assert set(C.COORD_CONDITION_TO_CONDITION.values()) == set(C.CONDITIONS)
    assert set(C.COORD_LEVEL_TO_LEVEL.values()) == set(C.LEVELS)
    for k, v in C.COORD_CONDITION_TO_CONDITION.items():
        assert C.CONDITION_TO_COORD_CONDITION[v] == k
    for k, v in C.COORD_LEVEL_TO_LEVEL.items():
        assert C.LEVEL_TO_COORD_LEVEL[v] == k
    assert set(C.CONDITION_SERIES_TYPE.values()) == set(C.SERIES_TYPES)
    assert C.SERIES_TYPES == ("Sagittal T1", "Sagittal T2/STIR", "Axial T2")


def test_lr_swap_swaps_sides() -> None:
    swap = C.LR_SWAP
    assert sorted(swap) == list(range(5))
    assert all(swap[swap[i]] == i for i in range(5))  # an involution
    for i, j in enumerate(swap):
        a, b = C.CONDITIONS[i], C.CONDITIONS[j]
        if a.startswith("left_"):
            assert b == "right_" + a[len("left_"):]
        elif a.startswith("right_"):
            assert b == "left_" + a[len("right_"):]
        else:
            assert i == j

