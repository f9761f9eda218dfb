"""Stage-2 grading families (fusion, roi) on a hand-built study with known geometry."""

import numpy as np
import pytest
import torch

from rsna_infer.constants import AXIAL_T2, CONDITIONS, LEVELS, LR_SWAP, SAG_T1, SAG_T2, TARGETS
from rsna_infer.io.volume import Study, Volume
from rsna_infer.keypoints import KeypointSet, StudyKeypoints, truth_key
from rsna_infer.models.registry import make_family
from rsna_infer.specs import ModelEntry, SpecError
from rsna_infer.stage2.fusion import FusionFamily
from rsna_infer.stage2.layout import point_lr_perm, point_targets, points_mask, scatter_points, swap_lr
from rsna_infer.stage2.roi import HEADS, RoiFamily
from rsna_infer.stage2.tta import ViewAxes, mirror, mirror_sample, run_tta, tta_passes

LEVEL_Z = np.array([42.0, 26.0, 10.0, -6.0, -22.0])  # cranial -> caudal, on axial slices
SAG_IOP = ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0))
AX_IOP = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))


def spinal_world():
    return np.stack([np.zeros(5), np.zeros(5), LEVEL_Z], 1)


def sided_world(x, y):
    """10 points: left side (patient left = +x) first, then right."""
    left = np.stack([np.full(5, x), np.full(5, y), LEVEL_Z], 1)
    right = left * np.array([-1, 1, 1])
    return np.concatenate([left, right])


def volume(shape, iop, spacing, slice_spacing, origin, series_id, desc, blobs):
    r, c = np.asarray(iop[0]), np.asarray(iop[1])
    n = np.cross(r, c)
    pos = np.asarray(origin)[None] + np.arange(shape[0])[:, None] * slice_spacing * n[None]
    vol = Volume(np.zeros(shape, np.float32), pos, r, c, spacing, np.arange(1, shape[0] + 1), study_id=7, series_id=series_id, description=desc)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    world = vol.to_world(grid)
    px = 100 + np.random.default_rng(series_id).normal(0, 5, shape)
    for p in blobs:
        px += 800 * np.exp(-np.sum((world - p) ** 2, -1) / (2 * 1.5**2))
    vol.pixels[...] = px
    return vol


def kpset(kind, vol, world, conf=None, source="test"):
    world = np.asarray(world, float)
    n = len(world)
    conf = np.ones(n) if conf is None else np.asarray(conf, float)
    valid = conf[:, None] > 0
    voxel = np.where(valid, vol.to_voxel(np.nan_to_num(world)), np.nan)
    return KeypointSet(kind, np.where(valid, world, np.nan), voxel, np.full(n, vol.series_id), np.full(n, vol.stack_index), conf, source)


def make_study(with_t1=True, with_axial=True, with_t2=True):
    """Sagittal T2 (x 14..-14 mm), Sagittal T1 (x 17.5..-17.5), Axial T2 (z -30..50); blobs at
    the canal (x=0), foramina (x=+-12) and subarticular zones (x=+-8)."""
    blobs = np.concatenate([spinal_world(), sided_world(12.0, 6.0), sided_world(8.0, -2.0)])
    vols = {}
    kps = StudyKeypoints(7)
    if with_t2:
        t2 = volume((9, 96, 96), SAG_IOP, (1.0, 1.0), 3.5, (14.0, -48.0, 60.0), 101, SAG_T2, blobs)
        vols[SAG_T2] = [t2]
        kps.sets["sag3d_t2"] = kpset("spinal", t2, spinal_world())
    if with_t1:
        t1 = volume((11, 96, 96), SAG_IOP, (1.0, 1.0), 3.5, (17.5, -48.0, 60.0), 102, SAG_T1, blobs)
        vols[SAG_T1] = [t1]
        kps.sets["sag3d_t1"] = kpset("foraminal", t1, sided_world(12.0, 6.0))
    if with_axial:
        ax = volume((21, 80, 80), AX_IOP, (0.8, 0.8), 4.0, (-32.0, -32.0, -30.0), 103, AXIAL_T2, blobs)
        vols[AXIAL_T2] = [ax]
        kps.sets["axial_level"] = kpset("subarticular", ax, sided_world(8.0, -2.0))
    return Study(7, vols), kps


