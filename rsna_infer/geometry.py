"""Cross-series geometry in DICOM patient coordinates (LPS mm: +x patient left, +y
posterior, +z superior).

Series of one study share patient space, so a point found in one stack is located in any
other by going through world coordinates: ``dst.to_voxel(src.to_world(zyx))``. Everything
here is vectorised over ``[..., 3]`` point arrays and works on anything with the `Volume`
geometry API (``to_world``, ``to_voxel``, ``pixels``, ``normal``...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .io.volume import Volume

PLANES: tuple[str, ...] = ("sagittal", "coronal", "axial")


def plane_of(normal: np.ndarray) -> str:
    """'sagittal' | 'coronal' | 'axial': the patient axis the slice normal is closest to."""
    n = np.abs(np.asarray(normal, dtype=np.float64).reshape(3))
    return PLANES[int(np.argmax(n))]


def obliquity_deg(normal: np.ndarray) -> float:
    """Angle (degrees) between the slice normal and its nearest patient axis."""
    n = np.asarray(normal, dtype=np.float64).reshape(3)
    n = n / np.linalg.norm(n)
    return float(np.degrees(np.arccos(np.clip(np.max(np.abs(n)), -1.0, 1.0))))


def project(volume: Volume, xyz: np.ndarray) -> np.ndarray:
    """World points ``[..., 3]`` -> fractional voxel ``(z, y, x)`` of ``volume``."""
    return volume.to_voxel(xyz)


def transfer(src: Volume, zyx: np.ndarray, dst: Volume) -> np.ndarray:
    """Voxel points of ``src`` -> voxel points of ``dst`` (through patient space)."""
    return dst.to_voxel(src.to_world(zyx))


def nearest_slice(volume: Volume, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the slice nearest each point and the point's distance (mm) to that slice's plane."""
    idx = volume.nearest_slice(xyz)
    d = np.asarray(xyz, dtype=np.float64) @ volume.normal - volume.slice_offsets[idx]
    return idx, np.abs(d)


def covers(volume: Volume, xyz: np.ndarray, margin_mm: float = 0.0) -> np.ndarray:
    """Whether each point lies inside the stack's box (within ``margin_mm``)."""
    return volume.contains(xyz, margin_mm=margin_mm)


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


def sample(volume: Volume, xyz: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Trilinear intensity of ``volume`` at world points ``[..., 3]``; ``fill`` outside the stack.

    z interpolates between the two neighbouring *sorted* slices (uneven spacing is exact);
    points up to half a voxel beyond the edges take the edge value.
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    zyx = volume.to_voxel(xyz).reshape(-1, 3)
    vals = _trilinear(volume.pixels, zyx, fill)
    return vals.reshape(xyz.shape[:-1])


def sample_plane(
    volume: Volume,
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
    r = _unit(row_dir)
    c = _unit(col_dir)
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    pts = np.asarray(origin, dtype=np.float64) + xs[..., None] * dc * r + ys[..., None] * dr * c
    return sample(volume, pts, fill=fill).astype(np.float32)


def reslice_like(src: Volume, dst: Volume, z: int, fill: float = 0.0) -> np.ndarray:
    """``src`` resampled onto the pixel grid of slice ``z`` of ``dst`` (float32 ``[H, W]``)."""
    h, w = dst.shape[1:]
    return sample_plane(src, dst.positions[z], dst.row_dir, dst.col_dir, (h, w), dst.spacing, fill=fill)


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).reshape(3)
    return v / np.linalg.norm(v)


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
