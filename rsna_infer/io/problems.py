"""The one way the io layer reports a problem with the data.

Every problem is a line the user sees: logged at WARNING (with the study and series it
concerns) and appended to the caller's list (``Study.warnings``, ``read_series(warnings=)``),
so that the run report carries it too. Nothing here raises.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger("rsna_infer.io")

#: File names listed in one warning before "and N more".
MAX_NAMES = 5


class WarningLog:
    """Collects warnings for the caller and logs each once.

    ``prefix`` starts every line (e.g. ``"series 12"``); ``context`` is added to the log line
    only (e.g. ``"study 7"``: the study's warning list needs no study id, the log does).
    """

    def __init__(self, sink: list[str] | None = None, prefix: str = "", context: str = "") -> None:
        self.sink = sink if sink is not None else []
        self.prefix, self.context = prefix, context

    def __call__(self, msg: str) -> None:
        text = f"{self.prefix}: {msg}" if self.prefix else msg
        logger.warning("%s", f"{self.context} {text}" if self.context else text)
        self.sink.append(text)

    def child(self, prefix: str) -> WarningLog:
        """The same list and context, another prefix (one series of a study)."""
        return WarningLog(self.sink, prefix, self.context)


def name_list(
    paths: Iterable[str | Path], details: Iterable[str] | None = None, limit: int = MAX_NAMES, sep: str = ", "
) -> str:
    """``"1.dcm, 7.dcm (why), ... and 3 more"``: file names (not whole paths) for a warning."""
    paths = [Path(p).name for p in paths]
    why = list(details) if details is not None else [""] * len(paths)
    shown = [f"{n} ({w})" if w else n for n, w in zip(paths[:limit], why[:limit])]
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return sep.join(shown) + more