def entry(family, variant, head=None, n_slices=3, size=(32, 32), arch="test_resnet", **kw):
    mk = dict(kw.pop("model_kwargs", {}))
    if head is not None:
        mk["head"] = head
    in_chans = 1 if head == "slice_gru" else n_slices
    inp = {"size": list(size), "n_slices": n_slices, "in_chans": in_chans, **kw}
    return ModelEntry.from_dict(
        {"name": f"{family}-{variant}-{head}", "family": family, "variant": variant, "arch": arch, "input": inp, "file": "x.safetensors", "model_kwargs": mk}
    )


@pytest.fixture(scope="module")
def study():
    return make_study()


ALL_CONFIGS = [("fusion", "default", None, "test_efficientnet")] + [
    ("roi", v, h, "test_resnet") for v in ("spinal", "foraminal", "subarticular") for h in HEADS
]


@pytest.mark.parametrize("family,variant,head,arch", ALL_CONFIGS)
def test_every_variant_and_head_runs_forward_and_backward(study, family, variant, head, arch):
    torch.manual_seed(0)
    fam = make_family(entry(family, variant, head, arch=arch))
    assert isinstance(fam, FusionFamily if family == "fusion" else RoiFamily)
    sample = fam.prepare(*study)[0]
    assert sample.study_id == 7 and sample.mask.shape == (5, 5) and sample.mask.dtype == bool
    batch = fam.collate([sample, sample])
    for k, shape in fam.input_shapes().items():
        assert tuple(batch[k].shape) == (2, *shape) and batch[k].dtype == torch.float32
    net = fam.build().train()
    out = net(batch)
    assert out.shape == (2, 5, 5, 3) and torch.isfinite(out).all()
    labels = torch.randint(0, 3, (2, 5, 5))
    mask = torch.from_numpy(np.stack([sample.mask, sample.mask]))
    loss = fam.loss(out, labels, mask)
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    net.eval()
    with torch.no_grad():
        y = fam.run(net, batch, tta=True)
    assert y.shape == (2, 5, 5, 3) and y.dtype == torch.float32 and torch.isfinite(y).all()


@pytest.mark.parametrize("variant", ["spinal", "foraminal", "subarticular"])
def test_roi_masks_and_layout_cover_only_its_conditions(study, variant):
    fam = make_family(entry("roi", variant, "plain"))
    sample = fam.prepare(*study)[0]
    rows = {t for t, m in zip(TARGETS, sample.mask.reshape(-1)) if m}
    want = {"spinal": ["spinal_canal_stenosis"], "foraminal": ["left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing"],
            "subarticular": ["left_subarticular_stenosis", "right_subarticular_stenosis"]}[variant]
    assert rows == {f"{c}_{lv}" for c in want for lv in LEVELS}
    net = fam.build().eval()
    with torch.no_grad():
        out = net(fam.collate([sample]))[0]
    other = [i for i, c in enumerate(CONDITIONS) if c not in want]
    assert torch.all(out[other] == 0) and torch.all(out[[CONDITIONS.index(c) for c in want]] != 0)


