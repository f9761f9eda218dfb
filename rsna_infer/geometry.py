"""Cross-series geometry in DICOM patient coordinates (LPS mm: +x patient left, +y
posterior, +z superior).

Series of one study share patient space, so a point found in one stack is located in any
other by going through world coordinates: ``dst.to_voxel(src.to_world(zyx))``. Everything
here is vectorised over ``[..., 3]`` point arrays and works on anything with the `Volume`
geometry API (``to_world``, ``to_voxel``, ``pixels``, ``normal``...). Questions about one
stack (nearest slice, inside its box) are `Volume` methods; the direction helpers `unit` and
`orthonormal_axes` are shared with the DICOM reader.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np


class Grid(Protocol):
    """What sampling needs of a stack: the `rsna_infer.io.volume.Volume` geometry API (declared
    here so that geometry, which the DICOM reader uses, does not import the reader)."""

    pixels: np.ndarray
    positions: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    spacing: tuple[float, float]

    @property
    def shape(self) -> tuple[int, ...]: ...

    def to_voxel(self, xyz: np.ndarray) -> np.ndarray: ...

    def to_world(self, zyx: np.ndarray) -> np.ndarray: ...

PLANES: tuple[str, ...] = ("sagittal", "coronal", "axial")


def plane_of(normal: np.ndarray) -> str:
    """'sagittal' | 'coronal' | 'axial': the patient axis the slice normal is closest to."""
    n = np.abs(np.asarray(normal, dtype=np.float64).reshape(3))
    return PLANES[int(np.argmax(n))]


def unit(v: np.ndarray) -> np.ndarray:
    """``v`` scaled to length 1 (float64); a zero or non-finite vector is a `ValueError`, never NaN."""
    v = np.asarray(v, dtype=np.float64)
    n = math.sqrt(float(np.dot(v.ravel(), v.ravel())))
    if n == 0.0 or not math.isfinite(n):
        raise ValueError(f"degenerate direction vector {v.tolist()}")
    return v / n


#: |r·c| of unit IOP axes up to this is rounding in the header; above it the reader warns.
SKEW_WARN = 1e-4


def orthonormal_axes(row_dir: np.ndarray, col_dir: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The orthonormal pair nearest to ``(row_dir, col_dir)`` and the skew ``|r·c|`` of the unit inputs.

    DICOM requires IOP axes to be orthonormal, and `Volume.to_voxel` relies on it; scanners
    write them rounded, some skewed. The correction is symmetric (the polar factor of
    ``[r c]``: both axes turn by half the skew, about their bisector), so neither axis is
    privileged. Axes that are already orthogonal to 1e-12 come back merely normalised.
    """
    r, c = unit(row_dir), unit(col_dir)
    skew = float(abs(r @ c))
    if skew <= 1e-12:
        return r, c, skew
    if skew >= 1.0 - 1e-9:
        raise ValueError(f"degenerate orientation: parallel direction vectors {r.tolist()} and {c.tolist()}")
    bisector, across = unit(r + c), unit(r - c)
    half = np.sqrt(0.5)
    return unit(half * (bisector + across)), unit(half * (bisector - across)), skew


def obliquity_deg(normal: np.ndarray) -> float:
    """Angle (degrees) between the slice normal and its nearest patient axis."""
    n = np.asarray(normal, dtype=np.float64).reshape(3)
    n = n / np.linalg.norm(n)
    return float(np.degrees(np.arccos(np.clip(np.max(np.abs(n)), -1.0, 1.0))))


def transfer(src: Grid, zyx: np.ndarray, dst: Grid) -> np.ndarray:
    """Voxel points of ``src`` -> voxel points of ``dst`` (through patient space)."""
    return dst.to_voxel(src.to_world(zyx))


def distance_mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance between corresponding points (broadcast over leading axes)."""
    return np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), axis=-1)


def pairwise_distance_mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[N, M]`` distances between point sets ``a [N, 3]`` and ``b [M, 3]``."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 3)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 3)
    return np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)


def side_of(xyz: np.ndarray, midline_x: float | np.ndarray) -> np.ndarray:
    """'left' where a point lies to the patient's left of ``midline_x`` (larger x), else 'right'."""
    x = np.asarray(xyz, dtype=np.float64)[..., 0]
    return np.where(x > midline_x, "left", "right")


def is_left_of(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether each point of ``a`` lies to the patient's left of the matching point of ``b``."""
    return np.asarray(a, dtype=np.float64)[..., 0] > np.asarray(b, dtype=np.float64)[..., 0]


def sample(volume: Grid, xyz: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Trilinear intensity of ``volume`` at world points ``[..., 3]``; ``fill`` outside the stack.

    z interpolates between the two neighbouring *sorted* slices (uneven spacing is exact);
    points up to half a voxel beyond the edges take the edge value.
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    zyx = volume.to_voxel(xyz).reshape(-1, 3)
    vals = _trilinear(volume.pixels, zyx, fill)
    return vals.reshape(xyz.shape[:-1])


def sample_plane(
    volume: Grid,
    origin: np.ndarray,
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    shape: tuple[int, int],
    spacing: tuple[float, float],
    fill: float = 0.0,
) -> np.ndarray:
    """Resample ``volume`` onto a plane: pixel (y, x) at ``origin + x·Δc·row_dir + y·Δr·col_dir``.

    ``spacing`` is ``(Δrow, Δcol)`` as in DICOM; ``row_dir`` is the direction of increasing
    column, as IOP[0:3]. Returns float32 ``[H, W]``.
    """
    h, w = shape
    dr, dc = spacing
    r = unit(row_dir)
    c = unit(col_dir)
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    pts = np.asarray(origin, dtype=np.float64) + xs[..., None] * dc * r + ys[..., None] * dr * c
    return sample(volume, pts, fill=fill).astype(np.float32)


def reslice_like(src: Grid, dst: Grid, z: int, fill: float = 0.0) -> np.ndarray:
    """``src`` resampled onto the pixel grid of slice ``z`` of ``dst`` (float32 ``[H, W]``)."""
    h, w = dst.shape[1:]
    return sample_plane(src, dst.positions[z], dst.row_dir, dst.col_dir, (h, w), dst.spacing, fill=fill)


def _trilinear(pixels: np.ndarray, zyx: np.ndarray, fill: float) -> np.ndarray:
    shape = np.array(pixels.shape, dtype=np.float64)
    inside = np.all((zyx >= -0.5) & (zyx <= shape - 0.5), axis=-1)
    c = np.clip(zyx, 0, shape - 1)
    i0 = np.minimum(np.floor(c).astype(np.int64), np.maximum(np.array(pixels.shape) - 2, 0))
    t = c - i0
    i1 = np.minimum(i0 + 1, np.array(pixels.shape) - 1)
    out = np.zeros(len(zyx), dtype=np.float64)
    for dz in (0, 1):
        wz = t[:, 0] if dz else 1 - t[:, 0]
        iz = i1[:, 0] if dz else i0[:, 0]
        for dy in (0, 1):
            wy = t[:, 1] if dy else 1 - t[:, 1]
            iy = i1[:, 1] if dy else i0[:, 1]
            for dx in (0, 1):
                wx = t[:, 2] if dx else 1 - t[:, 2]
                ix = i1[:, 2] if dx else i0[:, 2]
                out += wz * wy * wx * pixels[iz, iy, ix]
    out[~inside] = fill
    return out
