"""`Volume` geometry: voxel <-> patient coordinates, exact for oblique and uneven stacks."""

from __future__ import annotations

import numpy as np
import pytest

from rsna_infer.io.volume import Study, Volume


def _rotation(axis: np.ndarray, deg: float) -> np.ndarray:
    a = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    t = np.radians(deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def make_volume(
    offsets=(0.0, 4.0, 8.0, 12.0),
    shape=(6, 5),
    row_dir=(0.0, 1.0, 0.0),
    col_dir=(0.0, 0.0, -1.0),
    origin=(10.0, -20.0, 30.0),
    spacing=(0.7, 0.9),
    in_plane_shift=None,
) -> Volume:
    """A stack whose slice i sits at ``origin + offsets[i]·normal`` (+ an optional in-plane shift)."""
    r, c = np.asarray(row_dir, float), np.asarray(col_dir, float)
    n = np.cross(r, c)
    pos = np.array([np.asarray(origin) + o * n for o in offsets])
    if in_plane_shift is not None:
        pos += np.asarray(in_plane_shift, dtype=float)
    z = len(offsets)
    return Volume(
        pixels=np.arange(z * shape[0] * shape[1], dtype=np.float32).reshape(z, *shape),
        positions=pos,
        row_dir=r,
        col_dir=c,
        spacing=spacing,
        instance_numbers=np.arange(1, z + 1),
    )


def test_to_world_matches_hand_computation_from_dicom_tags():
    # sagittal: IOP [0,1,0, 0,0,-1] -> normal (-1, 0, 0); PixelSpacing [Δr, Δc] = [0.7, 0.9]
    v = make_volume()
    np.testing.assert_allclose(v.normal, [-1.0, 0.0, 0.0])
    # slice 2, row 3, column 4: IPP_2 + 4·Δc·r + 3·Δr·c
    ipp2 = np.array([10.0 - 8.0, -20.0, 30.0])
    expected = ipp2 + 4 * 0.9 * np.array([0, 1, 0]) + 3 * 0.7 * np.array([0, 0, -1])
    np.testing.assert_allclose(v.to_world([2, 3, 4]), expected)
    np.testing.assert_allclose(v.to_voxel(expected), [2, 3, 4], atol=1e-12)


def test_axial_normal_and_offsets_increase_cranially():
    v = make_volume(row_dir=(1, 0, 0), col_dir=(0, 1, 0), offsets=(-5.0, 0.0, 5.0))
    np.testing.assert_allclose(v.normal, [0, 0, 1])
    assert np.all(np.diff(v.positions[:, 2]) > 0)
    np.testing.assert_allclose(v.slice_offsets, [25.0, 30.0, 35.0])


@pytest.mark.parametrize("deg", [0.0, 7.0, 23.0, 41.0])
def test_round_trip_on_oblique_uneven_stack(deg):
    rot = _rotation([0.3, 1.0, 0.2], deg)
    v = make_volume(
        offsets=(0.0, 3.1, 3.9, 9.0, 15.5),  # unevenly spaced
        row_dir=rot @ np.array([1.0, 0, 0]),
        col_dir=rot @ np.array([0, 1.0, 0]),
    )
    rng = np.random.default_rng(0)
    zyx = rng.uniform([0, -2, -2], [4, 8, 7], size=(200, 3))
    np.testing.assert_allclose(v.to_voxel(v.to_world(zyx)), zyx, atol=1e-9)
    xyz = rng.normal(size=(50, 3)) * 20  # inside and outside the stack (extrapolated)
    np.testing.assert_allclose(v.to_world(v.to_voxel(xyz)), xyz, atol=1e-9)


def test_integer_slices_land_exactly_on_each_ipp_even_with_in_plane_shifts():
    # slices whose IPPs are also shifted in-plane (table moves, shifted FOV) stay exact
    v = make_volume(offsets=(0.0, 2.0, 7.0))
    v.positions[1] += np.array([0.0, 1.5, -0.5])  # in-plane shift of the middle slice
    for z in range(3):
        np.testing.assert_allclose(v.to_world([z, 0, 0]), v.positions[z])
        np.testing.assert_allclose(v.to_voxel(v.positions[z]), [z, 0, 0], atol=1e-12)


def test_uneven_spacing_interpolates_between_neighbours():
    v = make_volume(offsets=(0.0, 1.0, 11.0))
    # halfway between slices 1 and 2 is 6 mm along the normal from slice 0
    xyz = v.positions[0] + 6.0 * v.normal
    np.testing.assert_allclose(v.to_voxel(xyz)[0], 1.5)
    assert v.slice_spacing == pytest.approx(5.5)  # median of (1, 10)


def test_nearest_slice_and_contains():
    v = make_volume(offsets=(0.0, 4.0, 8.0))
    p = v.to_world(np.array([[1.4, 2, 2], [1.6, 2, 2], [-3.0, 2, 2], [1.0, 2, 40]]))
    np.testing.assert_array_equal(v.nearest_slice(p), [1, 2, 0, 1])
    np.testing.assert_array_equal(v.contains(p), [True, True, False, False])
    # 3 slices before the stack at 4 mm spacing = 12 mm outside: inside with a 13 mm margin
    assert v.contains(p[2:3], margin_mm=13.0)[0]


def test_single_slice_volume_uses_mm_along_normal():
    v = make_volume(offsets=(0.0,))
    xyz = v.positions[0] + 2.5 * v.normal
    np.testing.assert_allclose(v.to_voxel(xyz), [2.5, 0, 0], atol=1e-12)
    assert v.slice_spacing == 1.0


def test_validation_rejects_unsorted_and_mismatched_inputs():
    with pytest.raises(ValueError, match="sorted"):
        make_volume(offsets=(0.0, 4.0, 2.0))
    with pytest.raises(ValueError, match="pixels"):
        Volume(np.zeros((3, 3)), np.zeros((1, 3)), [1, 0, 0], [0, 1, 0], (1, 1), [1])
    with pytest.raises(ValueError, match="positions"):
        Volume(np.zeros((2, 3, 3)), np.zeros((1, 3)), [1, 0, 0], [0, 1, 0], (1, 1), [1, 2])
    with pytest.raises(ValueError, match="degenerate"):
        Volume(np.zeros((1, 3, 3)), np.zeros((1, 3)), [1, 0, 0], [1, 0, 0], (1, 1), [1])
    with pytest.raises(ValueError, match="native spacings"):
        Volume(np.zeros((2, 3, 3)), [[0, 0, 0], [0, 0, 1]], [1, 0, 0], [0, 1, 0], (1, 1), [1, 2], native_spacing=[[1, 1]])


def test_study_lookup_and_repr_do_not_dump_pixels():
    v = make_volume()
    v.series_id, v.description = 7, "Sagittal T1"
    s = Study(study_id=1, volumes={"Sagittal T1": [v]})
    assert s.first("Sagittal T1") is v and s.first("Axial T2") is None
    assert s.find(7) is v and s.find(7, stack_index=1) is None
    assert s.nbytes() == v.pixels.nbytes
    assert "shape=(4, 6, 5)" in repr(v) and "[[" not in repr(v)


def test_pixel_to_voxel_applies_each_slices_native_spacing_and_offset():
    v = make_volume(offsets=(0.0, 4.0), spacing=(1.0, 1.0))
    v.native_spacing = np.array([[1.0, 1.0], [0.5, 0.5]])
    v.native_offset = np.array([[0.0, 0.0], [-3.0, -2.0]])  # file 1 starts 3 mm up, 2 mm left
    np.testing.assert_allclose(v.pixel_to_voxel([0, 1], x=[4.0, 4.0], y=[6.0, 6.0]), [[0, 6, 4], [1, 0, 0]])


def test_per_slice_sources_must_match_the_slices():
    with pytest.raises(ValueError, match="native offsets"):
        Volume(np.zeros((2, 3, 3)), [[0, 0, 0], [0, 0, 1]], [1, 0, 0], [0, 1, 0], (1, 1), [1, 2], native_offset=[[0, 0]])
    with pytest.raises(ValueError, match="files"):
        Volume(np.zeros((2, 3, 3)), [[0, 0, 0], [0, 0, 1]], [1, 0, 0], [0, 1, 0], (1, 1), [1, 2], files=["a"])
    v = Volume(np.zeros((1, 3, 3)), [[0, 0, 0]], [1, 0, 0], [0, 1, 0], (1, 1), [7], files=["/d/7.dcm"],
               sop_instance_uids=["1.2.3"])
    assert v.source(0) == "slice 0, instance 7, /d/7.dcm, SOPInstanceUID 1.2.3"