def test_point_layout_maps_to_submission_rows():
    for kind, n in (("spinal", 5), ("foraminal", 10), ("subarticular", 10)):
        logits = torch.arange(n * 3, dtype=torch.float32).view(1, n, 3) + 1
        canon = scatter_points(logits, kind).reshape(25, 3)
        for i in range(n):
            side = ("left", "right")[i // 5]
            cond = {"spinal": "spinal_canal_stenosis", "foraminal": f"{side}_neural_foraminal_narrowing",
                    "subarticular": f"{side}_subarticular_stenosis"}[kind]
            row = TARGETS.index(f"{cond}_{LEVELS[i % 5]}")
            assert torch.equal(canon[row], logits[0, i])
        assert int((canon.abs().sum(1) > 0).sum()) == n
        assert points_mask(kind, np.ones(n, bool)).sum() == n
    assert point_lr_perm("foraminal") == (5, 6, 7, 8, 9, 0, 1, 2, 3, 4) and point_lr_perm("spinal") == (0, 1, 2, 3, 4)
    np.testing.assert_array_equal(point_targets("subarticular")[7], [4, 2])
    x = torch.arange(25.0).view(1, 5, 5)
    assert torch.equal(swap_lr(x)[0, 1], x[0, 2]) and torch.equal(swap_lr(x)[0, 3], x[0, 4]) and torch.equal(swap_lr(x)[0, 0], x[0, 0])


def test_crops_are_centred_on_the_keypoints(study):
    fam = make_family(entry("roi", "subarticular", "gated", size=(33, 33)))
    sample = fam.prepare(*study)[0]
    for i in range(10):
        info = sample.meta["crops"]["crops"][i]
        assert abs(info.center[1] - 16) <= 1 and abs(info.center[2] - 16) <= 1
        # the keypoint's blob is the local peak at the centre (neighbouring anatomy is 8 mm away)
        crop = sample.inputs["crops"][i]
        core = crop[:, 11:22, 11:22]
        s, y, x = np.unravel_index(np.argmax(core), core.shape)
        assert s == 1 and abs(y + 11 - info.center[1]) <= 1.5 and abs(x + 11 - info.center[2]) <= 1.5
        assert core.max() > np.median(crop) + 2.0
    # (canonical sagittal slice order runs toward patient left, i.e. decreasing index here)
    # the sagittal companion of a left point comes from the T2 slices near x = +8 (slice 2 at x = 7),
    # the right one from x = -8 (slice 6 at x = -7): laterality from patient coordinates
    assert sample.meta["crops"]["sag"][0].slices == (3, 2, 1)
    assert sample.meta["crops"]["sag"][5].slices == (7, 6, 5)
    assert sample.inputs["sag_present"].all()


def test_fusion_views_and_axial_centre(study):
    fam = make_family(entry("fusion", "default", arch="test_efficientnet", extra={"axial_crop_mm": 40.0, "axial_slices": 5}))
    sample = fam.prepare(*study)[0]
    assert sample.mask.all()
    assert sample.inputs["axial"].shape == (5, 5, 32, 32)
    crops = sample.meta["crops"]
    t2, t1, ax = study[0].first(SAG_T2), study[0].first(SAG_T1), study[0].first(AXIAL_T2)
    assert crops["sag"][0][2].series_id == t2.series_id and crops["sag"][0][2].slices == (5, 4, 3)  # x=0 is T2 slice 4
    # left foramen x=+12 -> T1 slice 1.57 -> 2; right x=-12 -> slice 8.43 -> 8
    assert crops["sag"][1][0].series_id == t1.series_id and crops["sag"][1][0].slices == (3, 2, 1)
    assert crops["sag"][2][0].slices == (9, 8, 7)
    # subarticular slots: paramedian T2 slices through x = +-8 (slices 1.71 -> 2 and 6.29 -> 6)
    assert crops["sag"][3][1].slices == (3, 2, 1) and crops["sag"][4][1].slices == (7, 6, 5)
    # axial crop per level: centred between left and right points (x = 0), at the level's z
    for lv, z in enumerate(LEVEL_Z):
        info = crops["axial"][lv]
        assert info.series_id == ax.series_id
        zc = (z + 30.0) / 4.0
        assert abs(np.mean([s for s in info.slices]) - round(zc)) <= 0.5
        assert abs(info.center[2] - 15.5) <= 0.6  # midpoint of the two sides


def test_fusion_axial_crop_falls_back_to_projected_spinal_point():
    st, kps = make_study()
    del kps.sets["axial_level"]
    fam = make_family(entry("fusion", "default", arch="test_efficientnet"))
    sample = fam.prepare(st, kps)[0]
    assert sample.mask[3:].all()  # axial crops centred on the canal point projected into the axial stack
    info = sample.meta["crops"]["axial"][0]
    assert info.series_id == st.first(AXIAL_T2).series_id


@pytest.mark.parametrize("missing", ["t1", "axial", "t2"])
def test_missing_views_give_zeros_masks_and_finite_outputs(missing):
    st, kps = make_study(with_t1=missing != "t1", with_axial=missing != "axial", with_t2=missing != "t2")
    fusion = make_family(entry("fusion", "default", arch="test_efficientnet"))
    sample = fusion.prepare(st, kps)[0]
    m = sample.mask
    if missing == "t1":
        assert m[0].all() and not m[1:3].any() and m[3:].all()
        assert np.all(sample.inputs["sag"][1:3] == 0) and np.all(sample.inputs["sag_present"][1:3] == 0)
    elif missing == "axial":
        assert m[:3].all() and not m[3:].any() and np.all(sample.inputs["axial"] == 0)
    else:
        assert not m[0].any() and m[1:].all()
    net = fusion.build()
    for mode in (net.train, net.eval):
        mode()
        assert torch.isfinite(net(fusion.collate([sample, sample]))).all()
    # an ROI model of the missing view has nothing to grade; the others are unaffected
    gone = {"t1": "foraminal", "axial": "subarticular", "t2": "spinal"}[missing]
    assert make_family(entry("roi", gone, "gated")).prepare(st, kps) == []
    if missing == "t2":  # the subarticular companion (Sagittal T2) is zeros and flagged absent
        sub = make_family(entry("roi", "subarticular", "gated")).prepare(st, kps)[0]
        assert sub.mask[3:].all() and not sub.inputs["sag_present"].any() and np.all(sub.inputs["sag"] == 0)


def test_missing_keypoints_mask_single_targets():
    st, kps = make_study()
    t1 = st.first(SAG_T1)
    conf = np.ones(10)
    conf[8] = 0.0  # right L4/L5 missing
    kps.sets["sag3d_t1"] = kpset("foraminal", t1, sided_world(12.0, 6.0), conf)
    roi = make_family(entry("roi", "foraminal", "level_lstm"))
    sample = roi.prepare(st, kps)[0]
    assert sample.mask.sum() == 9 and not sample.mask[2, 3]
    assert sample.inputs["present"][8] == 0 and np.all(sample.inputs["crops"][8] == 0)
    assert "foraminal right L4/L5" in sample.meta["missing"]
    fusion = make_family(entry("fusion", "default", arch="test_efficientnet"))
    fs = fusion.prepare(st, kps)[0]
    assert not fs.mask[2, 3] and fs.mask.sum() == 24
    assert fusion.prepare(st, None) == [] and roi.prepare(st, StudyKeypoints(7)) == []


@pytest.mark.parametrize("family,variant,head", [("fusion", "default", None), ("roi", "spinal", "gated"), ("roi", "foraminal", "slice_gru"), ("roi", "subarticular", "level_lstm")])
def test_zero_inputs_give_finite_outputs(family, variant, head):
    fam = make_family(entry(family, variant, head, arch="test_efficientnet" if family == "fusion" else "test_resnet"))
    batch = {k: torch.zeros_like(v) for k, v in fam.example_batch(2).items()}
    net = fam.build()
    for mode in (net.train, net.eval):
        mode()
        assert torch.isfinite(net(batch)).all()
    ex = fam.example_batch(3)
    assert set(ex) == set(fam.input_shapes()) and all(v.shape[0] == 3 for v in ex.values())


def _tta_setup(study, family, variant, head, tta_lr):
    torch.manual_seed(1)
    arch = "test_efficientnet" if family == "fusion" else "test_resnet"
    fam = make_family(entry(family, variant, head, arch=arch, model_kwargs={"tta_lr": tta_lr}))
    sample = fam.prepare(*study)[0]
    batch = fam.collate([sample])
    batch = {k: v + (0.1 * torch.randn_like(v) if v.ndim > 3 else 0) for k, v in batch.items()}  # break any symmetry
    return fam, fam.build().eval(), batch


@pytest.mark.parametrize("family,variant,head", [("fusion", "default", None), ("roi", "foraminal", "gated"), ("roi", "subarticular", "level_lstm"), ("roi", "spinal", "plain")])
def test_tta_is_flip_invariant_and_lr_equivariant(study, family, variant, head):
    fam, net, batch = _tta_setup(study, family, variant, head, tta_lr=True)
    axes = fam.view_axes()
    with torch.no_grad():
        y = fam.run(net, batch, tta=True)
        y_ap = fam.run(net, mirror(batch, axes, ap=True), tta=True)
        y_lr = fam.run(net, mirror(batch, axes, lr=True), tta=True)
        plain = fam.run(net, batch, tta=False)
    torch.testing.assert_close(y_ap, y, rtol=1e-4, atol=1e-5)
    # mirroring the patient left/right turns left predictions into right ones
    torch.testing.assert_close(y_lr, swap_lr(y), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, y)  # TTA did average something
    fam2, net2, batch2 = _tta_setup(study, family, variant, head, tta_lr=False)
    with torch.no_grad():
        y2 = fam2.run(net2, batch2, tta=True)
        manual = (net2(batch2) + net2(mirror(batch2, fam2.view_axes(), ap=True))) / 2
    torch.testing.assert_close(y2, manual, rtol=1e-5, atol=1e-6)


def test_mirror_moves_patient_directions(study):
    fam = make_family(entry("roi", "subarticular", "gated"))
    b = fam.collate(fam.prepare(*study))
    axes = fam.view_axes()
    lr = mirror(b, axes, lr=True)
    # the mirrored patient's left point is the original right one, axial image flipped left/right,
    # sagittal companion slices reversed (they run across the patient)
    torch.testing.assert_close(lr["crops"][:, 0], torch.flip(b["crops"][:, 5], [-1]))
    torch.testing.assert_close(lr["sag"][:, 2], torch.flip(b["sag"][:, 7], [-3]))
    ap = mirror(b, axes, ap=True)
    torch.testing.assert_close(ap["crops"], torch.flip(b["crops"], [-2]))  # axial: vertical flip = A/P
    torch.testing.assert_close(ap["sag"], torch.flip(b["sag"], [-1]))  # sagittal: horizontal flip = A/P
    both = mirror(mirror(b, axes, ap=True, lr=True), axes, ap=True, lr=True)
    for k in b:
        torch.testing.assert_close(both[k], b[k])
    with pytest.raises(KeyError, match="nope"):
        mirror({"nope": b["crops"]}, axes)
    assert tta_passes(False, True) == [(False, False)]
    assert len(tta_passes(True, True)) == 4 and len(tta_passes(True, False)) == 2


def test_run_tta_swaps_lr_outputs_back():
    """A toy model that reads only the left slot: under the lr pass its output must land on the
    right conditions, so the lr-only average puts the right crop's value on the left row."""

    class LeftReader(torch.nn.Module):
        def forward(self, batch):
            v = batch["x"][:, 0].mean(dim=(1, 2, 3))  # left slot brightness
            out = torch.zeros(len(v), 5, 5, 3)
            out[:, 1, :, 0] = v[:, None]  # left foraminal rows
            return out

    x = torch.zeros(1, 2, 1, 4, 4)
    x[:, 1] = 5.0  # right slot bright
    axes = {"x": ViewAxes("sagittal", (1, 0))}
    y = run_tta(LeftReader(), {"x": x}, axes, tta=True, lr=True)
    # identity/ap passes see the (dark) left crop on the left row; lr passes see the right crop
    # as "left" and their output is swapped back onto the right row
    assert float(y[0, 1, 0, 0]) == 0.0 and float(y[0, 2, 0, 0]) == pytest.approx(2.5)


def test_loss_ignores_unlabelled_and_unpredicted_targets(study):
    fam = make_family(entry("roi", "foraminal", "gated"))
    sample = fam.prepare(*study)[0]
    net = fam.build()
    out = net(fam.collate([sample])).detach().requires_grad_(True)
    labels = torch.full((1, 5, 5), 2)
    labels[0, 1, 0] = -1  # unlabelled
    mask = torch.from_numpy(sample.mask[None])
    loss = fam.loss(out, labels, mask)
    loss.backward()
    g = out.grad[0].abs().sum(-1)
    assert g[1, 0] == 0 and torch.all(g[0] == 0) and torch.all(g[3:] == 0)  # unlabelled, unpredicted
    assert torch.all(g[1, 1:] > 0) and torch.all(g[2] > 0)
    changed = out.detach().clone()
    changed[0, 1, 0] += 10
    changed[0, 0] -= 7
    assert torch.isclose(fam.loss(changed, labels, mask), loss.detach())


def test_training_augmentation_only_with_rng(study):
    fam = make_family(entry("roi", "spinal", "gated", extra={"aug": {"jitter_mm": 3.0, "ap_flip": 0.0}}))
    a, b = fam.prepare(*study)[0], fam.prepare(*study)[0]
    np.testing.assert_array_equal(a.inputs["crops"], b.inputs["crops"])
    r1 = fam.prepare(*study, rng=np.random.default_rng(5))[0]
    r2 = fam.prepare(*study, rng=np.random.default_rng(5))[0]
    np.testing.assert_array_equal(r1.inputs["crops"], r2.inputs["crops"])
    assert not np.allclose(r1.inputs["crops"], a.inputs["crops"])
    assert np.isfinite(r1.inputs["crops"]).all()


def test_truth_keypoints_win_for_training_crops(study):
    st, kps = study
    t2 = st.first(SAG_T2)
    moved = spinal_world() + np.array([0.0, 10.0, 0.0])
    kps2 = StudyKeypoints(7, dict(kps.sets))
    kps2.sets[truth_key("spinal")] = kpset("spinal", t2, moved)
    fam = make_family(entry("roi", "spinal", "gated"))
    base = fam.prepare(st, kps)[0].meta["crops"]["crops"][0]
    truth = fam.prepare(st, kps2)[0].meta["crops"]["crops"][0]
    assert truth.box[1] - base.box[1] == 10  # 10 mm posterior = 10 columns


def test_two_axial_stacks_each_point_uses_its_own_stack():
    st, kps = make_study()
    ax = st.first(AXIAL_T2)
    upper = Volume(ax.pixels[10:], ax.positions[10:], ax.row_dir, ax.col_dir, ax.spacing, ax.instance_numbers[10:], study_id=7, series_id=201, description=AXIAL_T2)
    lower = Volume(ax.pixels[:10], ax.positions[:10], ax.row_dir, ax.col_dir, ax.spacing, ax.instance_numbers[:10], study_id=7, series_id=202, description=AXIAL_T2)
    st.volumes[AXIAL_T2] = [lower, upper]
    world = sided_world(8.0, -2.0)
    on_upper = world[:, 2] > 10.0  # z of slice 10 is 10 mm
    a = kpset("subarticular", upper, np.where(on_upper[:, None], world, np.nan), on_upper.astype(float))
    b = kpset("subarticular", lower, np.where(~on_upper[:, None], world, np.nan), (~on_upper).astype(float))
    kps.sets["axial_level"] = a.merge_most_confident(b)
    fam = make_family(entry("roi", "subarticular", "plain"))
    meta = fam.prepare(st, kps)[0].meta["crops"]["crops"]
    assert [m.series_id for m in meta] == [201, 201, 202, 202, 202] * 2


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"variant": "nope"}, "variant"),
        ({"head": "mlp"}, "head"),
        ({"model_kwargs": {"bogus": 1}}, "bogus"),
        ({"extra": {"aug": {"lr_flip": 1.5}}}, "lr_flip"),
        ({"extra": {"aug": {"spin": 0.5}}}, "spin"),
        ({"extra": {"aug": {"ap_flip": 2}}}, "ap_flip"),
        ({"model_kwargs": {"prefer": {"disc": ["x"]}}}, "disc"),
        ({"extra": {"what": 1}}, "what"),
        ({"extra": {"sag_crop_mm": -3}}, "sag_crop_mm"),
        ({"size": (4, 32, 32)}, "n_slices"),
    ],
)
def test_config_errors_fail_fast(kw, msg):
    variant = kw.pop("variant", "subarticular")
    head = kw.pop("head", "gated")
    with pytest.raises(SpecError, match=msg):
        make_family(entry("roi", variant, head, **kw))


