"""A study stored another way that keeps the patient geometry is graded identically.

The same phantom study is re-stored file by file with pydicom (no rsna_infer code): every
third slice zero-padded by 16 px with its IPP moved to the new corner; the in-plane axes in
another scanner convention (rows / columns mirrored, transposed, IPP at the new first pixel);
other file names. The packaged demo weights must give the same probabilities for all of
them: the data layer hands the models the same patient grid whatever the storage.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

import rsna_infer
from rsna_infer.synth import make_dataset

#: |Δp| allowed between two storages of one study (float32 resampling and summation order).
PROB_TOL = 2e-4

Transform = Callable[[pydicom.Dataset, int], pydicom.Dataset]


def _ds_values(values) -> list[str]:
    return [f"{float(v):.10g}"[:16] for v in values]


def _geometry(ds: pydicom.Dataset):
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    return (np.array([float(v) for v in ds.ImagePositionPatient]), iop[:3], iop[3:],
            *(float(v) for v in ds.PixelSpacing))


def _set_pixels(ds: pydicom.Dataset, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr.astype(ds.pixel_array.dtype))
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = arr.tobytes()


def pad_every_third(ds: pydicom.Dataset, k: int, pad: int = 16) -> pydicom.Dataset:
    """Slices with InstanceNumber % 3 == 0 get a ``pad``-pixel zero frame; IPP moves to the new corner."""
    if int(ds.InstanceNumber) % 3:
        return ds
    ipp, r, c, dr, dc = _geometry(ds)
    _set_pixels(ds, np.pad(ds.pixel_array, pad))
    ds.ImagePositionPatient = _ds_values(ipp - pad * dc * r - pad * dr * c)
    return ds


def other_convention(ds: pydicom.Dataset, k: int) -> pydicom.Dataset:
    """Columns and rows mirrored and the axes swapped (a transposed, rotated storage)."""
    ipp, r, c, dr, dc = _geometry(ds)
    img = ds.pixel_array
    h, w = img.shape
    ipp = ipp + (w - 1) * dc * r + (h - 1) * dr * c  # the old last pixel is the new first
    r, c = -r, -c
    img = img[::-1, ::-1].T  # new (row, col) = old (col, row), both mirrored
    r, c, dr, dc = c, r, dc, dr
    _set_pixels(ds, img)
    ds.ImagePositionPatient = _ds_values(ipp)
    ds.ImageOrientationPatient = _ds_values([*r, *c])
    ds.PixelSpacing = _ds_values([dr, dc])
    return ds


def mirrored_columns(ds: pydicom.Dataset, k: int) -> pydicom.Dataset:
    """Only the columns mirrored: the slice normal turns round, so the slice order reverses."""
    ipp, r, c, dr, dc = _geometry(ds)
    img = ds.pixel_array
    ipp = ipp + (img.shape[1] - 1) * dc * r
    _set_pixels(ds, img[:, ::-1])
    ds.ImagePositionPatient = _ds_values(ipp)
    ds.ImageOrientationPatient = _ds_values([*(-r), *c])
    return ds


def restore(src: Path, dst: Path, transform: Transform | None, rename: bool = False) -> Path:
    """A copy of the Kaggle root ``src`` with every DICOM rewritten by ``transform``."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.dcm"))
    for series in sorted((src / "test_images").glob("*/*")):
        files = sorted(series.glob("*.dcm"))
        order = np.random.default_rng(0).permutation(len(files))
        for k, f in enumerate(files):
            ds = pydicom.dcmread(f)
            if transform is not None:
                ds = transform(ds, k)
            name = f"IM_{order[k]:04d}" if rename else f.name  # names mean nothing
            ds.save_as(dst / f.relative_to(src).parent / name, enforce_file_format=True)
    return dst


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("orig"), 1, split="test", seed=4242, image_size=(64, 80)).root


def _probabilities(root: Path, out: Path) -> pd.DataFrame:
    df = rsna_infer.predict(root, out_csv=out / "submission.csv", device="cpu", num_workers=0, progress=False)
    return df.sort_values("row_id").reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(original, tmp_path_factory) -> pd.DataFrame:
    return _probabilities(original, tmp_path_factory.mktemp("ref_out"))


@pytest.mark.parametrize("name, transform, rename", [
    ("padded_fov", pad_every_third, False),
    ("transposed_mirrored", other_convention, False),
    ("mirrored_columns", mirrored_columns, False),
    ("renamed", None, True),
])
def test_other_storage_is_graded_identically(original, reference, tmp_path, name, transform, rename):
    root = restore(original, tmp_path / name, transform, rename)
    got = _probabilities(root, tmp_path / "out")
    assert list(got.row_id) == list(reference.row_id)
    cols = ["normal_mild", "moderate", "severe"]
    diff = np.abs(got[cols].to_numpy() - reference[cols].to_numpy())
    assert diff.max() <= PROB_TOL, f"{name}: max |dp| {diff.max():.2e} at {got.row_id[int(diff.max(axis=1).argmax())]}"


def test_every_storage_switch_of_the_phantom_survives_predict(tmp_path):
    import json

    root = make_dataset(tmp_path / "root", 2, split="test", seed=4243, image_size=(64, 80), mixed_fov_rate=1.0,
                        parallel_block_rate=1.0, missing_spacing_rate=1.0, no_meta_rate=0.5, enhanced_rate=0.5).root
    df = _probabilities(root, tmp_path)
    assert len(df) == 50 and np.isfinite(df[["normal_mild", "moderate", "severe"]].to_numpy()).all()
    report = json.loads((tmp_path / "run_report.json").read_text())
    for sid, rec in report["studies"].items():
        assert rec["errors"] == [] and rec["status"] == "ok", (sid, rec["errors"], rec["status"])
        assert any("field of view" in w for w in rec["warnings"]), sid  # reported, with the files named
