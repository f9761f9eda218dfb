"""DICOM reading: transfer syntaxes, stacks, odd files, discovery and whole studies."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from rsna_infer.constants import AXIAL_T2, SAG_T1, SAG_T2
from rsna_infer.geometry import plane_of
from rsna_infer.io import (
    MissingDecoderError,
    Volume,
    decode_files,
    discover_studies,
    infer_series_type,
    infer_series_type_from_folder,
    load_study,
    make_executor,
    read_series,
    read_slice,
    write_slice,
    write_volume,
)
from rsna_infer.io import dicom as dicom_mod

MR_VARIANTS = [
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
]
SAG_IOP = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AX_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _volume(offsets, shape=(8, 6), iop=SAG_IOP, origin=(5.0, -30.0, 40.0), spacing=(0.8, 0.6), seed=0) -> Volume:
    r, c = np.array(iop[:3]), np.array(iop[3:])
    n = np.cross(r, c)
    rng = np.random.default_rng(seed)
    z = len(offsets)
    return Volume(
        pixels=rng.integers(0, 2000, size=(z, *shape)).astype(np.float32),
        positions=np.array([np.array(origin) + o * n for o in offsets]),
        row_dir=r,
        col_dir=c,
        spacing=spacing,
        instance_numbers=np.arange(1, z + 1),
        series_id=11,
    )


def _assert_same_geometry(a: Volume, b: Volume) -> None:
    np.testing.assert_allclose(a.positions, b.positions, atol=1e-6)
    np.testing.assert_allclose(a.row_dir, b.row_dir, atol=1e-9)
    np.testing.assert_allclose(a.col_dir, b.col_dir, atol=1e-9)
    np.testing.assert_allclose(a.spacing, b.spacing)


def _needs_decoder(name: str) -> str:
    """The test file's path; the test is skipped when its transfer syntax has no decoder here
    (the JPEG-LS / JPEG 2000 plugins come with the optional ``[dicom]`` extra)."""
    path = get_testdata_file(name)
    problem = dicom_mod.decoder_problem(str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID))
    if problem is not None:
        pytest.skip(problem)
    return path


# -- single files -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", MR_VARIANTS)
def test_all_mr_small_transfer_syntaxes_decode_to_the_same_pixels(name):
    ref = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.float32)
    rec = read_slice(_needs_decoder(name))
    assert rec.ok, (name, rec.error)
    np.testing.assert_array_equal(rec.image(), ref, err_msg=name)
    np.testing.assert_allclose(rec.position, [-83.9063, -91.2, 6.6406])
    assert rec.pixel_spacing == (0.3125, 0.3125)


def test_mr_small_reads_as_a_one_slice_axial_volume(tmp_path):
    shutil.copy(_needs_decoder("MR_small_jpeg_ls_lossless.dcm"), tmp_path / ".a")  # hidden names are read too
    (vol,) = read_series(tmp_path, series_id=5, description=AXIAL_T2)
    assert vol.shape == (1, 64, 64) and vol.series_id == 5 and vol.description == AXIAL_T2
    np.testing.assert_allclose(vol.normal, [0, 0, 1])


@pytest.mark.parametrize("ts", [
    pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.ExplicitVRBigEndian,
    pydicom.uid.DeflatedExplicitVRLittleEndian, pydicom.uid.RLELossless,
])
def test_written_transfer_syntaxes_round_trip_with_rescale(tmp_path, ts):
    img = np.random.default_rng(1).integers(0, 4000, size=(9, 7))
    p = write_slice(tmp_path / "x.dcm", img, rescale=(0.5, -100.0), transfer_syntax=ts)
    rec = read_slice(p)
    assert rec.ok, rec.error
    np.testing.assert_allclose(rec.image(), img * 0.5 - 100.0)
    np.testing.assert_array_equal(pydicom.dcmread(p).pixel_array, img)  # same as pydicom's own decoder


def test_file_without_preamble_or_meta_is_still_read(tmp_path):
    p = write_slice(tmp_path / "a.dcm", np.arange(12).reshape(3, 4), position=(1, 2, 3))
    ds = pydicom.dcmread(p)
    ds.preamble = None
    del ds.file_meta
    ds.save_as(tmp_path / "raw", implicit_vr=True, little_endian=True)  # bare dataset, as old PACS write
    rec = read_slice(tmp_path / "raw")
    assert rec.ok, rec.error
    np.testing.assert_array_equal(rec.image(), np.arange(12).reshape(3, 4))
    np.testing.assert_allclose(rec.position, [1, 2, 3])


def test_degenerate_orientation_is_treated_as_missing(tmp_path):
    p = write_slice(tmp_path / "a.dcm", np.ones((2, 2)), orientation=(1, 0, 0, 1, 0, 0))
    rec = read_slice(p)
    assert rec.ok and rec.orientation is None


def test_header_only_read_skips_pixels():
    rec = read_slice(get_testdata_file("MR_small.dcm"), pixels=False)
    assert rec.ok and rec.pixels is None and rec.rows == 64 and rec.orientation is not None


def test_missing_decoder_names_the_package_to_install(tmp_path, monkeypatch):
    shutil.copy(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), tmp_path / "1.dcm")
    shutil.copy(get_testdata_file("MR_small_jp2klossless.dcm"), tmp_path / "2.dcm")

    class Unavailable:
        is_available = False

    monkeypatch.setattr("pydicom.pixels.get_decoder", lambda uid: Unavailable())
    rec = read_slice(tmp_path / "1.dcm")
    assert rec.error_kind == "decoder" and "pip install pylibjpeg" in rec.error
    with pytest.raises(MissingDecoderError, match="pylibjpeg-libjpeg"):
        read_series(tmp_path)


# -- stacks -----------------------------------------------------------------------------------
def test_series_round_trip_with_shuffled_oddly_named_files(tmp_path):
    vol = _volume([0.0, 3.5, 7.0, 10.5, 14.0])
    names = ["IMG-0003", "zz.dcm", "1.2.840.5", "slice 10.DCM", "a"]  # no order, no extension
    write_volume(tmp_path, vol, names=names)
    (back,) = read_series(tmp_path, series_id=11)
    _assert_same_geometry(back, vol)
    np.testing.assert_array_equal(back.pixels, vol.pixels)
    np.testing.assert_array_equal(back.instance_numbers, vol.instance_numbers)
    assert back.slice_spacing == pytest.approx(3.5)


def test_sorted_by_position_not_by_instance_number(tmp_path):
    vol = _volume([0.0, 4.0, 8.0, 12.0])
    vol.instance_numbers = np.array([40, 30, 20, 10])  # descending, as some scanners write
    write_volume(tmp_path, vol)
    (back,) = read_series(tmp_path)
    np.testing.assert_array_equal(back.instance_numbers, [40, 30, 20, 10])
    np.testing.assert_array_equal(back.pixels, vol.pixels)
    assert np.all(np.diff(back.slice_offsets) > 0)


def test_oblique_unevenly_spaced_stack(tmp_path):
    t = np.radians(17.0)
    iop = (1.0, 0.0, 0.0, 0.0, np.cos(t), -np.sin(t))
    vol = _volume([0.0, 2.0, 2.5, 9.0, 30.0], iop=iop)
    write_volume(tmp_path, vol)
    (back,) = read_series(tmp_path)
    _assert_same_geometry(back, vol)
    zyx = np.array([[1.5, 3.25, 2.0], [3.7, 0.0, 5.0]])
    np.testing.assert_allclose(back.to_world(zyx), vol.to_world(zyx), atol=1e-5)


def test_two_stacks_in_one_series_largest_first(tmp_path):
    sag = _volume([0.0, 4.0, 8.0], seed=1)
    ax = _volume([0.0, 3.0, 6.0, 9.0, 12.0], iop=AX_IOP, shape=(6, 6), seed=2)
    uid = pydicom.uid.generate_uid()
    write_volume(tmp_path, sag, names=[f"s{i}.dcm" for i in range(3)], series_instance_uid=uid)
    ax.instance_numbers = ax.instance_numbers + 100
    write_volume(tmp_path, ax, names=[f"a{i}.dcm" for i in range(5)], series_instance_uid=uid)
    vols = read_series(tmp_path, series_id=3)
    assert [v.shape[0] for v in vols] == [5, 3]
    assert [v.stack_index for v in vols] == [0, 1]
    np.testing.assert_allclose(vols[0].normal, [0, 0, 1])
    np.testing.assert_allclose(vols[1].normal, [-1, 0, 0])
    np.testing.assert_array_equal(vols[0].pixels, ax.pixels)


def test_duplicate_positions_are_dropped_and_logged(tmp_path, caplog):
    vol = _volume([0.0, 4.0, 8.0])
    write_volume(tmp_path, vol)
    write_slice(tmp_path / "dup.dcm", np.zeros((8, 6)), position=vol.positions[1], orientation=SAG_IOP,
                pixel_spacing=vol.spacing, instance_number=99)
    warnings: list[str] = []
    with caplog.at_level(logging.WARNING):
        (back,) = read_series(tmp_path, warnings=warnings)
    assert back.shape[0] == 3
    np.testing.assert_array_equal(back.pixels, vol.pixels)  # the lower instance number is kept
    assert any("duplicate" in w and "dup.dcm" in w for w in warnings)
    assert "duplicate" in caplog.text


def test_broken_and_foreign_files_are_skipped_with_their_names(tmp_path):
    vol = _volume([0.0, 4.0, 8.0])
    write_volume(tmp_path, vol)
    (tmp_path / "notes.txt").write_text("not an image\n")
    good = (tmp_path / "2.dcm").read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(good[: len(good) // 2])
    (tmp_path / "header_only.dcm").write_bytes(good[:200])
    (tmp_path / "short_pixels.dcm").write_bytes(good[:-10])  # header intact, pixel data cut
    (tmp_path / "._2.dcm").write_bytes(b"\0\5\26\7" + bytes(100))  # macOS resource fork
    warnings: list[str] = []
    (back,) = read_series(tmp_path, warnings=warnings)
    np.testing.assert_array_equal(back.pixels, vol.pixels)
    text = " ".join(warnings)
    for name in ("notes.txt", "truncated.dcm", "header_only.dcm", "short_pixels.dcm", "._2.dcm"):
        assert name in text


def test_empty_and_missing_folders_give_no_volumes(tmp_path):
    warnings: list[str] = []
    assert read_series(tmp_path, warnings=warnings) == []
    assert read_series(tmp_path / "nope", warnings=warnings) == []
    assert len(warnings) == 2


def test_folder_of_only_text_files_gives_no_volumes(tmp_path):
    (tmp_path / "1.dcm").write_text("hello")
    warnings: list[str] = []
    assert read_series(tmp_path, warnings=warnings) == []
    assert any("1.dcm" in w for w in warnings)


def test_monochrome1_is_inverted(tmp_path):
    img = np.array([[0, 100], [300, 1000]])
    write_slice(tmp_path / "1.dcm", img, monochrome1=True, position=(0, 0, 0))
    write_slice(tmp_path / "2.dcm", img * 2, monochrome1=True, position=(0, 0, 1), instance_number=2)
    (v,) = read_series(tmp_path)
    # stack range [0, 2000]: x -> 2000 - x
    np.testing.assert_allclose(v.pixels[0], 2000 - img)
    np.testing.assert_allclose(v.pixels[1], 2000 - 2 * img)


def test_mixed_slice_sizes_are_resampled_with_exact_geometry(tmp_path):
    # slices 0, 1, 3 are 8x6 at 1.0 mm; slice 2 is 16x12 at 0.5 mm (same field of view)
    yy, xx = np.mgrid[0:8, 0:6]
    field = lambda y_mm, x_mm: 10 * y_mm + 3 * x_mm + 100
    for i in (0, 1, 3):
        write_slice(tmp_path / f"{i}.dcm", field(yy * 1.0, xx * 1.0) + i, position=(0, 0, 2.0 * i),
                    orientation=AX_IOP, pixel_spacing=(1.0, 1.0), instance_number=i + 1)
    y2, x2 = np.mgrid[0:16, 0:12]
    write_slice(tmp_path / "2.dcm", field(y2 * 0.5, x2 * 0.5) + 2, position=(0, 0, 4.0),
                orientation=AX_IOP, pixel_spacing=(0.5, 0.5), instance_number=3)
    warnings: list[str] = []
    (v,) = read_series(tmp_path, warnings=warnings)
    assert v.shape == (4, 8, 6) and v.spacing == (1.0, 1.0)
    np.testing.assert_allclose(v.pixels[2], field(yy, xx) + 2, atol=1e-3)
    assert any("resampled" in w for w in warnings)
    # a label on the 0.5 mm instance (its own pixels) lands on the same patient point
    np.testing.assert_allclose(v.native_spacing, [[1, 1], [1, 1], [0.5, 0.5], [1, 1]])
    zyx = v.pixel_to_voxel(2, x=5.0, y=7.0)
    np.testing.assert_allclose(zyx, [2, 3.5, 2.5])
    np.testing.assert_allclose(v.to_world(zyx), [2.5, 3.5, 4.0])
    np.testing.assert_allclose(v.pixel_to_voxel(1, x=5.0, y=7.0), [1, 7, 5])


def test_stack_on_one_grid_has_no_native_spacing(tmp_path):
    write_volume(tmp_path, _volume([0.0, 3.0, 6.0]))
    (v,) = read_series(tmp_path)
    assert v.native_spacing is None
    np.testing.assert_allclose(v.pixel_to_voxel([0, 2], x=[1.5, 2.0], y=[3.0, 0.5]), [[0, 3.0, 1.5], [2, 0.5, 2.0]])


def test_smaller_field_of_view_is_padded_with_zero(tmp_path):
    for i in range(3):
        write_slice(tmp_path / f"{i}.dcm", np.full((6, 6), 50), position=(0, 0, i), orientation=AX_IOP,
                    pixel_spacing=(1.0, 1.0), instance_number=i + 1)
    write_slice(tmp_path / "3.dcm", np.full((3, 3), 70), position=(0, 0, 3), orientation=AX_IOP,
                pixel_spacing=(1.0, 1.0), instance_number=4)
    (v,) = read_series(tmp_path)
    assert v.shape == (4, 6, 6)
    np.testing.assert_allclose(v.pixels[3, :3, :3], 70)
    np.testing.assert_allclose(v.pixels[3, 4:, :], 0)


def test_missing_optional_tags_fall_back_without_crashing(tmp_path):
    # no PixelSpacing anywhere, one slice without IOP, one without IPP
    for i in range(4):
        write_slice(tmp_path / f"{i}.dcm", np.full((4, 4), i), position=None if i == 2 else (0, 0, 3.0 * i),
                    orientation=None if i == 1 else AX_IOP, pixel_spacing=None, instance_number=i + 1)
    warnings: list[str] = []
    (v,) = read_series(tmp_path, warnings=warnings)
    assert v.shape[0] == 4 and v.spacing == (1.0, 1.0)
    np.testing.assert_allclose(v.positions[:, 2], [0, 3, 6, 9])  # slice 2 placed from InstanceNumber
    np.testing.assert_allclose(v.pixels[:, 0, 0], [0, 1, 2, 3])
    text = " ".join(warnings)
    assert "ImageOrientationPatient" in text and "ImagePositionPatient" in text and "PixelSpacing" in text


def test_no_positions_at_all_gives_a_synthetic_stack_by_instance_number(tmp_path):
    for i, inst in enumerate([3, 1, 2]):
        write_slice(tmp_path / f"f{i}.dcm", np.full((4, 4), inst), position=None, orientation=SAG_IOP,
                    instance_number=inst, slice_thickness=4.0)
    warnings: list[str] = []
    (v,) = read_series(tmp_path, warnings=warnings)
    np.testing.assert_array_equal(v.instance_numbers, [1, 2, 3])
    np.testing.assert_allclose(v.pixels[:, 0, 0], [1, 2, 3])
    assert v.slice_spacing == pytest.approx(4.0)
    assert any("synthetic" in w for w in warnings)


def test_thread_process_and_sequential_decoding_agree(tmp_path):
    write_volume(tmp_path, _volume([0.0, 4.0, 8.0, 12.0]))
    (tmp_path / "junk.txt").write_text("x")
    files = sorted(tmp_path.iterdir())
    seq = decode_files(files, parallel="sequential")
    thr = decode_files(files, parallel="thread", workers=2)
    with make_executor("process", 2) as pool:
        prc = decode_files(files, executor=pool)
    for a, b, c in zip(seq, thr, prc):
        assert a.path == b.path == c.path and a.ok == b.ok == c.ok
        if a.ok:
            np.testing.assert_array_equal(a.image(), b.image())
            np.testing.assert_array_equal(a.image(), c.image())
    with pytest.raises(ValueError, match="parallel"):
        decode_files(files, parallel="gpu")


# -- type inference ---------------------------------------------------------------------------
def _header(iop, **kw) -> dicom_mod.SliceRecord:
    return dicom_mod.SliceRecord(path="x", orientation=np.array(iop, dtype=float), **kw)


@pytest.mark.parametrize("iop, kw, expected", [
    (AX_IOP, {}, AXIAL_T2),
    (SAG_IOP, {"series_description": "SAG T1 FSE"}, SAG_T1),
    (SAG_IOP, {"series_description": "Sag STIR"}, SAG_T2),
    (SAG_IOP, {"series_description": "t2_tse_sag"}, SAG_T2),
    (SAG_IOP, {"echo_time": 9.0, "repetition_time": 550.0}, SAG_T1),
    (SAG_IOP, {"echo_time": 110.0, "repetition_time": 3500.0}, SAG_T2),
    (SAG_IOP, {"echo_time": 40.0, "repetition_time": 4000.0, "inversion_time": 160.0}, SAG_T2),  # STIR
    (SAG_IOP, {"echo_time": 10.0, "repetition_time": 2200.0, "inversion_time": 850.0}, SAG_T1),  # T1-FLAIR
    ((1.0, 0.0, 0.0, 0.0, 0.0, -1.0), {}, None),  # coronal
    (SAG_IOP, {}, None),  # sagittal, weighting unknown
])
def test_series_type_from_headers(iop, kw, expected):
    assert infer_series_type([_header(iop, **kw)]) == expected


def test_series_type_from_a_written_folder(tmp_path):
    write_volume(tmp_path, _volume([0.0, 4.0]), echo_time=12.0, repetition_time=600.0)
    assert infer_series_type_from_folder(tmp_path) == SAG_T1


# -- discovery and whole studies --------------------------------------------------------------
def _make_root(root: Path) -> None:
    """Study 1: three series + an extra folder; study 2: axial missing, T1 empty; study 3: no folder."""
    img = root / "test_images"
    write_volume(img / "1" / "10", _volume([0.0, 4.0, 8.0], seed=1), echo_time=10.0, repetition_time=500.0)
    write_volume(img / "1" / "11", _volume([0.0, 3.0, 6.0, 9.0], seed=2), echo_time=100.0, repetition_time=3000.0)
    write_volume(img / "1" / "12", _volume([0.0, 4.0], iop=AX_IOP, seed=3))
    write_volume(img / "1" / "12", _volume([0.0, 4.0, 8.0], iop=(1.0, 0, 0, 0, 0.95, -0.31225), seed=4),
                 names=["b1.dcm", "b2.dcm", "b3.dcm"])
    write_volume(img / "1" / "99", _volume([0.0, 4.0], iop=AX_IOP, seed=5))  # not in the CSV
    write_volume(img / "2" / "21", _volume([0.0, 4.0], seed=6))
    (img / "2" / "20").mkdir(parents=True)
    rows = [(1, 10, SAG_T1), (1, 11, SAG_T2), (1, 12, AXIAL_T2), (2, 20, SAG_T1), (2, 21, SAG_T2),
            (2, 22, AXIAL_T2), (3, 30, SAG_T2)]
    lines = ["study_id,series_id,series_description"] + [f"{a},{b},{c}" for a, b, c in rows]
    (root / "test_series_descriptions.csv").write_text("\n".join(lines) + "\n")


def test_discovery_records_missing_series_and_ignores_extra_folders(tmp_path):
    _make_root(tmp_path)
    refs = discover_studies(tmp_path)
    assert [r.study_id for r in refs] == [1, 2, 3]
    s1, s2, s3 = refs
    assert [s.series_id for s in s1.series] == [10, 11, 12]  # 99 ignored
    assert s1.problems == []
    by_id = {s.series_id: s for s in s2.series}
    assert by_id[20].problem == "empty folder" and by_id[22].problem == "missing folder"
    assert by_id[21].readable and by_id[21].n_files == 2
    assert s3.path is None and s3.series[0].problem == "missing folder"
    assert set(s3.problems) == {"series 30 (Sagittal T2/STIR): missing folder", "no Sagittal T1 series",
                                "no Sagittal T2/STIR series", "no Axial T2 series"}


def test_discovery_without_csv_infers_types_from_headers(tmp_path):
    _make_root(tmp_path)
    (tmp_path / "test_series_descriptions.csv").unlink()
    (tmp_path / "test_images" / "notes").mkdir()
    refs = discover_studies(tmp_path)
    assert [r.study_id for r in refs] == [1, 2]
    types = {s.series_id: s.description for s in refs[0].series}
    assert types == {10: SAG_T1, 11: SAG_T2, 12: AXIAL_T2, 99: AXIAL_T2}


def test_discovery_of_a_root_without_images_fails_with_a_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match="test_images"):
        discover_studies(tmp_path / "missing")


def test_no_studies_is_explained_with_the_paths_looked_at(tmp_path):
    from rsna_infer.io import describe_no_studies

    _make_root(tmp_path)
    assert discover_studies(tmp_path, split="train") == []
    msg = describe_no_studies(tmp_path, split="train")
    assert f"{tmp_path / 'train_series_descriptions.csv'} (missing)" in msg and f"{tmp_path / 'train_images'}/ (missing)" in msg
    assert "pass --split test" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "pass the competition folder that holds test_images/" in describe_no_studies(empty)
    assert "does not exist" in describe_no_studies(tmp_path / "nowhere")
    (empty / "test_series_descriptions.csv").write_text("study_id,series_id,series_description\n")
    assert discover_studies(empty) == [] and "(lists no studies)" in describe_no_studies(empty)


@pytest.mark.parametrize("content, match", [
    (b"\xff\xfe\x00garbage\x00\xff", "not a readable series CSV"),
    (b"study_id,series_id,series_description\n1,abc,Axial T2\n", "must be integers"),
    (b"", "not a readable series CSV"),
])
def test_a_broken_series_csv_names_the_file(tmp_path, content, match):
    (tmp_path / "test_series_descriptions.csv").write_bytes(content)
    with pytest.raises(ValueError, match=match) as e:
        discover_studies(tmp_path)
    assert str(tmp_path / "test_series_descriptions.csv") in str(e.value)


def test_folders_the_csv_does_not_list_are_counted_in_the_log(tmp_path, caplog):
    import logging

    _make_root(tmp_path)
    write_volume(tmp_path / "test_images" / "777" / "1", _volume([0.0, 4.0], seed=9))
    with caplog.at_level(logging.INFO, logger="rsna_infer.io.discovery"):
        discover_studies(tmp_path)
    by_level = {r.levelname: r.getMessage() for r in caplog.records if "not listed" in r.getMessage()}
    assert "1 study folder(s)" in by_level["WARNING"] and "777" in by_level["WARNING"]
    assert "1 series folder(s)" in by_level["INFO"] and "1/99" in by_level["INFO"]


def test_load_study_fills_volumes_by_type_and_warnings(tmp_path):
    _make_root(tmp_path)
    s1, s2, s3 = discover_studies(tmp_path)
    study = load_study(s1, workers=2)
    assert study.study_id == 1 and study.warnings == []
    assert [v.series_id for v in study.get(SAG_T1)] == [10]
    assert study.first(SAG_T2).shape[0] == 4 and study.first(SAG_T2).description == SAG_T2
    axial = study.get(AXIAL_T2)
    assert [(v.series_id, v.stack_index, v.shape[0]) for v in axial] == [(12, 0, 3), (12, 1, 2)]
    study2 = load_study(s2, parallel="sequential")
    assert SAG_T2 in study2.volumes and not study2.get(SAG_T1) and not study2.get(AXIAL_T2)
    assert any("empty folder" in w for w in study2.warnings)
    assert any("missing folder" in w for w in study2.warnings)
    study3 = load_study(s3)
    assert study3.volumes == {} and any("folder missing" in w for w in study3.warnings)


def test_load_study_survives_a_series_without_decoder(tmp_path, monkeypatch):
    _make_root(tmp_path)
    ref = discover_studies(tmp_path)[0]
    jpeg_dir = tmp_path / "test_images" / "1" / "10"
    for p in jpeg_dir.iterdir():
        p.unlink()
    shutil.copy(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), jpeg_dir / "1.dcm")
    real = dicom_mod.decoder_problem
    monkeypatch.setattr(dicom_mod, "decoder_problem",
                        lambda ts: "no decoder; pip install pylibjpeg" if ts and "4.80" in ts else real(ts))
    study = load_study(ref, parallel="sequential")
    assert not study.get(SAG_T1) and study.get(SAG_T2)
    assert any("pip install pylibjpeg" in w for w in study.warnings)
    assert any("no Sagittal T1 volume" in w for w in study.warnings)


def test_load_study_types_an_unknown_description_from_headers(tmp_path):
    _make_root(tmp_path)
    csv = tmp_path / "test_series_descriptions.csv"
    csv.write_text(csv.read_text().replace("1,10,Sagittal T1", "1,10,SAG T1 localiser"))
    study = load_study(discover_studies(tmp_path)[0], parallel="sequential")
    assert [v.series_id for v in study.get(SAG_T1)] == [10]
    assert any("not a known type" in w for w in study.warnings)


def test_load_study_turns_an_unexpected_stacking_error_into_a_warning(tmp_path, monkeypatch):
    _make_root(tmp_path)
    ref = discover_studies(tmp_path)[0]

    def boom(records, **kw):
        if kw["series_id"] == 11:
            raise ValueError("weird data")
        return real(records, **kw)

    import rsna_infer.io.series as series_mod

    real = series_mod.build_stacks
    monkeypatch.setattr(series_mod, "build_stacks", boom)
    study = load_study(ref, parallel="sequential")
    assert study.get(SAG_T1) and study.get(AXIAL_T2) and not study.get(SAG_T2)
    assert any("weird data" in w for w in study.warnings)


def test_csv_rows_without_ids_are_skipped(tmp_path):
    _make_root(tmp_path)
    csv = tmp_path / "test_series_descriptions.csv"
    csv.write_text(csv.read_text() + "4,,Sagittal T1\n")
    assert [r.study_id for r in discover_studies(tmp_path)] == [1, 2, 3]


def test_load_study_ranks_in_plane_stacks_first_and_flags_a_mislabelled_series(tmp_path):
    _make_root(tmp_path)
    img = tmp_path / "test_images" / "1"
    # a large axial "localiser" stack inside the sagittal T2 series: the sagittal stack stays first
    write_volume(img / "11", _volume(np.arange(8) * 3.0, iop=AX_IOP, seed=9), names=[f"ax{i}" for i in range(8)])
    # the T1 series holds only an axial stack: kept, but flagged
    for p in (img / "10").iterdir():
        p.unlink()
    write_volume(img / "10", _volume([0.0, 4.0], iop=AX_IOP, seed=10))
    study = load_study(discover_studies(tmp_path)[0], parallel="sequential")
    t2 = study.get(SAG_T2)
    assert [v.shape[0] for v in t2] == [4, 8] and plane_of(t2[0].normal) == "sagittal"
    assert study.first(SAG_T1) is not None
    assert any("no sagittal stack in a Sagittal T1 series" in w for w in study.warnings)


@pytest.mark.parametrize("enhanced, bare, ts", [
    (True, False, pydicom.uid.ExplicitVRLittleEndian),
    (False, True, pydicom.uid.ExplicitVRBigEndian),
    (True, True, pydicom.uid.ImplicitVRLittleEndian),
])
def test_writer_round_trips_enhanced_and_bare_files(tmp_path, enhanced, bare, ts):
    img = np.arange(20).reshape(4, 5) * 131
    p = write_slice(tmp_path / "a.dcm", img, position=(1, 2, 3), orientation=SAG_IOP, pixel_spacing=(0.5, 0.7),
                    rescale=(2.0, -5.0), echo_time=90.0, repetition_time=3000.0, transfer_syntax=ts,
                    enhanced=enhanced, bare=bare)
    assert (p.read_bytes()[128:132] == b"DICM") != bare
    ds = pydicom.dcmread(p, force=True)
    assert ("PerFrameFunctionalGroupsSequence" in ds) == enhanced and ("ImagePositionPatient" in ds) != enhanced
    rec = read_slice(p)
    assert rec.ok, rec.error
    np.testing.assert_allclose(rec.image(), img * 2.0 - 5.0)
    np.testing.assert_allclose(rec.position, [1, 2, 3])
    np.testing.assert_allclose(rec.orientation, SAG_IOP)
    assert rec.pixel_spacing == (0.5, 0.7) and rec.echo_time == 90.0 and rec.repetition_time == 3000.0
