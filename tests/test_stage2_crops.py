"""Crop geometry of rsna_infer.stage2.crops on hand-built volumes with known geometry."""

import numpy as np
import pytest

from rsna_infer.constants import AXIAL_T2, SAG_T2
from rsna_infer.io.volume import Study, Volume
from rsna_infer.keypoints import KeypointSet
from rsna_infer.specs import NormSpec
from rsna_infer.stage2.augment import CropAugment
from rsna_infer.stage2.crops import crop_2d5, crop_at_world, locate_point, locate_world, view_of

SAG = ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0))  # typical sagittal IOP: cols -> posterior, rows -> inferior
AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))


def make_volume(pixels, iop=SAG, spacing=(0.5, 0.8), slice_spacing=3.5, origin=(20.0, -30.0, 40.0), series_id=1, desc=SAG_T2):
    """A stack whose slice k sits at origin + k * slice_spacing * normal (sorted ascending)."""
    r, c = np.asarray(iop[0]), np.asarray(iop[1])
    n = np.cross(r, c)
    z = pixels.shape[0]
    pos = np.asarray(origin)[None] + np.arange(z)[:, None] * slice_spacing * n[None]
    return Volume(pixels.astype(np.float32), pos, r, c, spacing, np.arange(1, z + 1), series_id=series_id, description=desc)


def bright(shape, zyx, value=1000.0, background=10.0):
    px = np.full(shape, background, dtype=np.float32)
    px[tuple(zyx)] = value
    return px


def peak(crop):
    return np.unravel_index(int(np.argmax(crop)), crop.shape)


def test_bright_voxel_lands_at_crop_centre():
    vol = make_volume(bright((15, 60, 80), (7, 30, 40)))
    crop, info = crop_2d5(vol, (7, 30, 40), 5, (33, 33), crop_mm=20.0, norm=NormSpec())
    assert crop.shape == (5, 33, 33) and crop.dtype == np.float32
    # typical sagittal slices run toward patient right; canonical order runs toward the left
    assert info.slices == (9, 8, 7, 6, 5) and not info.shifted and not info.padded
    assert info.box[2:] == (40, 25)  # 20 mm / 0.5 mm rows, 20 mm / 0.8 mm cols
    s, y, x = peak(crop)
    assert s == 2 and abs(y - 16) <= 1 and abs(x - 16) <= 1
    assert info.center[0] == 2.0 and abs(info.center[1] - 16) <= 0.6 and abs(info.center[2] - 16) <= 0.6


@pytest.mark.parametrize("zyx", [(0, 2, 77), (14, 58, 1), (7, 0, 0), (14, 59, 79), (1, 30, 3)])
def test_border_points_shift_the_window_inside(zyx):
    vol = make_volume(bright((15, 60, 80), zyx))
    crop, info = crop_2d5(vol, zyx, 5, (32, 32), crop_mm=20.0, norm=NormSpec())
    assert info.shifted and not info.padded
    y0, x0, h, w = info.box
    assert 0 <= y0 and y0 + h <= 60 and 0 <= x0 and x0 + w <= 80
    assert all(0 <= s < 15 for s in info.slices)
    s, y, x = peak(crop)
    assert s == round(info.center[0])
    assert abs(y - info.center[1]) <= 1.0 and abs(x - info.center[2]) <= 1.0
    # no garbage: every value comes from the (normalised) image, none is the pad value
    assert crop.min() > (0 - 0.5) / 0.25 - 1e-6


def test_first_and_last_slice_windows():
    vol = make_volume(bright((15, 60, 80), (0, 30, 40)))
    vol = make_volume(bright((15, 60, 80), (0, 30, 40)), iop=AXIAL)  # canonical axial: slices run inferior
    _, first = crop_2d5(vol, (0, 30, 40), 5, (16, 16), size_px=21)
    assert first.slices == (4, 3, 2, 1, 0) and first.center[0] == 4.0 and first.shifted
    _, last = crop_2d5(vol, (14, 30, 40), 5, (16, 16), size_px=21)
    assert last.slices == (14, 13, 12, 11, 10) and last.center[0] == 0.0
    _, even = crop_2d5(vol, (7, 30, 40), 4, (16, 16), size_px=21)
    assert even.slices == (8, 7, 6, 5) and even.center[0] == 1.0


