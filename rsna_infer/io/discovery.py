"""Find the studies and series of a Kaggle-layout root without decoding any pixels.

Layout: ``{root}/{split}_images/{study_id}/{series_id}/*.dcm`` and
``{root}/{split}_series_descriptions.csv`` (``study_id, series_id, series_description``).
The CSV is the list of record: every study in it is returned (so it gets submission rows even
with no images at all); a listed series whose folder is missing, empty or unreadable
(``PermissionError``) is recorded, not fatal; folders the CSV does not name are ignored, and
counted in the log. Without a CSV, the series type is inferred from one header per series
(orientation -> sagittal/axial; description, echo and repetition time -> T1 vs T2/STIR). A
root that yields no study at all is a path mistake: `describe_no_studies` says what was
looked for and what is there.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..constants import AXIAL_T2, SAG_T1, SAG_T2, SERIES_TYPES
from ..geometry import plane_of
from ..validate import examples
from .dicom import SliceRecord, read_slice
from .files import MISSING_FOLDER, list_series_files, scan_folder

logger = logging.getLogger(__name__)


class NoStudiesError(FileNotFoundError):
    """No study under the root for the split; the message names the paths looked at."""

#: Sagittal series with TE and TR at most these (ms) are T1-weighted; longer is T2/STIR.
T1_MAX_ECHO_MS = 40.0
T1_MAX_REPETITION_MS = 1500.0
#: Inversion recovery with TI at most this (ms) is STIR; longer TI with a short TE is T1-FLAIR.
STIR_MAX_INVERSION_MS = 400.0
#: Header files tried per series when inferring its type.
HEADERS_PER_SERIES = 3


@dataclass
class SeriesRef:
    """One series of a study. ``problem`` is ``None`` when its folder holds files."""

    study_id: int
    series_id: int
    description: str | None  # one of SERIES_TYPES, or None when unknown
    path: Path | None  # the series folder (None when the study folder is missing)
    n_files: int = 0
    problem: str | None = None  # "missing folder" | "empty folder" | "unreadable folder (...)" | None

    @property
    def readable(self) -> bool:
        return self.problem is None


@dataclass
class StudyRef:
    """One study: its folder (``None`` if absent) and series in CSV (or folder) order."""

    study_id: int
    path: Path | None
    series: list[SeriesRef] = field(default_factory=list)
    problem: str | None = None  # "unreadable folder (...)": its series could not be listed

    def of_type(self, series_type: str) -> list[SeriesRef]:
        return [s for s in self.series if s.description == series_type]

    @property
    def problems(self) -> list[str]:
        """One line per series that cannot be read and per series type without any series."""
        out = [f"study folder: {self.problem}"] if self.problem else []
        out += [f"series {s.series_id} ({s.description}): {s.problem}" for s in self.series if s.problem]
        out += [f"no {t} series" for t in SERIES_TYPES if not any(s.readable for s in self.of_type(t))]
        return out


def images_dir(root: str | Path, split: str = "test") -> Path:
    """``{root}/{split}_images``, or ``root`` itself when it already is the images folder."""
    root = Path(root)
    d = root / f"{split}_images"
    return d if d.is_dir() else root


def discover_studies(
    root: str | Path, split: str = "test", series_csv: str | Path | None = None
) -> list[StudyRef]:
    """Studies under ``root`` sorted by study id.

    ``series_csv`` defaults to ``{root}/{split}_series_descriptions.csv`` when that exists;
    with no CSV, every numeric study/series folder is used and its type read from headers.
    """
    root = Path(root)
    if series_csv is None:
        candidate = root / f"{split}_series_descriptions.csv"
        series_csv = candidate if candidate.is_file() else None
    img = images_dir(root, split)
    if series_csv is not None:
        return _from_csv(img, Path(series_csv))
    if not img.is_dir():
        raise FileNotFoundError(
            f"no {split}_series_descriptions.csv and no image folder at {img}: point root at the "
            f"competition folder that holds {split}_images/"
        )
    logger.info("no series CSV under %s: series types inferred from DICOM headers", root)
    return _from_folders(img)


def describe_no_studies(root: str | Path, split: str = "test") -> str:
    """Why `discover_studies` found nothing under ``root``: the paths it looked at, what is
    there instead, and what to pass."""
    root = Path(root)
    if not root.exists():
        return f"the test root {root} does not exist; pass the competition folder that holds {split}_images/"
    if not root.is_dir():
        return f"the test root {root} is not a folder; pass the competition folder that holds {split}_images/"
    csv, img = root / f"{split}_series_descriptions.csv", root / f"{split}_images"
    seen = [f"{csv} ({'lists no studies' if csv.is_file() else 'missing'})",
            f"{img}/ ({'no numeric study folders' if _is_dir(img) else 'missing'})"]
    if not _is_dir(img):
        seen.append(f"{root}/ itself (no numeric study folders)")
    try:
        names = [p.name for p in root.iterdir() if p.name.endswith("_series_descriptions.csv")]
    except OSError:
        names = []
    names += [p.name for p in _subfolders(root) if p.name.endswith("_images")]
    others = sorted({n.split("_")[0] for n in names} - {split})
    hint = (f"this root has the split(s) {others}: pass --split {others[0]} (split={others[0]!r})" if others else
            f"pass the competition folder that holds {split}_images/ and {split}_series_descriptions.csv")
    return f"no studies found for split {split!r}: looked at {', '.join(seen)}; {hint}"


def _from_csv(img: Path, csv_path: Path) -> list[StudyRef]:
    import pandas as pd

    try:
        df = pd.read_csv(csv_path, dtype={"series_description": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{csv_path}: not a readable series CSV ({type(e).__name__}: {e})") from None
    need = {"study_id", "series_id", "series_description"}
    if not need.issubset(df.columns):
        raise ValueError(f"{csv_path} must have columns {sorted(need)}; found {list(df.columns)}")
    bad = df["study_id"].isna() | df["series_id"].isna()
    if bad.any():
        logger.warning("%s: %d row(s) without a study or series id skipped", csv_path, int(bad.sum()))
        df = df[~bad]
    try:
        ids = [(int(a), int(b)) for a, b in zip(df["study_id"], df["series_id"])]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{csv_path}: study_id and series_id must be integers ({e})") from None
    studies: dict[int, StudyRef] = {}
    for (sid, ser), row in zip(ids, df.itertuples(index=False)):
        desc = _clean_description(row.series_description)
        st = studies.get(sid)
        if st is None:
            sdir = img / str(sid)
            st = studies[sid] = StudyRef(study_id=sid, path=sdir if _is_dir(sdir) else None)
        if any(s.series_id == ser for s in st.series):
            logger.debug("study %s: series %s listed twice in %s", sid, ser, csv_path.name)
            continue
        st.series.append(_series_ref(st, ser, desc))
    extra_series = []
    for st in studies.values():
        if st.path is None:
            logger.warning("study %s: folder missing under %s; it will get fallback rows", st.study_id, img)
            continue
        named = {str(s.series_id) for s in st.series}
        extra_series += [f"{st.study_id}/{p.name}" for p in sorted(_subfolders(st.path)) if p.name not in named]
    if extra_series:
        logger.info("%d series folder(s) not listed in %s are ignored: %s", len(extra_series), csv_path,
                    examples(extra_series, quote=False))
    extra = sorted(p.name for p in _subfolders(img) if p.name.isdigit() and int(p.name) not in studies)
    if extra:
        logger.warning("%d study folder(s) under %s are not listed in %s and get no rows: %s", len(extra), img,
                       csv_path, examples(extra, quote=False))
    return [studies[k] for k in sorted(studies)]


def _clean_description(value: object) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    v = value.strip()
    for t in SERIES_TYPES:
        if v.lower() == t.lower():
            return t
    return v


def _is_dir(path: Path) -> bool:
    """``Path.is_dir`` that says False instead of raising (a parent without permission)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _subfolders(path: Path) -> list[Path]:
    """The folders inside ``path``; ``[]`` (logged) when it cannot be listed."""
    try:
        return [p for p in path.iterdir() if _is_dir(p)]
    except OSError as e:
        logger.warning("cannot list %s (%s: %s); its folders are not looked at", path, type(e).__name__, e)
        return []


