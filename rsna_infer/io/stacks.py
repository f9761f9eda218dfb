"""Decoded slices of one series -> sorted stacks (`Volume`s), each on one pixel grid.

A series may hold several stacks: of different orientation (e.g. one oblique axial block per
disc level), or parallel blocks at the same positions along the normal but elsewhere in the
plane (a repeat with a shifted field of view). Within a stack, slices are sorted by their
position along the normal (``n · IPP``; never by InstanceNumber or file name) and true
duplicates (the whole IPP equal) dropped.

Every stack has one pixel grid: the matrix, spacing and in-plane origin shared by most of its
slices. A slice stored another way (another matrix or spacing, or another field of view with
its own IPP) is resampled onto that grid at the grid's origin projected into the slice's own
plane, so ``pixels[z]`` of every slice shows the same patient rows and columns; the file's
own spacing and offset are kept (`Volume.native_spacing`, `Volume.native_offset`) so that
`Volume.pixel_to_voxel` maps its pixels (label coordinates) exactly.

Every oddity is a warning naming the files (`problems.WarningLog`); nothing here raises on
bad data, and the input records are never modified (a second call gives the same stacks and
the same warnings).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..constants import SAG_T1, SAG_T2
from ..geometry import orthonormal_axes
from .dicom import SliceRecord
from .files import natural_key
from .problems import WarningLog, name_list
from .volume import Volume

#: Two slices belong to the same stack when every direction cosine agrees within this (~0.6°).
ORIENTATION_TOL = 0.01
#: Slices closer than this fraction of the stack's median spacing (or 1e-3 mm) along the
#: normal are at the same depth: duplicates when their whole IPP agrees, else parallel blocks.
DUPLICATE_FRACTION = 0.01
#: In-plane origins closer than this many pixels are the same grid (DS rounding, not a shift).
ORIGIN_TOL_PX = 0.05
#: A resampling shift within this many pixels of a whole number is that whole number, so a
#: field of view padded by whole pixels is copied exactly (IPP strings carry ~1e-6 mm).
SNAP_PX = 1e-3

_AXIAL_IOP = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
_SAGITTAL_IOP = np.array([0.0, 1.0, 0.0, 0.0, 0.0, -1.0])


@dataclass
class _Slice:
    """One record and the geometry this module settles for it (the record stays untouched)."""

    rec: SliceRecord
    orientation: np.ndarray | None
    position: np.ndarray | None
    spacing: tuple[float, float] | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.rec.pixels.shape  # type: ignore[union-attr,return-value]

    def grid_key(self) -> tuple[int, int, float, float]:
        return (*self.shape, round(self.spacing[0], 6), round(self.spacing[1], 6))  # type: ignore[index]


@dataclass(frozen=True)
class _Frame:
    """In-plane axes and normal of an orientation group (orthonormal)."""

    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray

    @classmethod
    def of(cls, orientation: np.ndarray) -> _Frame:
        r, c, _ = orthonormal_axes(orientation[:3], orientation[3:])
        return cls(r, c, np.cross(r, c))

    def uv(self, position: np.ndarray) -> np.ndarray:
        """In-plane (along columns, along rows) coordinates of a position, mm."""
        return np.array([position @ self.row_dir, position @ self.col_dir])


def build_stacks(
    records: list[SliceRecord],
    *,
    study_id: int = 0,
    series_id: int = 0,
    description: str | None = None,
    warnings: list[str] | None = None,
) -> list[Volume]:
    """Group decoded slices into `Volume`s, largest stack first (``stack_index`` 0, 1, ...)."""
    warn = WarningLog(warnings, f"series {series_id}", f"study {study_id}")
    slices = [_Slice(r, r.orientation, r.position, r.pixel_spacing) for r in records if r.ok and r.pixels is not None]
    if not slices:
        return []
    _report_notes(slices, warn)
    _fill_orientation(slices, description, warn)
    volumes: list[Volume] = []
    for group in _group_by_orientation(slices):
        frame = _Frame.of(group[0].orientation)  # type: ignore[arg-type]
        group = _fill_positions(group, frame.normal, warn)
        if not group:
            continue
        _fill_spacing(group, frame.normal, warn)
        for block in _split_blocks(group, frame, warn):
            volumes.append(
                _stack_to_volume(block, frame, study_id=study_id, series_id=series_id, description=description, warn=warn)
            )
    volumes.sort(key=lambda v: -v.shape[0])  # stable: equal sizes keep first-seen order
    for i, v in enumerate(volumes):
        v.stack_index = i
    return volumes


def _report_notes(slices: list[_Slice], warn: WarningLog) -> None:
    """One warning per kind of oddity the reader noted, naming the files."""
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for s in slices:
        for what, detail in s.rec.notes:
            by_kind.setdefault(what, []).append((s.rec.path, detail))
    for what, hits in by_kind.items():
        details = [d for _, d in hits]
        if len(set(details)) == 1:  # one detail for all (e.g. the encoding): say it once
            what, details = f"{what} ({details[0]})", None
        warn(f"{what}: {len(hits)} slice(s): {name_list([p for p, _ in hits], details)}")


def _fill_orientation(slices: list[_Slice], description: str | None, warn: WarningLog) -> None:
    """Slices without a usable IOP take the series' most common IOP, else a default for its type."""
    missing = [s for s in slices if s.orientation is None]
    if not missing:
        return
    known = [tuple(np.round(s.orientation, 4)) for s in slices if s.orientation is not None]
    sagittal = description in (SAG_T1, SAG_T2)
    if known:
        iop = np.array(Counter(known).most_common(1)[0][0])
        source = "the series' most common orientation"
    else:
        iop = _SAGITTAL_IOP if sagittal else _AXIAL_IOP
        source = f"a default {'sagittal' if sagittal else 'axial'} orientation"
    degenerate = sum(any(what.startswith("ImageOrientationPatient degenerate") for what, _ in s.rec.notes)
                     for s in missing)
    why = f"{len(missing) - degenerate} without the tag, {degenerate} degenerate"
    warn(f"{len(missing)} slice(s) without a usable ImageOrientationPatient ({why}); using {source}: "
         f"{name_list(s.rec.path for s in missing)}")
    for s in missing:
        s.orientation = iop.copy()