def test_channel_contract_is_checked():
    e = entry("roi", "spinal", "gated")
    bad = ModelEntry.from_dict({**e.to_dict(), "input": {**e.input.to_dict(), "in_chans": 1}})
    with pytest.raises(SpecError, match="in_chans"):
        make_family(bad)
    g = entry("roi", "spinal", "slice_gru")
    bad = ModelEntry.from_dict({**g.to_dict(), "input": {**g.input.to_dict(), "in_chans": 3}})
    with pytest.raises(SpecError, match="in_chans"):
        make_family(bad)


def test_prefer_order_is_configurable(study):
    st, kps = study
    t2 = st.first(SAG_T2)
    kps2 = StudyKeypoints(7, dict(kps.sets))
    kps2.sets["sag2d_t2"] = kpset("spinal", t2, spinal_world() + np.array([0.0, -6.0, 0.0]))
    default = make_family(entry("roi", "spinal", "gated")).prepare(st, kps2)[0].meta["crops"]["crops"][2]
    flipped = make_family(entry("roi", "spinal", "gated", model_kwargs={"prefer": {"spinal": ["sag2d_t2"]}})).prepare(st, kps2)[0]
    assert default.box[1] - flipped.meta["crops"]["crops"][2].box[1] == 6  # roi prefers sag3d by default


