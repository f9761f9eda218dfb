"""Where a run's files go: probe the folder before any work, write every file atomically.

A read-only or full output folder must show in the first second of a run, not after nine
hours of compute: `probe_writable` creates the folder, writes, syncs and removes a small
file there. `atomic_write` writes to a temporary file in the same folder, syncs it, renames
it over the target and syncs the folder, so a reader (Kaggle's scorer, an interrupted run, a
resumed training run) sees the old file or the new one, never half of one, and never a
0-byte leftover: the temporary file is removed on any failure. Files get the mode an
ordinary ``open()`` would give them (0644 under the usual umask 022), not ``mkstemp``'s
0600. It is the one way the package writes a file that someone reads back: the CSV and the
run report, manifests, training checkpoints and records, out-of-fold files, the study cache,
QA pages (`atomic_write_text`, `atomic_copy` are its text and copy forms).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

#: Bytes the probe writes. Whether the whole CSV fits is proved right after discovery by the
#: priors-only safety net, which has the final CSV's size.
PROBE_BYTES = 4096


class OutputError(RuntimeError):
    """The output location cannot be written; the message names it and says why."""


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


def probe_writable(folder: str | os.PathLike, what: str = "output") -> Path:
    """Create ``folder`` if needed and prove a file can be written and renamed there.
    Raises `OutputError` naming the folder and the reason."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the {what} folder {folder}: {_reason(e)}; choose a writable location") from None
    if not folder.is_dir():
        raise OutputError(f"the {what} folder {folder} is not a folder; choose a writable location")
    try:
        atomic_write(folder / ".rsna_infer_probe", lambda fh: fh.write(b"\0" * PROBE_BYTES), binary=True)
        (folder / ".rsna_infer_probe").unlink()
    except OSError as e:
        raise OutputError(f"cannot write to the {what} folder {folder}: {_reason(e)}; choose a writable location "
                          "with free space") from None
    return folder


def atomic_write(path: str | os.PathLike, write: Callable[[IO], object], binary: bool = False) -> Path:
    """``write(file)`` into a temporary file beside ``path``, then rename it to ``path``.
    The folder must exist. Text files are UTF-8 with newlines as written. On any error the
    temporary file is removed and the error raised; an existing ``path`` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": "", "encoding": "utf-8"})) as fh:
            os.fchmod(fh.fileno(), 0o666 & ~current_umask())
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)
    return path


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (where the platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse to sync a folder; the file itself is synced
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of a string."""
    return atomic_write(path, lambda fh: fh.write(text))


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` with `atomic_write` (``dst``'s folder must exist)."""
    with open(src, "rb") as fh_in:
        return atomic_write(dst, lambda fh: shutil.copyfileobj(fh_in, fh, 1 << 20), binary=True)
