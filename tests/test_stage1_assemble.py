"""Combining decoded sets, the cross-view report and the projection fallback."""

import numpy as np
import pytest
from stage1_fixtures import (
    LEVEL_Z,
    axial,
    entry,
    sagittal,
    spinal_world,
    study_of,
    subarticular_world,
    world_set,
)

from rsna_infer.keypoints import KeypointSet, StudyKeypoints
from rsna_infer.models.registry import make_family
from rsna_infer.stage1.assemble import (
    DEFAULT_PREFER,
    LATERAL_OFFSET_MM,
    MAX_LEVEL_MM,
    finalize,
    merge_decoded,
    merge_sagittal,
    projection_set,
)


def test_point_at_known_voxel_lands_in_the_right_slice_of_another_series():
    sag = sagittal()  # origin (28, -80, 100); columns +y, rows -z, 2.5 mm; slices toward -x, 4 mm
    ax, ax_down = axial(series_id=20), axial(series_id=21, flipped_lr=True)
    study = study_of(sag, ax, ax_down)
    fam = make_family(entry("sag3d", "t2", arch="mobilenetv2_035", size=(16, 32, 32)))
    (sample,) = fam.prepare(study)
    voxel = np.array([3.0, 20.0, 40.0])
    u = sample.meta["transform"].to_norm(voxel)
    out = np.tile(np.r_[u, 1.0], (5, 1))
    ks = fam.decode(out, sample, study)
    np.testing.assert_allclose(ks.voxel[0], voxel, atol=1e-9)
    np.testing.assert_allclose(ks.world[0], [28 - 3 * 4.0, -80 + 40 * 2.5, 100 - 20 * 2.5], atol=1e-9)  # (16, 20, 50)
    # axial from z = -30 upward: z = 50 is slice 20; columns from x = -80, rows from y = -70
    np.testing.assert_allclose(ax.to_voxel(ks.world[0]), [20.0, 36.0, 38.4], atol=1e-9)
    assert ax.nearest_slice(ks.world[0]) == 20
    # the same point in an axial series stored top-down and mirrored: slice (70 - 50) / 4 = 5
    assert ax_down.nearest_slice(ks.world[0]) == 5
    np.testing.assert_allclose(ax_down.to_voxel(ks.world[0])[2], (77.5 - 16) / 2.5, atol=1e-9)


def _level_probs(n_slices: int, peaks: dict[tuple[int, int], tuple[int, float]]) -> np.ndarray:
    """Per-slice probabilities with ``peaks[(side, level)] = (slice, prob)``; the rest "none"."""
    p = np.zeros((n_slices, 2, 6))
    p[..., 5] = 1.0
    for (side, level), (i, prob) in peaks.items():
        p[i, side, 5] -= prob
        p[i, side, level] += prob
    return p


def test_several_axial_stacks_most_confident_wins():
    a, b = axial(series_id=20), axial(series_id=21)
    study = study_of(a, b)
    fam = make_family(entry("axial_level", n_slices=3, in_chans=3))
    samples = fam.prepare(study)
    assert [s.meta["series_id"] for s in samples] == [20, 21]
    outs = [
        _level_probs(26, {(0, 0): (3, 0.9), (1, 0): (3, 0.4), (0, 4): (20, 0.3)}),
        _level_probs(26, {(0, 0): (4, 0.6), (1, 0): (5, 0.8), (0, 4): (21, 0.7)}),
    ]
    sets = [fam.decode(o, s, study) for o, s in zip(outs, samples)]
    kp = merge_decoded(fam, sets, StudyKeypoints(1))
    merged = kp.get("axial_level")
    assert merged.series_id[0] == 20 and merged.confidence[0] == pytest.approx(0.9)
    assert merged.series_id[5] == 21 and merged.confidence[5] == pytest.approx(0.8)
    assert merged.series_id[4] == 21 and merged.confidence[4] == pytest.approx(0.7)
    # canonical axial order runs inferior: input slice i is source slice 25 - i
    assert merged.voxel[0, 0] == pytest.approx(25 - 3)
    assert sets[0].confidence[5] == pytest.approx(0.4)  # inputs untouched


