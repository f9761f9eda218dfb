"""Decoded slices of one series -> sorted, de-duplicated stacks (`Volume`s).

A series may hold several stacks of different orientation (e.g. one oblique axial block per
disc level). Slices are grouped by orientation, sorted by their position along the stack
normal (``n · IPP``; never by InstanceNumber or file name), duplicates dropped, and slices of
an odd matrix size resampled onto the stack's most common pixel grid. Every oddity is
reported in ``warnings`` and logged; nothing here raises on bad data.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..constants import SAG_T1, SAG_T2
from .dicom import SliceRecord
from .volume import Volume

logger = logging.getLogger(__name__)

#: Two slices belong to the same stack when every direction cosine agrees within this (~0.6°).
ORIENTATION_TOL = 0.01
#: Slices closer than this fraction of the stack's median spacing (or 1e-3 mm) are duplicates.
DUPLICATE_FRACTION = 0.01

_AXIAL_IOP = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
_SAGITTAL_IOP = np.array([0.0, 1.0, 0.0, 0.0, 0.0, -1.0])


@dataclass
class _Stack:
    orientation: np.ndarray  # [6], of the first member
    records: list[SliceRecord]


def build_stacks(
    records: list[SliceRecord],
    *,
    study_id: int = 0,
    series_id: int = 0,
    description: str | None = None,
    warnings: list[str] | None = None,
) -> list[Volume]:
    """Group decoded slices into `Volume`s, largest stack first (``stack_index`` 0, 1, ...)."""
    warn = _Warner(f"series {series_id}", warnings)
    records = [r for r in records if r.ok and r.pixels is not None]
    if not records:
        return []
    for r in records:
        for note in r.notes:
            logger.debug("%s: %s", r.path, note)
    _fill_orientation(records, description, warn)
    stacks = _group_by_orientation(records)
    volumes: list[Volume] = []
    for st in stacks:
        vol = _stack_to_volume(st, study_id=study_id, series_id=series_id, description=description, warn=warn)
        if vol is not None:
            volumes.append(vol)
    volumes.sort(key=lambda v: -v.shape[0])  # stable: equal sizes keep first-seen order
    for i, v in enumerate(volumes):
        v.stack_index = i
    if len(volumes) > 1:
        logger.debug("series %s: %d stacks %s", series_id, len(volumes), [v.shape for v in volumes])
    return volumes


class _Warner:
    """Collects warnings for the caller and logs them once, prefixed with the series."""

    def __init__(self, prefix: str, sink: list[str] | None) -> None:
        self.prefix, self.sink = prefix, sink

    def __call__(self, msg: str) -> None:
        text = f"{self.prefix}: {msg}"
        logger.warning(text)
        if self.sink is not None:
            self.sink.append(text)


def _fill_orientation(records: list[SliceRecord], description: str | None, warn: _Warner) -> None:
    """Slices without IOP take the series' most common IOP, else a default for its type."""
    missing = [r for r in records if r.orientation is None]
    if not missing:
        return
    known = [tuple(np.round(r.orientation, 4)) for r in records if r.orientation is not None]
    if known:
        iop = np.array(Counter(known).most_common(1)[0][0])
        source = "the series' most common orientation"
    else:
        iop = _SAGITTAL_IOP if description in (SAG_T1, SAG_T2) else _AXIAL_IOP
        source = f"a default {'sagittal' if description in (SAG_T1, SAG_T2) else 'axial'} orientation"
    warn(f"{len(missing)} slice(s) lack ImageOrientationPatient; using {source}")
    for r in missing:
        r.orientation = iop.copy()


def _group_by_orientation(records: list[SliceRecord]) -> list[_Stack]:
    stacks: list[_Stack] = []
    for r in records:
        for st in stacks:
            if np.max(np.abs(st.orientation - r.orientation)) <= ORIENTATION_TOL:
                st.records.append(r)
                break
        else:
            stacks.append(_Stack(orientation=r.orientation.copy(), records=[r]))
    return stacks


