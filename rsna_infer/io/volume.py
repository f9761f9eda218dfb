"""The data every stage reads: a `Volume` (one sorted stack of slices with its geometry) and
a `Study` (the volumes of one study, grouped by series type).

Coordinates follow DICOM patient space (LPS, mm). Voxel coordinates are ``(z, y, x)``
floats: ``z`` is the fractional index in the *sorted* stack, ``y`` the row and ``x`` the
column of a slice. Slice positions may be unevenly spaced; `to_world`/`to_voxel`
interpolate between neighbouring slices so the mapping stays exact for every slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..constants import SERIES_TYPES
from ..geometry import orthonormal_axes, unit


@dataclass
class Volume:
    """One stack of parallel slices, sorted by position along its normal.

    ``row_dir`` is the unit direction of increasing column index (IOP[0:3]); ``col_dir`` the
    direction of increasing row index (IOP[3:6]); ``normal = row_dir x col_dir``.
    ``spacing`` is ``(Δrow, Δcol)`` in mm (DICOM PixelSpacing order). Axes that are not
    orthonormal are replaced by the nearest orthonormal pair (`geometry.orthonormal_axes`), so
    `to_voxel` inverts `to_world` exactly.

    Every slice lies on the stack's pixel grid: slice ``z`` is ``pixels[z]`` with its first
    pixel at ``positions[z]``. A slice stored in its file with another matrix, spacing or field
    of view was resampled onto that grid; ``native_spacing`` / ``native_offset`` remember how its
    file's pixels sit on it (see `pixel_to_voxel`), ``files`` / ``sop_instance_uids`` which
    file each slice came from.
    """

    pixels: np.ndarray  # float32 [Z, H, W], rescaled intensities (not normalised)
    positions: np.ndarray  # float64 [Z, 3], ImagePositionPatient of each sorted slice
    row_dir: np.ndarray  # float64 [3]
    col_dir: np.ndarray  # float64 [3]
    spacing: tuple[float, float]  # (Δrow, Δcol) mm
    instance_numbers: np.ndarray  # int64 [Z]
    study_id: int = 0
    series_id: int = 0
    description: str | None = None  # "Sagittal T1" | "Sagittal T2/STIR" | "Axial T2" | None
    stack_index: int = 0  # 0 = largest stack of its series
    #: float64 [Z, 2]: each slice's own PixelSpacing (Δrow, Δcol) in its DICOM file, where
    #: some slices were resampled onto this stack's grid (another matrix size); None = every
    #: slice is stored on the stack's grid. See `pixel_to_voxel`.
    native_spacing: np.ndarray | None = None
    #: float64 [Z, 2]: where the first pixel of each slice's DICOM file lies relative to
    #: ``positions[z]``, in mm along (col_dir, row_dir), i.e. (down the rows, along the
    #: columns); non-zero for a slice stored with another field of view (its own IPP). None =
    #: every file starts at its slice's position.
    native_offset: np.ndarray | None = None
    #: the DICOM file of each sorted slice (None when the volume was not read from files)
    files: list[str] | None = None
    #: SOPInstanceUID of each sorted slice (entries None where a file had none)
    sop_instance_uids: list[str | None] | None = None
    normal: np.ndarray = field(init=False)
    _percentiles: dict = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.pixels = np.ascontiguousarray(self.pixels, dtype=np.float32)
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(-1, 3)
        self.row_dir, self.col_dir, _ = orthonormal_axes(self.row_dir, self.col_dir)
        self.normal = unit(np.cross(self.row_dir, self.col_dir))
        self.instance_numbers = np.asarray(self.instance_numbers, dtype=np.int64).reshape(-1)
        self.spacing = (float(self.spacing[0]), float(self.spacing[1]))
        if self.pixels.ndim != 3:
            raise ValueError(f"pixels must be [Z, H, W], got shape {self.pixels.shape}")
        z = self.pixels.shape[0]
        if len(self.positions) != z or len(self.instance_numbers) != z:
            raise ValueError(
                f"{z} slices but {len(self.positions)} positions and {len(self.instance_numbers)} instance numbers"
            )
        for name in ("native_spacing", "native_offset"):
            value = getattr(self, name)
            if value is not None:
                value = np.asarray(value, dtype=np.float64).reshape(-1, 2)
                setattr(self, name, value)
                if len(value) != z:
                    raise ValueError(f"{z} slices but {len(value)} {name.replace('_', ' ')}s")
        for name in ("files", "sop_instance_uids"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, list(value))
                if len(value) != z:
                    raise ValueError(f"{z} slices but {len(value)} {name}")
        d = self.slice_offsets
        if z > 1 and np.any(np.diff(d) <= 0):
            raise ValueError("slices must be sorted by strictly increasing position along the normal")

    def percentiles(self, lo_pct: float, hi_pct: float) -> tuple[float, float]:
        """Intensity percentiles of the whole stack, cached: every model and every crop of
        this volume normalises with the same bounds, computed once."""
        key = (float(lo_pct), float(hi_pct))
        if key not in self._percentiles:
            from ..quantiles import percentiles, subsample

            lo, hi = percentiles(subsample(self.pixels), key)
            self._percentiles[key] = (lo, hi)
        return self._percentiles[key]

    # -- derived geometry ---------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.pixels.shape)  # type: ignore[return-value]

    @property
    def slice_offsets(self) -> np.ndarray:
        """Position of each slice along the normal, ``n · IPP`` (mm, increasing)."""
        return self.positions @ self.normal

    @property
    def slice_spacing(self) -> float:
        """Median distance between neighbouring slices (mm), from positions; tags are not trusted."""
        if len(self.positions) < 2:
            return 1.0
        return float(np.median(np.diff(self.slice_offsets)))

    @property
    def series_type(self) -> str | None:
        return self.description if self.description in SERIES_TYPES else None

    def _origin_at(self, z: np.ndarray) -> np.ndarray:
        """IPP at fractional slice index ``z`` (linear between slices, extrapolated at the ends)."""
        z = np.asarray(z, dtype=np.float64)
        n = len(self.positions)
        if n == 1:
            return self.positions[0] + np.multiply.outer(z, self.normal)
        i0 = np.clip(np.floor(z).astype(np.int64), 0, n - 2)
        t = (z - i0)[..., None]
        return self.positions[i0] * (1 - t) + self.positions[i0 + 1] * t

    def to_world(self, zyx: np.ndarray) -> np.ndarray:
        """Voxel ``(z, y, x)`` -> patient ``(x, y, z)`` mm, for arrays ``[..., 3]``."""
        zyx = np.asarray(zyx, dtype=np.float64)
        dr, dc = self.spacing
        origin = self._origin_at(zyx[..., 0])
        return (
            origin
            + zyx[..., 2:3] * dc * self.row_dir
            + zyx[..., 1:2] * dr * self.col_dir
        )

    def to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        """Patient ``(x, y, z)`` mm -> voxel ``(z, y, x)`` (floats; may fall outside the stack)."""
        xyz = np.asarray(xyz, dtype=np.float64)
        d = xyz @ self.normal
        offs = self.slice_offsets
        n = len(offs)
        if n == 1:
            z = d - offs[0]
        else:
            i0 = np.clip(np.searchsorted(offs, d) - 1, 0, n - 2)
            z = i0 + (d - offs[i0]) / (offs[i0 + 1] - offs[i0])
        rel = xyz - self._origin_at(z)
        dr, dc = self.spacing
        x = rel @ self.row_dir / dc
        y = rel @ self.col_dir / dr
        return np.stack([z, y, x], axis=-1)

    def pixel_to_voxel(self, z: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Pixel (column ``x``, row ``y``) of sorted slice ``z`` *as stored in its DICOM file*
        -> voxel ``(z, y, x)`` of this stack, for arrays of points.

        Label coordinates (``train_label_coordinates.csv``) are pixels of the labelled
        instance. A slice stored with another matrix, spacing or field of view was resampled
        onto the stack's grid, so its pixels scale by its own spacing over the stack's and shift
        by its own first pixel's offset (``native_offset``); every other slice maps to itself.
        """
        z = np.asarray(z, dtype=np.int64)
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if self.native_spacing is not None:
            native = self.native_spacing[z]
            y = y * native[..., 0] / self.spacing[0]
            x = x * native[..., 1] / self.spacing[1]
        if self.native_offset is not None:
            offset = self.native_offset[z]
            y = y + offset[..., 0] / self.spacing[0]
            x = x + offset[..., 1] / self.spacing[1]
        z, y, x = np.broadcast_arrays(z.astype(np.float64), y, x)
        return np.stack([z, y, x], axis=-1)

    def nearest_slice(self, xyz: np.ndarray) -> np.ndarray:
        """Index of the slice nearest to each world point (clipped into the stack)."""
        z = self.to_voxel(xyz)[..., 0]
        return np.clip(np.rint(z), 0, len(self.positions) - 1).astype(np.int64)

    def contains(self, xyz: np.ndarray, margin_mm: float = 0.0) -> np.ndarray:
        """Whether each world point lies inside the stack's box (plus ``margin_mm``)."""
        zyx = self.to_voxel(xyz)
        z_tol = margin_mm / max(self.slice_spacing, 1e-6)
        lim = np.array(self.pixels.shape, dtype=np.float64) - 1
        tol = np.array([z_tol, margin_mm / self.spacing[0], margin_mm / self.spacing[1]])
        return np.all((zyx >= -0.5 - tol) & (zyx <= lim + 0.5 + tol), axis=-1)

    def source(self, z: int) -> str:
        """Where sorted slice ``z`` came from, for messages: its file and SOPInstanceUID."""
        parts = [f"slice {z}", f"instance {int(self.instance_numbers[z])}"]
        if self.files is not None:
            parts.append(str(self.files[z]))
        if self.sop_instance_uids is not None and self.sop_instance_uids[z]:
            parts.append(f"SOPInstanceUID {self.sop_instance_uids[z]}")
        return ", ".join(parts)

    def __repr__(self) -> str:  # keep logs short: never print the pixel array
        return (
            f"Volume(study={self.study_id}, series={self.series_id}, stack={self.stack_index}, "
            f"desc={self.description!r}, shape={self.shape}, spacing={self.spacing}, "
            f"slice_spacing={self.slice_spacing:.2f})"
        )


@dataclass
class Study:
    """All decoded volumes of one study, by series type.

    ``volumes[type]`` lists every stack of every series of that type, best first (largest
    stack of the first series first). ``warnings`` records what was missing or unreadable.
    """

    study_id: int
    volumes: dict[str, list[Volume]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def get(self, series_type: str) -> list[Volume]:
        return self.volumes.get(series_type, [])

    def first(self, series_type: str) -> Volume | None:
        v = self.get(series_type)
        return v[0] if v else None

    def find(self, series_id: int, stack_index: int = 0) -> Volume | None:
        for vols in self.volumes.values():
            for v in vols:
                if v.series_id == series_id and v.stack_index == stack_index:
                    return v
        return None

    def nbytes(self) -> int:
        return sum(v.pixels.nbytes for vols in self.volumes.values() for v in vols)