def _group_by_orientation(slices: list[_Slice]) -> list[list[_Slice]]:
    groups: list[list[_Slice]] = []
    for s in slices:
        for g in groups:
            if np.max(np.abs(g[0].orientation - s.orientation)) <= ORIENTATION_TOL:
                g.append(s)
                break
        else:
            groups.append([s])
    return groups


def _nominal_spacing(slices: list[_Slice]) -> float:
    for attr in ("spacing_between_slices", "slice_thickness"):
        vals = [getattr(s.rec, attr) for s in slices if getattr(s.rec, attr) and getattr(s.rec, attr) > 0]
        if vals:
            return float(np.median(vals))
    return 1.0


def _fill_positions(slices: list[_Slice], normal: np.ndarray, warn: WarningLog) -> list[_Slice]:
    """Slices without IPP get a synthetic position along the normal from their InstanceNumber.

    With at least two positioned slices of distinct instance numbers the offset is fitted
    linearly on InstanceNumber; otherwise the nominal slice spacing (SpacingBetweenSlices,
    SliceThickness, else 1 mm) is used. A slice with neither IPP nor InstanceNumber is dropped
    when others have an IPP; when no slice has one, all are ordered by InstanceNumber, then by
    file name.
    """
    missing = [s for s in slices if s.position is None]
    if not missing:
        return slices
    placed = [s for s in slices if s.position is not None]
    step = _nominal_spacing(slices)
    if placed:
        offset_of = _offset_model(placed, normal, step)
        anchor = placed[0]
        keep = list(placed)
        for s in missing:
            inst = s.rec.instance_number
            target = None if inst is None or offset_of is None else offset_of(inst)
            if target is None:
                continue
            s.position = anchor.position + (target - anchor.position @ normal) * normal
            keep.append(s)
        placed_n = len(keep) - len(placed)
        warn(
            f"{len(missing)} slice(s) lack ImagePositionPatient; {placed_n} placed along the normal "
            f"from InstanceNumber, {len(missing) - placed_n} dropped: {name_list(s.rec.path for s in missing)}"
        )
        return keep
    # No slice has a position: a synthetic stack ordered by InstanceNumber (then file name).
    ranked = sorted(
        slices,
        key=lambda s: (s.rec.instance_number is None, s.rec.instance_number or 0, natural_key(s.rec.path)),
    )
    for i, s in enumerate(ranked):
        s.position = i * step * normal
    warn(
        f"no slice has ImagePositionPatient; synthetic positions {step:g} mm apart by InstanceNumber "
        "(world coordinates of this stack are not comparable with other series)"
    )
    return ranked


def _offset_model(placed: list[_Slice], normal: np.ndarray, step: float):
    """InstanceNumber -> offset along the normal, fitted on the positioned slices (or None)."""
    numbered = [s for s in placed if s.rec.instance_number is not None]
    inst = np.array([s.rec.instance_number for s in numbered], dtype=np.float64)
    offs = np.array([s.position @ normal for s in numbered])
    if len(np.unique(inst)) >= 2:
        slope, intercept = np.polyfit(inst, offs, 1)
        if abs(slope) < 1e-6:
            return None
        return lambda i: float(slope * i + intercept)
    if len(numbered) == 1:
        return lambda i: float(offs[0] + step * (i - inst[0]))
    return None


def _fill_spacing(slices: list[_Slice], normal: np.ndarray, warn: WarningLog) -> None:
    """A slice without PixelSpacing takes the most common spacing of the slices with its
    matrix, else that of the nearest slice along the normal that has one, so it is not zoomed;
    with none anywhere, 1 mm."""
    missing = [s for s in slices if s.spacing is None]
    if not missing:
        return
    known = [s for s in slices if s.spacing is not None]
    if not known:
        for s in missing:
            s.spacing = (1.0, 1.0)
        warn(f"{len(missing)} slice(s) lack PixelSpacing and no slice has one; 1 mm assumed")
        return
    used = []
    for s in missing:
        same = [k.spacing for k in known if k.shape == s.shape]
        if same:
            s.spacing = Counter(same).most_common(1)[0][0]
        else:
            depth = s.position @ normal
            s.spacing = min(known, key=lambda k: abs(k.position @ normal - depth)).spacing
        used.append(s.spacing)
    spacings = ", ".join(sorted({f"{a:g}x{b:g} mm" for a, b in used}))
    warn(f"{len(missing)} slice(s) lack PixelSpacing; the stack's {spacings} used: "
         f"{name_list(s.rec.path for s in missing)}")


