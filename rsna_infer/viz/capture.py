"""Capture, during a run, what the models saw: model-input slices with keypoints, and crops.

`QACollector` is the `rsna_infer.inference.chunk.RunObserver` of a run with QA pages. Each chunk
gets a `ChunkCapture`: the predictor hands it every group's samples (``add``) and, after the
blend, the chunk's studies, keypoints and results (``close``). Nothing is read again from
disk and nothing is recomputed (what is kept and how pictures and points are laid out:
`rsna_infer.viz.frames`).

At ``close`` every study is scored (`rsna_infer.viz.rank`); only a study that enters the
current worst ``worst`` (a bounded heap) is turned into a compact `StudyCapture` (uint8
slices and crop centre slices, keypoint tables); the chunk's samples are then released. So a
2,000-study run holds at most ``worst`` captures plus one score per study.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .frames import CropGrid, ModelInput, StudyCapture, build_frames, crop_grid, set_summaries, volume_summaries
from .rank import StudyScore, score_chunk_study

if TYPE_CHECKING:
    import pandas as pd

    from ..inference.chunk import ChunkOutput
    from ..io.volume import Study
    from ..keypoints import StudyKeypoints
    from ..models.family import Family, Sample

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# The observer
# ----------------------------------------------------------------------------------------
class ChunkCapture:
    """What one chunk shows the collector; lives and dies with its `ChunkOutput`."""

    def __init__(self, collector: "QACollector") -> None:
        self.collector = collector
        self._inputs: dict[int, list[ModelInput]] = {}
        self._grids: dict[int, list[CropGrid]] = {}
        self._order = itertools.count()
        self._notes: dict[int, list[str]] = {}
        self.seconds = 0.0

    def add(self, group: Any, family: "Family", items: list[tuple[int, "Sample"]]) -> None:
        """Keep references to a stage-1 group's samples; lay out a stage-2 group's crops now
        (uint8 centre slices, so the big crop arrays are not held until the chunk ends)."""
        t0 = time.perf_counter()
        order = next(self._order)
        for sid, sample in items:
            try:
                if int(group.stage) == 1:
                    self._inputs.setdefault(int(sid), []).append(ModelInput(str(group.key), order, family, sample))
                else:
                    grid = crop_grid(group, family, sample)
                    if grid is not None:
                        self._grids.setdefault(int(sid), []).append(grid)
            except ValueError:
                continue  # a sample without image geometry (nothing to draw)
            except Exception as e:  # a QA problem must never hurt the run
                self._notes.setdefault(int(sid), []).append(f"capture of {group.key} failed: {type(e).__name__}: {e}")
        self.seconds += time.perf_counter() - t0

    def close(self, studies: dict[int, "Study"], keypoints: dict[int, "StudyKeypoints"], out: "ChunkOutput") -> None:
        """Score every study of the chunk; capture those that enter the worst-N; release the rest."""
        t0 = time.perf_counter()
        try:
            for sid, rec in out.records.items():
                kp = keypoints.get(sid)
                score = score_chunk_study(rec, out.probs.get(sid), out.coverage.get(sid), kp)
                if not self.collector.consider(score):
                    continue
                cap = StudyCapture(int(sid), score, probs=out.probs.get(sid), coverage=out.coverage.get(sid),
                                   notes=list(self._notes.get(sid, [])))
                try:
                    self._fill(cap, studies.get(sid), kp)
                except Exception as e:
                    logger.warning("QA capture of study %s failed: %s: %s", sid, type(e).__name__, e, exc_info=e)
                    cap.notes.append(f"capture failed: {type(e).__name__}: {e}")
                self.collector.offer(cap)
        finally:
            self._inputs.clear()
            self._grids.clear()
            self.seconds += time.perf_counter() - t0
            out.timings.add("qa/capture", self.seconds)

    def _fill(self, cap: StudyCapture, study: "Study | None", kp: "StudyKeypoints | None") -> None:
        sid = cap.study_id
        cap.grids = self._grids.get(sid, [])
        for n, g in enumerate(cap.grids):
            g.name = f"crops_{n + 1:02d}_{g.group.replace('/', '-').replace('#', '-')}"
        cap.sets = set_summaries(kp)
        cap.volumes = volume_summaries(study)
        if study is None:
            return
        truth = self.collector.truth(study)
        if truth is not None:
            cap.truth_unplaced = list(truth.report.get("truth_unplaced", []))
        cap.frames, cap.points = build_frames(study, self._inputs.get(sid, []), kp, truth)


class QACollector:
    """Keeps the ``worst`` most problematic studies of a run (see `rsna_infer.viz.rank`) and
    writes their pages (`write`). ``labels``: a ``train_label_coordinates.csv`` (path, or the
    dict of `rsna_infer.io.labels.read_coordinates`) whose points are drawn as ground truth."""

    def __init__(self, out_dir: "str | Path", worst: int = 10, labels: "str | Path | dict[int, pd.DataFrame] | None" = None) -> None:
        from . import require_pillow

        require_pillow()
        if int(worst) < 0:
            raise ValueError(f"qa_worst must be >= 0, got {worst}")
        self.out_dir = Path(out_dir)
        self.worst = int(worst)
        self.labels_path: str | None = None
        self.coords: dict[int, pd.DataFrame] | None = None
        if labels is not None:
            if isinstance(labels, dict):
                self.coords = labels
            else:
                from ..io.labels import read_coordinates

                self.labels_path = str(labels)
                self.coords = read_coordinates(labels)
        self.scores: dict[int, StudyScore] = {}
        self._heap: list[tuple[tuple, int, StudyCapture]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()

    # -- the RunObserver side -------------------------------------------------------------
    def new_chunk(self) -> ChunkCapture:
        return ChunkCapture(self)

    def consider(self, score: StudyScore) -> bool:
        """Record ``score``; True when the study would enter the current worst-N."""
        with self._lock:
            self.scores[score.study_id] = score
            return self.worst > 0 and (len(self._heap) < self.worst or score.key > self._heap[0][0])

    def offer(self, cap: StudyCapture) -> None:
        with self._lock:
            item = (cap.score.key, next(self._seq), cap)
            if len(self._heap) < self.worst:
                heapq.heappush(self._heap, item)
            elif self.worst > 0 and item[0] > self._heap[0][0]:
                heapq.heapreplace(self._heap, item)

    def truth(self, study: "Study") -> "StudyKeypoints | None":
        """Ground-truth keypoint sets of ``study`` from the labels (None without labels)."""
        if self.coords is None:
            return None
        from ..io.labels import truth_keypoints

        return truth_keypoints(study, self.coords.get(int(study.study_id)))

    # -- after the run --------------------------------------------------------------------
    def captures(self) -> dict[int, StudyCapture]:
        with self._lock:
            return {c.study_id: c for _, _, c in self._heap}

    def write(self, report: dict[str, Any], report_path: "str | Path | None" = None) -> Path:
        """Pages of the worst studies and the run's index page; returns the index path."""
        from .pages import write_pages

        return write_pages(self, report, report_path)