def test_lr_swap_constant_matches_conditions():
    for i, j in enumerate(LR_SWAP):
        a, b = CONDITIONS[i], CONDITIONS[j]
        assert a.replace("left", "right") == b or b.replace("left", "right") == a or a == b == CONDITIONS[0]


def test_training_ap_mirror_flips_every_view_and_is_recorded(study):
    aug = {"jitter_mm": 0.0, "scale": 0.0, "intensity": 0.0, "ap_flip": 1.0, "lr_flip": 0.0}
    fam = make_family(entry("roi", "subarticular", "plain", extra={"aug": aug}))
    plain = fam.prepare(*study)[0]
    flipped = fam.prepare(*study, rng=np.random.default_rng(0))[0]
    assert flipped.meta["ap_mirrored"] and not plain.meta["ap_mirrored"]
    np.testing.assert_array_equal(flipped.inputs["crops"], plain.inputs["crops"][..., ::-1, :])  # axial: rows = A/P
    np.testing.assert_array_equal(flipped.inputs["sag"], plain.inputs["sag"][..., ::-1])  # sagittal: cols = A/P
    np.testing.assert_array_equal(flipped.mask, plain.mask)


@pytest.mark.parametrize("family,variant,head,arch", [("roi", "subarticular", "plain", "test_resnet"),
                                                      ("roi", "foraminal", "gated", "test_resnet"),
                                                      ("fusion", "default", None, "test_efficientnet")])
