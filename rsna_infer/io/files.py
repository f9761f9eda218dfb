"""What a series folder holds: the files to try as DICOM, in natural name order, and every
entry that is not one (a sub-folder named ``x.dcm``, a symlink loop, a FIFO...), named.

Listing never raises: a folder that cannot be read (``PermissionError``, an I/O error) comes
back with ``problem`` set, so one bad folder never stops discovery or a study.
"""

from __future__ import annotations

import errno
import logging
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

MISSING_FOLDER = "missing folder"


def natural_key(name: str) -> tuple:
    """Sort key that orders digit runs by value: ``2.dcm`` before ``10.dcm``."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


@dataclass
class FolderListing:
    """``files``: regular files (hidden ones too: names mean nothing on real data).
    ``skipped``: ``"name (why)"`` for every other entry. ``problem``: why the folder itself
    could not be listed (``"missing folder"``, ``"unreadable folder (...)"``), else None."""

    path: Path
    files: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    problem: str | None = None


def scan_folder(folder: str | Path) -> FolderListing:
    """List ``folder`` (see `FolderListing`); follows symlinks to files, never raises."""
    folder = Path(folder)
    out = FolderListing(folder)
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        out.problem = MISSING_FOLDER
        return out
    except OSError as e:  # PermissionError, EIO, ...: the folder is there but cannot be read
        out.problem = f"unreadable folder ({type(e).__name__}: {e})"
        return out
    for p in entries:
        why = _not_a_file(p)
        if why is None:
            out.files.append(p)
        else:
            out.skipped.append(f"{p.name} ({why})")
    out.files.sort(key=lambda p: natural_key(p.name))
    out.skipped.sort(key=natural_key)
    return out


def _not_a_file(p: Path) -> str | None:
    """Why ``p`` is not a regular file to read, or None if it is one."""
    try:
        mode = p.stat().st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        if e.errno == errno.ENOENT:
            return "a broken symlink"
        return f"not readable: {type(e).__name__}: {e.strerror or e}"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device file"


def list_series_files(series_dir: str | Path) -> list[Path]:
    """The files of `scan_folder` (``[]`` for a missing or unreadable folder)."""
    return scan_folder(series_dir).files
