"""Decode one study (every series once) into a `Study`: volumes by series type, best first.

Nothing about the data raises here: a missing or unreadable series, an unreadable file or a
missing decoder becomes a line in ``Study.warnings`` (and a WARNING log line) and the study
carries on with what it has. Files are decoded on one pool for the whole study, and each
series is stacked as soon as its files are in: its stored pixels are released before the
next series is stacked, so the peak is about the float32 study, not 1.5 times it.
"""

from __future__ import annotations

import logging
from concurrent.futures import Executor
from itertools import islice

from ..constants import AXIAL_T2, SAG_T1, SAG_T2, SERIES_TYPES
from ..geometry import plane_of
from .dicom import MissingDecoderError
from .discovery import StudyRef, infer_series_type
from .files import scan_folder
from .parallel import DEFAULT_PARALLEL, iter_decode
from .problems import WarningLog
from .series import series_from_records
from .volume import Study, Volume

logger = logging.getLogger(__name__)

#: The slice plane each series type is acquired in.
EXPECTED_PLANE: dict[str, str] = {SAG_T1: "sagittal", SAG_T2: "sagittal", AXIAL_T2: "axial"}


def load_study(
    ref: StudyRef,
    *,
    workers: int | None = None,
    parallel: str = DEFAULT_PARALLEL,
    executor: Executor | None = None,
) -> Study:
    """Decode every readable series of ``ref``; files of all series share one pool.

    ``Study.volumes[type]`` lists the stacks of every series of that type, stacks in the
    type's own plane first, then larger stacks first (then series order). Series whose CSV
    description is not a known type are typed from their headers.
    """
    study = Study(study_id=ref.study_id)
    warn = WarningLog(study.warnings, context=f"study {ref.study_id}")
    if ref.path is None:
        warn(f"study {ref.study_id}: folder missing")
    elif ref.problem:
        warn(f"study {ref.study_id}: {ref.problem}")
    readable = []
    for s in ref.series:
        if s.problem:
            warn(f"series {s.series_id} ({s.description}): {s.problem}")
        else:
            readable.append(s)
    listings = [scan_folder(s.path) for s in readable]
    records = iter_decode([p for lst in listings for p in lst.files], workers=workers, parallel=parallel,
                          executor=executor)
    ranked: list[tuple[int, int, int, Volume]] = []
    try:
        for order, (s, listing) in enumerate(zip(readable, listings)):
            recs = list(islice(records, len(listing.files)))  # this series' files only
            vols = _stack_series(s, recs, listing, ref.study_id, study, warn)
            del recs  # its stored pixels go now, before the next series is decoded in
            if vols:
                expected = EXPECTED_PLANE.get(vols[0].description)  # type: ignore[arg-type]
                for v in vols:
                    off_plane = int(expected is not None and plane_of(v.normal) != expected)
                    ranked.append((off_plane, -v.shape[0], order, v))
    finally:
        records.close()
    for _, _, _, v in sorted(ranked, key=lambda t: t[:3]):
        study.volumes.setdefault(v.description, []).append(v)
    for t in SERIES_TYPES:
        if not study.volumes.get(t):
            warn(f"no {t} volume")
    if study.warnings:
        logger.info("study %s: %d warning(s)", ref.study_id, len(study.warnings))
    return study


def _stack_series(s, recs, listing, study_id: int, study: Study, warn: WarningLog) -> list[Volume]:
    """The typed stacks of one series ([] when it cannot be used; the reason is a warning)."""
    description = s.description
    if description not in SERIES_TYPES:
        inferred = infer_series_type([r for r in recs if r.ok])
        warn(f"series {s.series_id}: description {description!r} is not a known type; headers say {inferred!r}")
        description = inferred
    try:
        vols = series_from_records(
            recs, series_dir=s.path, series_id=s.series_id, description=description,
            study_id=study_id, warnings=study.warnings, listing=listing,
        )
    except MissingDecoderError as e:
        warn(str(e))
        return []
    except Exception as e:  # a data oddity nobody foresaw must not stop a 9-hour run
        logger.exception("study %s series %s: unexpected error while stacking", study_id, s.series_id)
        warn(f"series {s.series_id}: could not be stacked ({type(e).__name__}: {e})")
        return []
    if description is None:
        if vols:
            warn(f"series {s.series_id}: type unknown (plane {plane_of(vols[0].normal)}); not used")
        return []
    expected = EXPECTED_PLANE.get(description)
    if vols and expected is not None and all(plane_of(v.normal) != expected for v in vols):
        warn(f"series {s.series_id}: no {expected} stack in a {description} series (planes: "
             f"{sorted({plane_of(v.normal) for v in vols})})")
    return vols
