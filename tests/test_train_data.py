import numpy as np
import pandas as pd
import pytest

from rsna_infer.constants import (
    AXIAL_T2,
    COORD_CONDITION_TO_CONDITION,
    COORD_LEVEL_TO_LEVEL,
    SAG_T1,
    SAG_T2,
    TARGETS,
)
from rsna_infer.io.labels import DataError, read_labels, truth_keypoints
from rsna_infer.io.volume import Study, Volume
from rsna_infer.keypoints import point_index
from rsna_infer.train.cache import (
    StudyCache,
    folder_fingerprint,
    load_cached_study,
    save_study,
)
from rsna_infer.train.data import TrainingData


def _sagittal(series_id, n=6, study_id=1, shuffle_instances=False):
    # sagittal: row_dir = +y (posterior), col_dir = -z (down); normal = (-1, 0, 0)
    pos = np.array([[10.0 - 4 * i, -50.0, 80.0] for i in range(n)])
    inst = np.arange(1, n + 1)
    if shuffle_instances:
        inst = inst[::-1].copy()
    return Volume(np.random.default_rng(series_id).random((n, 16, 20)).astype(np.float32) * 1000, pos,
                  [0, 1, 0], [0, 0, -1], (0.5, 0.75), inst, study_id=study_id, series_id=series_id,
                  description=SAG_T2 if series_id == 10 else SAG_T1)


def _axial(series_id, study_id=1, stack_index=0, first_instance=1):
    pos = np.array([[-40.0, -60.0, 20.0 + 3 * i] for i in range(5)])
    return Volume(np.ones((5, 12, 12), np.float32), pos, [1, 0, 0], [0, 1, 0], (0.8, 0.8),
                  np.arange(first_instance, first_instance + 5), study_id=study_id, series_id=series_id,
                  description=AXIAL_T2, stack_index=stack_index)


def _study(study_id=1):
    return Study(study_id, {SAG_T2: [_sagittal(10, study_id=study_id)],
                            SAG_T1: [_sagittal(11, study_id=study_id, shuffle_instances=True)],
                            AXIAL_T2: [_axial(12, study_id), _axial(12, study_id, stack_index=1, first_instance=6)]})


def _coords(study_id=1):
    rows = [
        (study_id, 10, 3, "Spinal Canal Stenosis", "L3/L4", 5.0, 8.0),
        (study_id, 11, 2, "Left Neural Foraminal Narrowing", "L1/L2", 4.0, 2.0),
        (study_id, 11, 5, "Right Neural Foraminal Narrowing", "L5/S1", 1.5, 3.5),
        (study_id, 12, 7, "Right Subarticular Stenosis", "L4/L5", 6.0, 4.0),
        (study_id, 12, 99, "Left Subarticular Stenosis", "L4/L5", 6.0, 4.0),  # instance absent
    ]
    return pd.DataFrame(rows, columns=["study_id", "series_id", "instance_number", "condition", "level", "x", "y"])


def test_truth_keypoints_map_label_pixels_to_patient_space():
    study = _study()
    coords = _coords()
    coords["condition"] = coords["condition"].map(COORD_CONDITION_TO_CONDITION)
    coords["level"] = coords["level"].map(COORD_LEVEL_TO_LEVEL)
    kp = truth_keypoints(study, coords)
    spinal = kp.get("truth_spinal")
    i = point_index("spinal", 2)
    # by hand: IPP of instance 3 (sorted index 2) + x * dcol * row_dir + y * drow * col_dir
    expected = np.array([10.0 - 8, -50.0, 80.0]) + 5.0 * 0.75 * np.array([0, 1, 0]) + 8.0 * 0.5 * np.array([0, 0, -1])
    np.testing.assert_allclose(spinal.world[i], expected)
    np.testing.assert_allclose(spinal.voxel[i], [2, 8, 5])
    assert spinal.valid.sum() == 1 and spinal.series_id[i] == 10
    # T1 instances run backwards: instance 2 is sorted index 4
    fo = kp.get("truth_foraminal")
    assert fo.voxel[point_index("foraminal", 0, 0)][0] == 4
    assert fo.voxel[point_index("foraminal", 4, 1)][0] == 1
    # the second axial stack of the series holds instance 7 -> stack 1, slice 1
    sa = kp.get("truth_subarticular")
    j = point_index("subarticular", 3, 1)
    assert sa.stack_index[j] == 1 and sa.voxel[j][0] == 1
    assert not sa.valid[point_index("subarticular", 3, 0)]  # instance 99 does not exist
    assert len(kp.report["truth_unplaced"]) == 1


def _write_root(root, ids):
    rows = []
    for k, sid in enumerate(ids):
        labels = ["Normal/Mild"] * 25
        labels[k % 25] = "Severe"
        labels[(k + 3) % 25] = ""
        rows.append([sid, *labels])
    pd.DataFrame(rows, columns=["study_id", *TARGETS]).to_csv(root / "train.csv", index=False)
    pd.concat([_coords(s) for s in ids]).to_csv(root / "train_label_coordinates.csv", index=False)
    for sid in ids:
        (root / "train_images" / str(sid) / "10").mkdir(parents=True)
        (root / "train_images" / str(sid) / "10" / "1.dcm").write_bytes(b"x" * sid)