def test_projection_fills_a_study_without_axial_series():
    sag = sagittal()
    study = study_of(sag)
    kp = StudyKeypoints(1, {"sag3d_t2": world_set("spinal", spinal_world(), sag, source="sag3d_t2")})
    out = finalize(study, kp)
    assert "projection" not in kp.sets  # input not mutated
    best = out.best("subarticular", prefer=("axial_level", "axial3d", "projection"))
    assert best is not None and best.valid.all() and best.source == "projection"
    assert np.all(best.series_id == sag.series_id)
    np.testing.assert_allclose(best.world[:5, 0], LATERAL_OFFSET_MM)  # a sagittal slice sits at x = 12
    np.testing.assert_allclose(best.world[5:, 0], -LATERAL_OFFSET_MM)
    np.testing.assert_allclose(best.world[:5, 2], LEVEL_Z)
    assert out.report["cross_view"]["axial_source"] == "projection"
    assert out.report["cross_view"]["projection_points_sagittal"] == 10


def test_projection_uses_axial_stacks_that_cover_each_level():
    sag = sagittal()
    upper = axial((12, 64, 64), z0=22.0, series_id=20)  # z 22..66: L1/L2, L2/L3
    lower = axial((15, 64, 64), z0=-34.0, series_id=21, flipped_lr=True)  # z -34..22: L4/L5, L5/S1
    study = study_of(sag, upper, lower)
    canal = world_set("spinal", spinal_world(), sag)
    proj = projection_set(study, canal)
    assert list(proj.series_id) == [20, 20, 21, 21, 21] * 2  # L3/L4 (z = 20) is in the lower stack only
    for k in np.flatnonzero(proj.valid):
        vol = study.find(int(proj.series_id[k]), 0)
        level = k % 5
        assert proj.voxel[k, 0] == vol.nearest_slice(canal.world[level])  # on the nearest slice
        side_sign = 1.0 if k < 5 else -1.0  # left = larger patient x
        assert proj.world[k, 0] == pytest.approx(side_sign * LATERAL_OFFSET_MM)
        assert abs(proj.world[k, 2] - LEVEL_Z[level]) <= 2.0  # within half a slice
    assert proj.confidence.max() <= 0.3


def test_low_confidence_axial_points_fall_back_and_report_distances():
    sag = sagittal()
    ax = axial(series_id=20)
    study = study_of(sag, ax)
    canal = world_set("spinal", spinal_world(), sag, source="sag3d_t2")
    axial_world = spinal_world() + np.array([0.0, 0.0, 8.0])  # 8 mm cranial of the canal points
    pts = np.concatenate([axial_world + [11, 0, 0], axial_world - [11, 0, 0]])
    conf = np.array([0.9, 0.9, 0.1, 0.9, 0.9, 0.9, 0.9, 0.9, 0.2, 0.9])
    level_set = world_set("subarticular", pts, ax, source="axial_level")
    level_set = KeypointSet(level_set.kind, level_set.world, level_set.voxel, level_set.series_id,
                            level_set.stack_index, conf, "axial_level")
    kp = StudyKeypoints(1, {"sag3d_t2": canal, "axial_level": level_set})
    out = finalize(study, kp)
    rep = out.report["cross_view"]
    np.testing.assert_allclose(rep["axial_level"]["distance_mm"], 8.0)
    assert rep["axial_level"]["median_mm"] == pytest.approx(8.0) and rep["axial_level"]["n"] == 10
    assert rep["replaced"]["axial_level"] == ["subarticular left L3/L4", "subarticular right L4/L5"]
    assert kp.get("axial_level") is level_set and level_set.valid.all()  # never mutated
    best = out.best("subarticular", prefer=("axial_level", "projection"))
    assert best.valid.all()
    np.testing.assert_allclose(best.world[[0, 1, 3]], pts[[0, 1, 3]])
    assert best.series_id[2] == ax.series_id and best.world[2, 0] == pytest.approx(LATERAL_OFFSET_MM)
    assert abs(best.world[2, 2] - LEVEL_Z[2]) <= 2.0  # projection on the canal's level, not the axial z


def test_finalize_without_sagittal_points_leaves_axial_alone():
    ax = axial(series_id=20)
    study = study_of(ax)
    s = world_set("subarticular", np.zeros((10, 3)), ax, source="axial_level")
    out = finalize(study, StudyKeypoints(1, {"axial_level": s}))
    assert out.get("axial_level") is s and "projection" not in out.sets
    assert out.report["cross_view"]["projection_points"] == 0


