"""Stage-1 families: config checks, shapes, decoding, targets round trips, flip TTA."""

import numpy as np
import pytest
import torch
from stage1_fixtures import axial, entry, make_volume, mirror_volume, sagittal, study_of, truth_for
from torch import nn

from rsna_infer.constants import AXIAL_T2, SAG_T1, SAG_T2
from rsna_infer.imaging import source_slice_index
from rsna_infer.keypoints import StudyKeypoints, truth_key
from rsna_infer.models.registry import make_family
from rsna_infer.specs import SpecError
from rsna_infer.stage1.axial_level import NONE_CLASS

E3D = dict(arch="mobilenetv2_035", size=(16, 64, 64))


def _entries():
    return {
        "sag2d_t2": entry("sag2d", "t2", n_slices=10),
        "sag2d_t1": entry("sag2d", "t1", n_slices=10, in_chans=3),
        "sag3d_t2": entry("sag3d", "t2", **E3D),
        "sag3d_t1": entry("sag3d", "t1", **E3D, model_kwargs={"tta_lr": True}),
        "axial3d": entry("axial3d", **E3D),
        "axial_level": entry("axial_level", n_slices=3, in_chans=3, model_kwargs={"hidden": 16, "heads": 2}),
        "axial_xy": entry("axial_xy", n_slices=3, in_chans=3),
    }


def _study():
    localiser = make_volume((3, 64, 64), (1, 0, 0), (0, 1, 0), (-80, -80, 0), description=SAG_T2, series_id=12)
    return study_of(
        sagittal(series_id=10), sagittal(series_id=11, toward_left=True), localiser,
        sagittal(series_id=13, description=SAG_T1, toward_left=True),
        axial(series_id=20), axial((16, 64, 64), z0=10.0, series_id=21, flipped_lr=True),
    )


def _as_output(fam, t):
    coords = t["coords"]
    return np.concatenate([coords, t["vis"][:, None]], 1) if fam.visibility else coords


# -- configuration ----------------------------------------------------------------------
@pytest.mark.parametrize("bad,match", [
    (dict(family="sag2d", variant="t3"), "variant"),
    (dict(family="sag3d", variant="t2", size=(64, 64)), "D, H, W"),
    (dict(family="sag2d", variant="t2", model_kwargs={"hiddn": 3}), "unknown model_kwargs"),
    (dict(family="axial_level", n_slices=3, in_chans=1), "in_chans"),
    (dict(family="axial_xy", n_slices=4, in_chans=4), "odd"),
    (dict(family="sag2d", variant="t2", n_slices=2, in_chans=3), "in_chans"),
    (dict(family="sag2d", variant="t2", extra={"aug": {"spin": 1}}), "unknown"),
    (dict(family="axial3d", size=(16, 64, 64), extra={"maxslices": 3}), "unknown input.extra"),
])
def test_bad_config_fails_fast(bad, match):
    with pytest.raises(SpecError, match=match):
        make_family(entry(**bad))


def test_set_keys():
    fams = {k: make_family(e) for k, e in _entries().items()}
    assert {k: f.set_key for k, f in fams.items()} == {
        "sag2d_t2": "sag2d_t2", "sag2d_t1": "sag2d_t1", "sag3d_t2": "sag3d_t2", "sag3d_t1": "sag3d_t1",
        "axial3d": "axial3d", "axial_level": "axial_level", "axial_xy": "axial_level"}


# -- shapes and decoding -------------------------------------------------------------------
@pytest.mark.parametrize("key,n_samples,out_shape,kind", [
    ("sag2d_t2", 2, (5, 3), "spinal"),
    ("sag2d_t1", 1, (5, 3), "foraminal"),
    ("sag3d_t2", 2, (5, 4), "spinal"),
    ("sag3d_t1", 1, (10, 4), "foraminal"),
    ("axial3d", 2, (10, 4), "subarticular"),
    ("axial_level", 2, None, "subarticular"),
])
def test_prepare_run_decode(key, n_samples, out_shape, kind):
    fam = make_family(_entries()[key])
    model = fam.build().eval()
    study = _study()
    samples = fam.prepare(study)
    assert len(samples) == n_samples  # the localiser inside the T2 series is skipped
    batch = fam.collate(samples)
    ex = fam.example_batch(2)
    assert ex["image"].shape[2:] == batch["image"].shape[2:]
    with torch.no_grad():
        out = fam.run(model, batch).numpy()
        out_tta = fam.run(model, batch, tta=True).numpy()
        assert fam.run(model, ex).shape[0] == 2
    assert out.shape == out_tta.shape
    if out_shape is not None:
        assert out.shape == (n_samples, *out_shape)
    else:  # axial level: [B, S_max, 2 sides, 6 classes], probabilities, zero on padding
        assert out.shape == (n_samples, 26, 2, 6)
        np.testing.assert_allclose(out[0].sum(-1), 1.0, atol=1e-5)
        assert np.all(out[1, 16:] == 0)
    for i, s in enumerate(samples):
        ks = fam.decode(out[i], s, study)
        vol = study.find(s.meta["series_id"], s.meta["stack_index"])
        assert ks.kind == kind and ks.source == fam.set_key
        v = ks.valid
        assert v.any()
        assert np.all(ks.series_id[v] == vol.series_id)
        np.testing.assert_allclose(ks.world[v], vol.to_world(ks.voxel[v]), atol=1e-9)
        assert np.all((ks.confidence >= 0) & (ks.confidence <= 1))


