"""Shared image operations: canonical orientation, slice sampling, resizing through torch,
per-volume normalisation, augmentation, and the bookkeeping that maps model coordinates back
to a volume's voxels exactly.

Conventions
-----------
- Arrays are ``[Z, H, W]`` float32 (slices, rows, columns); voxel coordinates are ``(z, y, x)``
  with pixel *centres* at integers, so the edges of a stack of ``n`` voxels lie at -0.5 and
  ``n - 0.5``.
- A model sees a volume in a **canonical orientation** per view (only axis flips and an
  in-plane transpose, so no resampling error): sagittal -> slices run toward patient left,
  rows toward inferior, columns toward posterior; axial -> slices run toward inferior, rows
  toward posterior, columns toward patient left. Laterality and level order therefore come
  from patient coordinates (LPS: +x is the patient's left), never from the DICOM slice order.
- Model coordinates are **normalised** ``u`` in [0, 1] per axis, in ``(z, y, x)`` order, over a
  region ``[lo, hi]`` of the canonical volume (voxel-edge coordinates): ``c = lo + u (hi - lo)``.
  For a plain resize the region is the whole volume, and ``u = (c + 0.5) / n`` whatever the
  output size: torch's ``interpolate(..., align_corners=False)`` samples exactly there. A flip is
  a region with ``hi < lo``; a zoom/shift is a smaller/shifted region. `VoxelTransform` keeps
  the region and the orientation, so ``u`` maps back to the source volume's voxel exactly.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .specs import NormSpec, SpecError
from .validate import parse_fields

if TYPE_CHECKING:
    from .io.volume import Volume

logger = logging.getLogger(__name__)

#: Patient (LPS) direction of canonical axes (z, y, x) for each view.
CANONICAL_AXES: dict[str, tuple[tuple[float, float, float], ...]] = {
    "sagittal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),  # left, inferior, posterior
    "axial": ((0.0, 0.0, -1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0)),  # inferior, posterior, left
}
#: Canonical axis index of each anatomical direction, per view.
LATERAL_AXIS: dict[str, int] = {"sagittal": 0, "axial": 2}
AP_AXIS: dict[str, int] = {"sagittal": 2, "axial": 1}
VIEWS: tuple[str, ...] = tuple(CANONICAL_AXES)


def _check_view(view: str) -> None:
    if view not in CANONICAL_AXES:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")


# --------------------------------------------------------------------------------------
# Orientation
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Orientation:
    """How a source ``[Z, H, W]`` stack maps to its canonical array: optional row/column
    transpose, then a flip per canonical axis."""

    src_shape: tuple[int, int, int]
    transpose: bool = False
    flip: tuple[bool, bool, bool] = (False, False, False)

    @property
    def shape(self) -> tuple[int, int, int]:
        z, h, w = self.src_shape
        return (z, w, h) if self.transpose else (z, h, w)

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """Canonical view of ``pixels`` (a numpy view; no copy)."""
        if tuple(pixels.shape) != self.src_shape:
            raise ValueError(f"pixels shape {pixels.shape} does not match orientation {self.src_shape}")
        out = pixels.transpose(0, 2, 1) if self.transpose else pixels
        for axis, f in enumerate(self.flip):
            if f:
                out = np.flip(out, axis=axis)
        return out

    def to_source(self, zyx: np.ndarray) -> np.ndarray:
        """Canonical voxel coordinates ``[..., 3]`` -> source voxel coordinates."""
        c = np.array(zyx, dtype=np.float64, copy=True)
        shape = self.shape
        for axis, f in enumerate(self.flip):
            if f:
                c[..., axis] = shape[axis] - 1 - c[..., axis]
        return c[..., [0, 2, 1]] if self.transpose else c

    def to_canonical(self, zyx: np.ndarray) -> np.ndarray:
        """Source voxel coordinates ``[..., 3]`` -> canonical voxel coordinates."""
        c = np.array(zyx, dtype=np.float64, copy=True)
        if self.transpose:
            c = c[..., [0, 2, 1]]
        shape = self.shape
        for axis, f in enumerate(self.flip):
            if f:
                c[..., axis] = shape[axis] - 1 - c[..., axis]
        return c


def view_alignment(volume: "Volume", view: str) -> float:
    """|cos| between the stack normal and the view's slice axis (1 = a true sagittal/axial)."""
    _check_view(view)
    return float(abs(volume.normal @ np.asarray(CANONICAL_AXES[view][0])))


