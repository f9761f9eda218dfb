"""DICOM as real scanners write it (issue 13): fields of view, parallel blocks, missing
spacing, meta-less big endian, skewed IOP, enhanced MR, unreadable folders, odd folder
entries, text typing, cost and traceability. Each test failed on the reader before the fix."""

from __future__ import annotations

import copy
import logging
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from rsna_infer import geometry
from rsna_infer.constants import AXIAL_T2, SAG_T1, SAG_T2
from rsna_infer.io import (
    Volume,
    build_stacks,
    decode_files,
    discover_studies,
    infer_series_type,
    load_study,
    read_series,
    read_slice,
    write_slice,
)
from rsna_infer.io import dicom as dicom_mod

AX_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAG_IOP = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def _world_of_file_pixel(path: Path, x: float, y: float) -> np.ndarray:
    """Patient position of stored pixel (column x, row y) of a file, straight from its tags."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)
    return ipp + x * dc * iop[:3] + y * dr * iop[3:]


def _ramp(h: int, w: int, y0: float = 0.0, x0: float = 0.0, step: float = 1.0, k: int = 0) -> np.ndarray:
    """An image whose value encodes its patient position (rows/cols in mm from a common origin)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.rint(40 * (y0 + yy * step) + 3 * (x0 + xx * step) + 500 + 1000 * k).astype(np.int64)


# -- 1. another field of view with its own IPP ------------------------------------------------
def test_slice_with_another_field_of_view_lands_on_the_reference_grid(tmp_path):
    # three 20x20 slices and one 30x30 slice with the same centre, 1 mm pixels: the odd slice's
    # IPP is 5 px up and left of the others; its centre 20x20 must land exactly on the grid
    for k in (0, 1, 3):
        write_slice(tmp_path / f"{k}.dcm", _ramp(20, 20, k=k), position=(0, 0, 2.0 * k), orientation=AX_IOP,
                    pixel_spacing=(1.0, 1.0), instance_number=k + 1)
    big = tmp_path / "2.dcm"
    write_slice(big, _ramp(30, 30, y0=-5, x0=-5, k=2), position=(-5, -5, 4.0), orientation=AX_IOP,
                pixel_spacing=(1.0, 1.0), instance_number=3)
    warnings: list[str] = []
    (v,) = read_series(tmp_path, warnings=warnings)
    assert v.shape == (4, 20, 20)
    np.testing.assert_array_equal(v.pixels[2], _ramp(20, 20, k=2))
    np.testing.assert_allclose(v.positions[2], [0, 0, 4.0])  # the reference IPP in the slice's plane
    assert any("field of view" in w or "resampled" in w for w in warnings)
    # a label on the big file's own pixels maps to the same patient point
    for x, y in ((0.0, 0.0), (12.5, 7.25), (29.0, 29.0)):
        zyx = v.pixel_to_voxel(2, x=x, y=y)
        np.testing.assert_allclose(zyx, [2, y - 5, x - 5])
        np.testing.assert_allclose(v.to_world(zyx), _world_of_file_pixel(big, x, y), atol=1e-9)
    # slices on the reference grid map to themselves
    np.testing.assert_allclose(v.pixel_to_voxel(1, x=3.0, y=4.0), [1, 4, 3])


def test_field_of_view_and_spacing_both_differ(tmp_path):
    # reference: 12x12 at 1 mm from (0, 0); odd slice: 0.5 mm pixels starting 2 mm up-left
    for k in (0, 1, 2):
        write_slice(tmp_path / f"{k}.dcm", _ramp(12, 12, k=k), position=(0, 0, 3.0 * k), orientation=AX_IOP,
                    pixel_spacing=(1.0, 1.0), instance_number=k + 1)
    odd = tmp_path / "odd.dcm"
    write_slice(odd, _ramp(40, 40, y0=-2, x0=-2, step=0.5, k=3), position=(-2, -2, 9.0), orientation=AX_IOP,
                pixel_spacing=(0.5, 0.5), instance_number=4)
    (v,) = read_series(tmp_path)
    np.testing.assert_allclose(v.pixels[3], _ramp(12, 12, k=3), atol=1e-3)  # linear field: exact
    zyx = v.pixel_to_voxel(3, x=10.0, y=6.0)
    np.testing.assert_allclose(zyx, [3, 1.0, 3.0])
    np.testing.assert_allclose(v.to_world(zyx), _world_of_file_pixel(odd, 10.0, 6.0), atol=1e-9)


# -- 2. duplicates need the whole IPP; parallel blocks are their own stacks ---------------------
def test_parallel_blocks_at_the_same_depths_become_two_stacks(tmp_path):
    for k in range(3):
        write_slice(tmp_path / f"a{k}.dcm", np.full((8, 8), 100 + k), position=(0, 0, 4.0 * k), orientation=AX_IOP,
                    instance_number=k + 1)
        write_slice(tmp_path / f"b{k}.dcm", np.full((8, 8), 200 + k), position=(100, 0, 4.0 * k), orientation=AX_IOP,
                    instance_number=k + 4)
    warnings: list[str] = []
    vols = read_series(tmp_path, warnings=warnings)
    assert [v.shape for v in vols] == [(3, 8, 8), (3, 8, 8)]
    assert not any("duplicate" in w for w in warnings)
    np.testing.assert_array_equal(vols[0].pixels[:, 0, 0], [100, 101, 102])
    np.testing.assert_array_equal(vols[1].pixels[:, 0, 0], [200, 201, 202])
    np.testing.assert_allclose(vols[1].positions[:, 0], 100.0)
    assert [v.stack_index for v in vols] == [0, 1]


def test_a_true_duplicate_still_drops_with_its_name(tmp_path):
    for k in range(3):
        write_slice(tmp_path / f"{k}.dcm", np.full((8, 8), k), position=(0, 0, 4.0 * k), orientation=AX_IOP,
                    instance_number=k + 1)
    write_slice(tmp_path / "again.dcm", np.full((8, 8), 9), position=(0, 0, 4.0), orientation=AX_IOP, instance_number=7)
    warnings: list[str] = []
    (v,) = read_series(tmp_path, warnings=warnings)
    assert v.shape[0] == 3 and any("duplicate" in w and "again.dcm" in w for w in warnings)


# -- 3. a slice without PixelSpacing takes the stack's ---------------------------------------------
def test_slice_without_pixel_spacing_takes_the_stacks_spacing(tmp_path):
    for k in range(4):
        write_slice(tmp_path / f"{k}.dcm", _ramp(10, 8, k=k), position=(0, 0, 3.0 * k), orientation=AX_IOP,
                    pixel_spacing=None if k == 2 else (0.5, 0.7), instance_number=k + 1)
    warnings: list[str] = []
    (v,) = read_series(tmp_path, warnings=warnings)
    assert v.spacing == (0.5, 0.7)
    np.testing.assert_array_equal(v.pixels[2], _ramp(10, 8, k=2))  # not zoomed
    assert v.native_spacing is None or np.allclose(v.native_spacing[2], (0.5, 0.7))
    np.testing.assert_allclose(v.pixel_to_voxel(2, x=3.0, y=4.0), [2, 4, 3])
    assert any("PixelSpacing" in w and "2.dcm" in w and "0.5" in w for w in warnings)


def test_slice_without_spacing_and_its_own_matrix_takes_its_neighbours(tmp_path):
    # 0.5 mm slices 0-1 (20x20), 1 mm slices 3-5 (10x10), slice 2 (14x14) has no spacing: the
    # nearest slice along the normal with one says 0.5 mm
    for k in range(6):
        fine = k < 3
        write_slice(tmp_path / f"{k}.dcm", np.full((20, 20) if k < 2 else (14, 14) if k == 2 else (10, 10), k),
                    position=(0, 0, 1.0 * k - (0.4 if k == 2 else 0)), orientation=AX_IOP, instance_number=k + 1,
                    pixel_spacing=None if k == 2 else (0.5, 0.5) if fine else (1.0, 1.0))
    (v,) = read_series(tmp_path)
    assert np.allclose(v.native_spacing[2], (0.5, 0.5))


# -- 4. big endian without file meta -------------------------------------------------------------
def _strip_preamble_and_meta(path: Path) -> bytes:
    """The bare dataset of a Part-10 file: no preamble, no "DICM", no file meta (as old PACS write)."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM" and raw[132:136] == b"\x02\x00\x00\x00"
    meta_len = int.from_bytes(raw[140:144], "little")  # (0002,0000) UL, explicit VR little endian
    return raw[144 + meta_len:]


@pytest.mark.parametrize("syntax", [pydicom.uid.ExplicitVRBigEndian, pydicom.uid.ExplicitVRLittleEndian,
                                    pydicom.uid.ImplicitVRLittleEndian])
def test_file_without_meta_is_read_in_its_real_encoding(tmp_path, syntax):
    img = np.arange(300, 312).reshape(3, 4) * 37  # every value differs from its byte swap
    p = write_slice(tmp_path / "a.dcm", img, position=(1, 2, 3), transfer_syntax=syntax)
    (tmp_path / "raw").write_bytes(_strip_preamble_and_meta(p))
    rec = read_slice(tmp_path / "raw")
    assert rec.ok, rec.error
    np.testing.assert_array_equal(rec.image(), img)
    np.testing.assert_allclose(rec.position, [1, 2, 3])


# -- 5. skewed IOP ------------------------------------------------------------------------------
@pytest.mark.parametrize("skew", [1e-3, 0.02])
def test_skewed_orientation_is_orthonormalised_and_round_trips(tmp_path, skew, caplog):
    iop = (1.0, 0.0, 0.0, skew, 1.0, 0.0)  # column direction leans towards the row direction
    for k in range(3):
        write_slice(tmp_path / f"{k}.dcm", np.full((40, 40), k), position=(0, 0, 3.0 * k), orientation=iop,
                    instance_number=k + 1)
    warnings: list[str] = []
    with caplog.at_level(logging.WARNING):
        (v,) = read_series(tmp_path, warnings=warnings)
    assert abs(v.row_dir @ v.col_dir) < 1e-12
    zyx = np.array([[0.0, 0.0, 0.0], [1.0, 39.0, 39.0], [2.0, 20.0, 5.0]])
    np.testing.assert_allclose(v.to_voxel(v.to_world(zyx)), zyx, atol=1e-9)
    assert any("orthonormal" in w and "0.dcm" in w for w in warnings)
    assert "orthonormal" in caplog.text


def test_tiny_skew_is_silent_and_volume_orthonormalises_its_axes(tmp_path):
    write_slice(tmp_path / "0.dcm", np.ones((4, 4)), orientation=(1.0, 0.0, 0.0, 1e-6, 1.0, 0.0))
    warnings: list[str] = []
    read_series(tmp_path, warnings=warnings)
    assert not any("orthonormal" in w for w in warnings)
    v = Volume(np.zeros((1, 5, 5)), [[0, 0, 0]], [1, 0, 0], [0.02, 1, 0], (1, 1), [1])
    zyx = np.array([[0.0, 4.0, 4.0]])
    np.testing.assert_allclose(v.to_voxel(v.to_world(zyx)), zyx, atol=1e-9)


# -- 6. enhanced MR ------------------------------------------------------------------------------
def _item(**kw) -> Dataset:
    d = Dataset()
    for k, val in kw.items():
        setattr(d, k, val)
    return d


def _enhanced(path: Path, pixels: np.ndarray, ipp, iop, spacing, frames: int = 1, slope=2.0) -> Path:
    ds = pydicom.dcmread(write_slice(path, pixels[0] if pixels.ndim == 3 else pixels, position=None,
                                     orientation=None, pixel_spacing=None))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.EnhancedMRImageStorage
    ds.NumberOfFrames = frames
    shared = _item(
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=list(iop))]),
        PixelMeasuresSequence=Sequence([_item(PixelSpacing=list(spacing), SliceThickness=3.0)]),
        PixelValueTransformationSequence=Sequence([_item(RescaleSlope=slope, RescaleIntercept=-10.0,
                                                         RescaleType="US")]),
    )
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    n = np.cross(iop[:3], iop[3:])
    ds.PerFrameFunctionalGroupsSequence = Sequence([
        _item(PlanePositionSequence=Sequence([_item(ImagePositionPatient=list(np.asarray(ipp) + f * 3.0 * n))]))
        for f in range(frames)
    ])
    if frames > 1:
        arr = np.asarray(pixels, dtype=np.uint16)
        ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_enhanced_single_frame_geometry_comes_from_functional_groups(tmp_path):
    for k in range(3):  # a sagittal stack: IPP moves along the normal (-x)
        _enhanced(tmp_path / f"{k}.dcm", np.full((6, 5), 10 + k), ipp=(-4.0 * k, 0.0, 7.0), iop=SAG_IOP,
                  spacing=(0.8, 0.6))
    rec = read_slice(tmp_path / "1.dcm")
    assert rec.ok, rec.error
    np.testing.assert_allclose(rec.position, [-4.0, 0, 7.0])
    np.testing.assert_allclose(rec.orientation, SAG_IOP)
    assert rec.pixel_spacing == (0.8, 0.6) and rec.slice_thickness == 3.0
    np.testing.assert_allclose(rec.image(), 2.0 * 11 - 10.0)  # rescale from PixelValueTransformation
    warnings: list[str] = []
    (v,) = read_series(tmp_path, warnings=warnings)
    assert warnings == []
    assert v.spacing == (0.8, 0.6) and v.slice_spacing == pytest.approx(4.0)
    np.testing.assert_allclose(v.pixels[:, 0, 0], [2.0 * 10 - 10, 2.0 * 11 - 10, 2.0 * 12 - 10])  # n = -x: k ascends


def test_multi_frame_files_are_unsupported_not_broken(tmp_path):
    p = _enhanced(tmp_path / "mf.dcm", np.ones((2, 4, 4)), ipp=(0, 0, 0), iop=AX_IOP, spacing=(1, 1), frames=2)
    rec = read_slice(p)
    assert rec.error_kind == "unsupported" and "multi-frame" in rec.error


# -- 7. unreadable folders -------------------------------------------------------------------------
def _kaggle_root(root: Path) -> Path:
    img = root / "test_images"
    for series, (desc, iop) in {10: (SAG_T1, SAG_IOP), 11: (SAG_T2, SAG_IOP), 12: (AXIAL_T2, AX_IOP)}.items():
        n = np.cross(iop[:3], iop[3:])
        for k in range(3):
            write_slice(img / "1" / str(series) / f"{k + 1}.dcm", np.full((6, 6), k), position=tuple(4.0 * k * n),
                        orientation=iop, instance_number=k + 1, echo_time=10.0 if series == 10 else 100.0,
                        repetition_time=500.0 if series == 10 else 3000.0)
    write_slice(img / "2" / "20" / "1.dcm", np.ones((6, 6)), orientation=SAG_IOP)
    rows = ["study_id,series_id,series_description", f"1,10,{SAG_T1}", f"1,11,{SAG_T2}", f"1,12,{AXIAL_T2}",
            f"2,20,{SAG_T2}"]
    (root / "test_series_descriptions.csv").write_text("\n".join(rows) + "\n")
    return img


def _lock(monkeypatch, *locked: Path) -> None:
    """Make ``iterdir`` of these folders fail as on a folder without read permission (tests run as root)."""
    real = Path.iterdir
    locked_set = {str(p) for p in locked}

    def iterdir(self):
        if str(self) in locked_set:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)


def test_unreadable_series_folder_is_a_series_problem(tmp_path, monkeypatch):
    img = _kaggle_root(tmp_path)
    _lock(monkeypatch, img / "1" / "11")
    refs = discover_studies(tmp_path)
    assert [r.study_id for r in refs] == [1, 2]
    s11 = next(s for s in refs[0].series if s.series_id == 11)
    assert not s11.readable and "unreadable" in s11.problem and "Permission" in s11.problem
    study = load_study(refs[0], parallel="sequential")
    assert study.get(SAG_T1) and study.get(AXIAL_T2) and not study.get(SAG_T2)
    assert any("series 11" in w and "unreadable" in w for w in study.warnings)


def test_unreadable_study_folder_without_csv_does_not_stop_discovery(tmp_path, monkeypatch):
    img = _kaggle_root(tmp_path)
    (tmp_path / "test_series_descriptions.csv").unlink()
    _lock(monkeypatch, img / "2", img / "1" / "12")
    refs = discover_studies(tmp_path)
    assert [r.study_id for r in refs] == [1, 2]
    assert refs[1].series == [] and any("unreadable" in p for p in refs[1].problems)
    s12 = next(s for s in refs[0].series if s.series_id == 12)
    assert "unreadable" in s12.problem


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads every folder")
def test_unreadable_series_folder_for_real(tmp_path):
    img = _kaggle_root(tmp_path)
    locked = img / "1" / "11"
    locked.chmod(0)
    try:
        refs = discover_studies(tmp_path)
        assert "unreadable" in next(s for s in refs[0].series if s.series_id == 11).problem
    finally:
        locked.chmod(0o755)


# -- 8. warnings a user sees, naming the file ---------------------------------------------------------
def test_degenerate_orientation_is_a_warning_naming_the_file(tmp_path, caplog):
    for k in range(3):
        write_slice(tmp_path / f"{k}.dcm", np.ones((4, 4)), position=(0, 0, 2.0 * k), instance_number=k + 1,
                    orientation=(1, 0, 0, 1, 0, 0) if k == 1 else AX_IOP)
    warnings: list[str] = []
    with caplog.at_level(logging.WARNING):
        (v,) = read_series(tmp_path, warnings=warnings)
    assert v.shape[0] == 3
    text = " ".join(warnings)
    assert "degenerate" in text and "1.dcm" in text
    assert not any("lack ImageOrientationPatient" in w for w in warnings)  # the tag is there
    assert "degenerate" in caplog.text


def test_imager_pixel_spacing_fallback_is_a_warning(tmp_path):
    for k in range(2):
        write_slice(tmp_path / f"{k}.dcm", np.ones((4, 4)), position=(0, 0, 2.0 * k), orientation=AX_IOP,
                    pixel_spacing=None, instance_number=k + 1, extra={"ImagerPixelSpacing": [0.4, 0.4]})
    warnings: list[str] = []
    (v,) = read_series(tmp_path, warnings=warnings)
    assert v.spacing == (0.4, 0.4)
    assert any("ImagerPixelSpacing" in w and "0.dcm" in w for w in warnings)


def test_float_pixel_data_is_reported_as_unsupported(tmp_path):
    p = write_slice(tmp_path / "f.dcm", np.ones((4, 4)))
    ds = pydicom.dcmread(p)
    del ds.PixelData
    ds.BitsAllocated = 32
    ds.FloatPixelData = np.ones((4, 4), dtype=np.float32).tobytes()
    ds.save_as(p, enforce_file_format=True)
    rec = read_slice(p)
    assert rec.error_kind == "unsupported" and "float pixel data" in rec.error


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are a POSIX thing")
def test_odd_folder_entries_are_reported(tmp_path):
    for k in range(2):
        write_slice(tmp_path / f"{k}.dcm", np.ones((4, 4)), position=(0, 0, 2.0 * k), instance_number=k + 1)
    (tmp_path / "x.dcm").mkdir()
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    os.mkfifo(tmp_path / "pipe")
    warnings: list[str] = []
    (v,) = read_series(tmp_path, warnings=warnings)
    assert v.shape[0] == 2
    text = " ".join(warnings)
    for name in ("x.dcm", "loop", "pipe"):
        assert name in text, (name, warnings)


# -- 9. series typing by whole words ----------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("T1 SAG RELAX", SAG_T1), ("SAG T2 MAXFOV", SAG_T2), ("AX T2", AXIAL_T2), ("t2_tse_tra", AXIAL_T2),
    ("Axial T2 FSE", AXIAL_T2), ("SAG_STIR", SAG_T2), ("MAX IP", None), ("RELAX T2", None),
])
def test_series_type_from_text_matches_whole_words(text, expected):
    rec = dicom_mod.SliceRecord(path="x", series_description=text)
    assert infer_series_type([rec]) == expected


# -- 11. cost --------------------------------------------------------------------------------------------
def test_a_large_stray_file_is_not_read_whole(tmp_path):
    stray = tmp_path / "movie.dcm"
    stray.write_bytes(os.urandom(1 << 16) * 256)  # 16 MB, not DICOM
    tracemalloc.start()
    rec = read_slice(stray)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert rec.error_kind == "not_dicom"
    assert peak < 2 << 20, f"{peak / 2**20:.1f} MB traced to reject a stray file"


def test_load_study_does_not_hold_every_stored_slice(tmp_path):
    img = tmp_path / "test_images" / "1"
    rows = ["study_id,series_id,series_description"]
    for s, (desc, iop) in enumerate(((SAG_T1, SAG_IOP), (SAG_T2, SAG_IOP), (AXIAL_T2, AX_IOP))):
        n = np.cross(iop[:3], iop[3:])
        for k in range(12):
            write_slice(img / str(10 + s) / f"{k + 1}.dcm", np.full((128, 128), k + 1), position=tuple(4.0 * k * n),
                        orientation=iop, instance_number=k + 1)
        rows.append(f"1,{10 + s},{desc}")
    (tmp_path / "test_series_descriptions.csv").write_text("\n".join(rows) + "\n")
    (ref,) = discover_studies(tmp_path)
    load_study(ref, parallel="sequential")  # warm imports and caches
    tracemalloc.start()
    study = load_study(ref, parallel="sequential")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1.3 * study.nbytes(), f"peak {peak / study.nbytes():.2f}x the float32 study"


# -- 12. code: no mutation, traceability, one unit helper ---------------------------------------------
def test_build_stacks_leaves_its_records_alone(tmp_path):
    for k in range(3):
        write_slice(tmp_path / f"{k}.dcm", np.full((4, 4), k), instance_number=k + 1, pixel_spacing=None,
                    orientation=None if k == 0 else AX_IOP, position=None if k == 1 else (0, 0, 2.0 * k))
    records = decode_files(sorted(tmp_path.iterdir()), parallel="sequential")
    before = copy.deepcopy(records)
    w1: list[str] = []
    w2: list[str] = []
    a = build_stacks(records, warnings=w1)
    b = build_stacks(records, warnings=w2)
    assert w1 == w2 and w1
    np.testing.assert_array_equal(a[0].positions, b[0].positions)
    for r, o in zip(records, before):
        assert (r.orientation is None) == (o.orientation is None)
        assert (r.position is None) == (o.position is None)
        assert r.pixel_spacing == o.pixel_spacing


def test_volume_keeps_each_slices_file_and_sop_instance_uid(tmp_path):
    for k in (2, 0, 1):
        write_slice(tmp_path / f"s{k}.dcm", np.full((4, 4), k), position=(0, 0, 3.0 * k), orientation=AX_IOP,
                    instance_number=k + 1)
    (v,) = read_series(tmp_path)
    assert [Path(f).name for f in v.files] == ["s0.dcm", "s1.dcm", "s2.dcm"]
    uids = [str(pydicom.dcmread(tmp_path / f"s{k}.dcm", stop_before_pixels=True).SOPInstanceUID) for k in range(3)]
    assert list(v.sop_instance_uids) == uids


def test_one_unit_helper_raises_on_a_zero_direction():
    vol = Volume(np.zeros((1, 3, 3)), [[0, 0, 0]], [1, 0, 0], [0, 1, 0], (1, 1), [1])
    with pytest.raises(ValueError, match="degenerate"):
        geometry.sample_plane(vol, [0, 0, 0], [0, 0, 0], [0, 1, 0], (2, 2), (1, 1))


def test_geometry_keeps_no_thin_wrappers_of_volume_methods():
    for name in ("project", "covers", "nearest_slice"):
        assert not hasattr(geometry, name), name


def test_training_cache_keeps_native_offsets_and_sources(tmp_path):
    from rsna_infer.io import Study
    from rsna_infer.train.cache import load_cached_study, save_study

    for k in (0, 1, 3):
        write_slice(tmp_path / "s" / f"{k}.dcm", _ramp(10, 10, k=k), position=(0, 0, 2.0 * k), orientation=AX_IOP,
                    instance_number=k + 1)
    write_slice(tmp_path / "s" / "2.dcm", _ramp(14, 14, y0=-2, x0=-2, k=2), position=(-2, -2, 4.0),
                orientation=AX_IOP, instance_number=3)
    (v,) = read_series(tmp_path / "s", description=AXIAL_T2)
    back = load_cached_study(save_study(Study(1, {AXIAL_T2: [v]}), tmp_path / "c.npz")).first(AXIAL_T2)
    np.testing.assert_array_equal(back.native_offset, v.native_offset)
    np.testing.assert_allclose(back.pixel_to_voxel(2, 7.0, 3.0), v.pixel_to_voxel(2, 7.0, 3.0))
    assert back.files == v.files and back.sop_instance_uids == v.sop_instance_uids


def test_a_huge_file_gets_a_header_only_parse_first(tmp_path, monkeypatch):
    mf = _enhanced(tmp_path / "mf.dcm", np.ones((2, 4, 4)), ipp=(0, 0, 0), iop=AX_IOP, spacing=(1, 1), frames=2)
    ok = write_slice(tmp_path / "ok.dcm", np.full((4, 4), 3))
    monkeypatch.setattr(dicom_mod, "HEADER_FIRST_BYTES", 0)  # every file counts as huge
    calls: list[bool] = []
    real = dicom_mod.parse_dicom

    def spy(path, *, stop_before_pixels):
        calls.append(stop_before_pixels)
        return real(path, stop_before_pixels=stop_before_pixels)

    monkeypatch.setattr(dicom_mod, "parse_dicom", spy)
    rec = read_slice(mf)
    assert rec.error_kind == "unsupported" and calls == [True]  # rejected without reading the pixels
    calls.clear()
    rec = read_slice(ok)
    assert rec.ok and calls == [True, False] and rec.notes == []
    np.testing.assert_array_equal(rec.image(), 3)