def _stack_to_volume(
    st: _Stack, *, study_id: int, series_id: int, description: str | None, warn: _Warner
) -> Volume | None:
    row_dir = st.orientation[:3] / np.linalg.norm(st.orientation[:3])
    col_dir = st.orientation[3:] / np.linalg.norm(st.orientation[3:])
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    recs = _fill_positions(st.records, normal, warn)
    if not recs:
        return None
    offsets = np.array([r.position @ normal for r in recs])
    order = np.argsort(offsets, kind="stable")
    recs = [recs[i] for i in order]
    offsets = offsets[order]
    recs, offsets = _drop_duplicates(recs, offsets, warn)
    grid = _reference_grid(recs, warn)
    pixels = np.empty((len(recs), grid[0], grid[1]), dtype=np.float32)
    for i, r in enumerate(recs):
        _to_grid(r, grid, pixels[i])
    _invert_monochrome1(pixels, [r.monochrome1 for r in recs])
    native = np.array([r.pixel_spacing for r in recs], dtype=np.float64)
    resampled = not np.allclose(native, [grid[2], grid[3]])
    return Volume(
        pixels=pixels,
        positions=np.stack([r.position for r in recs]),
        row_dir=row_dir,
        col_dir=col_dir,
        spacing=(grid[2], grid[3]),
        instance_numbers=np.array([-1 if r.instance_number is None else r.instance_number for r in recs]),
        study_id=study_id,
        series_id=series_id,
        description=description,
        native_spacing=native if resampled else None,
    )


def _nominal_spacing(recs: list[SliceRecord]) -> float:
    for attr in ("spacing_between_slices", "slice_thickness"):
        vals = [getattr(r, attr) for r in recs if getattr(r, attr) and getattr(r, attr) > 0]
        if vals:
            return float(np.median(vals))
    return 1.0


def _fill_positions(recs: list[SliceRecord], normal: np.ndarray, warn: _Warner) -> list[SliceRecord]:
    """Slices without IPP get a synthetic position along the normal from their InstanceNumber.

    With at least two positioned slices of distinct instance numbers the offset is fitted
    linearly on InstanceNumber; otherwise the nominal slice spacing (SpacingBetweenSlices,
    SliceThickness, else 1 mm) is used. A slice with neither IPP nor InstanceNumber is dropped
    when others have an IPP; when no slice has one, all are ordered by InstanceNumber, then by
    file name.
    """
    missing = [r for r in recs if r.position is None]
    if not missing:
        return recs
    placed = [r for r in recs if r.position is not None]
    step = _nominal_spacing(recs)
    if placed:
        offset_of = _offset_model(placed, normal, step)
        anchor = placed[0]
        keep = list(placed)
        for r in missing:
            target = None if r.instance_number is None or offset_of is None else offset_of(r.instance_number)
            if target is None:
                continue
            r.position = anchor.position + (target - anchor.position @ normal) * normal
            keep.append(r)
        placed_n = len(keep) - len(placed)
        warn(
            f"{len(missing)} slice(s) lack ImagePositionPatient; {placed_n} placed along the normal "
            f"from InstanceNumber, {len(missing) - placed_n} dropped"
        )
        return keep
    # No slice has a position: a synthetic stack ordered by InstanceNumber (then file name).
    ranked = sorted(
        recs, key=lambda r: (r.instance_number is None, r.instance_number or 0, _natural_key(r.path))
    )
    for i, r in enumerate(ranked):
        r.position = i * step * normal
    warn(
        f"no slice has ImagePositionPatient; synthetic positions {step:g} mm apart by InstanceNumber "
        "(world coordinates of this stack are not comparable with other series)"
    )
    return ranked


def _offset_model(placed: list[SliceRecord], normal: np.ndarray, step: float):
    """InstanceNumber -> offset along the normal, fitted on the positioned slices (or None)."""
    numbered = [r for r in placed if r.instance_number is not None]
    inst = np.array([r.instance_number for r in numbered], dtype=np.float64)
    offs = np.array([r.position @ normal for r in numbered])
    if len(np.unique(inst)) >= 2:
        slope, intercept = np.polyfit(inst, offs, 1)
        if abs(slope) < 1e-6:
            return None
        return lambda i: float(slope * i + intercept)
    if len(numbered) == 1:
        return lambda i: float(offs[0] + step * (i - inst[0]))
    return None


def _natural_key(path: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path))


