"""Crops around keypoints: the 2.5-D / 3-D ROI inputs of every stage-2 grader.

A crop is ``[n_slices, out_h, out_w]`` float32 taken from one `Volume` around a voxel point
``(z, y, x)``:

- **Slices**: ``n_slices`` consecutive native slices around ``round(z)``; near the first or
  last slice the window shifts inside the stack instead of running off it.
- **In-plane window**: a physical side ``crop_mm`` (converted to pixels with the volume's own
  ``(Δrow, Δcol)`` spacing, so anisotropic pixels still give a square in mm) or a pixel side
  ``size_px``; near a border the window shifts inside the image (no garbage padding).
- **Padding**: only when the stack or the image is smaller than the window. Padded voxels
  get the volume's low clip bound (`PAD_DOC`), i.e. black after normalisation, and
  `CropInfo.padded` says so.
- **Normalisation**: `NormSpec.bounds` once per volume (pass ``bounds``), applied to the crop.
- **Canonical orientation**: crops are cut from the stack as `rsna_infer.imaging.orient` sees
  it (flips and an in-plane transpose only), so the same anatomy looks the same whatever the
  scanner's IOP, and a flip (TTA, augmentation) means the same patient direction for every
  study: sagittal slices run toward patient left, rows inferior, columns posterior; axial
  slices run inferior, rows posterior, columns toward patient left.
- **Resize** with torch (``F.interpolate``, bilinear, antialiased when shrinking).

`CropInfo` records where the requested centre landed in the output crop and which source
slices / pixels were used, so tests and debugging can check geometry exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..geometry import plane_of
from ..imaging import Orientation, interpolate_slices, orient, resize_slices, standardise, to_unit

if TYPE_CHECKING:
    from ..io.volume import Study, Volume
    from ..keypoints import KeypointSet
    from ..specs import NormSpec

logger = logging.getLogger(__name__)

PAD_DOC = "padding = the volume's low clip bound (black: (0 - norm.mean) / norm.std after normalisation); 0.0 without norm"


def view_of(volume: Volume) -> str:
    """The canonical view (`rsna_infer.imaging.CANONICAL_AXES`) a stack is cropped in:
    "axial" for axial stacks, "sagittal" otherwise."""
    return "axial" if plane_of(volume.normal) == "axial" else "sagittal"


@dataclass(frozen=True)
class CropInfo:
    """Where a crop came from and where its centre landed.

    Crops are cut from the canonically oriented stack (`rsna_infer.imaging.orient`, only flips
    and an in-plane transpose). ``slices``: source slice index of each output slice, -1 for
    padding. ``box``: the window ``(row0, col0, n_rows, n_cols)`` in canonical pixels; it
    reaches outside the image only when ``padded``. ``center``: the requested point in
    output-crop coordinates ``(slice, row, col)`` (pixel centres at integers). ``shifted``: the
    window was moved to stay inside the stack/image. ``mm_per_px``: output pixel size
    ``(rows, cols)``. ``series_id``/``stack_index``: the source volume.
    """

    slices: tuple[int, ...]
    box: tuple[int, int, int, int]
    center: tuple[float, float, float]
    shifted: bool
    padded: bool
    orientation: Orientation
    mm_per_px: tuple[float, float]
    series_id: int = 0
    stack_index: int = 0


def _window(center: float, size: int, length: int) -> tuple[int, bool]:
    """Start of a ``size``-long integer window centred on ``center`` inside ``[0, length)``:
    shifted inside when it would run off; when ``length < size`` it covers the whole axis."""
    start = int(np.floor(center - (size - 1) / 2.0 + 0.5))
    lo, hi = min(0, length - size), max(0, length - size)
    clipped = int(np.clip(start, lo, hi))
    return clipped, clipped != start


def _take(arr: np.ndarray, starts: tuple[int, int, int], sizes: tuple[int, int, int], pad: float) -> tuple[np.ndarray, bool]:
    """``arr[s0:s0+n0, s1:s1+n1, s2:s2+n2]`` with out-of-range parts filled with ``pad``."""
    out = np.full(sizes, pad, dtype=np.float32)
    src, dst = [], []
    for s, n, length in zip(starts, sizes, arr.shape):
        a, b = max(s, 0), min(s + n, length)
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[tuple(dst)] = arr[tuple(src)]
    padded = any(s < 0 or s + n > length for s, n, length in zip(starts, sizes, arr.shape))
    return out, padded


def _pair(v: float | tuple | list) -> tuple[float, float]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected a number or a (rows, cols) pair, got {v!r}")
        return float(v[0]), float(v[1])
    return float(v), float(v)


def crop_2d5(
    volume: Volume,
    center_zyx: np.ndarray | tuple[float, float, float],
    n_slices: int,
    out_size: tuple[int, int],
    *,
    crop_mm: float | tuple[float, float] | None = None,
    size_px: int | tuple[int, int] | None = None,
    norm: NormSpec | None = None,
    bounds: tuple[float, float] | None = None,
    unit_transform: Callable[[np.ndarray], np.ndarray] | None = None,
    slice_positions: np.ndarray | None = None,
) -> tuple[np.ndarray, CropInfo]:
    """Crop ``[n_slices, *out_size]`` around source voxel ``center_zyx`` of ``volume``.

    Give exactly one of ``crop_mm`` (physical side, or ``(rows_mm, cols_mm)`` of the output)
    and ``size_px`` (pixels, or ``(rows, cols)`` of the output). With ``norm`` the crop is
    normalised with ``bounds`` (computed from the whole volume when None: pass the cached
    per-volume bounds when cropping one volume many times); ``unit_transform`` (e.g. intensity
    augmentation) then runs on the [0, 1] crop before standardisation. ``slice_positions``
    (``n_slices`` canonical, possibly fractional positions, linearly interpolated) replaces the
    consecutive slices around ``z``: a window of slices when the point's own slice is unknown.
    See the module docstring for border handling and orientation.
    """
    if (crop_mm is None) == (size_px is None):
        raise ValueError("give exactly one of crop_mm and size_px")
    n_slices = int(n_slices)
    out_h, out_w = (int(s) for s in out_size)
    if n_slices < 1 or out_h < 1 or out_w < 1:
        raise ValueError(f"need n_slices >= 1 and a positive out_size, got {n_slices}, {out_size}")
    zyx = np.asarray(center_zyx, dtype=np.float64).reshape(3)
    if not np.all(np.isfinite(zyx)):
        raise ValueError(f"crop centre must be finite, got {zyx}")
    orientation = orient(volume, view_of(volume))
    canon = orientation.apply(volume.pixels)  # a view: flips/transpose only, no copy
    c = orientation.to_canonical(zyx)
    mm_row, mm_col = volume.spacing[::-1] if orientation.transpose else volume.spacing
    if crop_mm is not None:
        h_mm, w_mm = _pair(crop_mm)
        n_rows, n_cols = max(1, round(h_mm / mm_row)), max(1, round(w_mm / mm_col))
    else:
        n_rows, n_cols = (max(1, round(v)) for v in _pair(size_px))  # type: ignore[arg-type]

    n_z, n_y, n_x = canon.shape
    z0, z_shift = _window(float(np.floor(c[0] + 0.5)), n_slices, n_z)
    y0, y_shift = _window(c[1], n_rows, n_y)
    x0, x_shift = _window(c[2], n_cols, n_x)

    if norm is not None and bounds is None:
        bounds = norm.bounds(volume)
    pad = float(bounds[0]) if norm is not None else 0.0  # type: ignore[index]
    if slice_positions is not None:
        pos = np.clip(np.asarray(slice_positions, dtype=np.float64).reshape(-1), 0.0, n_z - 1.0)
        if len(pos) != n_slices:
            raise ValueError(f"slice_positions has {len(pos)} entries, need n_slices = {n_slices}")
        window, padded = _take(canon, (0, y0, x0), (n_z, n_rows, n_cols), pad)
        arr = interpolate_slices(window, pos)
        z0, z_shift = 0, False
        canon_idx = np.rint(pos).astype(np.int64)
        centre_z = float(np.interp(c[0], pos, np.arange(n_slices))) if np.all(np.diff(pos) > 0) else float(n_slices // 2)
    else:
        arr, padded = _take(canon, (z0, y0, x0), (n_slices, n_rows, n_cols), pad)
        canon_idx = np.arange(z0, z0 + n_slices)
        centre_z = float(c[0] - z0)
    if norm is not None:
        unit = to_unit(arr, bounds)  # type: ignore[arg-type]
        if unit_transform is not None:
            unit = unit_transform(unit)
        arr = standardise(unit, norm)
    np.nan_to_num(arr, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    out = resize_slices(arr, (out_h, out_w))

    src_idx = np.rint(orientation.to_source(np.stack([canon_idx, np.zeros(n_slices), np.zeros(n_slices)], -1))[:, 0])
    slices = np.where((canon_idx >= 0) & (canon_idx < n_z), src_idx, -1).astype(np.int64)
    info = CropInfo(
        slices=tuple(int(s) for s in slices),
        box=(y0, x0, n_rows, n_cols),
        center=(
            centre_z,
            float((c[1] - y0 + 0.5) * out_h / n_rows - 0.5),
            float((c[2] - x0 + 0.5) * out_w / n_cols - 0.5),
        ),
        shifted=bool(z_shift or y_shift or x_shift),
        padded=padded,
        orientation=orientation,
        mm_per_px=(n_rows * mm_row / out_h, n_cols * mm_col / out_w),
        series_id=int(volume.series_id),
        stack_index=int(volume.stack_index),
    )
    return out, info


def crop_at_world(
    volume: Volume,
    xyz: np.ndarray,
    n_slices: int,
    out_size: tuple[int, int],
    **kwargs: object,
) -> tuple[np.ndarray, CropInfo]:
    """`crop_2d5` around a patient-space point (mm), located in ``volume`` through its geometry."""
    return crop_2d5(volume, volume.to_voxel(np.asarray(xyz, dtype=np.float64)), n_slices, out_size, **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Located:
    """A keypoint found in a volume of the wanted series type."""

    volume: Volume
    zyx: np.ndarray  # fractional voxel (z, y, x) in ``volume``
    world: np.ndarray  # patient (x, y, z) mm
    confidence: float
    via_world: bool  # True when mapped from another stack through patient coordinates


def locate_world(study: Study, series_type: str, xyz: np.ndarray, margin_mm: float = 10.0) -> Volume | None:
    """The first (best) stack of ``series_type`` whose box holds ``xyz`` within ``margin_mm``."""
    xyz = np.asarray(xyz, dtype=np.float64)
    if not np.all(np.isfinite(xyz)):
        return None
    for vol in study.get(series_type):
        if bool(vol.contains(xyz, margin_mm=margin_mm)):
            return vol
    return None


def locate_point(
    study: Study,
    series_type: str,
    points: KeypointSet | None,
    index: int,
    margin_mm: float = 10.0,
) -> Located | None:
    """Point ``index`` of ``points`` in a stack of ``series_type``, or None.

    The point's own stack wins when it is of that type (its voxel coordinates are used as
    they are); otherwise the point is mapped through patient coordinates into the first stack
    of that type that holds it (``margin_mm`` of slack around the box). Invalid points, a
    missing series type or a point outside every stack give None.
    """
    if points is None or not bool(points.valid[index]):
        return None
    world = np.asarray(points.world[index], dtype=np.float64)
    conf = float(points.confidence[index])
    sid, stk = int(points.series_id[index]), int(points.stack_index[index])
    for vol in study.get(series_type):
        if vol.series_id == sid and vol.stack_index == stk:
            zyx = np.asarray(points.voxel[index], dtype=np.float64)
            if not np.all(np.isfinite(zyx)):
                zyx = vol.to_voxel(world)
            return Located(vol, zyx, world, conf, via_world=False)
    vol = locate_world(study, series_type, world, margin_mm)
    if vol is None:
        return None
    return Located(vol, vol.to_voxel(world), world, conf, via_world=True)