def test_three_axial_series_most_confident_stack_wins_and_keeps_its_ids():
    """Index bookkeeping with >= 3 axial series (and two stacks in one series): per (side,
    level) the most confident stack wins, and both the level set and the axial_xy
    refinement keep that stack's series_id/stack_index, slice and patient coordinates."""
    stacks = [
        axial(series_id=20),
        axial(series_id=21, z0=-26.0),
        axial(series_id=21, z0=-22.0, stack_index=1),
        axial(series_id=22, z0=-18.0, flipped_lr=True),
    ]
    study = study_of(*stacks)
    level_fam = make_family(entry("axial_level", n_slices=3, in_chans=3))
    samples = level_fam.prepare(study)
    assert [(s.meta["series_id"], s.meta["stack_index"]) for s in samples] == [(20, 0), (21, 0), (21, 1), (22, 0)]
    # (side, level) -> per-stack (input slice, probability); None: no peak in that stack
    peaks = {
        (0, 0): [(3, 0.5), (4, 0.6), (5, 0.7), (6, 0.9)],  # the last stack wins
        (0, 1): [(8, 0.9), (9, 0.3), (10, 0.2), (11, 0.1)],  # the first
        (1, 2): [(12, 0.2), (13, 0.3), (14, 0.95), (15, 0.4)],  # series 21 stack 1
        (1, 3): [(16, 0.3), (17, 0.85), (18, 0.4), (19, 0.5)],  # series 21 stack 0
        (0, 4): [None, None, None, (21, 0.6)],  # only the last stack sees it
    }
    winner = {(0, 0): 3, (0, 1): 0, (1, 2): 2, (1, 3): 1, (0, 4): 3}
    outs = []
    for j, s in enumerate(samples):
        swap = s.meta["transform"].lr_swapped  # output slots are sides of the (possibly mirrored) input
        want = {(1 - side if swap else side, lv): p[j] for (side, lv), p in peaks.items() if p[j] is not None}
        outs.append(_level_probs(26, want))
    assert samples[3].meta["transform"].orientation.flip[2]  # the mirrored stack is read in canonical order
    sets = [level_fam.decode(o, s, study) for o, s in zip(outs, samples)]
    kp = merge_decoded(level_fam, sets, StudyKeypoints(1))
    level = kp.get("axial_level")
    assert int(level.valid.sum()) == len(peaks)
    for (side, lv), j in winner.items():
        k = side * 5 + lv
        vol, i = stacks[j], peaks[(side, lv)][j][0]
        assert (level.series_id[k], level.stack_index[k]) == (vol.series_id, vol.stack_index), (side, lv)
        assert level.confidence[k] == pytest.approx(peaks[(side, lv)][j][1])
        assert level.voxel[k, 0] == pytest.approx(samples[j].meta["source_slices"][i])
        np.testing.assert_allclose(vol.to_voxel(level.world[k]), level.voxel[k], atol=1e-9)

    xy_fam = make_family(entry("axial_xy", n_slices=3, in_chans=3))
    xy_samples = xy_fam.prepare(study, kp)
    assert len(xy_samples) == len(peaks)  # one slice per point here: all slices differ
    for s in xy_samples:
        for k in s.meta["points"]:
            assert (s.meta["series_id"], s.meta["stack_index"]) == (level.series_id[k], level.stack_index[k])
    # canonical (row, col) per side: columns run toward patient left, so left is at col 0.7
    xy_out = [np.array([[0.7, 0.7], [0.7, 0.3]]) for _ in xy_samples]
    xy_sets = [xy_fam.decode(o, s, study) for o, s in zip(xy_out, xy_samples)]
    refined = merge_decoded(xy_fam, xy_sets, kp).get("axial_level")
    assert kp.get("axial_level") is level  # the level set itself is never mutated
    np.testing.assert_array_equal(refined.valid, level.valid)
    np.testing.assert_array_equal(refined.series_id, level.series_id)
    np.testing.assert_array_equal(refined.stack_index, level.stack_index)
    np.testing.assert_allclose(refined.confidence, level.confidence)
    np.testing.assert_allclose(refined.voxel[level.valid, 0], level.voxel[level.valid, 0])
    for (side, lv), j in winner.items():
        k = side * 5 + lv
        vol = stacks[j]
        np.testing.assert_allclose(vol.to_voxel(refined.world[k]), refined.voxel[k], atol=1e-9)
        assert not np.allclose(refined.voxel[k, 1:], level.voxel[k, 1:])  # (y, x) really refined
        # left points lie toward patient left (+x) of right points, whatever the stack's storage
        assert (refined.world[k, 0] > 0) == (side == 0), (side, lv, refined.world[k])
    assert "axial_xy" in refined.source


