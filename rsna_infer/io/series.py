"""One series folder -> its stacks (`Volume`s), whatever the file names.

Every regular file in the folder is tried as DICOM (names and extensions mean nothing on
real data); files that are not DICOM, truncated, otherwise broken or of a kind this reader
does not handle are skipped with a warning that names them, and so is every folder entry that
is not a file (a sub-folder named ``x.dcm``, a symlink loop, a FIFO). A series whose every
file needs a decoder that is not installed raises `MissingDecoderError` with the package to
install.
"""

from __future__ import annotations

from concurrent.futures import Executor
from pathlib import Path

from .dicom import MissingDecoderError, SliceRecord
from .files import FolderListing, list_series_files, scan_folder
from .parallel import DEFAULT_PARALLEL, decode_files
from .problems import WarningLog, name_list
from .stacks import build_stacks
from .volume import Volume

__all__ = ["list_series_files", "read_series", "series_from_records"]


def read_series(
    series_dir: str | Path,
    *,
    series_id: int | None = None,
    description: str | None = None,
    study_id: int = 0,
    workers: int | None = None,
    parallel: str = DEFAULT_PARALLEL,
    executor: Executor | None = None,
    warnings: list[str] | None = None,
) -> list[Volume]:
    """Decode a series folder into stacks, largest first.

    ``series_id`` defaults to the folder name when it is a number. ``warnings``, when given,
    receives every problem as one line (they are logged as well). Returns ``[]`` for an
    empty, missing or unreadable folder or one without a readable image.
    """
    series_dir = Path(series_dir)
    if series_id is None:
        series_id = int(series_dir.name) if series_dir.name.isdigit() else 0
    listing = scan_folder(series_dir)
    records = decode_files(listing.files, workers=workers, parallel=parallel, executor=executor)
    return series_from_records(
        records, series_dir=series_dir, series_id=series_id, description=description, study_id=study_id,
        warnings=warnings, listing=listing,
    )


def series_from_records(
    records: list[SliceRecord],
    *,
    series_dir: str | Path,
    series_id: int,
    description: str | None = None,
    study_id: int = 0,
    warnings: list[str] | None = None,
    listing: FolderListing | None = None,
) -> list[Volume]:
    """Stacks from already decoded files of one series (see `read_series`); ``listing``
    (`files.scan_folder` of the folder) adds its skipped entries and folder problem."""
    warn = WarningLog(warnings, f"series {series_id}", f"study {study_id}")
    if listing is not None and listing.skipped:
        warn(f"{len(listing.skipped)} folder entr{'y' if len(listing.skipped) == 1 else 'ies'} that are not "
             f"files skipped: {', '.join(listing.skipped[:5])}{' ...' if len(listing.skipped) > 5 else ''}")
    if not records:
        problem = listing.problem if listing is not None and listing.problem else "no files"
        warn(f"{problem}: {series_dir}")
        return []
    bad = [r for r in records if not r.ok]
    good = [r for r in records if r.ok]
    decoder = [r for r in bad if r.error_kind == "decoder"]
    if not good and decoder:
        msg = f"series {series_id} ({series_dir}): none of {len(records)} files decodable: {decoder[0].error}"
        raise MissingDecoderError(msg)
    if bad:
        warn(f"{len(bad)} of {len(records)} file(s) skipped: "
             + name_list([r.path for r in bad], [r.error or "" for r in bad], sep="; "))
    if not good:
        warn(f"no readable DICOM image in {series_dir}")
        return []
    return build_stacks(good, study_id=study_id, series_id=series_id, description=description, warnings=warn.sink)