def orient(volume: "Volume", view: str) -> Orientation:
    """The canonical orientation of ``volume`` for ``view`` (decided in patient coordinates)."""
    _check_view(view)
    tz, ty, tx = (np.asarray(a) for a in CANONICAL_AXES[view])
    # source axes: z along the normal, rows along col_dir, columns along row_dir
    transpose = abs(volume.col_dir @ ty) + abs(volume.row_dir @ tx) < abs(volume.row_dir @ ty) + abs(volume.col_dir @ tx)
    row_axis, col_axis = (volume.row_dir, volume.col_dir) if transpose else (volume.col_dir, volume.row_dir)
    flip = (bool(volume.normal @ tz < 0), bool(row_axis @ ty < 0), bool(col_axis @ tx < 0))
    return Orientation(tuple(int(s) for s in volume.pixels.shape), bool(transpose), flip)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# Normalised coordinates
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VoxelTransform:
    """Normalised model coordinates ``u`` (z, y, x) <-> source voxel coordinates.

    ``c = lo + u * (hi - lo)`` in canonical voxel coordinates, then ``orientation`` maps to the
    source stack. ``view`` tells which canonical axis is lateral: a region reversed along it
    means the model's left/right outputs refer to the mirrored image (`lr_swapped`).
    """

    orientation: Orientation
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    view: str = "sagittal"

    @classmethod
    def full(cls, orientation: Orientation, view: str) -> "VoxelTransform":
        """The whole canonical volume (a plain resize)."""
        _check_view(view)
        shape = orientation.shape
        return cls(orientation, (-0.5, -0.5, -0.5), tuple(s - 0.5 for s in shape), view)  # type: ignore[arg-type]

    @property
    def lr_swapped(self) -> bool:
        ax = LATERAL_AXIS[self.view]
        return self.hi[ax] < self.lo[ax]

    def to_canonical(self, u: np.ndarray) -> np.ndarray:
        u = np.asarray(u, dtype=np.float64)
        lo, hi = np.asarray(self.lo), np.asarray(self.hi)
        return lo + u * (hi - lo)

    def to_voxel(self, u: np.ndarray) -> np.ndarray:
        """Normalised ``u`` ``[..., 3]`` -> source voxel ``(z, y, x)``."""
        return self.orientation.to_source(self.to_canonical(u))

    def to_norm(self, zyx: np.ndarray) -> np.ndarray:
        """Source voxel ``(z, y, x)`` ``[..., 3]`` -> normalised ``u``."""
        c = self.orientation.to_canonical(zyx)
        lo, hi = np.asarray(self.lo), np.asarray(self.hi)
        return (c - lo) / (hi - lo)

    def reframed(self, scale: np.ndarray, shift: np.ndarray) -> "VoxelTransform":
        """The transform after resampling with ``u_old = scale * u_new + shift`` per axis."""
        lo, hi = np.asarray(self.lo), np.asarray(self.hi)
        a, b = np.asarray(scale, dtype=np.float64), np.asarray(shift, dtype=np.float64)
        new_lo, new_hi = lo + b * (hi - lo), lo + (a + b) * (hi - lo)
        return replace(self, lo=tuple(float(v) for v in new_lo), hi=tuple(float(v) for v in new_hi))

    def flipped(self, axis: int) -> "VoxelTransform":
        """The transform of the image flipped along ``axis`` (``u -> 1 - u`` on that axis)."""
        scale, shift = np.ones(3), np.zeros(3)
        scale[axis], shift[axis] = -1.0, 1.0
        return self.reframed(scale, shift)