def test_axial_xy_prepares_one_sample_per_chosen_slice():
    fam = make_family(_entries()["axial_xy"])
    study = _study()
    assert fam.prepare(study) == [] and fam.prepare(study, StudyKeypoints(1)) == []
    truth = truth_for(study)
    samples = fam.prepare(study, truth)
    points = np.concatenate([s.meta["points"] for s in samples])
    assert sorted(points) == list(range(10))  # every truth point is on one sample's slice
    assert all(s.inputs["image"].shape == (3, 64, 64) for s in samples)
    model = fam.build().eval()
    with torch.no_grad():
        out = fam.run(model, fam.collate(samples), tta=True).numpy()
    assert out.shape == (len(samples), 2, 2)


# -- targets -> decode round trips ---------------------------------------------------------
def _round_trip(key, study, truth, rng=None, extra=None):
    e = _entries()[key]
    if extra:
        e = entry(e.family, e.variant, e.arch, e.input.size, n_slices=e.input.n_slices, in_chans=e.input.in_chans,
                  extra=extra, model_kwargs=e.model_kwargs)
    fam = make_family(e)
    out = []
    for s in fam.prepare(study, truth, rng=rng):
        t = fam.targets(s, study, truth)
        assert t is not None
        out.append((s, t, fam.decode(_as_output(fam, t), s, study)))
    return fam, out


@pytest.mark.parametrize("rng", [None, np.random.default_rng(5)])
@pytest.mark.parametrize("key,kind", [("sag3d_t2", "spinal"), ("sag3d_t1", "foraminal"), ("axial3d", "subarticular")])
def test_volume_families_round_trip(key, kind, rng):
    study = _study()
    truth = truth_for(study)
    extra = {"aug": {"lr_flip": 1.0, "ap_flip": 0.5}} if rng is not None else None
    _, results = _round_trip(key, study, truth, rng, extra)
    t_set = truth.get(truth_key(kind))
    for s, _, ks in results:
        assert s.meta["transform"].lr_swapped == (rng is not None)
        vol = study.find(s.meta["series_id"], s.meta["stack_index"])
        inside = vol.contains(t_set.world)
        assert np.array_equal(ks.valid, inside)  # points outside this stack come back invisible
        truth_vox = vol.to_voxel(t_set.world[inside])
        assert np.abs(ks.voxel[inside] - truth_vox).max() < 0.5
        np.testing.assert_allclose(ks.world[inside], t_set.world[inside], atol=1e-4)


def test_partial_axial_stack_hides_missing_levels():
    study = _study()
    truth = truth_for(study)
    _, results = _round_trip("axial3d", study, truth)
    by_series = {s.meta["series_id"]: (t, ks) for s, t, ks in results}
    t, ks = by_series[21]  # covers z = 10..70: levels L1/L2..L3/L4 only
    assert list(t["vis"]) == [1, 1, 1, 0, 0] * 2 and list(t["vis_mask"]) == [1] * 10
    assert list(ks.valid) == [True, True, True, False, False] * 2


def test_sag2d_t2_round_trip_in_plane_on_centre_slice():
    study = _study()
    truth = truth_for(study)
    fam, results = _round_trip("sag2d_t2", study, truth)
    assert len(results) == 2
    for s, _, ks in results:
        vol = study.find(s.meta["series_id"], s.meta["stack_index"])
        truth_vox = vol.to_voxel(truth.get("truth_spinal").world)
        np.testing.assert_allclose(ks.voxel[:, 1:], truth_vox[:, 1:], atol=1e-4)
        _, centre = fam.channel_positions(vol.shape[0])
        np.testing.assert_allclose(ks.voxel[:, 0], source_slice_index(s.meta["transform"], centre))
        np.testing.assert_allclose(ks.confidence, fam.confidence)


