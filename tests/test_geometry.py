"""Cross-series geometry: projection between stacks, distances, sides, sampling at world points."""

from __future__ import annotations

import numpy as np
import pytest

from rsna_infer import geometry as g
from rsna_infer.io.volume import Volume


def _stack(iop, offsets, shape, spacing, origin, fill=None) -> Volume:
    r, c = np.array(iop[:3], float), np.array(iop[3:], float)
    n = np.cross(r, c)
    pos = np.array([np.asarray(origin, float) + o * n for o in offsets])
    z = len(offsets)
    vol = Volume(
        pixels=np.zeros((z, *shape), np.float32),
        positions=pos,
        row_dir=r,
        col_dir=c,
        spacing=spacing,
        instance_numbers=np.arange(1, z + 1),
    )
    if fill is not None:  # intensity = a function of each voxel's world position
        zz, yy, xx = np.meshgrid(*[np.arange(s) for s in vol.shape], indexing="ij")
        vol.pixels = fill(vol.to_world(np.stack([zz, yy, xx], -1))).astype(np.float32)
    return vol


def _linear(xyz: np.ndarray) -> np.ndarray:
    return 2.0 * xyz[..., 0] - 3.0 * xyz[..., 1] + 0.5 * xyz[..., 2] + 7.0


SAG = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AX = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _oblique_axial(deg: float) -> tuple[float, ...]:
    t = np.radians(deg)
    return (1.0, 0.0, 0.0, 0.0, np.cos(t), -np.sin(t))


@pytest.mark.parametrize("iop, plane", [(SAG, "sagittal"), (AX, "axial"), ((1, 0, 0, 0, 0, -1), "coronal"),
                                        (_oblique_axial(25.0), "axial")])
def test_plane_of_normal(iop, plane):
    assert g.plane_of(np.cross(iop[:3], iop[3:])) == plane


def test_obliquity():
    assert g.obliquity_deg([0, 0, 1]) == pytest.approx(0.0)
    n = np.cross(_oblique_axial(25.0)[:3], _oblique_axial(25.0)[3:])
    assert g.obliquity_deg(n) == pytest.approx(25.0)


def test_sagittal_point_projects_into_an_oblique_axial_stack():
    sag = _stack(SAG, np.arange(0, 40, 4.0), (60, 50), (0.8, 0.8), (20.0, -40.0, 30.0))
    ax = _stack(_oblique_axial(12.0), [0.0, 3.0, 6.5, 10.0], (48, 48), (0.7, 0.7), (-15.0, -45.0, 0.0))
    # a point on slice 5 (x = 20 - 20 = 0 mm: mid-sagittal), row 30, column 25 of the sagittal stack
    world = sag.to_world([5, 30, 25])
    zyx = ax.to_voxel(world)
    np.testing.assert_allclose(ax.to_world(zyx), world, atol=1e-9)
    np.testing.assert_allclose(g.transfer(sag, [5, 30, 25], ax), zyx)
    assert ax.nearest_slice(world) == int(np.clip(np.rint(zyx[0]), 0, 3))
    assert ax.contains(world) == (-0.5 <= zyx[0] <= 3.5 and -0.5 <= zyx[1] <= 47.5 and -0.5 <= zyx[2] <= 47.5)


def test_contains_is_false_for_levels_outside_an_axial_block():
    ax = _stack(AX, [0.0, 4.0, 8.0], (32, 32), (1.0, 1.0), (0.0, 0.0, 100.0))
    pts = np.array([[10.0, 10.0, 104.0], [10.0, 10.0, 130.0], [10.0, 10.0, 111.0]])  # 3 mm past the last slice
    np.testing.assert_array_equal(ax.contains(pts), [True, False, False])
    np.testing.assert_array_equal(ax.contains(pts, margin_mm=3.0), [True, False, True])


def test_distances():
    a = np.array([[0.0, 0, 0], [1, 2, 2]])
    b = np.array([[3.0, 4, 0], [1, 2, 2]])
    np.testing.assert_allclose(g.distance_mm(a, b), [5.0, 0.0])
    d = g.pairwise_distance_mm(a, b)
    assert d.shape == (2, 2)
    np.testing.assert_allclose(d, [[5.0, 3.0], [np.sqrt(4 + 4 + 4), 0.0]])


def test_left_right_from_patient_x():
    pts = np.array([[12.0, 0, 0], [-3.0, 0, 0]])
    np.testing.assert_array_equal(g.side_of(pts, 0.0), ["left", "right"])  # LPS: +x is patient left
    np.testing.assert_array_equal(g.is_left_of(pts[0], pts[1]), True)


@pytest.mark.parametrize("iop", [SAG, _oblique_axial(20.0)])
def test_trilinear_sampling_is_exact_for_linear_fields(iop):
    vol = _stack(iop, [0.0, 2.0, 3.0, 9.0], (20, 18), (0.9, 1.1), (1.0, 2.0, 3.0), fill=_linear)
    rng = np.random.default_rng(0)
    zyx = rng.uniform([0, 0, 0], [3, 19, 17], size=(300, 3))
    xyz = vol.to_world(zyx)
    np.testing.assert_allclose(g.sample(vol, xyz), _linear(xyz), rtol=1e-5, atol=1e-3)
    far = vol.to_world(np.array([[10.0, 5, 5], [1.0, -3, 5]]))
    np.testing.assert_array_equal(g.sample(vol, far, fill=-1.0), [-1.0, -1.0])


def test_sample_plane_reproduces_a_slice_and_reslices_between_series():
    sag = _stack(SAG, np.arange(-20, 21, 2.0), (40, 40), (1.0, 1.0), (0.0, -20.0, 20.0), fill=_linear)
    img = g.sample_plane(sag, sag.positions[3], sag.row_dir, sag.col_dir, (40, 40), sag.spacing)
    np.testing.assert_allclose(img, sag.pixels[3], rtol=1e-5, atol=1e-3)
    ax = _stack(AX, [0.0, 2.0], (10, 10), (1.5, 1.5), (-5.0, -15.0, 5.0), fill=_linear)
    resliced = g.reslice_like(sag, ax, 1)
    np.testing.assert_allclose(resliced, ax.pixels[1], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("skew", [0.0, 1e-6, 1e-3, 0.05])
def test_orthonormal_axes_is_the_symmetric_nearest_pair(skew):
    r, c = np.array([1.0, 0.0, 0.0]), np.array([skew, 1.0, 0.0])
    r2, c2, s = g.orthonormal_axes(r, c)
    assert s == pytest.approx(abs(g.unit(r) @ g.unit(c)))
    assert abs(r2 @ c2) < 1e-12 and np.linalg.norm(r2) == pytest.approx(1) and np.linalg.norm(c2) == pytest.approx(1)
    # both axes turn by the same angle, within the plane they span
    turn_r, turn_c = np.arccos(np.clip(r2 @ g.unit(r), -1, 1)), np.arccos(np.clip(c2 @ g.unit(c), -1, 1))
    assert turn_r == pytest.approx(turn_c, abs=1e-9)
    np.testing.assert_allclose(np.cross(r2, c2), g.unit(np.cross(r, c)), atol=1e-12)
    with pytest.raises(ValueError, match="parallel"):
        g.orthonormal_axes(r, r)