# --------------------------------------------------------------------------------------
# Slice sampling, resizing, resampling
# --------------------------------------------------------------------------------------
def sample_slice_indices(n_total: int, n: int) -> np.ndarray:
    """``n`` evenly spaced slice indices over a stack of ``n_total`` (first and last included;
    indices repeat when the stack is shorter than ``n``); symmetric: index ``i`` of a stack
    mirrors index ``n - 1 - i``."""
    if n_total < 1 or n < 1:
        raise ValueError(f"need n_total >= 1 and n >= 1, got {n_total}, {n}")
    x = np.linspace(0, n_total - 1, n)
    # halves round away from the middle, so a reversed stack gets the mirrored indices
    up = np.floor(x + 0.5)
    down = (n_total - 1) - np.floor((n_total - 1 - x) + 0.5)
    return np.where(x < (n_total - 1) / 2.0, down, up).astype(np.int64)


def resize_slices(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize every slice of ``[K, H, W]`` to ``size`` (bilinear, antialiased when shrinking;
    pixel centres map exactly: ``u = (c + 0.5) / n``)."""
    import torch
    import torch.nn.functional as F

    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.ndim != 3:
        raise ValueError(f"expected [K, H, W], got shape {arr.shape}")
    size = (int(size[0]), int(size[1]))
    if arr.shape[1:] == size:
        return arr.copy()
    t = torch.from_numpy(arr)[None]
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out[0].numpy()


def resize_depth(arr: np.ndarray, depth: int) -> np.ndarray:
    """Linearly resample ``[Z, H, W]`` to ``depth`` slices (same centre convention)."""
    import torch
    import torch.nn.functional as F

    arr = np.ascontiguousarray(arr, dtype=np.float32)
    z, h, w = arr.shape
    if z == depth:
        return arr.copy()
    # [1, 1, Z, H*W]: the 2-D antialiased kernel runs along z; scale 1 across H*W is the identity
    t = torch.from_numpy(arr).reshape(1, 1, z, h * w)
    out = F.interpolate(t, size=(int(depth), h * w), mode="bilinear", align_corners=False, antialias=True)
    return out.reshape(int(depth), h, w).numpy()


def resize_volume(arr: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """Resize ``[Z, H, W]`` to ``(D, H', W')``: antialiased in-plane, linear across slices."""
    return resize_depth(resize_slices(arr, (size[1], size[2])), int(size[0]))


def sample_region(
    arr: np.ndarray,
    lo: tuple[float, ...],
    hi: tuple[float, ...],
    out_shape: tuple[int, ...],
    padding: float = 0.0,
) -> np.ndarray:
    """Resample the region ``[lo, hi]`` (voxel-edge coordinates, per axis; ``hi < lo`` flips) of
    ``arr`` onto an ``out_shape`` grid with (tri/bi)linear interpolation; outside -> ``padding``.

    ``arr`` is ``[Z, H, W]`` with a 3-element region (3-D), or ``[K, H, W]`` with a 2-element
    region over (y, x) applied to each of the K slices (2-D). Output pixel ``j`` samples at
    ``lo + (j + 0.5) / n_out * (hi - lo)`` exactly like `VoxelTransform.reframed` assumes.
    """
    import torch
    import torch.nn.functional as F

    arr = np.ascontiguousarray(arr, dtype=np.float32)
    nd = len(lo)
    if nd not in (2, 3) or len(hi) != nd or len(out_shape) != nd:
        raise ValueError("lo, hi and out_shape must all have 2 (y, x) or 3 (z, y, x) entries")
    src = arr.shape[-nd:]
    axes = []
    for k in range(nd):
        j = (np.arange(out_shape[k], dtype=np.float64) + 0.5) / out_shape[k]
        c = lo[k] + j * (hi[k] - lo[k])
        axes.append(torch.from_numpy(2.0 * (c + 0.5) / src[k] - 1.0).float())  # grid_sample, align_corners=False
    mesh = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack(mesh[::-1], dim=-1)[None]  # last dim is (x, y[, z])
    t = torch.from_numpy(arr - padding)
    t = t[None, None] if nd == 3 else t[None]
    out = F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out[0, 0] if nd == 3 else out[0]
    return out.numpy() + np.float32(padding)


class shared_resizes:
    """Within this context (one study's preparation), resized canonical slices are computed
    once per volume, slice selection and size, and shared by every family that asks for the
    same (e.g. an axial 3-D model and the level classifier at the same in-plane size). Bound
    to the thread that entered it; nothing is kept after it exits."""

    _local = threading.local()

    def __enter__(self) -> "shared_resizes":
        self._outer = getattr(self._local, "cache", None)
        if self._outer is None:
            self._local.cache = {}
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._outer is None:
            self._local.cache = None

    @classmethod
    def cache(cls) -> dict | None:
        return getattr(cls._local, "cache", None)


def canonical_slices_resized(
    volume: "Volume", orientation: Orientation, canonical_slices: np.ndarray | None, size: tuple[int, int]
) -> np.ndarray:
    """``resize_slices(orientation.apply(volume.pixels)[canonical_slices], size)`` (every slice
    when ``canonical_slices`` is None), without copying the full-size stack.

    Resizing treats every slice on its own, so when the orientation only reverses the slice
    order (the usual case: no in-plane flip or transpose) the source slices are resized where
    they lie and the small result is put in canonical order: the same numbers, without a
    copy of the whole stack. With an in-plane flip or transpose the canonical view is copied
    first, as before. Inside `shared_resizes` the result is shared (callers must not write to it).
    """
    z = orientation.src_shape[0]
    idx = np.arange(z, dtype=np.int64) if canonical_slices is None else np.asarray(canonical_slices, dtype=np.int64)
    size = (int(size[0]), int(size[1]))
    cache = shared_resizes.cache()
    key = (id(volume), orientation, idx.tobytes(), size)
    if cache is not None and key in cache:
        return cache[key]
    if orientation.transpose or orientation.flip[1] or orientation.flip[2]:
        out = resize_slices(orientation.apply(volume.pixels)[idx], size)
    else:
        src = z - 1 - idx if orientation.flip[0] else idx
        if np.array_equal(src, np.arange(z)):
            out = resize_slices(volume.pixels, size)
        elif np.array_equal(src, np.arange(z - 1, -1, -1)):
            out = np.ascontiguousarray(resize_slices(volume.pixels, size)[::-1])
        else:
            out = resize_slices(volume.pixels[src], size)
    if cache is not None:
        cache[key] = out
    return out


# --------------------------------------------------------------------------------------
# Normalisation and augmentation
# --------------------------------------------------------------------------------------
def volume_bounds(volume: "Volume", norm: NormSpec) -> tuple[float, float]:
    """Per-volume intensity clip range (computed once per volume, applied to every input)."""
    return norm.bounds(volume)


def to_unit(arr: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """Clip to ``bounds`` and scale to [0, 1] (the first half of `NormSpec.apply`)."""
    lo, hi = bounds
    out = (np.clip(np.asarray(arr, dtype=np.float32), lo, hi) - lo) / (hi - lo)
    return np.nan_to_num(out, nan=0.0).astype(np.float32, copy=False)  # a NaN pixel must not poison a whole output


def standardise(unit: np.ndarray, norm: NormSpec) -> np.ndarray:
    """[0, 1] image -> model input, ``(x - mean) / std`` (the second half of `NormSpec.apply`)."""
    return norm.apply(unit, bounds=(0.0, 1.0))


@dataclass(frozen=True)
class AugSpec:
    """Training augmentation, read from ``InputSpec.extra["aug"]`` (all optional).

    ``scale``: max relative zoom (region side multiplied by ``1 ± scale``); ``shift``: max shift
    as a fraction of the region; ``intensity``: max gamma/contrast change; ``ap_flip`` /
    ``lr_flip``: probability of an anterior/posterior or left/right mirror (a left/right mirror
    swaps the left/right targets, see `VoxelTransform.lr_swapped`, so that a model learns to
    treat a mirrored patient as the mirror of the original); ``depth``: whether zoom and shift
    also apply across slices (3-D inputs only).
    """

    scale: float = 0.1
    shift: float = 0.05
    intensity: float = 0.1
    ap_flip: float = 0.5
    lr_flip: float = 0.5
    depth: bool = True

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> "AugSpec":
        aug = cls(**parse_fields(cls, extra.get("aug") or {}, "input.extra.aug", error=SpecError))
        for name in ("ap_flip", "lr_flip"):
            if not 0.0 <= getattr(aug, name) <= 1.0:
                raise SpecError(f"input.extra.aug.{name} is a probability in [0, 1], got {getattr(aug, name)}")
        if not (0.0 <= aug.scale < 0.5 and 0.0 <= aug.shift < 0.5 and 0.0 <= aug.intensity < 1.0):
            raise SpecError(f"input.extra.aug: need 0 <= scale, shift < 0.5 and 0 <= intensity < 1, got {aug}")
        return aug


def random_reframe(
    rng: np.random.Generator, aug: AugSpec, view: str, axes: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Random ``(scale, shift)`` with ``u_old = scale * u_new + shift`` on ``axes`` (others identity):
    zoom/shift plus the A/P and L/R mirrors allowed by ``aug``."""
    scale, shift = np.ones(3), np.zeros(3)
    for ax in axes:
        s = 1.0 + rng.uniform(-aug.scale, aug.scale)
        scale[ax] = s
        shift[ax] = (1.0 - s) / 2.0 + rng.uniform(-aug.shift, aug.shift)
    for ax, p in ((AP_AXIS[view], aug.ap_flip), (LATERAL_AXIS[view], aug.lr_flip)):
        if ax in axes and p > 0 and rng.random() < p:
            shift[ax] = scale[ax] + shift[ax]
            scale[ax] = -scale[ax]
    return scale, shift


def augment_intensity(unit: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Random gamma and contrast/brightness on a [0, 1] image (result clipped to [0, 1])."""
    if strength <= 0:
        return unit
    gamma = float(np.exp(rng.uniform(-strength, strength)))
    contrast = 1.0 + rng.uniform(-strength, strength)
    bright = rng.uniform(-strength, strength) / 2
    out = np.power(np.clip(unit, 0.0, 1.0), gamma) * contrast + bright
    return np.clip(out, 0.0, 1.0).astype(np.float32)


@dataclass
class Prepared:
    """A preprocessed array and the transform from its normalised coordinates to the volume."""

    image: np.ndarray
    transform: VoxelTransform
    bounds: tuple[float, float] = field(default=(0.0, 1.0))


def prepare_volume(
    volume: "Volume",
    view: str,
    size: tuple[int, int, int],
    norm: NormSpec,
    rng: np.random.Generator | None = None,
    aug: AugSpec | None = None,
    bounds: tuple[float, float] | None = None,
) -> Prepared:
    """A whole stack, canonically oriented, resized to ``size`` (D, H, W) and normalised.

    With ``rng`` applies ``aug`` (zoom/shift/mirrors by resampling the resized grid, intensity).
    """
    if len(size) != 3:
        raise SpecError(f"a 3-D input needs size (D, H, W), got {size}")
    orientation = orient(volume, view)
    bounds = bounds if bounds is not None else volume_bounds(volume, norm)
    resized = canonical_slices_resized(volume, orientation, None, (size[1], size[2]))
    unit = to_unit(resize_depth(resized, int(size[0])), bounds)
    transform = VoxelTransform.full(orientation, view)
    if rng is not None:
        aug = aug or AugSpec()
        axes = (0, 1, 2) if aug.depth else (1, 2)
        scale, shift = random_reframe(rng, aug, view, axes)
        lo = tuple(float(b * n - 0.5) for b, n in zip(shift, size))
        hi = tuple(float((a + b) * n - 0.5) for a, b, n in zip(scale, shift, size))
        unit = sample_region(unit, lo, hi, size)
        transform = transform.reframed(scale, shift)
        unit = augment_intensity(unit, rng, aug.intensity)
    return Prepared(standardise(unit, norm), transform, bounds)


def prepare_slices(
    volume: "Volume",
    view: str,
    canonical_slices: np.ndarray,
    size: tuple[int, int],
    norm: NormSpec,
    rng: np.random.Generator | None = None,
    aug: AugSpec | None = None,
    bounds: tuple[float, float] | None = None,
) -> Prepared:
    """Selected slices (canonical positions, clipped into the stack) of a stack, canonically
    oriented, each resized to ``size`` (H, W) and normalised: ``[K, H, W]``. A fractional
    position is the linear blend of its two neighbouring slices (integers take one slice).

    The transform's z axis is the whole canonical stack, so a point on canonical slice ``k``
    has ``u_z = (k + 0.5) / Z``. Augmentation (with ``rng``) is in-plane only.
    """
    if len(size) != 2:
        raise SpecError(f"a 2-D input needs size (H, W), got {size}")
    orientation = orient(volume, view)
    bounds = bounds if bounds is not None else volume_bounds(volume, norm)
    unit = to_unit(_slices_at(volume, orientation, canonical_slices, size), bounds)
    transform = VoxelTransform.full(orientation, view)
    if rng is not None:
        aug = aug or AugSpec()
        scale, shift = random_reframe(rng, aug, view, (1, 2))
        lo = tuple(float(shift[k] * size[k - 1] - 0.5) for k in (1, 2))
        hi = tuple(float((scale[k] + shift[k]) * size[k - 1] - 0.5) for k in (1, 2))
        unit = sample_region(unit, lo, hi, size)
        transform = transform.reframed(scale, shift)
        unit = augment_intensity(unit, rng, aug.intensity)
    return Prepared(standardise(unit, norm), transform, bounds)


def _slices_at(volume: "Volume", orientation: Orientation, positions: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[K, H, W]``: canonical slice positions of ``volume`` (clipped into the stack), resized
    to ``size``; a fractional position blends its two neighbours (resizing is linear, so the
    resized slices are blended: the integer slices go through `canonical_slices_resized`)."""
    pos = np.clip(np.asarray(positions, dtype=np.float64).reshape(-1), 0.0, orientation.shape[0] - 1.0)
    lo = np.floor(pos).astype(np.int64)
    w = (pos - lo).astype(np.float32)
    blend = w > 1e-6
    if not blend.any():
        return canonical_slices_resized(volume, orientation, lo, size)
    hi = np.minimum(lo + 1, orientation.shape[0] - 1)
    return interpolate_slices(canonical_slices_resized(volume, orientation, np.stack([lo, hi], 1).reshape(-1), size),
                              np.arange(len(pos)) * 2.0 + w)


def interpolate_slices(stack: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``[K, H, W]`` float32: slice position ``p`` of ``stack`` ``[Z, H, W]`` (clipped into it),
    linearly blended between ``floor(p)`` and the next slice; integer positions are exact."""
    pos = np.clip(np.asarray(positions, dtype=np.float64).reshape(-1), 0.0, stack.shape[0] - 1.0)
    lo = np.floor(pos).astype(np.int64)
    w = (pos - lo).astype(np.float32)
    out = np.asarray(stack[lo], dtype=np.float32)
    blend = w > 1e-6
    if blend.any():
        hi = np.minimum(lo[blend] + 1, stack.shape[0] - 1)
        out[blend] = out[blend] * (1.0 - w[blend, None, None]) + np.asarray(stack[hi], np.float32) * w[blend, None, None]
    return out


def canonical_slice_index(orientation: "Orientation | VoxelTransform", source_index: np.ndarray) -> np.ndarray:
    """Canonical slice index of source slice index(es) (only the z flip matters)."""
    o = orientation.orientation if isinstance(orientation, VoxelTransform) else orientation
    z = np.asarray(source_index, dtype=np.float64)
    zyx = np.stack([z, np.zeros_like(z), np.zeros_like(z)], axis=-1)
    return o.to_canonical(zyx)[..., 0]


def source_slice_index(orientation: "Orientation | VoxelTransform", canonical_index: np.ndarray) -> np.ndarray:
    """Source slice index of canonical slice index(es)."""
    o = orientation.orientation if isinstance(orientation, VoxelTransform) else orientation
    z = np.asarray(canonical_index, dtype=np.float64)
    zyx = np.stack([z, np.zeros_like(z), np.zeros_like(z)], axis=-1)
    return o.to_source(zyx)[..., 0]
