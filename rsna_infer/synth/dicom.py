"""Write one phantom image as a real MR DICOM file (pydicom), in any of four encodings,
classic or single-frame Enhanced MR, with or without file meta.

Files are byte-for-byte reproducible: UIDs are hashed from the seed and ids, and nothing
depends on the clock or the machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from ..io.writer import as_enhanced_single_frame, save_dataset
from .protocol import SeriesPlan, SlicePlan

#: Sequence parameters by series description (never by grade).
_SEQUENCE: dict[str, dict[str, object]] = {
    "T1": {"RepetitionTime": 550.0, "EchoTime": 9.0, "ScanningSequence": "SE", "SequenceName": "tse2d1_3"},
    "T2": {"RepetitionTime": 3500.0, "EchoTime": 105.0, "ScanningSequence": "SE", "SequenceName": "tse2d1_17"},
    "STIR": {"RepetitionTime": 4000.0, "EchoTime": 60.0, "ScanningSequence": ["SE", "IR"], "SequenceName": "tir2d1_13",
             "InversionTime": 160.0},
}  # fmt: skip

_SYNTAX_UID = {
    "explicit_le": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "big_endian": ExplicitVRBigEndian,
    "rle": RLELossless,
}


@dataclass(frozen=True)
class StudyIds:
    """Identifiers shared by every file of a study (the UIDs derive from the seed)."""

    seed: int
    split: str
    study_id: int

    def uid(self, *parts: object) -> str:
        return generate_uid(entropy_srcs=["rsna_infer.synth", str(self.seed), self.split, str(self.study_id)] + [str(p) for p in parts])


def _ds(values: list[float]) -> list[str]:
    """Decimal strings as scanners write them (at most 16 characters)."""
    return [f"{v:.6f}".rstrip("0").rstrip(".") if abs(v) < 1e6 else f"{v:.6g}" for v in values]


def build_dataset(ids: StudyIds, series: SeriesPlan, sl: SlicePlan, pixels: np.ndarray) -> Dataset:
    """The DICOM dataset of one slice; ``pixels`` is uint16 ``[rows, cols]``."""
    syntax = _SYNTAX_UID[series.transfer_syntax]
    sop_uid = ids.uid("sop", series.series_id, sl.instance_number)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if syntax == RLELossless else syntax

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "MR"
    ds.Manufacturer = "rsna_infer phantom"
    ds.BodyPartExamined = "LSPINE"
    ds.PatientID = str(ids.study_id)
    ds.PatientName = ""
    ds.StudyInstanceUID = ids.uid("study")
    ds.SeriesInstanceUID = ids.uid("series", series.series_id)
    ds.FrameOfReferenceUID = ids.uid("frame")
    ds.StudyID = ""
    ds.SeriesNumber = series.series_number
    ds.InstanceNumber = sl.instance_number
    ds.SeriesDescription = series.description
    ds.PatientPosition = "HFS"
    ds.MRAcquisitionType = "2D"
    for key, value in _SEQUENCE[series.contrast.name].items():
        setattr(ds, key, value)
    ds.SliceThickness = _ds([series.slice_thickness])[0]
    ds.SpacingBetweenSlices = _ds([series.stack_spacing.get(sl.stack_index, series.spacing_between)])[0]
    ds.ImagePositionPatient = _ds(list(sl.position))
    ds.ImageOrientationPatient = _ds(list(sl.row_dir) + list(sl.col_dir))
    ds.SliceLocation = _ds([float(sl.centre @ sl.normal)])[0]
    ds.PixelSpacing = _ds(list(sl.spacing))
    ds.Rows, ds.Columns = int(sl.rows), int(sl.cols)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.WindowCenter = _ds([round(0.45 * series.scale)])[0]
    ds.WindowWidth = _ds([round(0.9 * series.scale)])[0]
    for tag in series.dropped_tags:
        if tag in ds:
            delattr(ds, tag)
    if series.missing_spacing_instance == sl.instance_number:
        del ds.PixelSpacing

    pixels = np.ascontiguousarray(pixels, dtype=np.uint16)
    if syntax == RLELossless:
        ds.PixelData = pixels.tobytes()
        ds.compress(RLELossless, pixels, generate_instance_uid=False)
    elif syntax == ExplicitVRBigEndian:
        ds.PixelData = pixels.astype(">u2").tobytes()
    else:
        ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW" if syntax != RLELossless else "OB"
    return as_enhanced_single_frame(ds) if series.enhanced else ds


def write_dataset(path: Path, ds: Dataset, *, bare: bool = False) -> None:
    """A Part-10 file, or with ``bare`` the dataset alone (no preamble, no file meta)."""
    if bare:
        save_dataset(path, ds, bare=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, enforce_file_format=True)