def test_sag2d_t1_sides_in_patient_coordinates():
    study = _study()
    truth = truth_for(study)
    fam, results = _round_trip("sag2d_t1", study, truth, rng=np.random.default_rng(0))
    ((s, _, ks),) = results
    vol = study.find(s.meta["series_id"], 0)
    centre = source_slice_index(s.meta["transform"], fam.channel_positions(vol.shape[0])[1])
    centre_x = vol.to_world(np.array([centre, 0.0, 0.0]))[0]
    left, right = ks.world[:5], ks.world[5:]
    np.testing.assert_allclose(left[:, 0] - centre_x, 18.0, atol=1e-4)  # patient left = larger x
    np.testing.assert_allclose(right[:, 0] - centre_x, -18.0, atol=1e-4)
    truth_vox = vol.to_voxel(truth.get("truth_foraminal").world)  # sides share (y, x)
    np.testing.assert_allclose(ks.voxel[:5, 1:], truth_vox[:5, 1:], atol=1e-4)
    np.testing.assert_allclose(ks.voxel[5:, 1:], truth_vox[5:, 1:], atol=1e-4)
    assert np.all(ks.confidence < make_family(_entries()["sag3d_t1"]).confidence)


@pytest.mark.parametrize("rng", [None, np.random.default_rng(2)])
def test_axial_xy_round_trip(rng):
    study = _study()
    truth = truth_for(study)
    extra = {"aug": {"lr_flip": 1.0}} if rng is not None else None
    fam, results = _round_trip("axial_xy", study, truth, rng, extra)
    merged = fam.merge_sets([ks for _, _, ks in results])
    t_set = truth.get("truth_subarticular")
    assert merged.valid.all()
    np.testing.assert_allclose(merged.world, t_set.world, atol=1e-4)
    if rng is not None:
        assert all(s.meta["transform"].lr_swapped for s, _, _ in results)


def test_axial_level_targets_decode_to_truth_slices():
    study = _study()
    truth = truth_for(study)
    fam = make_family(_entries()["axial_level"])
    t_set = truth.get("truth_subarticular")
    for s in fam.prepare(study):
        t = fam.targets(s, study, truth)
        cls = t["cls"]
        probs = np.zeros((len(cls), 2, 6))
        probs[np.arange(len(cls))[:, None], np.arange(2)[None], np.where(cls >= 0, cls, NONE_CLASS)] = 1.0
        ks = fam.decode(probs, s, study)
        vol = study.find(s.meta["series_id"], s.meta["stack_index"])
        inside = vol.contains(t_set.world)
        assert np.array_equal(ks.valid, inside)
        assert np.abs(ks.voxel[inside, 0] - vol.to_voxel(t_set.world[inside])[:, 0]).max() <= 0.5
        np.testing.assert_allclose(ks.confidence[inside], 1.0)
        for side in range(2):  # every level present in the stack is labelled on exactly one slice
            labelled = sorted(int(c) for c in cls[:, side] if 0 <= c < NONE_CLASS)
            assert labelled == [lv for lv in range(5) if inside[side * 5 + lv]]


def test_axial_level_mirrored_sample_swaps_sides():
    study = _study()
    truth = truth_for(study)
    e = entry("axial_level", n_slices=3, in_chans=3, extra={"aug": {"lr_flip": 1.0, "ap_flip": 0.0}})
    fam = make_family(e)
    s = fam.prepare(study, rng=np.random.default_rng(0))[0]
    plain = make_family(_entries()["axial_level"]).prepare(study)[0]
    assert s.meta["transform"].lr_swapped
    t, t_plain = fam.targets(s, study, truth)["cls"], fam.targets(plain, study, truth)["cls"]
    np.testing.assert_array_equal(t, t_plain[:, ::-1])


def test_targets_none_without_truth():
    study = _study()
    fam = make_family(_entries()["sag3d_t2"])
    s = fam.prepare(study)[0]
    assert fam.targets(s, study, StudyKeypoints(1)) is None


