"""Intensity of the phantom anatomy at arbitrary patient positions, for one MR contrast.

`render_points` evaluates every structure's approximate signed distance (mm) at the given
points and paints tissues back to front with a soft (anti-aliased) edge. It is fully
vectorised, so a slice is rendered by passing the patient position of each of its pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import Anatomy

TISSUES: tuple[str, ...] = (
    "fat", "muscle", "viscera", "vessel", "bone", "cortex", "marrow", "annulus", "nucleus",
    "csf", "neural", "ligament",
)  # fmt: skip

#: Relative signal of each tissue per contrast (air is 0). STIR suppresses fat.
CONTRASTS: dict[str, dict[str, float]] = {
    "T1": {"fat": 0.95, "muscle": 0.32, "viscera": 0.42, "vessel": 0.06, "bone": 0.45, "cortex": 0.06, "marrow": 0.62,
               "annulus": 0.30, "nucleus": 0.36, "csf": 0.12, "neural": 0.36, "ligament": 0.20},
    "T2": {"fat": 0.68, "muscle": 0.22, "viscera": 0.48, "vessel": 0.05, "bone": 0.30, "cortex": 0.05, "marrow": 0.42,
               "annulus": 0.18, "nucleus": 0.85, "csf": 1.00, "neural": 0.30, "ligament": 0.12},
    "STIR": {"fat": 0.07, "muscle": 0.26, "viscera": 0.55, "vessel": 0.05, "bone": 0.20, "cortex": 0.04, "marrow": 0.20,
                 "annulus": 0.22, "nucleus": 0.85, "csf": 1.00, "neural": 0.33, "ligament": 0.14},
}  # fmt: skip


@dataclass(frozen=True)
class Contrast:
    """Tissue signals of one series (a base contrast with per-series jitter) and its coil profile."""

    name: str
    signal: dict[str, float]
    coil_depth: float  # mm: posterior surface coil sensitivity decays with this length

    @classmethod
    def sample(cls, name: str, rng: np.random.Generator) -> Contrast:
        base = CONTRASTS[name]
        signal = {t: base[t] * rng.uniform(0.9, 1.1) for t in TISSUES}
        return cls(name, signal, rng.uniform(90.0, 170.0))


def _ramp(sd: np.ndarray, soft: float) -> np.ndarray:
    """Soft inside-membership from a signed distance (negative inside)."""
    return np.clip(np.float32(0.5) - sd * np.float32(1.0 / soft), 0.0, 1.0)


def _ellipse(x: np.ndarray, y: np.ndarray, ax: np.ndarray | float, ay: np.ndarray | float) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned ellipse centred at 0."""
    q = np.sqrt((x / ax) ** 2 + (y / ay) ** 2)
    return (q - 1.0) * np.minimum(ax, ay)


def _box(x: np.ndarray, hx: float | np.ndarray, y: np.ndarray, hy: float | np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(x) - hx, np.abs(y) - hy)


