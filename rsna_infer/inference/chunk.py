"""What one chunk produces and what observers see of it.

`ChunkOutput` is what `rsna_infer.inference.engine.Predictor.run_chunk` returns for one chunk
(merged by `rsna_infer.inference.schedule`, also across device threads; the whole run's
result is `rsna_infer.inference.report.RunResult`); `RunObserver` is how a watcher (the QA
pages of `rsna_infer.viz`) sees a chunk's samples and keypoints without changing the run.
`FailureLog` logs a per-study failure readably and records it in the study's record.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .report import StudyRecord, Timings

logger = logging.getLogger(__name__)


@dataclass
class ChunkOutput:
    """What one chunk produced; merged by the caller (also across device threads)."""

    probs: dict[int, np.ndarray] = field(default_factory=dict)
    coverage: dict[int, np.ndarray] = field(default_factory=dict)
    records: dict[int, StudyRecord] = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)
    member_s: dict[str, float] = field(default_factory=dict)
    oom_retries: int = 0  # batches split after CUDA out-of-memory
    load_s: dict[str, float] = field(default_factory=dict)  # streamed: seconds moving each member's weights in
    memory: dict[str, int] = field(default_factory=dict)  # peak bytes of one forward per member, where measured
    #: What an observer (`RunObserver`, e.g. the QA pages of `rsna_infer.viz`) keeps of this
    #: chunk's samples and keypoints; None without an observer.
    capture: Any = None


class RunObserver(Protocol):
    """Watches a run without changing it (`rsna_infer.viz.QACollector` writes QA pages).

    ``new_chunk()`` returns a per-chunk capture with ``add(group, family, items)``, called
    with every group's ``(study_id, sample)`` list as stage 1 and stage 2 get them, and
    ``close(studies, keypoints, out)``, called once after the blend. A chunk that fails
    simply drops its capture. Without an observer none of this runs.
    """

    def new_chunk(self) -> Any: ...


class FailureLog:
    """Logs a failure with its traceback the first time per kind (``"decode sag3d/t2"``),
    then as one line, so a systematic failure over 2,000 studies stays readable."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, kind: str, study_id: int, exc: BaseException) -> None:
        first = kind not in self.seen
        self.seen.add(kind)
        logger.error("study %s: %s failed: %s: %s%s", study_id, kind, type(exc).__name__, exc,
                     "" if first else " (traceback logged at the first occurrence)", exc_info=exc if first else None)

    def record(self, out: ChunkOutput, kind: str, study_id: int, exc: BaseException) -> None:
        """Log it and put it in the study's record (the study keeps what else worked)."""
        self(kind, study_id, exc)
        out.records[study_id].error(kind, exc)