def test_training_lr_mirror_swaps_inputs_mask_and_labels(study, family, variant, head, arch):
    """A left/right training mirror shows the mirrored patient: inputs as the lr TTA pass sees
    them, left/right slots, mask and labels swapped."""
    st, kps = study
    kps = StudyKeypoints(kps.study_id, dict(kps.sets))
    for key in ("sag3d_t1", "axial_level"):  # drop the left L1/L2 point: an asymmetric mask
        s = kps.sets[key]
        kps.sets[key] = s.with_points(np.arange(len(s)) == 0, confidence=np.zeros(len(s)))
    aug = {"jitter_mm": 0.0, "scale": 0.0, "intensity": 0.0, "ap_flip": 0.0, "lr_flip": 1.0}
    fam = make_family(entry(family, variant, head, arch=arch, extra={"aug": aug}))
    plain = fam.prepare(st, kps)[0]
    mirrored = fam.prepare(st, kps, rng=np.random.default_rng(0))[0]
    assert mirrored.meta["lr_mirrored"] and not plain.meta["lr_mirrored"]
    expected = mirror_sample(plain.inputs, fam.view_axes(), lr=True)
    for k in plain.inputs:
        np.testing.assert_array_equal(mirrored.inputs[k], expected[k])
    if family == "roi":
        assert not np.array_equal(plain.mask, plain.mask[list(LR_SWAP)])
    np.testing.assert_array_equal(mirrored.mask, plain.mask[list(LR_SWAP)])
    labels = np.arange(25).reshape(5, 5)
    np.testing.assert_array_equal(fam.sample_labels(mirrored, labels), labels[list(LR_SWAP)])
    np.testing.assert_array_equal(fam.sample_labels(plain, labels), labels)
    # the network's lr TTA pass on the plain batch is the same computation as the mirrored sample
    torch.manual_seed(0)
    net = fam.build().eval()
    with torch.no_grad():
        a = net(fam.collate([mirrored]))
        b = net(mirror(fam.collate([plain]), fam.view_axes(), lr=True))
    torch.testing.assert_close(a, b)