def test_physical_size_is_honoured_with_anisotropic_spacing():
    spacing = (0.5, 1.0)  # rows 0.5 mm, cols 1.0 mm
    centre = (5, 40, 40)
    # a marker 8 mm below the centre (16 rows) and one 8 mm posterior (8 cols)
    for offset, axis in (((0, 16, 0), 1), ((0, 0, 8), 2)):
        mark = tuple(int(c + o) for c, o in zip(centre, offset))
        vol = make_volume(bright((11, 80, 80), mark), spacing=spacing)
        crop, info = crop_2d5(vol, centre, 3, (64, 64), crop_mm=32.0)
        assert info.box[2:] == (64, 32)
        assert info.mm_per_px == pytest.approx((0.5, 0.5))
        pos = peak(crop)
        # 8 mm at 0.5 mm per output pixel = 16 px from the centre along the marker's axis
        assert abs((pos[axis] - info.center[axis]) - 16.0) <= 1.0
        other = 3 - axis
        assert abs(pos[other] - info.center[other]) <= 1.0


def test_rectangular_crop_mm_and_size_px():
    vol = make_volume(bright((9, 60, 80), (4, 30, 40)), spacing=(1.0, 1.0))
    crop, info = crop_2d5(vol, (4, 30, 40), 3, (20, 40), crop_mm=(10.0, 20.0))
    assert crop.shape == (3, 20, 40) and info.box[2:] == (10, 20)
    _, info = crop_2d5(vol, (4, 30, 40), 3, (8, 8), size_px=(7, 9))
    assert info.box[2:] == (7, 9)
    with pytest.raises(ValueError, match="exactly one"):
        crop_2d5(vol, (4, 30, 40), 3, (8, 8))
    with pytest.raises(ValueError, match="finite"):
        crop_2d5(vol, (np.nan, 30, 40), 3, (8, 8), size_px=5)


def test_small_images_and_short_stacks_are_padded_and_marked():
    norm = NormSpec()
    vol = make_volume(np.random.default_rng(0).uniform(50, 100, (2, 10, 10)), spacing=(1.0, 1.0))
    crop, info = crop_2d5(vol, (1, 5, 5), 5, (20, 20), crop_mm=20.0, norm=norm)
    assert info.padded
    assert info.slices.count(-1) == 3 and sorted(s for s in info.slices if s >= 0) == [0, 1]
    pad = (0.0 - norm.mean) / norm.std  # the documented pad: low clip bound -> black
    assert np.all(crop[[i for i, s in enumerate(info.slices) if s < 0]] == pad)
    real = crop[[i for i, s in enumerate(info.slices) if s >= 0]]
    assert np.all(real[:, 0, 0] == pad) and np.all(real[:, 0, :] <= real[:, 10, 10].max())
    assert real[:, 5:15, 5:15].min() >= pad  # the image itself sits in the middle
    assert np.isfinite(crop).all()


def test_normalisation_uses_whole_volume_bounds():
    rng = np.random.default_rng(1)
    px = rng.uniform(0, 1000, (5, 40, 40)).astype(np.float32)
    px[:, :20, :20] = rng.uniform(0, 10, (5, 20, 20))  # a dark corner
    vol = make_volume(px, spacing=(1.0, 1.0))
    norm = NormSpec()
    bounds = norm.bounds(px)
    crop, _ = crop_2d5(vol, (2, 9, 9), 3, (11, 11), size_px=11, norm=norm, bounds=bounds)
    want = norm.apply(px[1:4, 4:15, 4:15][::-1], bounds)  # canonical sagittal order: toward patient left
    np.testing.assert_allclose(crop, want, rtol=1e-6, atol=1e-6)
    assert crop.max() < 0  # a dark region stays dark: not stretched by its own range
    crop2, _ = crop_2d5(vol, (2, 9, 9), 3, (11, 11), size_px=11, norm=norm)  # bounds computed when absent
    np.testing.assert_allclose(crop, crop2)


