import numpy as np
import pytest
from stage1_fixtures import axial, blob_volume, make_volume, sagittal

from rsna_infer.imaging import (
    CANONICAL_AXES,
    AugSpec,
    Orientation,
    VoxelTransform,
    canonical_slice_index,
    orient,
    prepare_slices,
    prepare_volume,
    resize_depth,
    resize_slices,
    resize_volume,
    sample_region,
    sample_slice_indices,
    source_slice_index,
    standardise,
    to_unit,
    view_alignment,
)
from rsna_infer.specs import NormSpec, SpecError



def _centroid(arr: np.ndarray) -> np.ndarray:
    w = np.clip(arr - np.median(arr), 0, None)
    w = np.where(w > 0.2 * w.max(), w, 0.0)
    grids = np.meshgrid(*[np.arange(n) for n in arr.shape], indexing="ij")
    return np.array([(g * w).sum() / w.sum() for g in grids])


def test_sample_slice_indices_even_and_inclusive():
    idx = sample_slice_indices(17, 10)
    assert len(idx) == 10 and idx[0] == 0 and idx[-1] == 16 and np.all(np.diff(idx) >= 1)
    assert list(sample_slice_indices(3, 5)) == [0, 0, 1, 2, 2]
    with pytest.raises(ValueError):
        sample_slice_indices(0, 3)


@pytest.mark.parametrize("view,vol", [
    ("sagittal", sagittal()),
    ("sagittal", sagittal(toward_left=True)),
    ("axial", axial()),
    ("axial", axial(flipped_lr=True)),
    # in-plane transposed sagittal: columns run inferior, rows posterior
    ("sagittal", make_volume((5, 20, 30), (0, 0, -1), (0, 1, 0), (0, 0, 0))),
])
def test_canonical_axes_point_the_documented_way(view, vol):
    o = orient(vol, view)
    base = np.array([1.0, 2.0, 3.0])
    for k, direction in enumerate(CANONICAL_AXES[view]):
        step = base.copy()
        step[k] += 1
        d = vol.to_world(o.to_source(step)) - vol.to_world(o.to_source(base))
        assert d @ np.asarray(direction) > 0.9 * np.linalg.norm(d), (k, d)
    # apply() and to_source agree voxel by voxel
    canon = o.apply(vol.pixels)
    assert canon.shape == o.shape
    for c in [(0, 0, 0), (2, 5, 7), (o.shape[0] - 1, o.shape[1] - 1, 1)]:
        s = np.rint(o.to_source(np.array(c, float))).astype(int)
        assert canon[c] == vol.pixels[tuple(s)]
    np.testing.assert_allclose(o.to_canonical(o.to_source(np.array([[1.5, 2.25, 3.75]]))), [[1.5, 2.25, 3.75]])


def test_view_alignment():
    assert view_alignment(sagittal(), "sagittal") == pytest.approx(1.0)
    assert view_alignment(sagittal(), "axial") == pytest.approx(0.0)


@pytest.mark.parametrize("out", [(32, 24), (64, 64), (100, 90)])
def test_resize_slices_maps_centres_exactly(out):
    yy, xx = np.meshgrid(np.arange(80), np.arange(70), indexing="ij")
    img = np.exp(-((yy - 30.3) ** 2 + (xx - 50.6) ** 2) / (2 * 5.0**2)).astype(np.float32)[None]
    r = resize_slices(img, out)[0]
    cy, cx = _centroid(r)
    assert (cy + 0.5) / out[0] * 80 - 0.5 == pytest.approx(30.3, abs=0.15)
    assert (cx + 0.5) / out[1] * 70 - 0.5 == pytest.approx(50.6, abs=0.15)


@pytest.mark.parametrize("depth", [7, 16, 33])
def test_resize_depth_maps_centres_exactly(depth):
    z = np.arange(20)
    arr = np.repeat(np.exp(-((z - 8.7) ** 2) / 8.0)[:, None, None], 3, 1).repeat(3, 2).astype(np.float32)
    r = resize_depth(arr, depth)[:, 1, 1]
    c = (r * np.arange(depth)).sum() / r.sum()
    assert (c + 0.5) / depth * 20 - 0.5 == pytest.approx(8.7, abs=0.1)
    assert resize_volume(arr, (depth, 5, 4)).shape == (depth, 5, 4)


def test_sample_region_identity_and_flip():
    a = np.random.default_rng(0).random((4, 6, 5)).astype(np.float32)
    full = sample_region(a, (-0.5, -0.5, -0.5), (3.5, 5.5, 4.5), a.shape)
    np.testing.assert_allclose(full, a, atol=1e-5)
    flipped = sample_region(a, (5.5, -0.5), (-0.5, 4.5), (6, 5))
    np.testing.assert_allclose(flipped, a[:, ::-1], atol=1e-5)
    outside = sample_region(a, (100.0, 100.0), (110.0, 110.0), (3, 3), padding=-7.0)
    np.testing.assert_allclose(outside, -7.0)


def test_unit_then_standardise_equals_norm_apply():
    norm = NormSpec(lo_pct=2, hi_pct=98, mean=0.4, std=0.3)
    a = np.random.default_rng(1).normal(100, 30, (5, 8, 8)).astype(np.float32)
    b = norm.bounds(a)
    np.testing.assert_allclose(standardise(to_unit(a, b), norm), norm.apply(a, b), atol=1e-6)