# -- flip TTA ---------------------------------------------------------------------------
def _symmetric(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x + x.flip(dim)


@pytest.mark.parametrize("key", ["sag2d_t2", "sag3d_t2", "axial3d", "axial_xy"])
def test_tta_exact_on_ap_symmetric_input(key):
    fam = make_family(_entries()[key])
    torch.manual_seed(0)
    model = fam.build().eval()
    batch = fam.example_batch(2)
    ((ap,),) = fam.tta_flips
    batch["image"] = _symmetric(batch["image"], ap - 3)
    with torch.no_grad():
        plain, tta = fam.run(model, batch), fam.run(model, batch, tta=True)
    j = fam.coord_axes.index(ap)
    torch.testing.assert_close(tta[..., j], torch.full_like(tta[..., j], 0.5), atol=1e-5, rtol=0)
    others = [i for i in range(tta.shape[-1]) if i != j]
    torch.testing.assert_close(tta[..., others], plain[..., others], atol=1e-5, rtol=0)


class _CentroidModel(nn.Module):
    """Flip-equivariant stand-in: each output point is the intensity centroid of one half of
    the input along the lateral axis (left slots: the patient-left half)."""

    def __init__(self, lateral_dim: int, n_points: int, coord_dims: tuple[int, ...]):
        super().__init__()
        self.lateral_dim, self.n_points, self.coord_dims = lateral_dim, n_points, coord_dims
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, batch):
        x = batch["image"].clamp(min=0).sum(1)  # [B, *spatial]
        n = x.shape[self.lateral_dim]
        halves = [x.narrow(self.lateral_dim, n // 2, n - n // 2), x.narrow(self.lateral_dim, 0, n // 2)]
        pts = []
        for side, h in enumerate(halves):
            coords = []
            for d in self.coord_dims:
                m = h.sum(dim=[k for k in range(1, h.ndim) if k != d])
                size = x.shape[d]
                pos = torch.arange(m.shape[1], dtype=x.dtype) + (n // 2 if (d == self.lateral_dim and side == 0) else 0)
                coords.append(((m * (pos + 0.5)).sum(1) / m.sum(1)) / size)
            pts.append(torch.stack(coords + [torch.zeros_like(coords[0])], -1))
        per_side = self.n_points // 2
        return torch.cat([pts[0][:, None].expand(-1, per_side, -1), pts[1][:, None].expand(-1, per_side, -1)], 1)


@pytest.mark.parametrize("key,lateral_dim", [("sag3d_t1", 1), ("axial3d", 3)])
def test_tta_unflips_exactly_with_side_swap(key, lateral_dim):
    """With a flip-equivariant model, TTA (A/P flip + left/right mirror) equals no TTA."""
    e = _entries()[key]
    fam = make_family(entry(e.family, e.variant, e.arch, e.input.size, model_kwargs={"tta_lr": True}))
    assert len(fam.tta_flips) == 3  # A/P, L/R, and both
    model = _CentroidModel(lateral_dim, 10, (1, 2, 3))
    batch = {"image": torch.rand(2, 1, 16, 20, 24) ** 4}
    plain, tta = fam.run(model, batch), fam.run(model, batch, tta=True)
    torch.testing.assert_close(tta, plain, atol=1e-5, rtol=0)
    assert not torch.allclose(plain[:, 0], plain[:, 5])  # the sides really differ


class _HalfStatsLevelModel(nn.Module):
    """Per slice and side: logits from statistics of that side's half of the slice, which a
    vertical flip leaves unchanged and a horizontal mirror hands to the other side."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 6)

    def forward(self, batch):
        x = batch["image"]
        w = x.shape[-1] // 2
        left, right = x[..., w:], x[..., :w]  # canonical axial columns run toward patient left
        feats = [torch.stack([h.mean((-1, -2)), (h**2).mean((-1, -2))], -1) for h in (left, right)]
        return self.lin(torch.stack(feats, 2))


def test_axial_level_tta_exact():
    fam = make_family(entry("axial_level", n_slices=3, in_chans=3, model_kwargs={"tta_lr": True}))
    torch.manual_seed(0)
    batch = {"image": torch.rand(2, 7, 16, 16), "slice_mask": torch.ones(2, 7, dtype=torch.bool)}
    model = _HalfStatsLevelModel()
    with torch.no_grad():
        torch.testing.assert_close(fam.run(model, batch, tta=True), fam.run(model, batch), atol=1e-6, rtol=0)
    # and the real network on a vertically symmetric input with vertical-flip TTA only
    fam = make_family(_entries()["axial_level"])
    net = fam.build().eval()
    sym = dict(batch, image=_symmetric(batch["image"], -2))
    with torch.no_grad():
        torch.testing.assert_close(fam.run(net, sym, tta=True), fam.run(net, sym), atol=1e-5, rtol=0)


def test_series_types_read():
    fams = {k: make_family(e) for k, e in _entries().items()}
    assert fams["sag2d_t2"].series_type == SAG_T2 and fams["sag2d_t1"].series_type == SAG_T1
    study = _study()
    assert {s.meta["series_id"] for s in fams["axial3d"].prepare(study)} == {v.series_id for v in study.get(AXIAL_T2)}


def test_sag2d_old_n_slices_meaning_reads_as_sampled_slices():
    """Older manifests said ``n_slices: 10`` for the 10 sampled slices; the new names are
    ``n_slices`` = ``in_chans`` (slices per input) and ``extra.sampled_slices``."""
    old = make_family(entry("sag2d", "t2", n_slices=10, in_chans=3))
    new = make_family(entry("sag2d", "t2", n_slices=3, in_chans=3, extra={"sampled_slices": 10}))
    default = make_family(entry("sag2d", "t2", n_slices=3, in_chans=3))
    assert old.sampled_slices == new.sampled_slices == default.sampled_slices == 10
    np.testing.assert_allclose(old.channel_positions(17)[0], new.channel_positions(17)[0])
    study = _study()
    np.testing.assert_array_equal(old.prepare(study)[0].inputs["image"], new.prepare(study)[0].inputs["image"])
    with pytest.raises(SpecError, match="sampled_slices"):
        make_family(entry("sag2d", "t2", n_slices=5, in_chans=3, extra={"sampled_slices": 10}))


@pytest.mark.parametrize("n_total", [9, 10, 17, 18])
def test_sag2d_channels_are_symmetric_and_a_mirrored_stack_reverses_them(n_total):
    fam = make_family(entry("sag2d", "t2", n_slices=3, in_chans=3))
    pos, centre = fam.channel_positions(n_total)
    assert centre == (n_total - 1) / 2
    np.testing.assert_allclose(pos[::-1], (n_total - 1) - pos)  # mirror image of itself
    np.testing.assert_allclose(np.diff(pos), (n_total - 1) / 9)  # the 10-sample spacing
    # a stack mirrored left/right in patient coordinates: same pixels, the channels reversed
    vol = sagittal((n_total, 64, 64), series_id=10)
    mirrored = mirror_volume(vol)
    assert np.allclose(mirrored.pixels, vol.pixels[::-1])
    a = fam.prepare(study_of(vol))[0].inputs["image"]
    b = fam.prepare(study_of(mirrored))[0].inputs["image"]
    np.testing.assert_allclose(b, a[::-1], atol=1e-6)


def test_axial_level_padding_to_a_bucket_leaves_each_stack_s_output_unchanged():
    """The predictor batches level-classifier stacks of different lengths together, padded to
    a length bucket (`length_axis`): the slice mask makes every real slice's output the same
    as with the stack alone (up to float rounding), and the padded tail is cut off."""
    from rsna_infer.inference.batches import batches_by_shape, length_bucket
    from rsna_infer.models.family import Sample

    fam = make_family(_entries()["axial_level"])
    assert fam.length_axis == ("image", 0)
    assert [length_bucket(n) for n in (1, 8, 9, 13, 17, 30, 33, 49)] == [8, 8, 12, 16, 24, 32, 48, 64]
    torch.manual_seed(0)
    net = fam.build().eval()
    rng = np.random.default_rng(0)
    samples = [Sample(1, {"image": rng.random((n, 16, 16), dtype=np.float32)}) for n in (10, 5, 12, 7, 30)]
    assert batches_by_shape(fam, samples, 8) == [[0, 2], [1, 3], [4]]  # buckets 12, 8, 32
    batch = fam.collate([samples[0], samples[2]], pad_to=16)
    assert batch["image"].shape == (2, 16, 16, 16) and batch["slice_mask"].sum().item() == 22
    with torch.no_grad():
        together = fam.run(net, batch, tta=True).numpy()
        for j, s in enumerate((samples[0], samples[2])):
            alone = fam.run(net, fam.collate([s]), tta=True).numpy()[0]
            n = len(s.inputs["image"])
            np.testing.assert_allclose(together[j, :n], alone, atol=1e-5, rtol=0)
            assert np.all(together[j, n:] == 0)