def _series_ref(st: StudyRef, series_id: int, desc: str | None) -> SeriesRef:
    path = st.path / str(series_id) if st.path is not None else None
    ref = SeriesRef(study_id=st.study_id, series_id=series_id, description=desc, path=path)
    if path is None:
        ref.problem = MISSING_FOLDER
    else:
        listing = scan_folder(path)
        ref.n_files = len(listing.files)
        ref.problem = listing.problem or (None if ref.n_files else "empty folder")
    if ref.problem:
        logger.warning("study %s series %s (%s): %s", st.study_id, series_id, desc, ref.problem)
    return ref


def _from_folders(img: Path) -> list[StudyRef]:
    try:
        entries = [p for p in img.iterdir() if _is_dir(p)]
    except OSError as e:  # the images folder itself: nothing to discover, and nothing to fall back on
        raise PermissionError(f"cannot list the images folder {img} ({type(e).__name__}: {e})") from e
    studies = []
    for sdir in sorted(entries, key=lambda p: (not p.name.isdigit(), p.name)):
        if not sdir.name.isdigit():
            logger.warning("folder %s is not a numeric study id; skipped", sdir)
            continue
        st = StudyRef(study_id=int(sdir.name), path=sdir)
        try:
            ser_dirs = [p for p in sdir.iterdir() if _is_dir(p)]
        except OSError as e:
            st.problem = f"unreadable folder ({type(e).__name__}: {e})"
            logger.warning("study %s: %s; it will get fallback rows", st.study_id, st.problem)
            ser_dirs = []
        for ser_dir in sorted(ser_dirs):
            if not ser_dir.name.isdigit():
                logger.warning("study %s: folder %s is not a numeric series id; skipped", st.study_id, ser_dir.name)
                continue
            ref = _series_ref(st, int(ser_dir.name), None)
            if ref.readable:
                ref.description = infer_series_type_from_folder(ser_dir)
            st.series.append(ref)
        studies.append(st)
    return sorted(studies, key=lambda s: s.study_id)


