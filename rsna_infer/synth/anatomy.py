"""A phantom lumbar spine in patient coordinates, and its ground-truth keypoints.

The spine is built in a curvilinear frame that follows a lordotic centre line through the
vertebral bodies: ``u`` lateral (+ = patient left), ``d`` perpendicular to the centre line in
the sagittal plane (+ = posterior), ``s`` arc length along it (+ = cranial). Everything that
varies along the spine (body/disc extent, canal diameter, narrowing at a graded level) is a
1-D profile of ``s``, so evaluating the anatomy at millions of pixel positions is a few
vectorised ``np.interp`` calls. A rigid transform (small rotation + offset) places the
local frame (``u, v, w`` = left, posterior, superior) in patient space (LPS).

Severity lives only in geometry: the canal, lateral recess and foramen of a graded level
shrink; nothing else knows the grade.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from ..constants import N_LEVELS
from .grades import narrowing_factor

#: Vertebrae modelled, cranial to caudal. S1 stands for the whole sacrum.
VERTEBRAE: tuple[str, ...] = ("T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")
#: Discs between consecutive vertebrae (disc j lies between VERTEBRAE[j] and VERTEBRAE[j+1]).
DISCS: tuple[str, ...] = tuple(f"{a}/{b}" for a, b in itertools.pairwise(VERTEBRAE))
#: Index in `DISCS` of the graded levels L1/L2 .. L5/S1.
GRADED_DISCS: tuple[int, ...] = tuple(DISCS.index(d) for d in ("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"))

_S_STEP = 0.25  # mm, resolution of the longitudinal profiles
_W_STEP = 0.25  # mm, resolution of the tabulated centre line


def _box(s: np.ndarray, lo: float, hi: float, edge: float = 0.6) -> np.ndarray:
    """Smooth indicator of ``lo <= s <= hi`` (linear edges ``edge`` mm wide)."""
    return np.clip((s - lo) / edge + 0.5, 0, 1) * np.clip((hi - s) / edge + 0.5, 0, 1)


@dataclass
class Anatomy:
    """One study's spine: rigid placement, centre-line curve, sizes and severity profiles."""

    origin: np.ndarray  # [3] patient position of the local origin (mm)
    rotation: np.ndarray  # [3, 3] columns: patient directions of local u (left), v (posterior), w (superior)
    curve_slope: tuple[float, float]  # lordosis: centre-line slope dv/dw tends to these above/below the apex
    curve_apex: float  # w of the most anterior point of the centre line
    curve_scale: float  # mm over which the slope builds up
    body_top: np.ndarray  # [10] s of each vertebral body's upper endplate
    body_bot: np.ndarray  # [10]
    body_half_width: np.ndarray  # [10] a_u (mm)
    body_half_depth: np.ndarray  # [10] a_d (mm)
    canal_half_ap: float  # r_d0: canal AP half-diameter without narrowing
    canal_half_width: float  # r_u0
    recess_radius: tuple[float, float]  # (lateral, AP) half-axes of a normal lateral recess
    foramen_radius: tuple[float, float, float]  # (u, d, s) half-axes of a normal foramen
    spinous_length: float
    conus_s: float  # s where the spinal cord ends (conus medullaris)
    spinal_factor: np.ndarray  # [9 discs] canal size factor at each disc (1 = normal)
    foramen_factor: np.ndarray  # [2 sides, 9 discs]
    recess_factor: np.ndarray  # [2 sides, 9 discs]
    disc_hydration: np.ndarray  # [9] nucleus T2 brightness factor
    torso: dict[str, float]  # v_back, half_depth, half_width, fat
    texture: np.ndarray  # [4, 4]: wave vector (3) and phase (1) of soft-tissue texture waves
    grades: np.ndarray  # [5, 5] the grades this anatomy shows (canonical order)
    profiles: dict[str, np.ndarray] = field(init=False, repr=False)
    _w_grid: np.ndarray = field(init=False, repr=False)
    _arc_grid: np.ndarray = field(init=False, repr=False)
    _curve_table: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._w_grid = np.arange(-450.0, 450.0 + _W_STEP, _W_STEP)
        f1 = self.curve_slope_at(self._w_grid)
        ds = np.sqrt(1 + f1**2)
        arc = np.concatenate([[0.0], np.cumsum(0.5 * (ds[1:] + ds[:-1]) * _W_STEP)])
        self._arc_grid = arc - np.interp(0.0, self._w_grid, arc)
        # f, f', f'', arc length tabulated on the w grid: rendering looks them up (cheap)
        # instead of evaluating transcendental functions at millions of points.
        self._curve_table = np.stack([self.curve(self._w_grid), f1, self.curve_bend_at(self._w_grid), self._arc_grid])
        self.profiles = self._build_profiles()

    # -- centre line ----------------------------------------------------------------------
    def curve(self, w: np.ndarray) -> np.ndarray:
        """The spine's centre line: its anterior offset at height ``w`` (mm)."""
        x = (w - self.curve_apex) / self.curve_scale
        x0 = -self.curve_apex / self.curve_scale
        amp = np.where(x > 0, self.curve_slope[0], self.curve_slope[1])
        amp0 = self.curve_slope[0] if x0 > 0 else self.curve_slope[1]
        return self.curve_scale * (amp * _logcosh(x) - amp0 * _logcosh(x0))

    def curve_slope_at(self, w: np.ndarray) -> np.ndarray:
        """First derivative of `curve`."""
        x = (w - self.curve_apex) / self.curve_scale
        return np.where(x > 0, self.curve_slope[0], self.curve_slope[1]) * np.tanh(x)

    def curve_bend_at(self, w: np.ndarray) -> np.ndarray:
        """Second derivative of `curve`."""
        x = (w - self.curve_apex) / self.curve_scale
        th = np.tanh(x)
        return np.where(x > 0, self.curve_slope[0], self.curve_slope[1]) * (1 - th * th) / self.curve_scale

    def to_local(self, xyz: np.ndarray) -> np.ndarray:
        return (np.asarray(xyz, dtype=np.float64) - self.origin) @ self.rotation

    def local_to_world(self, uvw: np.ndarray) -> np.ndarray:
        return np.asarray(uvw, dtype=np.float64) @ self.rotation.T + self.origin

    def local_components(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(u, v, w) of patient points ``[N, 3]`` as separate arrays in ``xyz``'s float dtype
        (explicit products: no BLAS call, so no thread pool on a shared machine)."""
        dt = xyz.dtype if xyz.dtype in (np.float32, np.float64) else np.dtype(np.float64)
        rel = [np.ascontiguousarray(xyz[:, i]) - dt.type(self.origin[i]) for i in range(3)]
        r = self.rotation.astype(dt)
        return tuple(rel[0] * r[0, j] + rel[1] * r[1, j] + rel[2] * r[2, j] for j in range(3))  # type: ignore[return-value]

    def to_spine(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patient ``[N, 3]`` -> curvilinear ``(u, d, s)`` (foot point on the centre line by
        Newton steps on the tabulated curve). Computes in ``xyz``'s dtype (float32 is plenty
        for rendering; float64 is exact to ~1e-4 mm)."""
        xyz = np.asarray(xyz)
        if xyz.dtype not in (np.float32, np.float64):
            xyz = xyz.astype(np.float64)
        shape = xyz.shape[:-1]
        u, v, w = self.local_components(xyz.reshape(-1, 3))
        dt = xyz.dtype.type
        table = self._curve_table.astype(dt)
        step = np.diff(table, axis=1)
        w0, inv, last = dt(self._w_grid[0]), dt(1.0 / _W_STEP), dt(table.shape[1] - 1.001)

        def lookup(t: np.ndarray, rows: range) -> list[np.ndarray]:
            pos = np.clip((t - w0) * inv, 0, last)
            base = np.floor(pos)
            i = base.astype(np.int32)
            frac = pos - base
            return [table[r].take(i) + frac * step[r].take(i) for r in rows]

        t = w
        for _ in range(3):
            f, f1, f2 = lookup(t, range(3))
            dv = v - f
            # Newton on the squared distance; far from the curve its curvature term can make
            # the Hessian vanish or turn negative, so it is floored at half the Gauss-Newton
            # value (1 + f1²), which keeps every step finite and descending.
            gauss_newton = 1.0 + f1 * f1
            hessian = np.maximum(gauss_newton - dv * f2, dt(0.5) * gauss_newton)
            t = t + (dv * f1 + (w - t)) / hessian
        f, f1, s = lookup(t, (0, 1, 3))
        d = ((v - f) - (w - t) * f1) / np.sqrt(1 + f1 * f1)
        return u.reshape(shape), d.reshape(shape), s.reshape(shape)

    def profile_index(self, s: np.ndarray) -> np.ndarray:
        """Index into the longitudinal profiles of each ``s`` (nearest 0.25 mm grid point)."""
        grid = self.profiles["s"]
        return np.clip(np.rint((s - grid[0]) / _S_STEP), 0, len(grid) - 1).astype(np.int64)

    def from_spine(self, u: np.ndarray, d: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Curvilinear ``(u, d, s)`` -> patient ``[..., 3]``."""
        u, d, s = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (u, d, s)))
        t = np.interp(s, self._arc_grid, self._w_grid)
        f1 = self.curve_slope_at(t)
        norm = np.sqrt(1 + f1 * f1)
        v = self.curve(t) + d / norm
        w = t - d * f1 / norm
        return self.local_to_world(np.stack([u, v, w], axis=-1))

    def tangent(self, s: float) -> np.ndarray:
        """Unit patient direction of the centre line (cranial) at arc length ``s``."""
        t = float(np.interp(s, self._arc_grid, self._w_grid))
        f1 = float(self.curve_slope_at(np.array(t)))
        return self.rotation @ (np.array([0.0, f1, 1.0]) / np.hypot(1.0, f1))

    # -- landmarks ------------------------------------------------------------------------
    @property
    def disc_centre(self) -> np.ndarray:
        """[9] s of each disc's mid plane."""
        return 0.5 * (self.body_bot[:-1] + self.body_top[1:])

    @property
    def disc_height(self) -> np.ndarray:
        return self.body_bot[:-1] - self.body_top[1:]

    @property
    def body_height(self) -> np.ndarray:
        return self.body_top - self.body_bot

    def canal_centre_d(self, s: np.ndarray) -> np.ndarray:
        return np.interp(s, self.profiles["s"], self.profiles["canal_d"])

    def foramen_centre(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(s [9], d [9], |u|) of the foramina below each vertebra (same for both sides)."""
        s = self.body_bot[:-1] + 0.2 * self.body_height[:-1]
        d = self.canal_centre_d(s) - 0.25 * self.canal_half_ap
        return s, d, self.canal_half_width + 6.0

    def recess_offset(self) -> tuple[float, float]:
        """(|u|, d offset from the canal centre) of the lateral recess axis."""
        return 0.55 * self.canal_half_width + 3.0, -0.3 * self.canal_half_ap

    def keypoints(self) -> dict[str, np.ndarray]:
        """Ground-truth patient points per kind, in `rsna_infer.keypoints` layout:
        spinal [5, 3] (canal centre at each disc), foraminal and subarticular [10, 3]
        (index side * 5 + level, left side first)."""
        disc = self.disc_centre[list(GRADED_DISCS)]
        spinal = self.from_spine(np.zeros(N_LEVELS), self.canal_centre_d(disc), disc)
        fs, fd, fu = self.foramen_centre()
        fs, fd = fs[list(GRADED_DISCS)], fd[list(GRADED_DISCS)]
        ru, rd = self.recess_offset()
        foraminal, subarticular = [], []
        for sign in (1.0, -1.0):  # left (+u) first
            foraminal.append(self.from_spine(sign * fu * np.ones(N_LEVELS), fd, fs))
            subarticular.append(self.from_spine(sign * ru * np.ones(N_LEVELS), self.canal_centre_d(disc) + rd, disc))
        return {
            "spinal": spinal,
            "foraminal": np.concatenate(foraminal),
            "subarticular": np.concatenate(subarticular),
        }

    # -- longitudinal profiles --------------------------------------------------------------
    def _build_profiles(self) -> dict[str, np.ndarray]:
        s = np.arange(self.body_bot[-1] - 120.0, self.body_top[0] + 160.0, _S_STEP)
        centres = 0.5 * (self.body_top + self.body_bot)
        # Body size: interpolated between body centres; sacrum tapers caudally.
        sac_bot = self.body_bot[-1]
        taper = np.clip((s - sac_bot) / (self.body_height[-1]), 0.35, 1.0)
        sac = s < centres[-1]
        a_u = np.interp(s, centres[::-1], self.body_half_width[::-1])
        a_d = np.interp(s, centres[::-1], self.body_half_depth[::-1])
        a_u = np.where(sac, a_u * (0.55 + 0.45 * taper), a_u)
        a_d = np.where(sac, a_d * (0.45 + 0.55 * taper), a_d)
        body = np.zeros_like(s)
        marrow = np.zeros_like(s)
        pedicle = np.zeros_like(s)
        arch = np.zeros_like(s)
        nv = len(VERTEBRAE)
        for i in range(nv):
            top = self.body_top[i] if i > 0 else s[-1] + 10  # the column continues cranially
            body += _box(s, self.body_bot[i], top)
            marrow += _box(s, self.body_bot[i] + 1.5, top - 1.5)
            if i < nv - 1:
                h = self.body_height[i]
                pedicle += _box(s, self.body_top[i] - 0.42 * h, self.body_top[i] - 0.02 * h, 1.0)
                below = self.disc_height[i]
                arch += _box(s, self.body_bot[i] - 0.5 * below - 3.0, self.body_top[i] - 0.3 * h - 3.0, 1.2)
        disc = np.zeros_like(s)
        nucleus = np.zeros_like(s)
        hydration = np.zeros_like(s)
        facet = np.zeros_like(s)
        bulge = np.zeros_like(s)
        spinal = np.ones_like(s)
        recess = np.ones((2, len(s)))
        for j, (c, h) in enumerate(zip(self.disc_centre, self.disc_height)):
            disc += _box(s, c - 0.5 * h, c + 0.5 * h)
            inner = _box(s, c - 0.28 * h, c + 0.28 * h, 1.5)
            nucleus += inner
            hydration += inner * self.disc_hydration[j]
            facet += _box(s, c - 5.0, c + 9.0, 1.5)
            bump = np.exp(-0.5 * ((s - c) / (0.5 * h + 3.0)) ** 4)  # flat over the disc, then recovers
            narrow = 1.0 - self.spinal_factor[j]
            spinal -= narrow * bump
            bulge += _box(s, c - 0.5 * h, c + 0.5 * h, 2.0) * (0.6 + 0.35 * narrow * self.canal_half_ap)
            for side in range(2):
                recess[side] -= (1.0 - self.recess_factor[side, j]) * bump
        canal_d = np.interp(s, centres[::-1], self.body_half_depth[::-1]) + 1.0 + self.canal_half_ap
        sacral = np.clip(1.0 - (self.body_top[-1] - s) / 60.0, 0.45, 1.0)  # sacral canal narrows
        cord = np.clip((s - self.conus_s) / 15.0, 0.0, 1.0)
        return {
            "s": s,
            "a_u": a_u,
            "a_d": a_d + bulge * np.clip(disc, 0, 1),
            "body": np.clip(body, 0, 1),
            "marrow": np.clip(marrow, 0, 1),
            "disc": np.clip(disc, 0, 1),
            "nucleus": np.clip(nucleus, 0, 1),
            "hydration": hydration,
            "pedicle": np.clip(pedicle, 0, 1),
            "arch": np.clip(arch, 0, 1),
            "facet": np.clip(facet, 0, 1),
            "canal_d": canal_d,
            "spinal": np.clip(spinal, 0.05, 1.1) * sacral,
            "recess_left": np.clip(recess[0], 0.05, 1.1) * sacral,
            "recess_right": np.clip(recess[1], 0.05, 1.1) * sacral,
            "cord": cord,
        }


def sample_anatomy(rng: np.random.Generator, grades: np.ndarray) -> Anatomy:
    """Draw one study's spine showing ``grades`` ([5, 5] canonical int grades)."""
    grades = np.asarray(grades, dtype=np.int64)
    nv, nd = len(VERTEBRAE), len(DISCS)
    scale = rng.uniform(0.9, 1.1)
    body_h = np.array([20.5, 21.5, 22.5, 23.5, 25.0, 26.0, 27.0, 27.0, 26.0, 95.0]) * scale
    body_h[:-1] += rng.uniform(-1.0, 1.0, nv - 1)
    disc_h = np.array([4.5, 5.0, 5.5, 6.5, 7.5, 8.5, 9.5, 10.0, 9.5]) * scale
    disc_h += rng.uniform(-0.8, 0.8, nd)
    # Lay bodies and discs out cranial -> caudal, then put L3's centre near s = 0.
    tops, bots, cur = [], [], 0.0
    for i in range(nv):
        tops.append(cur)
        cur -= body_h[i]
        bots.append(cur)
        if i < nd:
            cur -= disc_h[i]
    tops, bots = np.array(tops), np.array(bots)
    l3 = VERTEBRAE.index("L3")
    shift = -0.5 * (tops[l3] + bots[l3]) + rng.uniform(-8, 8)
    tops, bots = tops + shift, bots + shift

    half_width = np.linspace(15.0, 25.0, nv) * rng.uniform(0.92, 1.08)
    half_width[-1] = half_width[-2] * 1.05
    half_depth = np.linspace(12.5, 17.5, nv) * rng.uniform(0.92, 1.08)
    half_depth[-1] = half_depth[-2] * 1.0

    def factors(g: np.ndarray) -> np.ndarray:
        """[9 discs] size factors: graded discs from their grade, the others normal."""
        out = narrowing_factor(np.zeros(nd, dtype=np.int64), rng)
        out[list(GRADED_DISCS)] = narrowing_factor(g, rng)
        return out

    spinal = factors(grades[0])
    foramen = np.stack([factors(grades[1]), factors(grades[2])])
    recess = np.stack([factors(grades[3]), factors(grades[4])])

    angles = np.deg2rad([rng.uniform(-8, 8), rng.uniform(-4, 4), rng.uniform(-4, 4)])
    rotation = _rotation(*angles)
    origin = np.array([rng.uniform(-12, 12), rng.uniform(-25, 35), rng.uniform(-150, 150)])
    canal_half_ap = rng.uniform(6.8, 8.8)
    spinous = rng.uniform(28, 42)
    torso_fat = rng.uniform(6, 26)
    v_back = half_depth[l3] + 1 + 2 * canal_half_ap + spinous + rng.uniform(12, 30) + torso_fat
    texture = np.concatenate(
        [rng.normal(size=(4, 3)) / rng.uniform(20, 60, size=(4, 1)) * 2 * np.pi, rng.uniform(0, 2 * np.pi, (4, 1))],
        axis=1,
    )
    return Anatomy(
        origin=origin,
        rotation=rotation,
        curve_slope=(rng.uniform(0.25, 0.5), rng.uniform(0.35, 0.7)),
        curve_apex=rng.uniform(-45, -15),
        curve_scale=rng.uniform(55, 95),
        body_top=tops,
        body_bot=bots,
        body_half_width=half_width,
        body_half_depth=half_depth,
        canal_half_ap=canal_half_ap,
        canal_half_width=rng.uniform(10.0, 12.5),
        recess_radius=(rng.uniform(4.0, 5.0), rng.uniform(3.2, 4.0)),
        foramen_radius=(4.5, rng.uniform(4.0, 5.0), rng.uniform(6.5, 8.0)),
        spinous_length=spinous,
        conus_s=0.5 * (tops[VERTEBRAE.index("L1")] + bots[VERTEBRAE.index("L1")]) + rng.uniform(-6, 10),
        spinal_factor=spinal,
        foramen_factor=foramen,
        recess_factor=recess,
        disc_hydration=rng.uniform(0.35, 1.0, nd),
        torso={
            "v_back": v_back,
            "half_depth": rng.uniform(95, 135),
            "half_width": rng.uniform(130, 175),
            "fat": torso_fat,
        },
        texture=texture,
        grades=grades,
    )


def _logcosh(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    return ax + np.log1p(np.exp(-2 * ax)) - np.log(2.0)


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation about patient x (pitch), then y (roll), then z (yaw)."""
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx
