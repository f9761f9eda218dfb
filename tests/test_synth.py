"""Phantom studies: layout, DICOM validity, label geometry, visibility of severity, switches,
determinism. The reader here uses pydicom only, so these tests do not depend on rsna_infer.io."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from rsna_infer import cli
from rsna_infer.constants import (
    CLASS_WEIGHTS,
    CLASSES,
    CONDITION_SERIES_TYPE,
    CONDITIONS,
    COORD_CONDITION_TO_CONDITION,
    COORD_LEVEL_TO_LEVEL,
    LABEL_TO_CLASS,
    LEVELS,
    SERIES_TYPES,
    TARGETS,
    study_row_ids,
)
from rsna_infer.keypoints import point_index
from rsna_infer.synth import (
    CONDITION_KIND,
    GRADE_PRIORS,
    KEYPOINTS_WORLD_COLUMNS,
    OPTIONAL_TAGS,
    SynthOptions,
    load_keypoints_world,
    make_dataset,
    sample_anatomy,
    sample_grades,
)
from rsna_infer.synth.render import CONTRASTS, Contrast, render_points

SMALL = (48, 64)


# -- a reader written with pydicom only ---------------------------------------------------------
def read_slice(path: Path) -> dict:
    ds = pydicom.dcmread(path)
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    r, c = iop[:3], iop[3:]
    return {
        "ds": ds,
        "ipp": np.array([float(v) for v in ds.ImagePositionPatient]),
        "r": r,
        "c": c,
        "n": np.cross(r, c),
        "spacing": tuple(float(v) for v in ds.PixelSpacing),  # (Δrow, Δcol)
        "pixels": ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept),
    }


def pixel_to_world(sl: dict, x: float, y: float) -> np.ndarray:
    dr, dc = sl["spacing"]
    return sl["ipp"] + x * dc * sl["r"] + y * dr * sl["c"]


def world_to_pixel(sl: dict, p: np.ndarray) -> tuple[float, float, float]:
    dr, dc = sl["spacing"]
    rel = p - sl["ipp"]
    return rel @ sl["r"] / dc, rel @ sl["c"] / dr, rel @ sl["n"]


def series_dir(root: Path, split: str, study: int, series: int) -> Path:
    return root / f"{split}_images" / str(study) / str(series)


# -- layout and CSVs ---------------------------------------------------------------------------
def test_train_layout_matches_csvs(phantom_train):
    root = phantom_train.root
    series = pd.read_csv(root / "train_series_descriptions.csv")
    assert list(series.columns) == ["study_id", "series_id", "series_description"]
    assert set(series.series_description) <= set(SERIES_TYPES)
    on_disk = {(int(p.parent.name), int(p.name)) for p in (root / "train_images").glob("*/*") if p.is_dir()}
    assert on_disk == set(zip(series.study_id, series.series_id))
    assert sorted(series.study_id.unique()) == sorted(phantom_train.study_ids)
    for study in phantom_train.study_ids:  # one series of each type by default
        assert sorted(series[series.study_id == study].series_description) == sorted(SERIES_TYPES)

    train = pd.read_csv(root / "train.csv")
    assert list(train.columns) == ["study_id", *TARGETS]
    assert sorted(train.study_id) == sorted(phantom_train.study_ids)
    assert set(train[list(TARGETS)].to_numpy().ravel()) <= set(LABEL_TO_CLASS)
    for row in train.itertuples(index=False):
        grades = np.array([LABEL_TO_CLASS[v] for v in row[1:]]).reshape(5, 5)
        assert (grades == phantom_train.truth[row.study_id].grades).all()


def test_file_names_are_instance_numbers_and_every_file_reads(phantom_train):
    root = phantom_train.root
    series = pd.read_csv(root / "train_series_descriptions.csv")
    for r in series.itertuples():
        files = sorted(series_dir(root, "train", r.study_id, r.series_id).iterdir())
        numbers = []
        for f in files:
            sl = read_slice(f)
            ds = sl["ds"]
            assert f.name == f"{ds.InstanceNumber}.dcm"
            numbers.append(int(ds.InstanceNumber))
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.Modality == "MR" and ds.PatientID == str(r.study_id)
            assert ds.SeriesDescription == r.series_description
            assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 16 and ds.PixelRepresentation == 0
            assert sl["pixels"].shape == (ds.Rows, ds.Columns)
            assert 64 <= ds.Rows <= 96 and 64 <= ds.Columns <= 96
            assert abs(np.linalg.norm(sl["r"]) - 1) < 1e-4 and abs(sl["r"] @ sl["c"]) < 1e-4
            assert float(ds.SliceThickness) > 0 and float(ds.SpacingBetweenSlices) >= float(ds.SliceThickness)
            assert sl["pixels"].std() > 0  # not a constant image
        assert sorted(numbers) == list(range(1, len(files) + 1))
        uids = {read_slice(f)["ds"].SeriesInstanceUID for f in files[:3]}
        assert len(uids) == 1


def test_instance_numbers_follow_the_slice_normal(phantom_train):
    root = phantom_train.root
    for study in phantom_train.study_ids[:2]:
        for info in phantom_train.truth[study].series:
            slices = [read_slice(f) for f in series_dir(root, "train", study, info.series_id).iterdir()]
            slices.sort(key=lambda s: int(s["ds"].InstanceNumber))
            offsets = np.array([s["ipp"] @ s["n"] for s in slices])
            assert (np.diff(offsets) > 0).all(), info.description


def test_keypoints_world_csv(phantom_train, phantom_test):
    for data in (phantom_train, phantom_test):
        df = pd.read_csv(data.keypoints_csv, keep_default_na=False)
        assert tuple(df.columns) == KEYPOINTS_WORLD_COLUMNS
        assert len(df) == 25 * len(data.study_ids)
        assert Counter(df.kind) == {"spinal": 5 * len(data.study_ids), "foraminal": 10 * len(data.study_ids),
                                    "subarticular": 10 * len(data.study_ids)}  # fmt: skip
        assert set(df[df.kind == "spinal"].side) == {""} and set(df[df.kind != "spinal"].side) == {"left", "right"}
        loaded = load_keypoints_world(data.root, data.split)
        for study in data.study_ids:
            for kind, pts in data.truth[study].keypoints.items():
                np.testing.assert_allclose(loaded[study][kind], pts, atol=1e-3)


def test_left_points_are_on_the_patients_left(phantom_train):
    for study in phantom_train.study_ids:
        kp = phantom_train.truth[study].keypoints
        for kind in ("foraminal", "subarticular"):
            assert (kp[kind][:5, 0] > kp[kind][5:, 0]).all()  # +x = patient left (LPS)
        assert (np.diff(kp["spinal"][:, 2]) < 0).all()  # L1/L2 is cranial of L5/S1


def test_solution_agrees_with_truth(phantom_test):
    root = phantom_test.root
    assert not (root / "train.csv").exists() and not (root / "train_label_coordinates.csv").exists()
    sol = pd.read_csv(root / "solution.csv")
    assert list(sol.columns) == ["row_id", *CLASSES, "sample_weight"]
    assert list(sol.row_id) == [rid for s in phantom_test.study_ids for rid in study_row_ids(s)]
    onehot = sol[list(CLASSES)].to_numpy()
    assert (onehot.sum(axis=1) == 1).all()
    grades = np.concatenate([phantom_test.truth[s].grades.reshape(-1) for s in phantom_test.study_ids])
    assert (onehot.argmax(axis=1) == grades).all()
    assert (sol.sample_weight.to_numpy() == np.array(CLASS_WEIGHTS)[grades]).all()
    sub = pd.read_csv(root / "sample_submission.csv")
    assert list(sub.row_id) == list(sol.row_id)
    series = pd.read_csv(root / "test_series_descriptions.csv")
    assert sorted(series.study_id.unique()) == sorted(phantom_test.study_ids)


# -- label coordinates --------------------------------------------------------------------------
def test_label_coordinates_land_on_the_structure(phantom_train):
    """Round trip: 3-D truth -> (series, instance, x, y) -> pydicom geometry -> world point
    within half a slice spacing of the truth, on the series type the condition is read on."""
    root = phantom_train.root
    coords = pd.read_csv(root / "train_label_coordinates.csv")
    assert list(coords.columns) == ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    assert len(coords) == 25 * len(phantom_train.study_ids)
    series = pd.read_csv(root / "train_series_descriptions.csv").set_index("series_id").series_description
    truth = load_keypoints_world(root, "train")
    for r in coords.itertuples():
        cond, level = COORD_CONDITION_TO_CONDITION[r.condition], LEVELS.index(COORD_LEVEL_TO_LEVEL[r.level])
        assert series[r.series_id] == CONDITION_SERIES_TYPE[cond]
        sl = read_slice(series_dir(root, "train", r.study_id, r.series_id) / f"{r.instance_number}.dcm")
        assert 0 <= r.x <= sl["ds"].Columns - 1 and 0 <= r.y <= sl["ds"].Rows - 1
        kind = "foraminal" if "foraminal" in cond else "subarticular" if "subarticular" in cond else "spinal"
        side = None if kind == "spinal" else (0 if cond.startswith("left") else 1)
        target = truth[r.study_id][kind][point_index(kind, level, side)]
        x, y, dist = world_to_pixel(sl, target)
        assert abs(x - r.x) < 1e-2 and abs(y - r.y) < 1e-2
        assert abs(dist) <= 0.5 * float(sl["ds"].SpacingBetweenSlices) + 0.3
        np.testing.assert_allclose(pixel_to_world(sl, r.x, r.y), target - dist * sl["n"], atol=1e-2)


@pytest.fixture(scope="module")
def sharp_train(tmp_path_factory) -> object:
    """Two studies at a resolution where a 3 mm structure spans a few pixels."""
    return make_dataset(tmp_path_factory.mktemp("sharp"), 2, split="train", seed=3, image_size=(176, 192), noise=(0.01, 0.01))


def test_labelled_pixel_is_brighter_than_its_surroundings(sharp_train):
    """Canal CSF (T2), foraminal fat (T1) and lateral recess CSF (axial T2) are bright against
    the bone and ligament around them: at a Normal/Mild labelled pixel, the image is brighter
    than most of the 12 mm neighbourhood."""
    root = sharp_train.root
    coords = pd.read_csv(root / "train_label_coordinates.csv")
    ranks: dict[str, list[float]] = {}
    for r in coords.itertuples():
        cond = COORD_CONDITION_TO_CONDITION[r.condition]
        grade = sharp_train.truth[r.study_id].grades[CONDITIONS.index(cond), LEVELS.index(COORD_LEVEL_TO_LEVEL[r.level])]
        if grade != 0:
            continue
        sl = read_slice(series_dir(root, "train", r.study_id, r.series_id) / f"{r.instance_number}.dcm")
        img = sl["pixels"]
        yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
        dist_mm = np.hypot((yy - r.y) * sl["spacing"][0], (xx - r.x) * sl["spacing"][1])
        centre = img[dist_mm <= 1.0].mean()
        ranks.setdefault(CONDITION_SERIES_TYPE[cond], []).append((img[dist_mm <= 12.0] < centre).mean())
    assert set(ranks) == set(SERIES_TYPES), "fixture lacks Normal/Mild labels of some series type"
    for name, vals in ranks.items():
        assert np.median(vals) > 0.75 and min(vals) > 0.5, (name, np.round(vals, 2))


@pytest.mark.parametrize("kind, condition", [("spinal", 0), ("foraminal", 1), ("subarticular", 3)])
def test_narrowing_grows_with_grade(kind, condition):
    """Severity shows as less bright (CSF or fat) area in the section through the keypoint:
    the axial section (u, d) for the canal and the recesses, the parasagittal (d, s) one for
    the foramina. Same anatomy draw, only the L4/L5 grade changes."""
    areas = []
    for grade in (0, 1, 2):
        grades = np.zeros((5, 5), dtype=np.int64)
        grades[condition:condition + (1 if kind == "spinal" else 2), 3] = grade  # L4/L5, both sides
        anat = sample_anatomy(np.random.default_rng(7), grades)
        name = "T1" if kind == "foraminal" else "T2"
        contrast = Contrast(name, CONTRASTS[name], coil_depth=1e9)
        u, d, s = anat.to_spine(anat.keypoints()[kind][3][None])
        half = 5.0 if kind == "subarticular" else 8.0  # the recess sits beside the central canal
        a, b = np.meshgrid(np.arange(-half, half + 0.01, 0.25), np.arange(-half, half + 0.01, 0.25), indexing="ij")
        if kind == "foraminal":
            pts = anat.from_spine(np.full(a.size, u[0]), d[0] + a.ravel(), s[0] + b.ravel())
        else:
            pts = anat.from_spine(u[0] + a.ravel(), d[0] + b.ravel(), np.full(a.size, s[0]))
        tissue = contrast.signal["fat" if kind == "foraminal" else "csf"]
        areas.append((render_points(anat, pts, contrast, 0.5) > 0.8 * tissue).mean())
    assert areas[0] > areas[1] > areas[2], areas
    assert areas[2] < 0.5 * areas[0], areas


# -- grades --------------------------------------------------------------------------------------
def test_grade_priors_and_correlation():
    rng = np.random.default_rng(0)
    g = np.stack([sample_grades(rng) for _ in range(3000)])
    freq = np.stack([(g == k).mean(axis=0) for k in range(3)], axis=-1)  # [5, 5, 3]
    for c, group in enumerate(["spinal", "foraminal", "foraminal", "subarticular", "subarticular"]):
        np.testing.assert_allclose(freq[c], GRADE_PRIORS[group], atol=0.035)
    overall = np.array([(g == k).mean() for k in range(3)])
    assert 0.70 <= overall[0] <= 0.80 and 0.15 <= overall[1] <= 0.22 and 0.05 <= overall[2] <= 0.10
    sev = (g > 0).astype(float)
    assert np.corrcoef(sev[:, 1, 3], sev[:, 2, 3])[0, 1] > 0.2  # left vs right foramen, L4/L5
    assert np.corrcoef(sev[:, 0, 2], sev[:, 0, 3])[0, 1] > 0.15  # spinal L3/L4 vs L4/L5


# -- switches ------------------------------------------------------------------------------------
def _all_slices(data) -> dict[tuple[int, int], list[dict]]:
    out = {}
    for study in data.study_ids:
        for info in data.truth[study].series:
            out[(study, info.series_id)] = [
                read_slice(f) for f in series_dir(data.root, data.split, study, info.series_id).iterdir()
                if not f.name.startswith("._") and all(f != t for t in data.truth[study].truncated_files)
            ]  # fmt: skip
    return out


def _decodes(path: Path) -> bool:
    """Whether pydicom reads a full image from ``path``."""
    try:
        ds = pydicom.dcmread(path)
        return ds.pixel_array.shape == (ds.Rows, ds.Columns)
    except (ValueError, AttributeError, KeyError, EOFError, OSError, NotImplementedError, InvalidDicomError):
        return False


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns while reading the truncated file
def test_switches_do_what_they_claim(tmp_path):
    data = make_dataset(
        tmp_path, 3, split="train", seed=5, image_size=SMALL, second_axial_rate=1.0, multi_stack_rate=1.0,
        mixed_slice_size_rate=1.0, descending_instance_rate=1.0, missing_tags_rate=1.0, truncated_file_rate=1.0,
        stray_file_rate=1.0, blank_label_rate=0.2, transfer_syntax="mixed",
    )  # fmt: skip
    slices = _all_slices(data)
    syntaxes = set()
    for study in data.study_ids:
        t = data.truth[study]
        axial = t.series_of("Axial T2")
        assert len(axial) == 2
        first = slices[(study, axial[0].series_id)]
        orientations = {tuple(np.round(s["n"], 2)) for s in first}
        assert axial[0].n_stacks == len(orientations) >= 2  # several stacks in one series
        assert any(len({s["pixels"].shape for s in slices[(study, i.series_id)]}) > 1 for i in t.series)
        for info in t.series:
            ss = sorted(slices[(study, info.series_id)], key=lambda s: int(s["ds"].InstanceNumber))
            for s in ss:
                for tag in info.dropped_tags:
                    assert tag not in s["ds"]
                syntaxes.add(s["ds"].file_meta.TransferSyntaxUID)
            assert info.dropped_tags and set(info.dropped_tags) <= set(OPTIONAL_TAGS)
            stack0 = [s for s in ss if np.allclose(s["n"], ss[0]["n"], atol=1e-3)]
            offsets = [s["ipp"] @ s["n"] for s in stack0]
            assert (np.diff(offsets) < 0).all()  # descending instance numbers
        (truncated,) = t.truncated_files
        assert not _decodes(truncated)
        (stray,) = t.stray_files
        with pytest.raises(InvalidDicomError):
            pydicom.dcmread(stray)
    assert len(syntaxes) >= 2
    train = pd.read_csv(tmp_path / "train.csv")
    blanks = train[list(TARGETS)].isna().to_numpy()
    assert blanks.any()
    coords = pd.read_csv(tmp_path / "train_label_coordinates.csv")
    assert len(coords) == (~blanks).sum()  # blank grades have no coordinates


def test_flipped_axes_switch_changes_iop_not_patient_space(tmp_path):
    plain = make_dataset(tmp_path / "plain", 2, split="train", seed=4, image_size=SMALL)
    flipped = make_dataset(tmp_path / "flipped", 2, split="train", seed=4, image_size=SMALL, flipped_axes_rate=1.0)
    assert (tmp_path / "plain/train_keypoints_world.csv").read_bytes() == (tmp_path / "flipped/train_keypoints_world.csv").read_bytes()
    a, b = _all_slices(plain), _all_slices(flipped)
    coords = pd.read_csv(tmp_path / "flipped/train_label_coordinates.csv")
    for study in flipped.study_ids:
        world = load_keypoints_world(tmp_path / "flipped")[study]
        for info in flipped.truth[study].series:
            assert info.flipped_axes and set(info.flipped_axes) <= {"columns", "rows", "swapped"}
            s0 = min(a[(study, info.series_id)], key=lambda s: int(s["ds"].InstanceNumber))
            s1 = next(s for s in b[(study, info.series_id)] if np.allclose(s["ipp"] @ s0["n"], s0["ipp"] @ s0["n"]))
            r, c = -s0["r"] if "columns" in info.flipped_axes else s0["r"], -s0["c"] if "rows" in info.flipped_axes else s0["c"]
            if "swapped" in info.flipped_axes:
                r, c = c, r
            np.testing.assert_allclose(np.r_[s1["r"], s1["c"]], np.r_[r, c], atol=1e-6)
            # the same anatomy: the image centre is the same patient point
            centre = lambda sl: pixel_to_world(sl, (sl["pixels"].shape[1] - 1) / 2, (sl["pixels"].shape[0] - 1) / 2)
            np.testing.assert_allclose(centre(s1), centre(s0), atol=1e-3)
        for row in coords[coords.study_id == study].itertuples(index=False):  # labels stay on the truth
            sl = next(s for s in b[(study, row.series_id)] if int(s["ds"].InstanceNumber) == row.instance_number)
            cond = COORD_CONDITION_TO_CONDITION[row.condition]
            kind = CONDITION_KIND[cond]
            side = None if kind == "spinal" else (0 if cond.startswith("left") else 1)
            p = world[kind][point_index(kind, LEVELS.index(COORD_LEVEL_TO_LEVEL[row.level]), side)]
            assert np.linalg.norm(pixel_to_world(sl, row.x, row.y) - p) <= 0.5 * 5.0 + 0.1  # half the widest slice spacing


def test_missing_series_switch(tmp_path):
    data = make_dataset(tmp_path, 3, split="train", seed=2, image_size=SMALL, missing_series_rate=1.0)
    series = pd.read_csv(tmp_path / "train_series_descriptions.csv")
    coords = pd.read_csv(tmp_path / "train_label_coordinates.csv")
    for study in data.study_ids:
        missing = data.truth[study].missing_series_type
        assert missing in SERIES_TYPES
        assert missing not in set(series[series.study_id == study].series_description)
        assert len(coords[coords.study_id == study]) == 25 - (5 if missing == "Sagittal T2/STIR" else 10)
    assert sorted(pd.read_csv(tmp_path / "train.csv").study_id) == sorted(data.study_ids)  # grades stay


def _tag(ds, keyword: str, macro: str):
    """A geometry value of a classic or an enhanced file (functional groups), or None."""
    if keyword in ds:
        return ds.data_element(keyword).value
    for group in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        item = ds.get(group)
        if item and macro in item[0] and keyword in item[0].data_element(macro).value[0]:
            return item[0].data_element(macro).value[0].data_element(keyword).value
    return None


def test_storage_switches_do_what_they_claim(tmp_path):
    data = make_dataset(tmp_path, 2, split="train", seed=7, image_size=SMALL, mixed_fov_rate=1.0,
                        parallel_block_rate=1.0, missing_spacing_rate=1.0, no_meta_rate=1.0, enhanced_rate=1.0)
    n_parallel = 0
    for study in data.study_ids:
        for info in data.truth[study].series:
            assert info.mixed_fov and info.no_meta and info.enhanced and info.missing_spacing_instance is not None
            files = sorted(series_dir(data.root, "train", study, info.series_id).iterdir())
            assert len(files) == info.n_instances
            sl = []
            for f in files:
                assert f.read_bytes()[128:132] != b"DICM"  # bare dataset, no preamble or meta
                ds = pydicom.dcmread(f, force=True)
                assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.1" and int(ds.NumberOfFrames) == 1  # Enhanced MR
                assert "ImagePositionPatient" not in ds  # geometry only in the functional groups
                iop = np.array([float(v) for v in _tag(ds, "ImageOrientationPatient", "PlaneOrientationSequence")])
                ipp = np.array([float(v) for v in _tag(ds, "ImagePositionPatient", "PlanePositionSequence")])
                ps = _tag(ds, "PixelSpacing", "PixelMeasuresSequence")
                assert (ps is None) == (int(ds.InstanceNumber) == info.missing_spacing_instance)
                sl.append((np.cross(iop[:3], iop[3:]), ipp, iop, (int(ds.Rows), int(ds.Columns)), ps))
            # another field of view on some slices: other matrix, same spacing, IPP on the same grid
            spacing = next(tuple(map(float, s[4])) for s in sl if s[4] is not None)
            assert len({s[3] for s in sl}) > 1
            assert all(s[4] is None or np.allclose(tuple(map(float, s[4])), spacing) for s in sl)
            n = sl[0][0]
            depths = np.array([s[1] @ n for s in sl])
            same_depth = np.abs(depths[:, None] - depths[None, :]) < 1e-3
            if info.parallel_block:  # a second block at the same depths, shifted in-plane
                n_parallel += 1
                assert info.n_stacks >= 2 and (same_depth.sum(axis=1) >= 2).any()
            else:
                assert (same_depth.sum(axis=1) == 1).all()
    assert n_parallel == len(data.study_ids)


@pytest.mark.parametrize("syntax, uid", [("rle", RLELossless), ("big_endian", ExplicitVRBigEndian), ("implicit", ImplicitVRLittleEndian)])
def test_transfer_syntaxes_decode_to_the_same_pixels(tmp_path, syntax, uid):
    ref = make_dataset(tmp_path / "ref", 1, split="test", seed=4, image_size=(32, 40))
    alt = make_dataset(tmp_path / syntax, 1, split="test", seed=4, image_size=(32, 40), transfer_syntax=syntax)
    files = sorted(p.relative_to(ref.root) for p in ref.files())
    assert files == sorted(p.relative_to(alt.root) for p in alt.files())
    for rel in files[::7]:
        a, b = pydicom.dcmread(ref.root / rel), pydicom.dcmread(alt.root / rel)
        assert b.file_meta.TransferSyntaxUID == uid
        np.testing.assert_array_equal(a.pixel_array, b.pixel_array)
        assert a.ImagePositionPatient == b.ImagePositionPatient


# -- determinism and honesty -------------------------------------------------------------------------
def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    kw = {"image_size": SMALL, "multi_stack_rate": 0.5, "transfer_syntax": "mixed"}
    a = make_dataset(tmp_path / "a", 2, split="train", seed=11, **kw)
    b = make_dataset(tmp_path / "b", 2, split="train", seed=11, **kw)
    c = make_dataset(tmp_path / "c", 2, split="train", seed=12, **kw)
    assert _digest(a.root) == _digest(b.root)
    assert _digest(a.root) != _digest(c.root)
    # Study k does not depend on how many studies are built.
    d = make_dataset(tmp_path / "d", 1, split="train", seed=11, **kw)
    first = str(a.study_ids[0])
    assert {k: v for k, v in _digest(a.root).items() if k.startswith(f"train_images/{first}/")} == {
        k: v for k, v in _digest(d.root).items() if k.startswith("train_images/")
    }


def test_headers_and_sizes_do_not_depend_on_grade(phantom_train):
    """Same series type -> same set of tags; image sizes are not correlated with grades."""
    root = phantom_train.root
    keys: dict[str, set] = {}
    for study in phantom_train.study_ids:
        for info in phantom_train.truth[study].series:
            f = next(series_dir(root, "train", study, info.series_id).iterdir())
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            kw = frozenset(e.keyword for e in ds)
            keys.setdefault(info.weighting, set()).add(kw)
    assert all(len(v) == 1 for v in keys.values()), keys


# -- options and CLI -------------------------------------------------------------------------------
def test_bad_options_fail_fast(tmp_path):
    with pytest.raises(TypeError, match="unknown synth option"):
        make_dataset(tmp_path, 1, bogus=1)
    with pytest.raises(ValueError, match="missing_series_rate"):
        make_dataset(tmp_path, 1, missing_series_rate=2.0)
    with pytest.raises(ValueError, match="transfer_syntax"):
        make_dataset(tmp_path, 1, transfer_syntax="jpeg")
    with pytest.raises(ValueError, match="split"):
        make_dataset(tmp_path, 1, split="val")
    with pytest.raises(ValueError, match="image_size"):
        SynthOptions(image_size=(96, 64))
    assert not any(tmp_path.iterdir())


def test_cli_writes_a_test_root(tmp_path, capsys):
    rc = cli.main(["synth", str(tmp_path), "--studies", "2", "--split", "test", "--seed", "3",
                   "--image-size", "32", "40", "--first-study-id", "1000", "--n-axial-series", "2"])  # fmt: skip
    assert rc == 0
    assert "wrote 2 test studies" in capsys.readouterr().out
    series = pd.read_csv(tmp_path / "test_series_descriptions.csv")
    assert sorted(series.study_id.unique()) == [1000, 1001]
    assert (series.series_description == "Axial T2").sum() == 4
    assert (tmp_path / "solution.csv").exists()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_to_spine_stays_finite_far_from_the_curve(dtype):
    """Regression: the foot-point Newton step diverged for image corners far from the spine
    (NaN -> int cast -> IndexError while rendering a 384-px study)."""
    anat = sample_anatomy(np.random.default_rng(5), np.zeros((5, 5), np.int64))
    rng = np.random.default_rng(0)
    centre = anat.from_spine(np.zeros(1), np.zeros(1), np.zeros(1))[0]
    # Points at the centre line's centres of curvature, where the plain Newton Hessian is 0.
    t0 = np.linspace(-200, 200, 4001)
    f, f1, f2 = anat.curve(t0), anat.curve_slope_at(t0), anat.curve_bend_at(t0)
    ok = np.abs(f2) > 1e-6
    v = f[ok] + (1 + f1[ok] ** 2) / f2[ok]
    singular = anat.local_to_world(np.stack([np.zeros_like(v), v, t0[ok]], axis=1))
    far = np.concatenate([centre + rng.uniform(-250, 250, size=(20000, 3)), singular])
    u, d, s = anat.to_spine(far.astype(dtype))
    assert np.isfinite(u).all() and np.isfinite(d).all() and np.isfinite(s).all()
    near = anat.from_spine(np.zeros(50), rng.uniform(-5, 5, 50), rng.uniform(-60, 60, 50))
    _, d_near, _ = anat.to_spine(near)
    assert np.all(np.abs(d_near) < 6)
