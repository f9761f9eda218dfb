"""Write minimal, valid MR DICOM slices with exact geometry (phantoms, tests, benchmarks).

The files carry what `read_slice` and the Kaggle data carry: patient geometry (IPP, IOP,
PixelSpacing), InstanceNumber, rescale, photometric interpretation, series description and
timing tags. Any tag can be left out (``None``) to mimic incomplete real-world headers, a
slice can be stored as a single-frame Enhanced MR file (`as_enhanced_single_frame`) and a file
can be written bare, without preamble and file meta, as old PACS exports are (`save_dataset`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, EnhancedMRImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

if TYPE_CHECKING:
    from .volume import Volume

#: Transfer syntaxes `write_slice` can encode itself (no third-party encoder needed).
WRITABLE_SYNTAXES: tuple[str, ...] = (
    pydicom.uid.ExplicitVRLittleEndian,
    pydicom.uid.ImplicitVRLittleEndian,
    pydicom.uid.ExplicitVRBigEndian,
    pydicom.uid.DeflatedExplicitVRLittleEndian,
    pydicom.uid.RLELossless,
)


def write_slice(
    path: str | Path,
    pixels: np.ndarray,
    *,
    position: Sequence[float] | None = (0.0, 0.0, 0.0),
    orientation: Sequence[float] | None = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    pixel_spacing: Sequence[float] | None = (1.0, 1.0),
    instance_number: int | None = 1,
    series_instance_uid: str | None = None,
    series_description: str | None = None,
    study_id: int | None = None,
    series_id: int | None = None,
    echo_time: float | None = None,
    repetition_time: float | None = None,
    inversion_time: float | None = None,
    slice_thickness: float | None = None,
    rescale: tuple[float, float] | None = None,
    monochrome1: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    extra: dict[str, object] | None = None,
    enhanced: bool = False,
    bare: bool = False,
) -> Path:
    """One single-frame slice; ``pixels`` [H, W] integers stored as uint16 (int16 if negative).

    ``rescale`` is ``(slope, intercept)``: stored = pixels, real = stored·slope + intercept.
    ``extra`` sets further tags by DICOM keyword (e.g. ``{"Manufacturer": "GE"}``).
    ``enhanced``: a single-frame Enhanced MR file (geometry in functional groups);
    ``bare``: no preamble and no file meta (`save_dataset`).
    """
    path = Path(path)
    arr = np.asarray(pixels)
    if arr.ndim != 2:
        raise ValueError(f"pixels must be [H, W], got {arr.shape}")
    signed = bool(arr.min() < 0)
    arr = arr.astype(np.int16 if signed else np.uint16)
    ts = UID(transfer_syntax)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if ts == pydicom.uid.RLELossless else ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.1.{study_id}" if study_id is not None else generate_uid()
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    if study_id is not None:
        ds.PatientID = str(study_id)
    if series_id is not None:
        ds.SeriesNumber = int(series_id) % 2**31
    _set(ds, "SeriesDescription", series_description)
    _set(ds, "InstanceNumber", instance_number)
    _set(ds, "ImagePositionPatient", None if position is None else [_ds(v) for v in position])
    _set(ds, "ImageOrientationPatient", None if orientation is None else [_ds(v) for v in orientation])
    _set(ds, "PixelSpacing", None if pixel_spacing is None else [_ds(v) for v in pixel_spacing])
    _set(ds, "SliceThickness", None if slice_thickness is None else _ds(slice_thickness))
    _set(ds, "EchoTime", None if echo_time is None else _ds(echo_time))
    _set(ds, "RepetitionTime", None if repetition_time is None else _ds(repetition_time))
    _set(ds, "InversionTime", None if inversion_time is None else _ds(inversion_time))
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = _ds(rescale[0]), _ds(rescale[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = int(signed)
    if ts == pydicom.uid.RLELossless:
        ds.compress(pydicom.uid.RLELossless, arr, encoding_plugin="pydicom")
    elif ts == pydicom.uid.ExplicitVRBigEndian:
        ds.PixelData = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    else:
        ds.PixelData = arr.tobytes()
    if enhanced:
        ds = as_enhanced_single_frame(ds)
    save_dataset(path, ds, bare=bare)
    return path


def save_dataset(path: str | Path, ds: Dataset, *, bare: bool = False) -> Path:
    """Write ``ds`` as a Part-10 file, or with ``bare`` as the dataset alone (no preamble, no
    "DICM", no file meta) in the encoding of its transfer syntax, as old PACS exports are.
    Pixel data must already be in that byte order; encapsulated (compressed) data cannot be bare."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not bare:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        return path
    ts = UID(ds.file_meta.TransferSyntaxUID)
    if ts.is_encapsulated:
        raise ValueError(f"a bare dataset cannot hold encapsulated pixel data ({ts.name})")
    out = copy.copy(ds)
    del out.file_meta
    pydicom.dcmwrite(path, out, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian)
    return path