def test_wrong_level_axial_points_fall_back_and_the_xy_model_refines_them_on_the_canal_level():
    """A short axial stack whose classifier names the wrong disc: the point is more than
    MAX_LEVEL_MM from its level's canal point, so finalize drops it (best() falls back to the
    projection) and axial_xy, run after the canal is known, refines it on the right slice."""
    sag, ax = sagittal(), axial(series_id=20)
    study = study_of(sag, ax)
    canal = world_set("spinal", spinal_world(), sag, source="sag3d_t2")
    pts = subarticular_world()
    wrong = pts.copy()
    wrong[[1, 6], 2] = LEVEL_Z[2]  # L2/L3 points placed on the L3/L4 disc
    level_set = world_set("subarticular", wrong, ax, source="axial_level")
    kp = StudyKeypoints(1, {"sag3d_t2": canal, "axial_level": level_set})
    out = finalize(study, kp)
    assert out.report["cross_view"]["wrong_level"]["axial_level"] == ["subarticular left L2/L3", "subarticular right L2/L3"]
    best = out.best("subarticular", prefer=("axial_level", "projection"))
    assert best.origin.tolist() == ["axial_level"] + ["projection"] + ["axial_level"] * 4 + ["projection"] + ["axial_level"] * 3
    assert abs(best.world[1, 2] - LEVEL_Z[1]) <= 2.5 and abs(best.world[6, 2] - LEVEL_Z[1]) <= 2.5
    # the xy model's samples: the moved points sit on the canal's slice and say where it came from
    xy = make_family(entry("axial_xy", n_slices=3, in_chans=3))
    samples = xy.prepare(study, kp)
    placed = {int(k): (s.meta["z"][j], s.meta["origin"][j]) for s in samples for j, k in enumerate(s.meta["points"])}
    assert placed[1][1] == "projection" and placed[6][1] == "projection" and placed[0][1] == "axial_level"
    assert placed[1][0] == pytest.approx(ax.nearest_slice(canal.world[1]))
    assert MAX_LEVEL_MM < abs(LEVEL_Z[2] - LEVEL_Z[1])


def test_merge_sagittal_takes_the_3d_slice_refines_in_plane_and_fills_gaps():
    sag = sagittal()
    study = study_of(sag)
    truth = spinal_world()
    s3_world = truth + np.array([0.0, 0.0, 2.0])  # 2 mm off in-plane (superior)
    s2_world = truth + np.array([-3.0, 0.0, -2.0])  # another slice (x) and 2 mm inferior
    valid3 = np.array([True, True, True, True, False])
    s3 = world_set("spinal", s3_world, sag, valid=valid3, source="sag3d_t2")
    s2 = world_set("spinal", s2_world, sag, source="sag2d_t2")
    kp = StudyKeypoints(1, {"sag3d_t2": s3, "sag2d_t2": s2})
    m = merge_sagittal(study, kp, "spinal", refine_weight=0.5)
    assert m.origin.tolist() == ["sag3d_t2+sag2d_t2"] * 4 + ["sag2d_t2"]
    np.testing.assert_allclose(m.world[:4], truth[:4], atol=1e-9)  # slice (x) from 3-D, in-plane half way
    np.testing.assert_allclose(m.world[4], s2_world[4])
    np.testing.assert_allclose(sag.to_world(m.voxel), m.world, atol=1e-9)
    plain = merge_sagittal(study, kp, "spinal", refine_weight=0.0)
    np.testing.assert_allclose(plain.world[:4], s3_world[:4])
    assert plain.origin.tolist() == ["sag3d_t2"] * 4 + ["sag2d_t2"] and plain.source == "sag3d_t2+sag2d_t2"
    far = world_set("spinal", truth + np.array([0.0, 0.0, 60.0]), sag, source="sag2d_t2")
    m = merge_sagittal(study, StudyKeypoints(1, {"sag3d_t2": s3, "sag2d_t2": far}), "spinal")
    np.testing.assert_allclose(m.world[:4], s3_world[:4])  # too far apart: not the same point
    out = finalize(study, kp)
    best = out.best("spinal", prefer=DEFAULT_PREFER["spinal"])
    assert best.origin[0] == "sag3d_t2+sag2d_t2"
    np.testing.assert_allclose(best.world[:4], (truth + [0.0, 0.0, -2.0])[:4], atol=1e-9)  # default: sag2d in-plane
