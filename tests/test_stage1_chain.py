"""End to end on one study: every family, fold averaging, axial_xy refining axial_level."""

import numpy as np
import pytest
import torch
from stage1_fixtures import axial, entry, sagittal, study_of

from rsna_infer.constants import SAG_T1
from rsna_infer.models.registry import make_family
from rsna_infer.stage1.chain import predict_keypoints, run_folds


@pytest.fixture(scope="module")
def study():
    return study_of(sagittal(series_id=10), sagittal(series_id=11, description=SAG_T1), axial(series_id=20),
                    axial((16, 64, 64), z0=10.0, series_id=21))


@pytest.fixture(scope="module")
def families():
    torch.manual_seed(0)
    entries = [
        entry("axial_xy", n_slices=3, in_chans=3),  # deliberately first: the runner orders families
        entry("sag2d", "t2", n_slices=10),
        entry("sag2d", "t1", n_slices=10),
        entry("sag3d", "t2", arch="mobilenetv2_035", size=(16, 64, 64)),
        entry("axial3d", arch="mobilenetv2_035", size=(16, 64, 64)),
        entry("axial_level", n_slices=3, in_chans=3, model_kwargs={"hidden": 16, "heads": 2}),
    ]
    return [(f, f.build().eval()) for f in map(make_family, entries)]


def test_predict_keypoints_all_families(study, families):
    kp = predict_keypoints(families, study, tta=True)
    assert set(kp.sets) == {"sag2d_t2", "sag2d_t1", "sag3d_t2", "axial3d", "axial_level", "projection",
                            "sagittal_t2", "sagittal_t1"}
    for key, s in kp.sets.items():
        v = s.valid
        assert v.any(), key
        for k in np.flatnonzero(v):
            vol = study.find(int(s.series_id[k]), int(s.stack_index[k]))
            np.testing.assert_allclose(s.world[k], vol.to_world(s.voxel[k]), atol=1e-9)
    assert "cross_view" in kp.report and "axial_level" in kp.report["cross_view"]


def test_axial_xy_refines_xy_and_keeps_level_z(study, families):
    axial_only = [fm for fm in families if fm[0].view == "axial"]  # no canal points: no level reconciliation
    level_only = [fm for fm in axial_only if fm[0].name != "axial_xy"]
    base = predict_keypoints(level_only, study, finalize=False).get("axial_level")
    refined = predict_keypoints(axial_only, study, finalize=False).get("axial_level")
    assert base.valid.any()
    np.testing.assert_array_equal(refined.valid, base.valid)
    v = base.valid
    np.testing.assert_allclose(refined.voxel[v, 0], base.voxel[v, 0])
    np.testing.assert_allclose(refined.confidence, base.confidence)
    # level-only points sit at the slice centre; refined ones come from the xy model
    vol = study.find(int(base.series_id[v][0]), 0)
    np.testing.assert_allclose(base.voxel[v, 1:], [[(vol.shape[1] - 1) / 2, (vol.shape[2] - 1) / 2]] * int(v.sum()))
    assert not np.allclose(refined.voxel[v, 1:], base.voxel[v, 1:])
    assert "axial_xy" in refined.source and set(refined.origin[v]) == {"axial_level+axial_xy"}


def test_run_folds_averages_run_outputs(study):
    fam = make_family(entry("sag2d", "t2", n_slices=10))
    torch.manual_seed(1)
    models = [fam.build().eval(), fam.build().eval()]
    batch = fam.collate(fam.prepare(study))
    with torch.no_grad():
        expected = (fam.run(models[0], batch) + fam.run(models[1], batch)).numpy() / 2
    np.testing.assert_allclose(run_folds(fam, models, batch), expected, atol=1e-6)
    np.testing.assert_allclose(run_folds(fam, models[0], batch), fam.run(models[0], batch).detach().numpy(), atol=1e-6)