def _drop_duplicates(
    recs: list[SliceRecord], offsets: np.ndarray, warn: _Warner
) -> tuple[list[SliceRecord], np.ndarray]:
    if len(recs) < 2:
        return recs, offsets
    gaps = np.diff(offsets)
    positive = gaps[gaps > 1e-6]
    tol = max(1e-3, DUPLICATE_FRACTION * float(np.median(positive))) if len(positive) else 1e-3
    keep_idx = [0]
    dropped: list[str] = []
    for i in range(1, len(recs)):
        j = keep_idx[-1]
        if offsets[i] - offsets[j] > tol:
            keep_idx.append(i)
            continue
        # keep the lower instance number of the two (the first acquisition); report the other
        a, b = recs[j], recs[i]
        if (b.instance_number or 0) < (a.instance_number or 0) and b.instance_number is not None:
            keep_idx[-1] = i
            a, b = b, a
        dropped.append(b.path)
    if dropped:
        warn(
            f"{len(dropped)} slice(s) at a duplicate position dropped: "
            + ", ".join(_short(p) for p in dropped[:5])
            + (" ..." if len(dropped) > 5 else "")
        )
    return [recs[i] for i in keep_idx], offsets[keep_idx]


def _short(path: str) -> str:
    parts = path.replace("\\", "/").split("/")
    return "/".join(parts[-2:])


def _reference_grid(recs: list[SliceRecord], warn: _Warner) -> tuple[int, int, float, float]:
    """The most common (rows, cols, Δrow, Δcol) of the stack; a missing spacing counts as 1 mm."""
    missing = [r for r in recs if r.pixel_spacing is None]
    if missing:
        warn(f"{len(missing)} slice(s) lack PixelSpacing; 1 mm assumed")
        for r in missing:
            r.pixel_spacing = (1.0, 1.0)
    keys = [(r.pixels.shape[0], r.pixels.shape[1], round(r.pixel_spacing[0], 6), round(r.pixel_spacing[1], 6)) for r in recs]
    counts = Counter(keys)
    grid = counts.most_common(1)[0][0]
    if len(counts) > 1:
        others = sum(n for k, n in counts.items() if k != grid)
        warn(
            f"{others} slice(s) with another size/spacing resampled onto the stack's most common grid "
            f"{grid[0]}x{grid[1]} at {grid[2]:g}x{grid[3]:g} mm"
        )
    return grid


def _to_grid(rec: SliceRecord, grid: tuple[int, int, float, float], out: np.ndarray) -> None:
    """Write one slice, rescaled, onto the reference pixel grid anchored at its own IPP.

    Output pixel (y, x) lies at ``IPP + x·Δc·r + y·Δr·c`` with the reference spacing, i.e. at
    source pixel ``(y·Δr/Δr', x·Δc/Δc')``. Linear interpolation, separable (two small matrix
    products); points more than half a pixel outside the source image are 0.
    """
    h, w, dr, dc = grid
    sdr, sdc = rec.pixel_spacing
    if rec.pixels.shape == (h, w) and np.isclose(sdr, dr) and np.isclose(sdc, dc):
        rec.rescale_into(out)
        return
    img = rec.image().astype(np.float64)
    wy = _linear_weights(np.arange(h) * dr / sdr, img.shape[0])
    wx = _linear_weights(np.arange(w) * dc / sdc, img.shape[1])
    out[...] = wy @ img @ wx.T


def _linear_weights(coords: np.ndarray, n: int) -> np.ndarray:
    """[len(coords), n] linear interpolation weights at fractional source indices."""
    w = np.zeros((len(coords), n), dtype=np.float64)
    inside = (coords >= -0.5) & (coords <= n - 0.5)
    c = np.clip(coords, 0, n - 1)
    i0 = np.clip(np.floor(c).astype(np.int64), 0, max(n - 2, 0))
    t = c - i0
    rows = np.nonzero(inside)[0]
    if n == 1:
        w[rows, 0] = 1.0
        return w
    w[rows, i0[rows]] += 1 - t[rows]
    w[rows, i0[rows] + 1] += t[rows]
    return w


def _invert_monochrome1(pixels: np.ndarray, flags: list[bool]) -> None:
    """MONOCHROME1 (low = white) -> MONOCHROME2, in place, keeping the stack's value range."""
    idx = [i for i, f in enumerate(flags) if f]
    if not idx:
        return
    sub = pixels[idx]
    lo, hi = float(sub.min()), float(sub.max())
    pixels[idx] = (hi + lo) - sub