def render_points(anat: Anatomy, xyz: np.ndarray, contrast: Contrast, soft: float = 0.8) -> np.ndarray:
    """Noise-free signal at patient points ``xyz [N, 3]`` -> float32 ``[N]``.

    Computed in float32; spine structures are evaluated only on the points near the spine.
    """
    xyz = np.asarray(xyz, dtype=np.float32).reshape(-1, 3)
    sig = contrast.signal
    t = anat.torso
    u, v, _ = anat.local_components(xyz)
    out = np.zeros(len(xyz), dtype=np.float32)

    def paint(o: np.ndarray, m: np.ndarray, value: np.ndarray | float) -> None:
        o += m * (value - o)

    # Torso: subcutaneous fat ring around muscle; viscera anterior to the spine.
    vc = t["v_back"] - t["half_depth"]
    tv = v - np.float32(vc)
    paint(out, _ramp(_ellipse(u, tv, t["half_width"], t["half_depth"]), soft), sig["fat"])
    texture = np.ones(len(xyz), dtype=np.float32)
    for k in anat.texture.astype(np.float32):  # a few plane waves: smooth tissue inhomogeneity
        texture += 0.035 * np.sin(xyz[:, 0] * k[0] + xyz[:, 1] * k[1] + xyz[:, 2] * k[2] + k[3])
    paint(out, _ramp(_ellipse(u, tv, t["half_width"] - t["fat"], t["half_depth"] - t["fat"]), soft), sig["muscle"] * texture)
    front = float(vc - t["half_depth"] + t["fat"] + 8.0)
    back = float(-anat.body_half_depth.mean() - 10.0)
    if back - front > 20.0:
        half = 0.5 * (back - front)
        vis = _ellipse(u, v - np.float32(front + half), t["half_width"] * 0.7, half)
        paint(out, _ramp(vis, soft), sig["viscera"] * (2.0 - texture))

    # Everything else lives within a box around the spine: evaluate it only there.
    u_s, d_s, s_s = anat.to_spine(xyz)
    near = np.nonzero((np.abs(u_s) < 75.0) & (d_s > -60.0) & (d_s < 110.0))[0]
    if len(near):
        out[near] = _render_spine(anat, out[near], u_s[near], d_s[near], s_s[near], sig, soft)

    # Posterior surface coil: signal falls off with depth from the back.
    out *= 0.5 + 0.5 * np.exp(-np.clip(np.float32(t["v_back"]) - v, 0, None) / np.float32(contrast.coil_depth))
    return out