def test_full_flip_group_makes_a_mirrored_study_give_the_mirrored_keypoints(study):
    """With ``tta_lr`` every family averages identity, A/P, L/R and A/P+L/R: the keypoints of
    the study mirrored left/right in patient coordinates are exactly the mirrored keypoints
    of the original, left and right swapped (random networks: no training can hide a slip)."""
    from stage1_fixtures import mirror_volume

    from rsna_infer.io.volume import Study

    torch.manual_seed(3)
    lr = {"tta_lr": True}
    entries = [
        entry("sag2d", "t1", n_slices=3, in_chans=3, model_kwargs=lr),
        entry("sag3d", "t1", arch="mobilenetv2_035", size=(16, 64, 64), model_kwargs={**lr, "head": "heatmap"}),
        entry("axial3d", arch="mobilenetv2_035", size=(16, 64, 64), model_kwargs=lr),
        entry("axial_level", n_slices=3, in_chans=3, model_kwargs={**lr, "hidden": 16, "heads": 2}),
        entry("axial_xy", n_slices=3, in_chans=3, model_kwargs=lr),
    ]
    fams = [(f, f.build().eval()) for f in map(make_family, entries)]
    mirrored = Study(study.study_id, {k: [mirror_volume(v) for v in vols] for k, vols in study.volumes.items()})
    a = predict_keypoints(fams, study, tta=True, finalize=False)
    b = predict_keypoints(fams, mirrored, tta=True, finalize=False)
    swap = np.r_[5:10, 0:5]
    for key in ("sag2d_t1", "sag3d_t1", "axial3d", "axial_level"):
        sa, sb = a.get(key), b.get(key)
        np.testing.assert_array_equal(sb.valid, sa.valid[swap])
        v = sb.valid
        np.testing.assert_allclose(sb.world[v] * [-1, 1, 1], sa.world[swap][v], atol=2e-3, err_msg=key)
        np.testing.assert_allclose(sb.confidence, sa.confidence[swap], atol=1e-4, err_msg=key)


def test_fold_mean_averages_the_folds_that_produced_an_output():
    from rsna_infer.stage1.chain import fold_mean

    a, b = np.array([1.0, 2.0], np.float32), np.array([2.0, 5.0], np.float32)
    got = fold_mean([[a, None, a], [b, None, None]])
    np.testing.assert_array_equal(got[0], [1.5, 3.5])
    assert got[1] is None and got[0].dtype == np.float32
    np.testing.assert_array_equal(got[2], a)


def test_the_chain_records_a_failing_study_and_goes_on(study, families):
    """With an ``on_error`` (the predictor's: log and record), a study whose decode or
    finalize fails keeps what worked; without one (the default) nothing is tolerated."""
    from rsna_infer.stage1.chain import Stage1Group, group_key, stage1_chain

    fam, model = next((f, m) for f, m in families if f.name == "sag2d" and f.entry.variant == "t2")
    groups = [Stage1Group(group_key(fam), fam, model)]
    other = 99
    studies = {study.study_id: study, other: study}
    failures = []

    def samples(g, kps):
        return [(sid, s) for sid in studies for s in g.family.prepare(study, kps[sid])]

    def run(g, items):
        with torch.no_grad():
            out = g.family.run(g.folds, g.family.collate([s for _, s in items])).numpy()
        return [[o if sid == study.study_id else None for (sid, _), o in zip(items, out)], [o for o in out]]

    def broken_finalize(st, kp):
        raise RuntimeError("no cross-view today")

    kps = stage1_chain(studies, groups, samples, run, broken_finalize, lambda *a: failures.append(a[:2]))
    assert "sag2d_t2" in kps[study.study_id].sets and "sag2d_t2" in kps[other].sets
    assert failures == [("stage1 finalize", study.study_id), ("stage1 finalize", other)]
    with pytest.raises(RuntimeError, match="no cross-view today"):
        stage1_chain(studies, groups, samples, run, broken_finalize)