def infer_series_type_from_folder(series_dir: str | Path) -> str | None:
    """Series type from the headers of up to `HEADERS_PER_SERIES` files (no pixels read)."""
    headers: list[SliceRecord] = []
    for p in list_series_files(series_dir):
        rec = read_slice(p, pixels=False)
        if rec.ok:
            headers.append(rec)
            if len(headers) >= HEADERS_PER_SERIES:
                break
    t = infer_series_type(headers)
    logger.debug("series %s: inferred type %s", Path(series_dir).name, t)
    return t


def infer_series_type(headers: list[SliceRecord]) -> str | None:
    """'Sagittal T1' | 'Sagittal T2/STIR' | 'Axial T2' from header fields, or None (coronal, no IOP).

    Orientation decides the plane. For sagittal series the description decides when it
    names the weighting (T1 / T2 / STIR); otherwise a short inversion time means STIR, and a
    short echo time with a short repetition time (or a long inversion time: T1-FLAIR) means T1.
    """
    oriented = [h for h in headers if h.orientation is not None]
    if not oriented:
        return _type_from_text(" ".join(h.series_description or "" for h in headers))
    planes = Counter(plane_of(np.cross(h.orientation[:3], h.orientation[3:])) for h in oriented)
    plane = planes.most_common(1)[0][0]
    if plane == "axial":
        return AXIAL_T2
    if plane != "sagittal":
        return None
    h = oriented[0]
    named = _weighting(_words(h.series_description or ""))
    if named is not None:
        return named
    inversion = h.inversion_time is not None or bool(
        h.scanning_sequence and "IR" in h.scanning_sequence.split("\\")
    )
    if inversion and h.inversion_time is not None and h.inversion_time <= STIR_MAX_INVERSION_MS:
        return SAG_T2  # STIR
    if h.echo_time is not None:
        short_tr = h.repetition_time is None or h.repetition_time <= T1_MAX_REPETITION_MS
        t1_flair = inversion and (h.inversion_time or 0.0) > STIR_MAX_INVERSION_MS
        return SAG_T1 if h.echo_time <= T1_MAX_ECHO_MS and (short_tr or t1_flair) else SAG_T2
    return SAG_T2 if inversion else None


#: Whole words of a SeriesDescription that name the plane (Siemens writes "tra" for axial).
AXIAL_WORDS = frozenset({"AX", "AXI", "AXIAL", "TRA", "TRANS", "TRANSVERSE", "TRANSVERSAL"})
SAGITTAL_WORDS = frozenset({"SAG", "SAGITTAL"})


def _words(text: str) -> set[str]:
    """Upper-case words of a description: letters and digits, split at anything else
    (``"t2_tse_sag"`` -> T2, TSE, SAG), so "AX" never matches inside "RELAX" or "MAXFOV"."""
    return set(re.findall(r"[A-Z0-9]+", text.upper()))


def _weighting(words: set[str]) -> str | None:
    """Sagittal type named by the words: STIR/TIRM or T2 (T2W, T2FS...) -> T2/STIR, T1 -> T1."""
    if any(w.startswith("STIR") or w == "TIRM" or re.fullmatch(r"T2[A-Z]*", w) for w in words):
        return SAG_T2
    if any(re.fullmatch(r"T1[A-Z]*", w) for w in words):  # T1W, T1FS; never T12 (a vertebra)
        return SAG_T1
    return None


def _type_from_text(text: str) -> str | None:
    words = _words(text)
    if words & AXIAL_WORDS:
        return AXIAL_T2
    if words & SAGITTAL_WORDS:
        return _weighting(words)
    return None