def _world_field(world):
    """A smooth asymmetric pattern in patient space (so any wrong flip shows)."""
    x, y, z = world[..., 0], world[..., 1], world[..., 2]
    return (100 + 3 * x + 2 * y - z + 40 * np.exp(-((x - 3) ** 2 + (y + 4) ** 2 + (z - 5) ** 2) / 30)).astype(np.float32)


def _sampled(shape, iop, spacing, origin_fn, slice_spacing=3.0):
    """A volume of ``shape`` sampling `_world_field`; ``origin_fn(normal)`` gives slice 0's IPP."""
    r, c = np.asarray(iop[0], float), np.asarray(iop[1], float)
    n = np.cross(r, c)
    vol = make_volume(np.zeros(shape), iop=iop, spacing=spacing, slice_spacing=slice_spacing, origin=origin_fn(r, c, n))
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    vol.pixels[...] = _world_field(vol.to_world(np.stack([zz, yy, xx], -1).astype(float)))
    return vol


@pytest.mark.parametrize(
    "iop",
    [
        SAG,
        ((0.0, -1.0, 0.0), (0.0, 0.0, -1.0)),  # columns run anterior: hflip + reversed slices
        ((0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),  # transposed sagittal
        ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),  # rows run superior
        AXIAL,
        ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),  # mirrored axial: patient left on the image left
        ((0.0, 1.0, 0.0), (1.0, 0.0, 0.0)),  # transposed axial
    ],
)
def test_canonical_orientation_gives_the_same_crop_for_the_same_anatomy(iop):
    """A volume stored in any orientation crops to the same array as the typical one."""
    plane_axial = abs(np.cross(iop[0], iop[1])[2]) > 0.5
    ref_iop = AXIAL if plane_axial else SAG
    spacing_ref = (1.0, 0.6)
    shape_ref = (9, 41, 61)  # odd: the centre sits on a voxel, windows are symmetric
    centre_world = np.array([1.0, -2.0, 3.0])

    def box_origin(r, c, n, spacing, shape):
        # place the stack so its voxel grid covers the same patient box for every orientation
        lo = centre_world - 0.5 * ((shape[2] - 1) * spacing[1] * r + (shape[1] - 1) * spacing[0] * c + (shape[0] - 1) * 3.0 * n)
        return lo

    ref = _sampled(shape_ref, ref_iop, spacing_ref, lambda r, c, n: box_origin(r, c, n, spacing_ref, shape_ref))
    r, c = np.asarray(iop[0]), np.asarray(iop[1])
    ref_r = np.asarray(ref_iop[0])
    transposed = abs(r @ ref_r) < abs(c @ ref_r)
    spacing = spacing_ref[::-1] if transposed else spacing_ref
    shape = (shape_ref[0], shape_ref[2], shape_ref[1]) if transposed else shape_ref
    other = _sampled(shape, iop, spacing, lambda r, c, n: box_origin(r, c, n, spacing, shape))
    assert view_of(other) == view_of(ref) == ("axial" if plane_axial else "sagittal")

    a, ia = crop_at_world(ref, centre_world, 3, (24, 24), crop_mm=(15.0, 21.0))
    b, ib = crop_at_world(other, centre_world, 3, (24, 24), crop_mm=(15.0, 21.0))
    assert ib.orientation.transpose == (transposed != ia.orientation.transpose)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(ia.center, ib.center, atol=1e-6)
    assert ia.mm_per_px == pytest.approx(ib.mm_per_px)


def _study_with_sag_and_axial():
    sag = make_volume(np.zeros((9, 64, 64)), iop=SAG, spacing=(1.0, 1.0), slice_spacing=3.5, origin=(14.0, -32.0, 32.0), series_id=10)
    ax = make_volume(np.zeros((16, 64, 64)), iop=AXIAL, spacing=(1.0, 1.0), slice_spacing=4.0, origin=(-32.0, -32.0, -30.0), series_id=20, desc=AXIAL_T2)
    return Study(1, {SAG_T2: [sag], AXIAL_T2: [ax]}), sag, ax