def _render_spine(
    anat: Anatomy, out: np.ndarray, u: np.ndarray, d: np.ndarray, s: np.ndarray, sig: dict[str, float], soft: float
) -> np.ndarray:
    """Paint the spine's structures over ``out`` at curvilinear points ``(u, d, s)``."""
    pr = anat.profiles
    idx = anat.profile_index(s)

    def prof(name: str) -> np.ndarray:
        return pr[name].astype(np.float32)[idx]

    def paint(m: np.ndarray, value: np.ndarray | float) -> None:
        np.add(out, m * (value - out), out=out)

    a_u, a_d = prof("a_u"), prof("a_d")
    # Aorta: a flow void anterior-left of the bodies, following the curve.
    paint(_ramp(_ellipse(u - 8.0, d + a_d + 14.0, 9.0, 9.0), soft), sig["vessel"])

    canal_d = prof("canal_d")
    r_d0, r_u0 = anat.canal_half_ap, anat.canal_half_width
    dc = d - canal_d  # AP offset from the canal axis
    back_of_canal = r_d0 + 0.5
    au = np.abs(u)
    # Soft tissue between bodies and arches (ligaments, facet capsules): the dark frame
    # that narrowing structures shrink into.
    zone = _box(u, r_u0 + 14.0, d - 0.5 * (0.3 * a_d + canal_d + r_d0 + 3.0), 0.5 * (canal_d + r_d0 + 3.0 - 0.3 * a_d))
    paint(_ramp(zone, soft), sig["ligament"])
    # Posterior arch: laminae and spinous processes.
    lamina = _box(u, r_u0 + 9.0, dc - (back_of_canal + 3.5), 3.5)
    spinous = _box(u, 3.5, dc - (back_of_canal + 0.5 * anat.spinous_length), 0.5 * anat.spinous_length)
    paint(_ramp(np.minimum(lamina, spinous), soft) * prof("arch"), sig["bone"])
    # Facet joints (at the discs) and pedicles (upper part of each body).
    facet = _box(au - (r_u0 + 7.5), 6.5, dc - (0.2 * r_d0 + 0.5 * (0.8 * r_d0 + 8.0)), 0.5 * (0.8 * r_d0 + 8.0))
    paint(_ramp(facet, soft) * prof("facet"), sig["bone"])
    pedicle = _box(au - (r_u0 + 5.0), 4.5, d - 0.5 * (0.5 * a_d + canal_d + r_d0), 0.5 * (canal_d + r_d0 - 0.5 * a_d))
    paint(_ramp(pedicle, soft) * prof("pedicle"), sig["bone"])

    # Neural foramina: fat ellipsoids with the exiting root, at each disc on both sides.
    fs, fd, fu = anat.foramen_centre()
    mid = 0.5 * (fs[1:] + fs[:-1])
    j = np.searchsorted(-mid, -s)  # fs descends cranial -> caudal
    ru_f, rd_f, rs_f = anat.foramen_radius
    fs32, fd32 = fs.astype(np.float32), fd.astype(np.float32)
    for side, sign in enumerate((1.0, -1.0)):
        f = anat.foramen_factor[side].astype(np.float32)[j]
        du, dd, ds_ = u - np.float32(sign * fu), d - fd32[j], s - fs32[j]
        ad, as_ = rd_f * (0.3 + 0.7 * f), rs_f * (0.45 + 0.55 * f)
        q = np.sqrt((du / ru_f) ** 2 + (dd / ad) ** 2 + (ds_ / as_) ** 2)
        paint(_ramp((q - 1.0) * np.minimum(ad, ru_f), soft), sig["fat"])
        root = np.sqrt(du**2 + dd**2 + (ds_ - np.float32(0.45 * rs_f)) ** 2) - 1.6
        paint(_ramp(root, soft), sig["neural"])

    # Spinal canal: epidural fat, then the dural sac (central ellipse plus lateral recesses).
    narrow = prof("spinal")
    r_d = r_d0 * narrow
    r_uc = 0.55 * r_u0 * (0.4 + 0.6 * np.minimum(narrow, 1.0))
    paint(_ramp(_ellipse(u, dc - 0.7 * r_d0, 0.5 * r_u0, 0.45 * r_d0 * narrow + 0.3), soft), sig["fat"])
    canal = _ellipse(u, dc, r_uc, r_d)
    rec_u, rec_d = anat.recess_offset()
    ra_u, ra_d = anat.recess_radius
    for sign, name in ((1.0, "recess_left"), (-1.0, "recess_right")):
        f = prof(name) * (0.6 + 0.4 * np.minimum(narrow, 1.0))  # a tight canal squeezes the recesses too
        rec = _ellipse(u - np.float32(sign * rec_u), dc - np.float32(rec_d), ra_u * f, ra_d * (0.35 + 0.65 * f))
        canal = np.minimum(canal, rec)
    m_canal = _ramp(canal, soft)
    paint(m_canal, sig["csf"])
    # Spinal cord above the conus; below it the cauda equina roots, layering posteriorly
    # (patients lie supine) and partial-volumed with CSF.
    cord = prof("cord")
    nu = cord * 4.5 + (1 - cord) * 0.45 * r_uc
    nd = cord * 3.8 + (1 - cord) * 0.3 * r_d
    neural = _ellipse(u, dc - (1 - cord) * 0.5 * r_d, nu, nd)
    roots = cord * sig["neural"] + (1 - cord) * (0.5 * sig["neural"] + 0.5 * sig["csf"])
    paint(np.minimum(_ramp(neural, soft), m_canal), roots)

    # Vertebral column: cortex, marrow, annulus, nucleus.
    col = _ellipse(au**1.25 * a_u**-0.25, d, a_u, a_d)  # a squarer, kidney-like section
    body, disc = prof("body"), prof("disc")
    paint(_ramp(col, soft) * np.maximum(body, disc), sig["cortex"])
    marrow_tex = 1.0 + 0.06 * np.sin(0.9 * u + 0.7 * s) * np.sin(0.8 * d)
    paint(_ramp(col + 1.5, soft) * prof("marrow"), sig["marrow"] * marrow_tex)
    paint(_ramp(col + 0.3, soft) * disc, sig["annulus"])
    inner = prof("nucleus")
    hydration = prof("hydration") / np.maximum(inner, 1e-3)
    nucleus = sig["annulus"] + (sig["nucleus"] - sig["annulus"]) * hydration
    paint(_ramp(_ellipse(u, d, 0.6 * a_u, 0.55 * a_d), soft) * inner, nucleus)
    return out