@dataclass
class _Block:
    """Slices of a group that share one pixel grid (matrix, spacing, in-plane origin)."""

    key: tuple[int, int, float, float]
    uv: np.ndarray  # in-plane origin (mm)
    members: list[_Slice] = field(default_factory=list)
    depths: list[float] = field(default_factory=list)
    uvs: list[np.ndarray] = field(default_factory=list)

    @property
    def tol(self) -> float:
        return ORIGIN_TOL_PX * min(self.key[2], self.key[3])

    def field_box(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) corners of the field of view in-plane, half a pixel beyond the centres."""
        rows, cols, dr, dc = self.key
        half = np.array([0.5 * dc, 0.5 * dr])
        return self.uv - half, self.uv + np.array([(cols - 1) * dc, (rows - 1) * dr]) + half

    def centre(self) -> np.ndarray:
        rows, cols, dr, dc = self.key
        return self.uv + 0.5 * np.array([(cols - 1) * dc, (rows - 1) * dr])


def _split_blocks(group: list[_Slice], frame: _Frame, warn: WarningLog) -> list[list[_Slice]]:
    """Slices of one orientation -> stacks.

    Slices sharing a pixel grid form a block; blocks, largest first, join the first stack
    they fit: none of their slices at the depth of a stack slice with another IPP (that is a
    parallel block, not the same stack) and their field of view's centre inside the stack's.
    """
    depth_tol = _depth_tolerance([s.position @ frame.normal for s in group])
    blocks: list[_Block] = []
    for s in group:
        key, uv = s.grid_key(), frame.uv(s.position)
        for b in blocks:
            if b.key == key and np.all(np.abs(uv - b.uv) <= b.tol):
                break
        else:
            b = _Block(key, uv)
            blocks.append(b)
        b.members.append(s)
        b.depths.append(float(s.position @ frame.normal))
        b.uvs.append(uv)
    blocks.sort(key=lambda b: -len(b.members))  # stable: ties keep first-seen order
    stacks: list[list[_Block]] = []
    parallel = 0
    for b in blocks:
        for st in stacks:
            clash = _clashes(b, st, depth_tol)
            if not clash and _inside(b.centre(), st[0].field_box()):
                st.append(b)
                break
            parallel += int(clash)
        else:
            stacks.append([b])
    if len(stacks) > 1:
        sizes = [sum(len(b.members) for b in st) for st in stacks]
        why = ("at the same positions along the normal but elsewhere in the plane" if parallel
               else "with fields of view that do not overlap")
        warn(f"{len(stacks)} parallel blocks of one orientation {why}: kept as separate stacks of {sizes} slices")
    return [[s for b in st for s in b.members] for st in stacks]


def _clashes(b: _Block, stack: list[_Block], depth_tol: float) -> bool:
    """Whether a slice of ``b`` lies at the depth of a slice of ``stack`` with another IPP."""
    depths = np.asarray(b.depths)
    uvs = np.asarray(b.uvs)
    for other in stack:
        same_depth = np.abs(depths[:, None] - np.asarray(other.depths)[None, :]) <= depth_tol
        if not same_depth.any():
            continue
        apart = np.any(np.abs(uvs[:, None, :] - np.asarray(other.uvs)[None, :, :]) > min(b.tol, other.tol), axis=-1)
        if np.any(same_depth & apart):
            return True
    return False


def _inside(point: np.ndarray, box: tuple[np.ndarray, np.ndarray]) -> bool:
    return bool(np.all(point >= box[0]) and np.all(point <= box[1]))


def _depth_tolerance(depths: list[float]) -> float:
    gaps = np.diff(np.sort(np.asarray(depths)))
    positive = gaps[gaps > 1e-6]
    return max(1e-3, DUPLICATE_FRACTION * float(np.median(positive))) if len(positive) else 1e-3


def _stack_to_volume(
    slices: list[_Slice], frame: _Frame, *, study_id: int, series_id: int, description: str | None, warn: WarningLog
) -> Volume:
    ref = slices[0]  # a member of the stack's largest block: its grid is the stack's
    depths = np.array([s.position @ frame.normal for s in slices])
    order = np.argsort(depths, kind="stable")
    slices = [slices[i] for i in order]
    slices = _drop_duplicates(slices, depths[order], warn)
    rows, cols = ref.shape
    dr, dc = ref.spacing  # type: ignore[misc]
    origin = frame.uv(ref.position)
    pixels = np.empty((len(slices), rows, cols), dtype=np.float32)
    positions = np.empty((len(slices), 3))
    native = np.empty((len(slices), 2))
    offset = np.zeros((len(slices), 2))
    moved: list[str] = []
    for i, s in enumerate(slices):
        positions[i], offset[i] = _to_grid(s, ref, origin, frame, pixels[i])
        native[i] = s.spacing
        if not np.array_equal(positions[i], s.position) or s.grid_key() != ref.grid_key():
            moved.append(s.rec.path)
    if moved:
        warn(
            f"{len(moved)} slice(s) stored with another matrix, spacing or field of view resampled onto the "
            f"stack's grid {rows}x{cols} at {dr:g}x{dc:g} mm: {name_list(moved)}"
        )
    _invert_monochrome1(pixels, [s.rec.monochrome1 for s in slices])
    return Volume(
        pixels=pixels,
        positions=positions,
        row_dir=frame.row_dir,
        col_dir=frame.col_dir,
        spacing=(float(dr), float(dc)),
        instance_numbers=np.array([-1 if s.rec.instance_number is None else s.rec.instance_number for s in slices]),
        study_id=study_id,
        series_id=series_id,
        description=description,
        native_spacing=None if np.allclose(native, [dr, dc]) else native,
        native_offset=offset if np.any(offset != 0) else None,
        files=[s.rec.path for s in slices],
        sop_instance_uids=[s.rec.sop_instance_uid for s in slices],
    )


def _drop_duplicates(slices: list[_Slice], depths: np.ndarray, warn: WarningLog) -> list[_Slice]:
    """Of slices at the same depth (and hence, in one stack, the same IPP) keep the lower
    InstanceNumber (the first acquisition); report the others by name."""
    if len(slices) < 2:
        return slices
    tol = _depth_tolerance(list(depths))
    keep = [0]
    dropped: list[str] = []
    for i in range(1, len(slices)):
        j = keep[-1]
        if depths[i] - depths[j] > tol:
            keep.append(i)
            continue
        a, b = slices[j], slices[i]
        if b.rec.instance_number is not None and (b.rec.instance_number or 0) < (a.rec.instance_number or 0):
            keep[-1] = i
            a, b = b, a
        dropped.append(b.rec.path)
    if dropped:
        warn(f"{len(dropped)} slice(s) at a duplicate position (the same IPP) dropped: {name_list(dropped)}")
    return [slices[i] for i in keep]


def _to_grid(
    s: _Slice, ref: _Slice, origin: np.ndarray, frame: _Frame, out: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Write one slice, rescaled, onto the stack's grid; returns (its position in the
    volume, its file's first-pixel offset from there in mm along (rows, columns)).

    The grid origin in the slice's plane is the reference origin projected there: output
    pixel (y, x) samples the source at ``((y·Δr + Δv)/Δr', (x·Δc + Δu)/Δc')`` where (Δu, Δv)
    is the in-plane shift from the slice's own IPP to that origin. Linear, separable (two
    small matrix products); points more than half a pixel outside the source are 0. A slice
    already on the grid (same matrix and spacing, origin within `ORIGIN_TOL_PX`) is copied
    and keeps its own IPP.
    """
    rows, cols = ref.shape
    dr, dc = ref.spacing  # type: ignore[misc]
    sdr, sdc = s.spacing  # type: ignore[misc]
    shift = origin - frame.uv(s.position)  # (along columns, along rows), mm
    same_grid = s.grid_key() == ref.grid_key()
    if same_grid and np.all(np.abs(shift) <= ORIGIN_TOL_PX * min(dr, dc)):
        s.rec.rescale_into(out)
        return s.position, np.zeros(2)
    shift_px = np.array([shift[0] / sdc, shift[1] / sdr])
    whole = np.rint(shift_px)
    shift_px = np.where(np.abs(shift_px - whole) <= SNAP_PX, whole, shift_px)
    shift = shift_px * np.array([sdc, sdr])
    img = s.rec.image().astype(np.float64)
    wy = _linear_weights(np.arange(rows) * (dr / sdr) + shift_px[1], img.shape[0])
    wx = _linear_weights(np.arange(cols) * (dc / sdc) + shift_px[0], img.shape[1])
    out[...] = wy @ img @ wx.T
    position = s.position + shift[0] * frame.row_dir + shift[1] * frame.col_dir
    return position, np.array([-shift[1], -shift[0]])


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
