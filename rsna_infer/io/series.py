"""One series folder -> its stacks (`Volume`s), whatever the file names.

Every regular file in the folder is tried as DICOM (names and extensions mean nothing on
real data); files that are not DICOM, truncated or otherwise broken are skipped with a
warning that names them. A series whose every file needs a decoder that is not installed
raises `MissingDecoderError` with the package to install.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import Executor
from pathlib import Path

from .dicom import MissingDecoderError, SliceRecord
from .parallel import DEFAULT_PARALLEL, decode_files
from .stacks import build_stacks
from .volume import Volume

logger = logging.getLogger(__name__)


def list_series_files(series_dir: str | Path) -> list[Path]:
    """Every regular file of a folder (hidden ones too: names mean nothing), in natural name
    order (``2.dcm`` before ``10.dcm``)."""
    d = Path(series_dir)
    if not d.is_dir():
        return []
    files = [p for p in d.iterdir() if p.is_file()]
    return sorted(files, key=lambda p: _natural_key(p.name))


def _natural_key(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


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
    empty folder or one without a readable image.
    """
    series_dir = Path(series_dir)
    if series_id is None:
        series_id = int(series_dir.name) if series_dir.name.isdigit() else 0
    records = decode_files(list_series_files(series_dir), workers=workers, parallel=parallel, executor=executor)
    return series_from_records(
        records, series_dir=series_dir, series_id=series_id, description=description, study_id=study_id,
        warnings=warnings,
    )


def series_from_records(
    records: list[SliceRecord],
    *,
    series_dir: str | Path,
    series_id: int,
    description: str | None = None,
    study_id: int = 0,
    warnings: list[str] | None = None,
) -> list[Volume]:
    """Stacks from already decoded files of one series (see `read_series`)."""
    sink = warnings if warnings is not None else []

    def warn(msg: str) -> None:
        text = f"series {series_id}: {msg}"
        logger.warning(text)
        sink.append(text)

    if not records:
        warn(f"no files in {series_dir}")
        return []
    bad = [r for r in records if not r.ok]
    good = [r for r in records if r.ok]
    decoder = [r for r in bad if r.error_kind == "decoder"]
    if not good and decoder:
        msg = f"series {series_id} ({series_dir}): none of {len(records)} files decodable: {decoder[0].error}"
        raise MissingDecoderError(msg)
    if bad:
        listed = "; ".join(f"{Path(r.path).name} ({r.error})" for r in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        warn(f"{len(bad)} of {len(records)} file(s) skipped: {listed}{more}")
    if not good:
        warn(f"no readable DICOM image in {series_dir}")
        return []
    return build_stacks(good, study_id=study_id, series_id=series_id, description=description, warnings=sink)
