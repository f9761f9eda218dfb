"""One DICOM file -> one `SliceRecord`: the header fields the pipeline needs and, optionally,
the decoded pixels.

`read_slice` never raises: a file that is not DICOM, is truncated, needs a decoder that is
not installed or holds something this reader does not handle (multi-frame, float pixels) comes
back with ``error`` set (and ``error_kind`` saying why), so one bad file never stops a series.
It is a module-level function of a path so that it pickles into worker processes.

Before a file is read whole, its first 132 bytes must look like DICOM (the ``DICM`` magic, or a
data element at offset 0 for files without preamble, whose header is then parsed alone first):
a stray multi-GB file costs 132 bytes, not its size. Files without file meta are decoded in
the encoding they were written in (``Dataset.original_encoding``), big endian included.
Oddities that do not stop a file (skewed orientation, a spacing fallback, no file meta) are
``notes``; the stacking layer reports them as warnings naming the files. Single-frame enhanced
MR files keep their geometry in functional-group sequences; it is read from there.

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
from pydicom.datadict import dictionary_VR
from pydicom.errors import InvalidDicomError

from ..geometry import SKEW_WARN, orthonormal_axes

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
    orientation: np.ndarray | None = None  # ImageOrientationPatient [6], orthonormalised
    pixel_spacing: tuple[float, float] | None = None  # (Δrow, Δcol) mm
    rows: int = 0
    columns: int = 0
    instance_number: int | None = None
    monochrome1: bool = False
    series_description: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
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
    error_kind: str | None = None  # "not_dicom" | "broken" | "decoder" | "unsupported"
    #: non-fatal oddities as (what, detail), e.g. ("ImageOrientationPatient not orthogonal;
    #: orthonormalised", "|r·c| = 2.0e-03"); reported per series, with the files' names
    notes: list[tuple[str, str]] = field(default_factory=list)

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


#: Part-10 files larger than this get a header-only parse before they are read whole.
HEADER_FIRST_BYTES = 64 * 2**20
_PROBE_BYTES = 132
_FLOAT_PIXEL_TAGS = {0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}


def read_slice(path: str | Path, *, pixels: bool = True) -> SliceRecord:
    """Read one file; never raises (errors are reported in the record)."""
    path = str(path)
    rec = SliceRecord(path=path)
    try:
        rec.nbytes = Path(path).stat().st_size
        if pixels and rec.nbytes > HEADER_FIRST_BYTES:  # a huge file: is it one image we can use?
            _fill_header(rec, parse_dicom(path, stop_before_pixels=True))
            if _unsupported(rec):
                return rec
            rec.notes.clear()
        ds = parse_dicom(path, stop_before_pixels=not pixels)
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
    if _unsupported(rec) or not pixels:
        return rec
    if "PixelData" not in ds:
        floats = [name for tag, name in _FLOAT_PIXEL_TAGS.items() if tag in ds]
        if floats:
            rec.error, rec.error_kind = f"unsupported float pixel data ({floats[0]})", "unsupported"
        else:
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


def _unsupported(rec: SliceRecord) -> bool:
    """Mark a file this reader cannot use although it is valid DICOM; True if so."""
    if rec.frames > 1:
        rec.error = (
            f"unsupported multi-frame file ({rec.frames} frames); enhanced/multi-frame DICOM with more "
            "than one frame is not read: convert the series to single-frame files"
        )
        rec.error_kind = "unsupported"
    return rec.error is not None


def parse_dicom(path: str, *, stop_before_pixels: bool) -> pydicom.Dataset:
    """The one place a file is parsed (tests count parses here): dcmread after a 132-byte probe; files without the preamble are accepted only if their
    header (parsed alone first, large values deferred) describes an image.

    With pixels, the file is read in one call and parsed from memory (~15% faster than
    pydicom's many small reads); header-only reads stop early, so they stream. One open per
    file: the probe and the parse share the handle.
    """
    with open(path, "rb") as fh:  # one open: probe, then parse from the same handle
        head = fh.read(_PROBE_BYTES)
        part10 = len(head) == _PROBE_BYTES and head[128:132] == b"DICM"
        if not part10:
            if not _starts_with_an_element(head):
                raise InvalidDicomError("no DICM preamble and no DICOM data element at the start")
            fh.seek(0)
            probe = pydicom.dcmread(fh, stop_before_pixels=True, force=True, defer_size=4096)
            if "Rows" not in probe or "Columns" not in probe:
                raise InvalidDicomError("no DICM preamble and no image attributes")
            if stop_before_pixels:
                return probe
        fh.seek(0)
        if stop_before_pixels:
            return pydicom.dcmread(fh, stop_before_pixels=True)
        data = fh.read()
    return pydicom.dcmread(io.BytesIO(data), force=not part10)


def _starts_with_an_element(head: bytes) -> bool:
    """Whether ``head`` can be the start of a bare dataset: an even group in the range where
    a dataset begins (file meta 0002 to image 0028), in either byte order."""
    if len(head) < 8:
        return False
    for order in ("little", "big"):
        group = int.from_bytes(head[0:2], order)
        if group % 2 == 0 and 0x0002 <= group <= 0x0028:
            return True
    return False


#: ``Dataset.original_encoding`` (implicit VR, little endian) -> the transfer syntax it is.
_ENCODING_SYNTAX = {
    (True, True): pydicom.uid.ImplicitVRLittleEndian,
    (False, True): pydicom.uid.ExplicitVRLittleEndian,
    (False, False): pydicom.uid.ExplicitVRBigEndian,
    (True, False): pydicom.uid.ExplicitVRBigEndian,  # not a standard syntax; the byte order is what counts
}


def _transfer_syntax(ds: pydicom.Dataset) -> tuple[str, bool]:
    """(transfer syntax UID, whether the file meta says so). Without one in the meta, the
    encoding the dataset was actually parsed in; it is also set on the meta, so that
    pydicom's own decoders read the pixels in that byte order."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return str(meta.TransferSyntaxUID), True
    uid = _ENCODING_SYNTAX.get(tuple(ds.original_encoding), pydicom.uid.ImplicitVRLittleEndian)
    if meta is None:
        ds.file_meta = meta = pydicom.dataset.FileMetaDataset()
    meta.TransferSyntaxUID = uid
    return str(uid), False


# Header values are read from the raw element bytes: pydicom's per-element conversion
# (DSfloat, MultiValue, ...) costs more than parsing the whole file, and almost every value we
# need is a text VR (DS, IS, CS, LO, UI). Binary VRs (Rows, Columns, Bits*, the FD times of
# enhanced files) go through pydicom.
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
    "SOPInstanceUID": 0x00080018,
    "EchoTime": 0x00180081,
    "RepetitionTime": 0x00180080,
    "InversionTime": 0x00180082,
    "ScanningSequence": 0x00180020,
    "SliceThickness": 0x00180050,
    "SpacingBetweenSlices": 0x00180088,
    "NumberOfFrames": 0x00280008,
}
_TEXT_VRS = frozenset({"AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UI", "UT"})
_PER_FRAME_GROUPS, _SHARED_GROUPS = 0x52009230, 0x52009229
#: Where enhanced MR files keep what classic files hold at the top level: (functional-group
#: macro sequence, tag inside it). Frame 1's per-frame item wins over the shared one.
_FUNCTIONAL = {
    "ImagePositionPatient": ("PlanePositionSequence", 0x00200032),
    "ImageOrientationPatient": ("PlaneOrientationSequence", 0x00200037),
    "PixelSpacing": ("PixelMeasuresSequence", 0x00280030),
    "SliceThickness": ("PixelMeasuresSequence", 0x00180050),
    "SpacingBetweenSlices": ("PixelMeasuresSequence", 0x00180088),
    "RescaleSlope": ("PixelValueTransformationSequence", 0x00281053),
    "RescaleIntercept": ("PixelValueTransformationSequence", 0x00281052),
    "RepetitionTime": ("MRTimingAndRelatedParametersSequence", 0x00180080),
    "EchoTime": ("MREchoSequence", 0x00189082),  # EffectiveEchoTime
    "InversionTime": ("MRModifierSequence", 0x00189079),  # InversionTimes
}


class _Header:
    """Typed access to the few header values we need, classic or enhanced."""

    def __init__(self, ds: pydicom.Dataset) -> None:
        self.ds = ds
        self.groups = [ds[t].value[0] for t in (_PER_FRAME_GROUPS, _SHARED_GROUPS) if t in ds and len(ds[t].value)]

    def text(self, keyword: str) -> str | None:
        """The value as one string (multi-values joined by backslash), or None."""
        holder, tag = self.ds, _TAGS[keyword]
        elem = holder.get_item(tag)
        if elem is None:
            holder, tag = self._functional(keyword)
            if holder is None:
                return None
            elem = holder.get_item(tag)
        vr = getattr(elem, "VR", None) or dictionary_VR(tag)
        value = elem.value if vr in _TEXT_VRS else holder[tag].value
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

    def _functional(self, keyword: str) -> tuple[pydicom.Dataset | None, int]:
        if keyword not in _FUNCTIONAL:
            return None, 0
        macro, tag = _FUNCTIONAL[keyword]
        for item in self.groups:
            seq = item.get(macro)
            if seq and tag in seq[0]:
                return seq[0], tag
        return None, 0

    def floats(self, keyword: str) -> np.ndarray | None:
        text = self.text(keyword)
        if text is None:
            return None
        try:
            a = np.array([float(t) for t in text.split("\\")], dtype=np.float64)
        except ValueError:
            return None
        return a if np.all(np.isfinite(a)) else None

    def float(self, keyword: str) -> float | None:
        vals = self.floats(keyword)
        return None if vals is None or len(vals) == 0 else float(vals[0])

    def vector(self, keyword: str, n: int) -> np.ndarray | None:
        a = self.floats(keyword)
        return a if a is not None and a.shape == (n,) else None


def _fill_header(rec: SliceRecord, ds: pydicom.Dataset) -> None:
    h = _Header(ds)
    rec.transfer_syntax, from_meta = _transfer_syntax(ds)
    if not from_meta:
        rec.notes.append(("no file meta; read in the encoding it was written in",
                          pydicom.uid.UID(rec.transfer_syntax).name))
    rec.rows = int(ds.get("Rows", 0) or 0)
    rec.columns = int(ds.get("Columns", 0) or 0)
    rec.position = h.vector("ImagePositionPatient", 3)
    rec.orientation = _orientation(h.vector("ImageOrientationPatient", 6), rec)
    ps = h.vector("PixelSpacing", 2)
    if ps is None:
        ps = h.vector("ImagerPixelSpacing", 2)
        if ps is not None:
            rec.notes.append(("PixelSpacing missing; ImagerPixelSpacing used", "x".join(f"{v:g}" for v in ps)))
    if ps is not None and np.all(ps > 0):
        rec.pixel_spacing = (float(ps[0]), float(ps[1]))
    inst = h.float("InstanceNumber")
    rec.instance_number = int(inst) if inst is not None else None
    rec.monochrome1 = (h.text("PhotometricInterpretation") or "").upper() == "MONOCHROME1"
    rec.series_description = h.text("SeriesDescription")
    rec.series_instance_uid = h.text("SeriesInstanceUID")
    rec.sop_instance_uid = h.text("SOPInstanceUID")
    rec.echo_time = h.float("EchoTime")
    rec.repetition_time = h.float("RepetitionTime")
    rec.inversion_time = h.float("InversionTime")
    rec.scanning_sequence = h.text("ScanningSequence")
    rec.slice_thickness = h.float("SliceThickness")
    rec.spacing_between_slices = h.float("SpacingBetweenSlices")
    frames = h.float("NumberOfFrames")
    rec.frames = int(frames) if frames else 1
    slope, intercept = h.float("RescaleSlope"), h.float("RescaleIntercept")
    rec.slope = 1.0 if slope is None else slope
    rec.intercept = 0.0 if intercept is None else intercept


def _orientation(iop: np.ndarray | None, rec: SliceRecord) -> np.ndarray | None:
    """IOP as an orthonormal pair (a note when it was skewed), or None (a note) when degenerate."""
    if iop is None:
        return None
    r, c = iop[:3], iop[3:]
    rr, cc, rc = float(r @ r), float(c @ c), float(r @ c)
    # |r x c|^2 = |r|^2 |c|^2 - (r.c)^2, without np.cross (35 us on 3-vectors, per file)
    if rr < 1e-12 or cc < 1e-12 or rr * cc - rc * rc < 1e-6 * rr * cc:
        rec.notes.append(("ImageOrientationPatient degenerate (zero or parallel axes); ignored",
                          "\\".join(f"{v:g}" for v in iop)))
        return None
    if abs(rr - 1.0) < 1e-12 and abs(cc - 1.0) < 1e-12 and abs(rc) < 1e-12:
        return iop  # already orthonormal (the usual case): nothing to correct
    r, c, skew = orthonormal_axes(r, c)
    if skew > SKEW_WARN:
        rec.notes.append(("ImageOrientationPatient axes not orthogonal; orthonormalised", f"|r.c| = {skew:.1e}"))
    return np.concatenate([r, c])


_NATIVE_DTYPES = {(8, 0): "u1", (8, 1): "i1", (16, 0): "u2", (16, 1): "i2", (32, 0): "u4", (32, 1): "i4"}


def _decode_pixels(ds: pydicom.Dataset, rec: SliceRecord) -> np.ndarray:
    """Stored values of the (single) frame as [H, W] (the rescale is in the record's header).

    Kept in the stored dtype (half the bytes of float32 to pass between processes); the
    stacking layer converts once, straight into the volume array.
    """
    raw = _native_pixels(ds, rec)
    if raw is None:
        raw = ds.pixel_array
    if raw.ndim == 3 and raw.shape[-1] in (3, 4):
        raw = raw[..., :3].mean(axis=-1, dtype=np.float32)  # colour -> grey; MR is single-sample in practice
    if raw.ndim != 2:
        raise ValueError(f"unexpected pixel array shape {raw.shape}")
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
