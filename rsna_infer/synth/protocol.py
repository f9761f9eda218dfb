"""Acquisition planning: where each slice of each series lies in patient space.

A scanner operator plans sagittal stacks along the spine and axial stacks either as one
block covering L1-S1 or as short blocks tilted along each disc. Each planned slice is a
`SlicePlan` (centre, in-plane directions, pixel spacing, matrix); its DICOM
ImagePositionPatient follows from the centre, so matrices of different size can share a
field of view exactly as on a real scanner.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..constants import AXIAL_T2, SAG_T1, SAG_T2
from ..geometry import unit as _unit
from .anatomy import GRADED_DISCS, VERTEBRAE, Anatomy
from .render import Contrast


@dataclass
class SlicePlan:
    """One image: a plane with its pixel grid. ``row_dir`` = direction of increasing column
    (IOP[0:3]); ``col_dir`` = direction of increasing row (IOP[3:6])."""

    centre: np.ndarray  # [3] patient position of the image centre
    row_dir: np.ndarray
    col_dir: np.ndarray
    spacing: tuple[float, float]  # (Δrow, Δcol) mm
    rows: int
    cols: int
    stack_index: int = 0
    instance_number: int = 0

    @property
    def normal(self) -> np.ndarray:
        r, c = self.row_dir, self.col_dir
        return np.array([r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0]])

    @property
    def position(self) -> np.ndarray:
        """ImagePositionPatient: centre of the first (top-left) pixel."""
        dr, dc = self.spacing
        return self.centre - 0.5 * (self.cols - 1) * dc * self.row_dir - 0.5 * (self.rows - 1) * dr * self.col_dir

    def pixel_positions(self) -> np.ndarray:
        """[rows * cols, 3] patient position of every pixel, row-major."""
        dr, dc = self.spacing
        ii, jj = np.meshgrid(np.arange(self.rows) * dr, np.arange(self.cols) * dc, indexing="ij")
        return self.position + jj.reshape(-1, 1) * self.row_dir + ii.reshape(-1, 1) * self.col_dir

    def project(self, xyz: np.ndarray) -> tuple[float, float, float]:
        """(column x, row y, signed distance along the normal) of a patient point."""
        rel = np.asarray(xyz, dtype=np.float64) - self.position
        dr, dc = self.spacing
        return float(rel @ self.row_dir / dc), float(rel @ self.col_dir / dr), float(rel @ self.normal)

    def contains_inplane(self, x: float, y: float, margin: float = 0.0) -> bool:
        return -margin <= x <= self.cols - 1 + margin and -margin <= y <= self.rows - 1 + margin


@dataclass
class SeriesPlan:
    """One series: its slices (any number of stacks) and how they will be written."""

    series_id: int
    description: str
    contrast: Contrast
    slices: list[SlicePlan]
    slice_thickness: float
    spacing_between: float
    scale: float  # stored value per unit of signal
    noise: float  # Rician noise sigma, in signal units
    acquisition_matrix: int = 320  # slices are rendered at most this many pixels a side, then interpolated
    series_number: int = 0
    transfer_syntax: str = "explicit_le"
    dropped_tags: tuple[str, ...] = ()
    descending: bool = False
    flipped_axes: tuple[str, ...] = ()
    stack_spacing: dict[int, float] = field(default_factory=dict)
    # how the files are stored (the storage switches; see `SynthOptions`)
    mixed_fov: bool = False
    parallel_block: bool = False
    missing_spacing_instance: int | None = None
    no_meta: bool = False
    enhanced: bool = False

    @property
    def n_stacks(self) -> int:
        return len({sl.stack_index for sl in self.slices})

    def stack(self, index: int) -> list[SlicePlan]:
        return [sl for sl in self.slices if sl.stack_index == index]

    def number_instances(self) -> None:
        """Assign InstanceNumber 1..N: stack by stack, ascending along each stack's normal
        (or descending when ``descending``), as a scanner numbers its acquisitions."""
        k = 1
        for idx in sorted({sl.stack_index for sl in self.slices}):
            st = self.stack(idx)
            st.sort(key=lambda sl: float(sl.position @ sl.normal), reverse=self.descending)
            for sl in st:
                sl.instance_number = k
                k += 1


def _tilt(rng: np.random.Generator, axis: np.ndarray, max_deg: float) -> np.ndarray:
    """Rotate ``axis`` by a small random angle about a random perpendicular axis."""
    axis = _unit(axis)
    perp = _unit(np.cross(axis, rng.normal(size=3)))
    a = np.deg2rad(rng.uniform(-max_deg, max_deg))
    return _unit(axis * np.cos(a) + np.cross(perp, axis) * np.sin(a))


def _matrix(rng: np.random.Generator, size_range: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) within ``size_range``; square most of the time, multiples of 16 when the
    range allows (as scanners do)."""
    lo, hi = int(size_range[0]), int(size_range[1])

    def one() -> int:
        if hi - lo >= 32:
            choices = np.arange(-(-lo // 16) * 16, hi + 1, 16)
            return int(rng.choice(choices))
        return int(rng.integers(lo, hi + 1))

    rows = one()
    cols = rows if rng.random() < 0.75 else one()
    return rows, cols


def _stack(
    centre: np.ndarray,
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    offsets: np.ndarray,
    fov: float,
    matrix: tuple[int, int],
    stack_index: int = 0,
) -> list[SlicePlan]:
    """Parallel slices at ``offsets`` (mm along the normal) around ``centre``; the longer
    matrix side spans ``fov`` mm with square pixels."""
    rows, cols = matrix
    px = fov / max(rows, cols)
    normal = np.cross(row_dir, col_dir)
    return [
        SlicePlan(centre + o * normal, row_dir.copy(), col_dir.copy(), (px, px), rows, cols, stack_index)
        for o in offsets
    ]


def plan_sagittal(
    rng: np.random.Generator, anat: Anatomy, weighting: str, size_range: tuple[int, int]
) -> tuple[list[SlicePlan], float, float]:
    """One sagittal stack centred on the canal. T1 stacks are wide enough to pass through
    both foramina. Returns (slices, thickness, spacing between slices)."""
    lr, post, sup = anat.rotation[:, 0], anat.rotation[:, 1], anat.rotation[:, 2]
    left = _tilt(rng, lr, 2.5)
    post = _unit(post - (post @ left) * left)
    sup = np.cross(left, post)
    row_dir, col_dir = post, -sup  # columns run posterior, rows run caudal: normal = -left
    spacing = rng.uniform(3.3, 4.8)
    thickness = round(spacing - rng.uniform(0.0, 0.8), 2)
    _, _, fu = anat.foramen_centre()
    n_min = int(np.ceil(2 * (fu + 6.0) / spacing)) + 1 if weighting == "T1" else 11
    n = max(n_min, int(rng.integers(13, 20)) if weighting != "T1" else int(rng.integers(15, 22)))
    s_mid = 0.5 * (anat.body_top[VERTEBRAE.index("L1")] + anat.body_bot[VERTEBRAE.index("L5")]) + rng.uniform(-12, 12)
    centre = anat.from_spine(rng.uniform(-2.5, 2.5), anat.canal_centre_d(np.array(s_mid)) - rng.uniform(0, 30), s_mid)
    offsets = (np.arange(n) - 0.5 * (n - 1)) * spacing + rng.uniform(-1.0, 1.0)
    fov = rng.uniform(250.0, 320.0)
    return _stack(centre, row_dir, col_dir, offsets, fov, _matrix(rng, size_range)), thickness, round(spacing, 3)


def _axial_frame(rng: np.random.Generator, anat: Anatomy, normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """In-plane directions of an axial plane with ``normal`` (cranial): rows run posterior,
    columns run to the patient's left, so that ``row x col = normal``."""
    left = anat.rotation[:, 0]
    row_dir = _unit(left - (left @ normal) * normal)
    col_dir = np.cross(normal, row_dir)
    return row_dir, col_dir


def _disc_points(anat: Anatomy, discs: list[int]) -> np.ndarray:
    """Canal centres at the given graded levels (0 = L1/L2)."""
    s = anat.disc_centre[[GRADED_DISCS[i] for i in discs]]
    return anat.from_spine(np.zeros(len(s)), anat.canal_centre_d(s), s)


def plan_axial_block(
    rng: np.random.Generator, anat: Anatomy, levels: list[int], size_range: tuple[int, int], stack_index: int = 0
) -> tuple[list[SlicePlan], float, float]:
    """One straight axial stack covering the discs ``levels`` (indices into L1/L2..L5/S1)."""
    pts = _disc_points(anat, levels)
    if len(levels) > 1 and rng.random() < 0.7:
        normal = _unit(pts[0] - pts[-1])  # cranial, along the mean spine direction
    else:
        normal = anat.tangent(float(anat.disc_centre[GRADED_DISCS[levels[len(levels) // 2]]]))
    normal = _tilt(rng, normal, 3.0)
    spacing = rng.uniform(3.5, 5.0)
    thickness = round(spacing - rng.uniform(0.0, 1.0), 2)
    proj = (pts - pts.mean(axis=0)) @ normal
    lo, hi = proj.min() - rng.uniform(8, 14), proj.max() + rng.uniform(8, 14)
    n = int(np.ceil((hi - lo) / spacing)) + 1
    offsets = lo + np.arange(n) * spacing
    row_dir, col_dir = _axial_frame(rng, anat, normal)
    centre = pts.mean(axis=0) + row_dir * rng.uniform(-6, 6) + col_dir * rng.uniform(-15, 5)
    fov = rng.uniform(160.0, 220.0)
    slices = _stack(centre, row_dir, col_dir, offsets, fov, _matrix(rng, size_range), stack_index)
    return slices, thickness, round(spacing, 3)


def plan_axial_per_disc(
    rng: np.random.Generator, anat: Anatomy, levels: list[int], size_range: tuple[int, int]
) -> tuple[list[SlicePlan], float, float, dict[int, float]]:
    """Several short stacks in one series, each tilted along its disc (or disc group);
    orientations differ by at least 3 degrees so readers can tell the stacks apart."""
    groups: list[list[int]] = [[lv] for lv in levels]
    if len(groups) >= 4 and rng.random() < 0.5:  # the two upper levels often share one block
        groups = [groups[0] + groups[1]] + groups[2:]
    matrix = _matrix(rng, size_range)
    fov = rng.uniform(160.0, 220.0)
    spacing = rng.uniform(3.0, 4.5)
    thickness = round(spacing - rng.uniform(0.0, 0.8), 2)
    slices: list[SlicePlan] = []
    normals: list[np.ndarray] = []
    spacings: dict[int, float] = {}
    for k, group in enumerate(groups):
        pts = _disc_points(anat, group)
        s_c = float(np.mean(anat.disc_centre[[GRADED_DISCS[i] for i in group]]))
        normal = _tilt(rng, anat.tangent(s_c), 2.0)
        for _ in range(10):
            if all(np.degrees(np.arccos(np.clip(normal @ m, -1, 1))) >= 3.0 for m in normals):
                break
            lateral = anat.rotation[:, 0]
            a = np.deg2rad(4.0)
            normal = _unit(normal * np.cos(a) + np.cross(lateral, normal) * np.sin(a))
        normals.append(normal)
        proj = (pts - pts.mean(axis=0)) @ normal
        lo, hi = proj.min() - rng.uniform(7, 11), proj.max() + rng.uniform(7, 11)
        n = int(np.ceil((hi - lo) / spacing)) + 1
        offsets = lo + np.arange(n) * spacing
        row_dir, col_dir = _axial_frame(rng, anat, normal)
        centre = pts.mean(axis=0) + col_dir * rng.uniform(-12, 4)
        slices += _stack(centre, row_dir, col_dir, offsets, fov, matrix, k)
        spacings[k] = round(spacing, 3)
    return slices, thickness, round(spacing, 3), spacings


def flip_axes(p: SeriesPlan, rng: np.random.Generator) -> None:
    """Another scanner convention for every slice of ``p`` (in place): mirror the columns
    and/or the rows and/or swap them, at least one. Centres, fields of view and hence the
    anatomy in patient space are unchanged; one mirror or a swap alone reverses the slice normal
    (and with it the sorted slice order)."""
    choice: list[str] = []
    while not choice:
        choice = [name for name in ("columns", "rows", "swapped") if rng.random() < 0.5]
    for sl in p.slices:
        if "columns" in choice:
            sl.row_dir = -sl.row_dir
        if "rows" in choice:
            sl.col_dir = -sl.col_dir
        if "swapped" in choice:
            sl.row_dir, sl.col_dir = sl.col_dir, sl.row_dir
            sl.rows, sl.cols = sl.cols, sl.rows
            sl.spacing = (sl.spacing[1], sl.spacing[0])
    p.flipped_axes = tuple(choice)


def other_field_of_view(p: SeriesPlan, rng: np.random.Generator) -> None:
    """Every third slice of every stack of ``p`` (in place) stored with another field of view:
    whole pixels added (or, at most an eighth, cut) on each side at the same spacing. The
    centre moves by half the difference, so IPP lands on the new first pixel and every stored
    pixel stays on the stack's patient grid."""
    for idx in sorted({sl.stack_index for sl in p.slices}):
        st = sorted(p.stack(idx), key=lambda sl: float(sl.position @ sl.normal))
        for sl in st[1::3]:
            cut = max(0, min(sl.rows, sl.cols) // 8)
            top, bottom, left, right = (int(v) for v in rng.integers(-cut, 17, size=4))
            top, bottom = max(top, 8 - sl.rows // 2), max(bottom, 8 - sl.rows // 2)
            left, right = max(left, 8 - sl.cols // 2), max(right, 8 - sl.cols // 2)
            dr, dc = sl.spacing
            sl.centre = sl.centre + 0.5 * (right - left) * dc * sl.row_dir + 0.5 * (bottom - top) * dr * sl.col_dir
            sl.rows += top + bottom
            sl.cols += left + right
    p.mixed_fov = True


def add_parallel_block(p: SeriesPlan, rng: np.random.Generator) -> None:
    """A second block in ``p`` (in place): stack 0's slices again, at the same positions along
    the normal, the field of view shifted in-plane by 20-35 % of its width (a repeat after the
    operator moved the field of view). It gets the next stack index, so its instances follow."""
    src = p.stack(0)
    new_index = max(sl.stack_index for sl in p.slices) + 1
    sl0 = src[0]
    frac = rng.uniform(0.2, 0.35) * rng.choice([-1.0, 1.0])
    shift = frac * sl0.cols * sl0.spacing[1] * sl0.row_dir + rng.uniform(-0.1, 0.1) * sl0.rows * sl0.spacing[0] * sl0.col_dir
    p.slices += [replace(sl, centre=sl.centre + shift, row_dir=sl.row_dir.copy(), col_dir=sl.col_dir.copy(),
                         stack_index=new_index) for sl in src]
    if p.stack_spacing:
        p.stack_spacing[new_index] = p.stack_spacing.get(0, p.spacing_between)
    p.parallel_block = True


def resize_slices(slices: list[SlicePlan], factor: float) -> None:
    """Give ``slices`` a different matrix over the same field of view (in place)."""
    for sl in slices:
        fov_r, fov_c = sl.rows * sl.spacing[0], sl.cols * sl.spacing[1]
        sl.rows = max(16, round(sl.rows * factor))
        sl.cols = max(16, round(sl.cols * factor))
        sl.spacing = (fov_r / sl.rows, fov_c / sl.cols)


#: Base contrast per series description (Sagittal T2/STIR is STIR in some studies).
DESCRIPTION_WEIGHTING: dict[str, str] = {SAG_T1: "T1", SAG_T2: "T2", AXIAL_T2: "T2"}
