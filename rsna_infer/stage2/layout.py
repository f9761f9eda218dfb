"""The canonical stage-2 output layout and how keypoints map onto it.

Every grader returns logits ``[B, 5 conditions, 5 levels, 3 classes]`` in submission order
(`rsna_infer.constants.CONDITIONS`, `LEVELS`, `CLASSES`), so ``logits[b].reshape(25, 3)[k]``
is the row ``TARGETS[k]`` of study ``b``. A per-point model (ROI) predicts the targets of
its keypoint kind only; `scatter_points` places its ``[B, N, 3]`` logits there and fills the
rest with 0, and `points_mask` marks which targets the sample really predicts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..constants import CONDITIONS, LR_SWAP, N_CLASSES, N_CONDITIONS, N_LEVELS
from ..keypoints import POINT_KINDS

if TYPE_CHECKING:
    import torch

#: The conditions whose targets each keypoint kind covers, one per side (left first).
KIND_CONDITIONS: dict[str, tuple[int, ...]] = {
    "spinal": (CONDITIONS.index("spinal_canal_stenosis"),),
    "foraminal": (
        CONDITIONS.index("left_neural_foraminal_narrowing"),
        CONDITIONS.index("right_neural_foraminal_narrowing"),
    ),
    "subarticular": (
        CONDITIONS.index("left_subarticular_stenosis"),
        CONDITIONS.index("right_subarticular_stenosis"),
    ),
}


def point_targets(kind: str) -> np.ndarray:
    """``[N, 2]`` int (condition, level) of each point of a keypoint set of ``kind``
    (point ``side * 5 + level``, left side first, as in `KeypointSet`)."""
    conds = KIND_CONDITIONS[kind]
    n = POINT_KINDS[kind]
    return np.array([(conds[i // N_LEVELS], i % N_LEVELS) for i in range(n)], dtype=np.int64)


def point_lr_perm(kind: str) -> tuple[int, ...]:
    """Permutation of a kind's points under a left/right mirror (identity for spinal)."""
    n = POINT_KINDS[kind]
    if len(KIND_CONDITIONS[kind]) == 1:
        return tuple(range(n))
    return tuple((i + N_LEVELS) % n for i in range(n))


def points_mask(kind: str, present: np.ndarray) -> np.ndarray:
    """``[5, 5]`` bool: the targets of the ``present`` points of ``kind``."""
    mask = np.zeros((N_CONDITIONS, N_LEVELS), dtype=bool)
    tg = point_targets(kind)
    present = np.asarray(present, dtype=bool).reshape(-1)
    mask[tg[present, 0], tg[present, 1]] = True
    return mask


def scatter_points(point_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """``[B, N, 3]`` per-point logits of ``kind`` -> canonical ``[B, 5, 5, 3]`` (zeros elsewhere)."""
    import torch

    b = point_logits.shape[0]
    tg = torch.as_tensor(point_targets(kind), device=point_logits.device)
    flat = point_logits.new_zeros(b, N_CONDITIONS * N_LEVELS, N_CLASSES)
    flat = flat.index_copy(1, tg[:, 0] * N_LEVELS + tg[:, 1], point_logits)
    return flat.view(b, N_CONDITIONS, N_LEVELS, N_CLASSES)


def swap_lr(logits: torch.Tensor) -> torch.Tensor:
    """Swap the left and right conditions of canonical ``[B, 5, 5, ...]`` outputs (`LR_SWAP`;
    `rsna_infer.models.family.swap_lr_labels` does the same to numpy labels and masks)."""
    import torch

    return logits.index_select(1, torch.as_tensor(LR_SWAP, device=logits.device))