def test_training_data_with_cache(tmp_path):
    ids = [3, 5, 8]
    _write_root(tmp_path, ids)
    calls = []

    def loader(sid):
        calls.append(sid)
        return _study(sid)

    data = TrainingData.open(tmp_path, cache_dir=tmp_path / "cache", loader=loader)
    assert data.study_ids == ids
    lab = data.labels[5]
    assert lab.shape == (5, 5) and lab.reshape(-1)[1] == 2 and lab.reshape(-1)[4] == -1
    assert data.cache.ensure(ids, progress=False) == 3
    kp = data.truth(5)
    assert kp.get("truth_spinal").valid.sum() == 1
    # a fresh instance reads the disk cache: no decoding at all
    calls.clear()
    again = TrainingData.open(tmp_path, cache_dir=tmp_path / "cache", loader=loader)
    s = again.study(8)
    assert calls == [] and s.first(SAG_T2).series_id == 10
    np.testing.assert_array_equal(s.first(SAG_T2).pixels, _study(8).first(SAG_T2).pixels)
    # touching a file of the study changes its fingerprint -> decoded again
    (tmp_path / "train_images" / "8" / "10" / "1.dcm").write_bytes(b"changed")
    third = TrainingData.open(tmp_path, cache_dir=tmp_path / "cache", loader=loader)
    third.study(8)
    assert calls == [8]


def test_cache_round_trip_is_exact(tmp_path):
    study = _study(4)
    study.warnings.append("series 13: empty folder")
    integer = study.first(AXIAL_T2)
    integer.pixels[:] = np.arange(integer.pixels.size).reshape(integer.pixels.shape)
    p = save_study(study, tmp_path / "s.npz")
    back = load_cached_study(p)
    assert back.warnings == study.warnings and back.study_id == 4
    for t in study.volumes:
        for a, b in zip(study.get(t), back.get(t)):
            np.testing.assert_array_equal(a.pixels, b.pixels)
            np.testing.assert_array_equal(a.positions, b.positions)
            np.testing.assert_array_equal(a.instance_numbers, b.instance_numbers)
            assert (a.series_id, a.stack_index, a.description, a.spacing) == (b.series_id, b.stack_index, b.description, b.spacing)
    with np.load(p) as z:
        assert z["v2_pixels"].dtype == np.uint16  # integer pixels stored compactly


def test_corrupt_cache_entry_is_rebuilt(tmp_path):
    (tmp_path / "f").mkdir()
    cache = StudyCache(tmp_path / "c", lambda sid: _study(sid), lambda sid: tmp_path / "f")
    cache.path(1).parent.mkdir(parents=True)
    cache.path(1).write_bytes(b"not an npz")
    assert cache.get(1).study_id == 1
    assert load_cached_study(cache.path(1)).study_id == 1
    assert folder_fingerprint(tmp_path / "missing") == folder_fingerprint(tmp_path / "also-missing")


def test_labels_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_labels(tmp_path / "train.csv")
    pd.DataFrame({"study_id": [1], TARGETS[0]: ["Normal/Mild"]}).to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(DataError, match="missing column"):
        read_labels(tmp_path / "train.csv")
    df = pd.DataFrame([[1] + ["Bad"] * 25], columns=["study_id", *TARGETS])
    df.to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(DataError, match="study 1"):
        read_labels(tmp_path / "train.csv")


def _with_native_spacing(vol, z, native):
    spacing = np.tile(np.asarray(vol.spacing, float), (vol.shape[0], 1))
    spacing[z] = native
    return Volume(vol.pixels, vol.positions, vol.row_dir, vol.col_dir, vol.spacing, vol.instance_numbers,
                  study_id=vol.study_id, series_id=vol.series_id, description=vol.description,
                  stack_index=vol.stack_index, native_spacing=spacing)


def test_label_on_a_resampled_slice_maps_through_its_own_spacing():
    """A slice stored at another matrix size (native spacing 1.0 mm, stack 0.5/0.75 mm): its
    label pixel (x, y) is in that file's grid, so the world point scales by its own spacing."""
    study = _study()
    t2 = study.first(SAG_T2)
    z = int(np.flatnonzero(t2.instance_numbers == 3)[0])
    study.volumes[SAG_T2] = [_with_native_spacing(t2, z, (1.0, 1.0))]
    coords = _coords()
    coords["condition"] = coords["condition"].map(COORD_CONDITION_TO_CONDITION)
    coords["level"] = coords["level"].map(COORD_LEVEL_TO_LEVEL)
    truth = truth_keypoints(study, coords)
    p = truth.sets["truth_spinal"].world[point_index("spinal", 2)]
    vol = study.first(SAG_T2)
    expected = vol.positions[z] + 5.0 * 1.0 * vol.row_dir + 8.0 * 1.0 * vol.col_dir
    np.testing.assert_allclose(p, expected, atol=1e-9)


def test_cache_keeps_native_spacing(tmp_path):
    study = _study(5)
    t2 = study.first(SAG_T2)
    study.volumes[SAG_T2] = [_with_native_spacing(t2, 1, (1.0, 2.0))]
    back = load_cached_study(save_study(study, tmp_path / "s.npz"))
    np.testing.assert_array_equal(back.first(SAG_T2).native_spacing, study.first(SAG_T2).native_spacing)
    assert back.first(SAG_T1).native_spacing is None