def _subarticular_set(vol, worlds, conf=None):
    worlds = np.asarray(worlds, float)
    n = len(worlds)
    conf = np.ones(n) if conf is None else np.asarray(conf, float)
    return KeypointSet("subarticular", worlds, vol.to_voxel(worlds), np.full(n, vol.series_id), np.zeros(n, int), conf, "test")


def test_locate_point_own_stack_and_through_patient_space():
    study, sag, ax = _study_with_sag_and_axial()
    worlds = np.tile(np.array([[8.0, 0.0, 10.0]]), (10, 1))
    worlds[5:, 0] = -8.0
    worlds[9] = [200.0, 0.0, 10.0]  # far outside every stack
    pts = _subarticular_set(ax, worlds, conf=[1] * 8 + [0, 1])
    own = locate_point(study, AXIAL_T2, pts, 0)
    assert own.volume is ax and not own.via_world
    np.testing.assert_allclose(own.zyx, pts.voxel[0])
    other = locate_point(study, SAG_T2, pts, 0)
    assert other.volume is sag and other.via_world
    np.testing.assert_allclose(sag.to_world(other.zyx), worlds[0], atol=1e-9)
    # x = +8 (patient left) lies between sagittal slices 1 (x=10.5) and 2 (x=7)
    assert 1.0 < other.zyx[0] < 2.0
    assert locate_point(study, SAG_T2, pts, 8) is None  # invalid (confidence 0)
    assert locate_point(study, SAG_T2, pts, 9) is None  # outside every sagittal stack
    assert locate_point(study, "Sagittal T1", pts, 0) is None  # no such series
    assert locate_point(study, SAG_T2, None, 0) is None
    assert locate_world(study, SAG_T2, np.array([np.nan, 0, 0])) is None


def test_crop_at_world_matches_voxel_crop():
    _, sag, _ = _study_with_sag_and_axial()
    sag.pixels[...] = np.random.default_rng(3).uniform(0, 100, sag.pixels.shape)
    world = sag.to_world(np.array([4.0, 20.0, 30.0]))
    a, _ = crop_at_world(sag, world, 3, (16, 16), crop_mm=15.0)
    b, _ = crop_2d5(sag, (4.0, 20.0, 30.0), 3, (16, 16), crop_mm=15.0)
    np.testing.assert_allclose(a, b)


def test_jitter_is_in_mm_of_each_axis():
    vol = make_volume(np.zeros((5, 10, 10)), spacing=(0.5, 2.0), slice_spacing=4.0)
    aug = CropAugment(jitter_mm=1.0, scale=0.0, intensity=0.0, ap_flip=0.0)
    rng = np.random.default_rng(0)
    d = np.array([aug.jitter(vol, np.zeros(3), rng) for _ in range(4000)])
    # 1 mm std is 0.25 slices, 2 rows, 0.5 columns
    np.testing.assert_allclose(d.std(axis=0), [0.25, 2.0, 0.5], rtol=0.08)
    assert aug.crop_scale(rng) == 1.0 and aug.intensity_fn(rng) is None and not aug.mirror_ap(rng)
    on = CropAugment(intensity=0.3)
    unit = np.full((1, 4, 4), 0.5, np.float32)
    out = on.intensity_fn(rng)(unit)
    assert out.shape == unit.shape and 0.0 <= out.min() and out.max() <= 1.0 and not np.allclose(out, unit)


def test_intensity_augmentation_runs_on_the_unit_crop():
    norm = NormSpec()
    vol = make_volume(np.random.default_rng(2).uniform(0, 100, (5, 30, 30)), spacing=(1.0, 1.0))
    seen = []
    crop, _ = crop_2d5(vol, (2, 15, 15), 3, (9, 9), size_px=9, norm=norm, unit_transform=lambda u: seen.append(u.copy()) or u * 0)
    assert 0.0 <= seen[0].min() and seen[0].max() <= 1.0  # the hook sees [0, 1] intensities
    np.testing.assert_allclose(crop, (0 - norm.mean) / norm.std)
