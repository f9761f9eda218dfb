"""Competition constants: conditions, levels, classes, row ids and label names.

Everything that spells a competition name lives here so that no other module hard-codes
strings. Orders are the submission orders; every array in the package with a condition,
level or class axis uses them.
"""

from __future__ import annotations

import re

#: Conditions in submission order (axis 0 of the canonical [5, 5, 3] layout).
CONDITIONS: tuple[str, ...] = (
    "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing",
    "left_subarticular_stenosis",
    "right_subarticular_stenosis",
)
#: Levels in submission order, cranial to caudal (axis 1).
LEVELS: tuple[str, ...] = ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")
#: Class columns of the submission (axis 2).
CLASSES: tuple[str, ...] = ("normal_mild", "moderate", "severe")
N_CONDITIONS, N_LEVELS, N_CLASSES = len(CONDITIONS), len(LEVELS), len(CLASSES)

#: The 25 targets, condition-major: ``spinal_canal_stenosis_l1_l2`` ... (train.csv columns).
TARGETS: tuple[str, ...] = tuple(f"{c}_{lv}" for c in CONDITIONS for lv in LEVELS)

#: Metric sample weight per true class (Normal/Mild, Moderate, Severe).
CLASS_WEIGHTS: tuple[float, ...] = (1.0, 2.0, 4.0)

#: Label strings of train.csv, mapped to class index.
LABEL_TO_CLASS: dict[str, int] = {"Normal/Mild": 0, "Moderate": 1, "Severe": 2}
CLASS_TO_LABEL: tuple[str, ...] = ("Normal/Mild", "Moderate", "Severe")

#: Condition groups of the metric (and of blend weights).
GROUPS: tuple[str, ...] = ("spinal", "foraminal", "subarticular")
CONDITION_GROUP: dict[str, str] = {
    "spinal_canal_stenosis": "spinal",
    "left_neural_foraminal_narrowing": "foraminal",
    "right_neural_foraminal_narrowing": "foraminal",
    "left_subarticular_stenosis": "subarticular",
    "right_subarticular_stenosis": "subarticular",
}
#: Index of each condition's group in ``GROUPS``, aligned with ``CONDITIONS``.
CONDITION_GROUP_INDEX: tuple[int, ...] = tuple(GROUPS.index(CONDITION_GROUP[c]) for c in CONDITIONS)

#: Series descriptions exactly as in ``*_series_descriptions.csv``.
SAG_T1 = "Sagittal T1"
SAG_T2 = "Sagittal T2/STIR"
AXIAL_T2 = "Axial T2"
SERIES_TYPES: tuple[str, ...] = (SAG_T1, SAG_T2, AXIAL_T2)

#: Sides, in the order used for left/right pairs everywhere (left first).
SIDES: tuple[str, ...] = ("left", "right")

#: train_label_coordinates.csv names -> ours.
COORD_CONDITION_TO_CONDITION: dict[str, str] = {
    "Spinal Canal Stenosis": "spinal_canal_stenosis",
    "Left Neural Foraminal Narrowing": "left_neural_foraminal_narrowing",
    "Right Neural Foraminal Narrowing": "right_neural_foraminal_narrowing",
    "Left Subarticular Stenosis": "left_subarticular_stenosis",
    "Right Subarticular Stenosis": "right_subarticular_stenosis",
}
CONDITION_TO_COORD_CONDITION: dict[str, str] = {v: k for k, v in COORD_CONDITION_TO_CONDITION.items()}
COORD_LEVEL_TO_LEVEL: dict[str, str] = {
    "L1/L2": "l1_l2", "L2/L3": "l2_l3", "L3/L4": "l3_l4", "L4/L5": "l4_l5", "L5/S1": "l5_s1",
}
LEVEL_TO_COORD_LEVEL: dict[str, str] = {v: k for k, v in COORD_LEVEL_TO_LEVEL.items()}

#: The series type each condition is labelled on in train_label_coordinates.csv.
CONDITION_SERIES_TYPE: dict[str, str] = {
    "spinal_canal_stenosis": SAG_T2,
    "left_neural_foraminal_narrowing": SAG_T1,
    "right_neural_foraminal_narrowing": SAG_T1,
    "left_subarticular_stenosis": AXIAL_T2,
    "right_subarticular_stenosis": AXIAL_T2,
}

#: Left/right partner of each condition index (identity for the spinal canal). A flip that
#: swaps patient left and right permutes axis 0 of the canonical layout by this.
LR_SWAP: tuple[int, ...] = (0, 2, 1, 4, 3)

#: A submission row id: ``(study_id)_(condition)_(level)`` (groups 1-3).
ROW_ID_PATTERN = re.compile(r"^(\d+)_(" + "|".join(CONDITIONS) + r")_(" + "|".join(LEVELS) + r")$")


def row_id(study_id: int | str, condition: str, level: str) -> str:
    """``{study_id}_{condition}_{level}`` as in the submission."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; expected one of {CONDITIONS}")
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; expected one of {LEVELS}")
    return f"{int(study_id)}_{condition}_{level}"


def study_row_ids(study_id: int | str) -> list[str]:
    """The 25 row ids of one study, in canonical (condition-major) order."""
    return [row_id(study_id, c, lv) for c in CONDITIONS for lv in LEVELS]


def parse_row_id(rid: str) -> tuple[int, str, str]:
    """Inverse of :func:`row_id`: ``(study_id, condition, level)``."""
    m = ROW_ID_PATTERN.match(rid)
    if m is None:
        raise ValueError(f"malformed row_id {rid!r}; expected '{{study_id}}_{{condition}}_{{level}}'")
    return int(m.group(1)), m.group(2), m.group(3)


def label_to_class(label: object) -> int:
    """train.csv label string -> class index; blank/NaN -> -1 (unscored)."""
    if label is None or (isinstance(label, float) and label != label) or label == "":
        return -1
    try:
        return LABEL_TO_CLASS[str(label).strip()]
    except KeyError:
        raise ValueError(f"unknown label {label!r}; expected one of {list(LABEL_TO_CLASS)} or blank") from None