def test_fusion_crops_slice_windows_around_rule_slices_only(study):
    """sag-2d points (slice = a rule) get the write-up's windows: T2 the slices around the
    middle at the 10-sample spacing, T1 left / right the last / first 5 of the 10 samples;
    points with a modelled slice get their consecutive slices."""
    st, kps = study
    rule = StudyKeypoints(kps.study_id, {k: v for k, v in kps.sets.items() if not k.startswith("sag3d")})
    rule.sets["sag2d_t2"] = KeypointSet(**{**kps.sets["sag3d_t2"].__dict__, "source": "sag2d_t2", "origin": None})
    rule.sets["sag2d_t1"] = KeypointSet(**{**kps.sets["sag3d_t1"].__dict__, "source": "sag2d_t1", "origin": None})
    fam = make_family(entry("fusion", "default", n_slices=5, arch="test_efficientnet"))
    modelled = fam.prepare(st, kps)[0].meta["crops"]["sag"]
    windowed = fam.prepare(st, rule)[0].meta["crops"]["sag"]
    t2, t1 = st.first(SAG_T2), st.first(SAG_T1)
    for lv in range(5):
        z = int(round(kps.sets["sag3d_t2"].voxel[lv, 0]))
        assert sorted(modelled[0][lv].slices) == list(range(z - 2, z + 3))
        canon = np.rint((t2.shape[0] - 1) / 2 + (np.arange(5) - 2) * (t2.shape[0] - 1) / 9)
        src = np.rint(modelled[0][lv].orientation.to_source(np.stack([canon, 0 * canon, 0 * canon], -1))[:, 0])
        assert sorted(windowed[0][lv].slices) == sorted(src.astype(int).tolist())
        samples = np.arange(10) * (t1.shape[0] - 1) / 9
        o = windowed[1][lv].orientation
        to_src = lambda c: set(np.rint(o.to_source(np.stack([c, 0 * c, 0 * c], -1))[:, 0]).astype(int).tolist())  # noqa: E731
        assert set(windowed[1][lv].slices) == to_src(np.rint(samples[5:]))  # left: toward patient left
        assert set(windowed[2][lv].slices) == to_src(np.rint(samples[:5]))
    # sag_windows off: the rule slices are cropped like any other
    off = make_family(entry("fusion", "default", n_slices=5, arch="test_efficientnet", extra={"sag_windows": False}))
    plain = off.prepare(st, rule)[0].meta["crops"]["sag"]
    assert list(plain[0][0].slices) == list(modelled[0][0].slices)