#: Classic MR attributes and the functional-group macro an Enhanced MR file keeps them in:
#: (macro, keyword there).
_ENHANCED_GROUPS = {
    "ImageOrientationPatient": ("PlaneOrientationSequence", "ImageOrientationPatient"),
    "PixelSpacing": ("PixelMeasuresSequence", "PixelSpacing"),
    "SliceThickness": ("PixelMeasuresSequence", "SliceThickness"),
    "SpacingBetweenSlices": ("PixelMeasuresSequence", "SpacingBetweenSlices"),
    "RescaleSlope": ("PixelValueTransformationSequence", "RescaleSlope"),
    "RescaleIntercept": ("PixelValueTransformationSequence", "RescaleIntercept"),
    "RepetitionTime": ("MRTimingAndRelatedParametersSequence", "RepetitionTime"),
    "EchoTime": ("MREchoSequence", "EffectiveEchoTime"),
    "InversionTime": ("MRModifierSequence", "InversionTimes"),
}


def as_enhanced_single_frame(ds: Dataset) -> Dataset:
    """The same image as a single-frame Enhanced MR Image Storage dataset (a new object).

    Position goes to the per-frame PlanePositionSequence; orientation, pixel measures,
    rescale and MR timing to the shared functional groups, as enhanced files keep them; the
    classic top-level elements (and SliceLocation, which the enhanced IOD lacks) are removed.
    """
    out = copy.deepcopy(ds)
    out.SOPClassUID = EnhancedMRImageStorage
    if getattr(out, "file_meta", None) is not None:
        out.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    out.NumberOfFrames = 1
    macros: dict[str, Dataset] = {}
    for keyword, (macro, target) in _ENHANCED_GROUPS.items():
        if keyword not in out:
            continue
        value = out.data_element(keyword).value
        if keyword in ("EchoTime", "InversionTime"):  # FD in the enhanced macros
            value = float(value)
        setattr(macros.setdefault(macro, Dataset()), target, value)
        delattr(out, keyword)
    if "RescaleSlope" in macros.get("PixelValueTransformationSequence", ()):
        macros["PixelValueTransformationSequence"].RescaleType = "US"
    shared = Dataset()
    for macro, item in macros.items():
        setattr(shared, macro, DicomSequence([item]))
    out.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frame = Dataset()
    if "ImagePositionPatient" in out:
        frame.PlanePositionSequence = DicomSequence([Dataset()])
        frame.PlanePositionSequence[0].ImagePositionPatient = out.ImagePositionPatient
        del out.ImagePositionPatient
    out.PerFrameFunctionalGroupsSequence = DicomSequence([frame])
    if "SliceLocation" in out:
        del out.SliceLocation
    return out


def _set(ds: Dataset, keyword: str, value: object) -> None:
    if value is not None:
        setattr(ds, keyword, value)


def _ds(v: float) -> str:
    """A DS string of at most 16 characters that round-trips the value as closely as possible."""
    for digits in range(15, 0, -1):
        s = f"{float(v):.{digits}g}"
        if len(s) <= 16:
            return s
    return f"{float(v):.6g}"


def write_volume(
    series_dir: str | Path,
    volume: Volume,
    *,
    names: Sequence[str] | None = None,
    series_instance_uid: str | None = None,
    **tags: object,
) -> list[Path]:
    """Write every slice of ``volume`` as one file (the inverse of `read_series` for one stack).

    Pixels are rounded to integers. ``names`` default to ``{InstanceNumber}.dcm`` as in the
    Kaggle layout; ``tags`` go to every `write_slice` call (``series_description``, ...).
    """
    series_dir = Path(series_dir)
    uid = series_instance_uid or generate_uid()
    orientation = [*volume.row_dir, *volume.col_dir]
    out = []
    for z in range(volume.shape[0]):
        inst = int(volume.instance_numbers[z])
        name = names[z] if names is not None else f"{inst}.dcm"
        out.append(
            write_slice(
                series_dir / name,
                np.rint(volume.pixels[z]),
                position=volume.positions[z],
                orientation=orientation,
                pixel_spacing=volume.spacing,
                instance_number=inst,
                series_instance_uid=uid,
                study_id=volume.study_id,
                series_id=volume.series_id,
                **tags,
            )
        )
    return out