def _blob_round_trip(vol, view, size, rng=None, aug=None):
    voxel = np.array([vol.shape[0] * 0.4, vol.shape[1] * 0.35, vol.shape[2] * 0.6])
    world = vol.to_world(voxel)
    bvol = blob_volume(vol, world[None], sigma_mm=6.0)
    prep = prepare_volume(bvol, view, size, NormSpec(), rng=rng, aug=aug)
    c = _centroid(prep.image)
    u = (c + 0.5) / np.array(size)
    return prep, vol.to_world(prep.transform.to_voxel(u)), world


@pytest.mark.parametrize("view,vol", [("sagittal", sagittal()), ("sagittal", sagittal(toward_left=True)),
                                      ("axial", axial()), ("axial", axial(flipped_lr=True))])
def test_prepare_volume_transform_maps_back_to_the_point(view, vol):
    _, got, world = _blob_round_trip(vol, view, (16, 48, 40))
    assert np.linalg.norm(got - world) < 1.5  # mm; slices are 4 mm apart, pixels 2.5 mm


def test_augmented_transform_still_exact():
    rng = np.random.default_rng(3)
    aug = AugSpec(scale=0.15, shift=0.08, intensity=0.0, ap_flip=1.0, lr_flip=1.0)
    prep, got, world = _blob_round_trip(sagittal(), "sagittal", (16, 48, 48), rng=rng, aug=aug)
    assert prep.transform.lr_swapped
    assert np.linalg.norm(got - world) < 1.5


def test_prepare_slices_shapes_and_z_bookkeeping():
    vol = axial()
    prep = prepare_slices(vol, "axial", np.array([0, 3, 5]), (32, 32), NormSpec())
    assert prep.image.shape == (3, 32, 32) and prep.image.dtype == np.float32
    # u_z of canonical slice k is (k + 0.5) / Z and maps back to its source slice
    k = 3
    src = prep.transform.to_voxel(np.array([(k + 0.5) / vol.shape[0], 0.5, 0.5]))[0]
    assert src == pytest.approx(source_slice_index(prep.transform, k))
    assert canonical_slice_index(prep.transform, src) == pytest.approx(k)
    # axial canonical z runs inferior: source (ascending z) slice 0 is canonical last
    assert source_slice_index(prep.transform, 0) == pytest.approx(vol.shape[0] - 1)


def test_voxel_transform_flip_and_reframe():
    t = VoxelTransform.full(Orientation((4, 10, 20)), "axial")
    u = np.array([0.3, 0.6, 0.25])
    flipped = t.flipped(2)
    assert flipped.lr_swapped and not t.lr_swapped
    np.testing.assert_allclose(flipped.to_voxel(u), t.to_voxel([0.3, 0.6, 0.75]))
    zoom = t.reframed(np.array([1, 0.5, 0.5]), np.array([0, 0.25, 0.25]))
    np.testing.assert_allclose(zoom.to_norm(zoom.to_voxel(u)), u)
    np.testing.assert_allclose(zoom.to_voxel([0.3, 0.5, 0.5]), t.to_voxel([0.3, 0.5, 0.5]))


def test_aug_spec_validation():
    assert AugSpec.from_extra({}) == AugSpec()
    assert AugSpec.from_extra({"aug": {"lr_flip": 0.5}}).lr_flip == 0.5
    with pytest.raises(SpecError, match="unknown"):
        AugSpec.from_extra({"aug": {"rotate": 10}})
    with pytest.raises(SpecError, match="probability"):
        AugSpec.from_extra({"aug": {"ap_flip": 2}})


@pytest.mark.parametrize("view,a,b", [
    ("sagittal", sagittal(), sagittal(toward_left=True)),
    ("axial", axial(), axial(flipped_lr=True)),
])
def test_same_anatomy_in_either_slice_order_gives_the_same_input(view, a, b):
    """Left/right comes from patient coordinates: two stacks of the same anatomy stored in
    opposite slice / column orders become the same canonical model input."""
    pts = np.array([[10.0, 0.0, 30.0], [-6.0, 20.0, 0.0]])
    pa = prepare_volume(blob_volume(a, pts), view, (15, 32, 32), NormSpec())
    pb = prepare_volume(blob_volume(b, pts), view, (15, 32, 32), NormSpec())
    np.testing.assert_allclose(pa.image, pb.image, atol=1e-4)


def test_canonical_resize_without_the_full_copy_gives_the_same_numbers():
    """Resizing the source slices where they lie and reordering the small result equals
    resizing the canonical copy (slice order reversed, subsets, every slice); an in-plane flip
    takes the copying path; inside `shared_resizes` a repeated request is the same array."""
    from rsna_infer.imaging import canonical_slices_resized, shared_resizes

    cases = [sagittal((9, 40, 48)), sagittal((9, 40, 48), toward_left=True), axial((12, 44, 40)),
             axial((12, 44, 40), flipped_lr=True)]
    for vol in cases:
        for view in ("sagittal", "axial"):
            o = orient(vol, view)
            canon = o.apply(vol.pixels)
            for idx in (None, np.arange(canon.shape[0])[::-1], np.array([0, 3, 3, 8]), np.array([2])):
                want = resize_slices(canon if idx is None else canon[idx], (16, 20))
                got = canonical_slices_resized(vol, o, idx, (16, 20))
                np.testing.assert_array_equal(got, want)
    vol = axial((12, 44, 40))
    o = orient(vol, "axial")
    with shared_resizes():
        a = canonical_slices_resized(vol, o, None, (16, 16))
        assert canonical_slices_resized(vol, o, None, (16, 16)) is a
        assert canonical_slices_resized(vol, o, np.arange(3), (16, 16)) is not a
    assert canonical_slices_resized(vol, o, None, (16, 16)) is not a  # nothing kept after the context
