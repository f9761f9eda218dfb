"""One DICOM file -> one `SliceRecord`: the header fields the pipeline needs and, optionally,
the decoded pixels.

`read_slice` never raises: a file that is not DICOM, is truncated, or needs a decoder that is
not installed comes back with ``error`` set (and ``error_kind`` saying why), so one bad file
never stops a series. It is a module-level function of a path so that it pickles into worker
processes.

Uncompressed pixel data (explicit/implicit little endian, big endian, deflate) is read
straight from the dataset bytes with numpy, which is about twice as fast as
``Dataset.pixel_array``; everything else (RLE, JPEG-LS, JPEG Lossless, JPEG 2000) goes
through pydicom's decoders and the pylibjpeg plugins.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

logger = logging.getLogger(__name__)

#: What to install when a compressed transfer syntax has no decoder.
DECODER_HINT = (
    "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg "
    "(or pip install 'rsna-infer[dicom]')"
)


class MissingDecoderError(RuntimeError):
    """No slice of a series could be decoded because a pixel decoder is not installed."""


@dataclass
class SliceRecord:
    """Header fields (and pixels) of one image frame. Missing tags are ``None``."""

    path: str
    pixels: np.ndarray | None = None  # [H, W] stored values (any numeric dtype); see `image`
    slope: float = 1.0  # RescaleSlope
    intercept: float = 0.0  # RescaleIntercept
    position: np.ndarray | None = None  # ImagePositionPatient [3]
    orientation: np.ndarray | None = None  # ImageOrientationPatient [6]
    pixel_spacing: tuple[float, float] | None = None  # (Δrow, Δcol) mm
    rows: int = 0
    columns: int = 0
    instance_number: int | None = None
    monochrome1: bool = False
    series_description: str | None = None
    series_instance_uid: str | None = None
    echo_time: float | None = None
    repetition_time: float | None = None
    inversion_time: float | None = None
    scanning_sequence: str | None = None
    slice_thickness: float | None = None
    spacing_between_slices: float | None = None
    transfer_syntax: str | None = None
    frames: int = 1  # NumberOfFrames
    nbytes: int = 0  # file size
    error: str | None = None
    error_kind: str | None = None  # "not_dicom" | "broken" | "decoder"
    notes: list[str] = field(default_factory=list)  # non-fatal oddities (e.g. a spacing fallback)

    @property
    def ok(self) -> bool:
        return self.error is None

    def image(self) -> np.ndarray:
        """float32 [H, W] with rescale slope/intercept applied (MONOCHROME1 not inverted)."""
        out = np.empty(self.pixels.shape, dtype=np.float32)
        self.rescale_into(out)
        return out

    def rescale_into(self, out: np.ndarray) -> None:
        """Write the rescaled image into ``out`` (float32 [H, W]) without a temporary copy."""
        if self.slope != 1.0:
            np.multiply(self.pixels, np.float32(self.slope), out=out, casting="unsafe")
        else:
            out[...] = self.pixels
        if self.intercept != 0.0:
            out += np.float32(self.intercept)


def decoder_problem(transfer_syntax: str | None) -> str | None:
    """Why pixels of this transfer syntax cannot be decoded here, or ``None`` if they can."""
    if not transfer_syntax:
        return None
    uid = pydicom.uid.UID(transfer_syntax)
    if not uid.is_encapsulated:
        return None
    try:
        from pydicom.pixels import get_decoder

        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"transfer syntax {uid.name} ({uid}) is not supported by pydicom"
    if decoder.is_available:
        return None
    return f"no decoder installed for {uid.name} ({uid}); {DECODER_HINT}"


def read_slice(path: str | Path, *, pixels: bool = True) -> SliceRecord:
    """Read one file; never raises (errors are reported in the record)."""
    path = str(path)
    rec = SliceRecord(path=path)
    try:
        rec.nbytes = Path(path).stat().st_size
        ds = _dcmread(path, stop_before_pixels=not pixels)
    except InvalidDicomError as e:
        rec.error, rec.error_kind = f"not a DICOM file ({e})", "not_dicom"
        return rec
    except Exception as e:  # noqa: BLE001  truncated headers raise assorted errors deep in pydicom
        rec.error, rec.error_kind = f"unreadable ({type(e).__name__}: {e})", "broken"
        return rec
    try:
        _fill_header(rec, ds)
    except Exception as e:  # noqa: BLE001  one malformed file must not stop its series
        rec.error, rec.error_kind = f"malformed header ({type(e).__name__}: {e})", "broken"
        return rec
    if not pixels:
        return rec
    if "PixelData" not in ds:
        rec.error, rec.error_kind = "no pixel data", "broken"
        return rec
    problem = decoder_problem(rec.transfer_syntax)
    if problem is not None:
        rec.error, rec.error_kind = problem, "decoder"
        return rec
    try:
        rec.pixels = _decode_pixels(ds, rec)
    except Exception as e:  # noqa: BLE001  decoder plugins raise many types
        rec.error, rec.error_kind = f"pixel data not decodable ({type(e).__name__}: {e})", "broken"
    return rec


def _dcmread(path: str, *, stop_before_pixels: bool) -> pydicom.Dataset:
    """dcmread; files without the 128-byte preamble are accepted only if they look like images.

    With pixels, the file is read in one call and parsed from memory (~15% faster than
    pydicom's many small reads); header-only reads stop early, so they stream.
    """
    src: str | io.BytesIO = path
    if not stop_before_pixels:
        with open(path, "rb") as fh:
            src = io.BytesIO(fh.read())
    try:
        return pydicom.dcmread(src, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        if isinstance(src, io.BytesIO):
            src.seek(0)
        ds = pydicom.dcmread(src, stop_before_pixels=stop_before_pixels, force=True)
        if "Rows" not in ds or "Columns" not in ds:
            raise InvalidDicomError("no DICM preamble and no image attributes") from None
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            ds.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        return ds


# Header values are read from the raw element bytes: pydicom's per-element conversion
# (DSfloat, MultiValue, ...) costs more than parsing the whole file, and every value we need
# is a text VR (DS, IS, CS, LO, UI). Binary VRs (Rows, Columns, Bits*) go through pydicom.
_TAGS = {
    "ImagePositionPatient": 0x00200032,
    "ImageOrientationPatient": 0x00200037,
    "PixelSpacing": 0x00280030,
    "ImagerPixelSpacing": 0x00181164,
    "InstanceNumber": 0x00200013,
    "RescaleSlope": 0x00281053,
    "RescaleIntercept": 0x00281052,
    "PhotometricInterpretation": 0x00280004,
    "SeriesDescription": 0x0008103E,
    "SeriesInstanceUID": 0x0020000E,
    "EchoTime": 0x00180081,
    "RepetitionTime": 0x00180080,
    "InversionTime": 0x00180082,
    "ScanningSequence": 0x00180020,
    "SliceThickness": 0x00180050,
    "SpacingBetweenSlices": 0x00180088,
    "NumberOfFrames": 0x00280008,
}


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    """The value of a text element as one string (multi-values joined by backslash), or None."""
    elem = ds.get_item(_TAGS[keyword])
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, bytes):
        text = value.decode("latin-1")
    elif isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        text = "\\".join(str(v) for v in value)
    elif value is None:
        return None
    else:
        text = str(value)
    text = text.strip(" \0")
    return text or None


def _float(ds: pydicom.Dataset, keyword: str) -> float | None:
    vals = _floats(ds, keyword)
    return None if vals is None or len(vals) == 0 else float(vals[0])


def _floats(ds: pydicom.Dataset, keyword: str) -> np.ndarray | None:
    text = _text(ds, keyword)
    if text is None:
        return None
    try:
        a = np.array([float(t) for t in text.split("\\")], dtype=np.float64)
    except ValueError:
        return None
    return a if np.all(np.isfinite(a)) else None


def _vector(ds: pydicom.Dataset, keyword: str, n: int) -> np.ndarray | None:
    a = _floats(ds, keyword)
    return a if a is not None and a.shape == (n,) else None


def _fill_header(rec: SliceRecord, ds: pydicom.Dataset) -> None:
    meta = getattr(ds, "file_meta", None)
    rec.transfer_syntax = str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else None
    rec.rows = int(ds.get("Rows", 0) or 0)
    rec.columns = int(ds.get("Columns", 0) or 0)
    rec.position = _vector(ds, "ImagePositionPatient", 3)
    iop = _vector(ds, "ImageOrientationPatient", 6)
    if iop is not None:
        r, c = iop[:3], iop[3:]
        nr, nc = np.linalg.norm(r), np.linalg.norm(c)
        if nr < 1e-6 or nc < 1e-6 or np.linalg.norm(np.cross(r, c)) < 1e-3 * nr * nc:
            rec.notes.append(f"degenerate ImageOrientationPatient {iop.tolist()} ignored")
            iop = None
    rec.orientation = iop
    ps = _vector(ds, "PixelSpacing", 2)
    if ps is None:
        ps = _vector(ds, "ImagerPixelSpacing", 2)
        if ps is not None:
            rec.notes.append("PixelSpacing missing; ImagerPixelSpacing used")
    if ps is not None and np.all(ps > 0):
        rec.pixel_spacing = (float(ps[0]), float(ps[1]))
    inst = _float(ds, "InstanceNumber")
    rec.instance_number = int(inst) if inst is not None else None
    rec.monochrome1 = (_text(ds, "PhotometricInterpretation") or "").upper() == "MONOCHROME1"
    rec.series_description = _text(ds, "SeriesDescription")
    rec.series_instance_uid = _text(ds, "SeriesInstanceUID")
    rec.echo_time = _float(ds, "EchoTime")
    rec.repetition_time = _float(ds, "RepetitionTime")
    rec.inversion_time = _float(ds, "InversionTime")
    rec.scanning_sequence = _text(ds, "ScanningSequence")
    rec.slice_thickness = _float(ds, "SliceThickness")
    rec.spacing_between_slices = _float(ds, "SpacingBetweenSlices")
    frames = _float(ds, "NumberOfFrames")
    rec.frames = int(frames) if frames else 1


_NATIVE_DTYPES = {(8, 0): "u1", (8, 1): "i1", (16, 0): "u2", (16, 1): "i2", (32, 0): "u4", (32, 1): "i4"}


def _decode_pixels(ds: pydicom.Dataset, rec: SliceRecord) -> np.ndarray:
    """Stored values of the (single) frame as [H, W]; the rescale goes to the record.

    Kept in the stored dtype (half the bytes of float32 to pass between processes); the
    stacking layer converts once, straight into the volume array.
    """
    if rec.frames != 1:
        raise ValueError(
            f"multi-frame file ({rec.frames} frames): enhanced/multi-frame DICOM is not supported; "
            "convert the series to single-frame files"
        )
    raw = _native_pixels(ds, rec)
    if raw is None:
        raw = ds.pixel_array
    if raw.ndim == 3 and raw.shape[-1] in (3, 4):
        raw = raw[..., :3].mean(axis=-1, dtype=np.float32)  # colour -> grey; MR is single-sample in practice
    if raw.ndim != 2:
        raise ValueError(f"unexpected pixel array shape {raw.shape}")
    slope = _float(ds, "RescaleSlope")
    intercept = _float(ds, "RescaleIntercept")
    rec.slope = 1.0 if slope is None else slope
    rec.intercept = 0.0 if intercept is None else intercept
    return raw


def _native_pixels(ds: pydicom.Dataset, rec: SliceRecord) -> np.ndarray | None:
    """Uncompressed single-frame greyscale pixels straight from the bytes, or None to let
    pydicom decode (compressed data, colour, multi-frame, odd bit layouts)."""
    ts = pydicom.uid.UID(rec.transfer_syntax or pydicom.uid.ImplicitVRLittleEndian)
    if ts.is_encapsulated or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    if rec.frames != 1:
        return None
    bits_alloc = int(ds.get("BitsAllocated", 0) or 0)
    bits_stored = int(ds.get("BitsStored", bits_alloc) or bits_alloc)
    signed = int(ds.get("PixelRepresentation", 0) or 0)
    code = _NATIVE_DTYPES.get((bits_alloc, signed))
    if code is None or (signed and bits_stored != bits_alloc):
        return None  # signed values with unused high bits need sign extension: pydicom does it
    data = ds.PixelData
    n = rec.rows * rec.columns
    itemsize = bits_alloc // 8
    if len(data) < n * itemsize:
        raise ValueError(f"truncated pixel data: {len(data)} bytes, expected {n * itemsize}")
    order = ">" if ts == pydicom.uid.ExplicitVRBigEndian else "<"
    arr = np.frombuffer(data, dtype=order + code, count=n).reshape(rec.rows, rec.columns)
    if not signed and bits_stored < bits_alloc:
        arr = arr & np.array((1 << bits_stored) - 1, dtype=arr.dtype)  # unused high bits may hold overlays
    return arr
