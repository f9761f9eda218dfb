"""Flip test-time augmentation for stage-2 batches, defined in patient directions.

Crops are in canonical orientation (`rsna_infer.imaging.CANONICAL_AXES`), so a flip
means the same patient direction for every study:

- ``ap`` (anterior/posterior mirror): horizontal flip of sagittal crops, vertical flip of
  axial crops. Laterality is unchanged, outputs need no fix-up.
- ``lr`` (left/right mirror): horizontal flip of axial crops and reversed slice order of
  sagittal crops (slices run across the patient). This swaps patient left and right, so the
  left/right slots of the inputs are swapped too (the mirrored patient's left foramen is the
  original's right one) and the outputs' left/right conditions are swapped back
  (`constants.LR_SWAP`) before averaging.

`run_tta` averages logits over the passes; the pass set is a group (identity, ap, and with
``lr`` also lr and ap+lr), so the averaged prediction is exactly invariant to those flips of
the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .layout import swap_lr

if TYPE_CHECKING:
    import torch
    from torch import nn

PLANES = ("sagittal", "axial")


@dataclass(frozen=True)
class ViewAxes:
    """How one batch entry ``[B, ...]`` transforms under the flips.

    ``plane``: "sagittal" or "axial" when the trailing axes are ``[slices, rows, cols]`` of
    crops of that plane; None for per-slot flags (e.g. presence). ``lr_perm``: permutation of
    axis 1 (the first axis after the batch) under a left/right mirror; None when axis 1 has no
    sides (e.g. levels).
    """

    plane: str | None = None
    lr_perm: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.plane is not None and self.plane not in PLANES:
            raise ValueError(f"plane must be one of {PLANES} or None, got {self.plane!r}")


def flip_dims(plane: str | None, ap: bool, lr: bool) -> list[int]:
    """Trailing dims of a ``[..., slices, rows, cols]`` crop of ``plane`` that a patient mirror
    reverses: ``ap`` sagittal columns / axial rows; ``lr`` sagittal slices / axial columns."""
    if plane == "sagittal":
        return ([-1] if ap else []) + ([-3] if lr else [])
    if plane == "axial":
        return ([-2] if ap else []) + ([-1] if lr else [])
    return []


def mirror(batch: dict[str, torch.Tensor], axes: dict[str, ViewAxes], ap: bool = False, lr: bool = False) -> dict[str, torch.Tensor]:
    """The batch as seen with the patient mirrored ``ap`` and/or ``lr`` (new tensors)."""
    import torch

    out = {}
    for key, x in batch.items():
        if key not in axes:
            raise KeyError(f"batch entry {key!r} has no flip axes declared; known: {sorted(axes)}")
        ax = axes[key]
        dims = flip_dims(ax.plane, ap, lr)
        if dims:
            x = torch.flip(x, dims)
        if lr and ax.lr_perm is not None:
            x = x.index_select(1, torch.as_tensor(ax.lr_perm, device=x.device))
        out[key] = x
    return out


def mirror_sample(inputs: dict[str, np.ndarray], axes: dict[str, ViewAxes], ap: bool = False, lr: bool = False) -> dict[str, np.ndarray]:
    """One sample's inputs (no batch axis) with the patient mirrored ``ap`` and/or ``lr``: the
    training-time counterpart of the TTA passes (an ``lr`` mirror also swaps the left/right
    input slots, so its labels must be swapped too, `rsna_infer.models.family.swap_lr_labels`)."""
    out = {}
    for key, x in inputs.items():
        ax = axes[key]
        dims = flip_dims(ax.plane, ap, lr)
        permute = lr and ax.lr_perm is not None
        if dims:
            x = np.flip(x, tuple(dims))
        if permute:
            x = x[list(ax.lr_perm)]
        out[key] = np.ascontiguousarray(x) if (dims or permute) else x
    return out


def tta_passes(tta: bool, lr: bool) -> list[tuple[bool, bool]]:
    """``(ap, lr)`` mirror passes: identity only without TTA; with TTA ap, plus lr and ap+lr
    when ``lr`` (a group, so the average is flip-invariant)."""
    if not tta:
        return [(False, False)]
    passes = [(False, False), (True, False)]
    if lr:
        passes += [(False, True), (True, True)]
    return passes


def run_tta(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    axes: dict[str, ViewAxes],
    tta: bool = False,
    lr: bool = False,
) -> torch.Tensor:
    """Mean canonical logits ``[B, 5, 5, 3]`` (float32) over the mirror passes."""
    total = None
    passes = tta_passes(tta, lr)
    for ap_flip, lr_flip in passes:
        x = mirror(batch, axes, ap=ap_flip, lr=lr_flip) if (ap_flip or lr_flip) else batch
        y = model(x).float()
        if lr_flip:
            y = swap_lr(y)
        total = y if total is None else total + y
    return total / len(passes)  # type: ignore[operator]
