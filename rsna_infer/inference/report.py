"""``run_report.json``: what a prediction run did, written beside the submission.

`RunReport` is filled in by `rsna_infer.api.predict`: the settings as the run resolved them
(`rsna_infer.settings.RunSettings.report`), the models, and the run's outcome
(`record_result`); `write_report` writes it without ever failing a run whose CSV is written.

It answers the questions asked after a long offline run: which code and weights produced
this CSV (versions, manifest hash, models), how long each stage took, and what went wrong
for which study (warnings, exceptions, fallback rows, shed work). It also carries the final
keypoints of every study in patient coordinates, so the demo can measure keypoint error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..constants import N_CONDITIONS, N_LEVELS

if TYPE_CHECKING:
    from ..keypoints import KeypointSet, StudyKeypoints

logger = logging.getLogger(__name__)

#: Distributions whose versions every report records.
VERSIONED = ("rsna-infer", "torch", "timm", "timm-3d", "pydicom", "numpy", "pandas", "safetensors")
N_TARGETS = N_CONDITIONS * N_LEVELS


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


class Timings:
    """Seconds spent per named stage (``"stage1/sag3d_t2"``, ``"load"``...), additive."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + float(seconds)

    @contextlib.contextmanager
    def timed(self, key: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(key, time.perf_counter() - t0)

    def merge(self, other: "Timings") -> None:
        for k, v in other.seconds.items():
            self.add(k, v)

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in sorted(self.seconds.items())}


@dataclass
class StudyRecord:
    """One study's outcome.

    ``status``: ``ok`` (every target from models), ``partial`` (some targets from priors),
    ``fallback`` (all 25 from priors: nothing usable, or an exception), ``skipped`` (the
    deadline guard gave it priors without reading it).
    """

    study_id: int
    status: str = "ok"
    prior_targets: int = 0
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    keypoints: dict[str, Any] = field(default_factory=dict)
    cross_view: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)

    def error(self, where: str, exc: BaseException) -> None:
        self.errors.append(f"{where}: {type(exc).__name__}: {exc}")

    def set_prior_targets(self, n: int) -> None:
        self.prior_targets = int(n)
        if self.status == "skipped":
            return
        self.status = "fallback" if n >= N_TARGETS else "partial" if n > 0 else "ok"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 4)
        return d


@dataclass
class RunResult:
    """What `rsna_infer.inference.engine.Predictor.run` returns: per-study probabilities and
    coverage (targets a model predicted), records, timings, and what the run met."""

    study_ids: list[int]
    probs: dict[int, np.ndarray]
    coverage: dict[int, np.ndarray]
    records: dict[int, StudyRecord]
    timings: Timings
    deadline: dict[str, Any] | None
    wall_s: float
    warnings: list[str] = field(default_factory=list)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)  # main process / loading process(es)
    faults: dict[str, Any] = field(default_factory=dict)  # what the machine did: workers, devices, OOM
    memory: dict[str, Any] = field(default_factory=dict)  # device memory: mode, plan, what was measured


def keypoint_set_dict(s: "KeypointSet") -> dict[str, Any]:
    """JSON form of one set: world mm and origin (the set each point came from; None where
    missing), confidence, series/stack."""
    valid = s.valid
    return {
        "kind": s.kind,
        "source": s.source,
        "origin": [str(o) if ok else None for o, ok in zip(s.origin, valid)],
        "world": [np.round(w, 2).tolist() if ok else None for w, ok in zip(s.world, valid)],
        "confidence": np.round(s.confidence, 4).tolist(),
        "series_id": s.series_id.tolist(),
        "stack_index": s.stack_index.tolist(),
    }


def keypoints_dict(kp: "StudyKeypoints") -> dict[str, Any]:
    """Every set of a study plus the merged best set per kind (``best/<kind>``, with the
    default preference of `rsna_infer.stage1.assemble.DEFAULT_PREFER`; ``origin`` says per
    point which set it came from)."""
    from ..keypoints import POINT_KINDS
    from ..stage1.assemble import preferred_best

    out = {key: keypoint_set_dict(s) for key, s in sorted(kp.sets.items())}
    for kind in POINT_KINDS:
        best = preferred_best(kp, kind)
        if best is not None:
            out[f"best/{kind}"] = keypoint_set_dict(best)
    return out


@dataclass
class RunReport:
    """Everything about one run; `write` puts it in ``run_report.json``."""

    versions: dict[str, str | None] = field(default_factory=package_versions)
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    argv: list[str] = field(default_factory=lambda: list(sys.argv))
    host: dict[str, Any] = field(default_factory=lambda: {"platform": platform.platform(), "cpus": os.cpu_count()})
    test_dir: str = ""
    out_csv: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)
    devices: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    n_studies: int = 0
    wall_s: float = 0.0
    studies_per_s: float = 0.0
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    summary: dict[str, int] = field(default_factory=dict)
    deadline: dict[str, Any] = field(default_factory=dict)
    faults: dict[str, Any] = field(default_factory=dict)  # what the machine did: workers, devices, OOM
    memory: dict[str, Any] = field(default_factory=dict)  # device memory: mode, plan per member, measured, peak
    warnings: list[str] = field(default_factory=list)
    studies: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add_studies(self, records: list[StudyRecord]) -> None:
        for r in records:
            self.studies[str(r.study_id)] = r.to_dict()
        counts: dict[str, int] = {}
        for r in self.studies.values():
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        self.summary = {"studies": len(self.studies), **dict(sorted(counts.items())),
                        "studies_with_errors": sum(bool(r["errors"]) for r in self.studies.values()),
                        "prior_targets": sum(r["prior_targets"] for r in self.studies.values())}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: str | os.PathLike) -> Path:
        """Atomically (`rsna_infer.output.atomic_write`): a report that does not fit leaves
        no partial or 0-byte file behind, and an older report stays as it was."""
        from ..output import atomic_write_text

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1, default=json_default) + "\n")


def json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def jsonable(obj: Any) -> Any:
    """Plain JSON types from a report dict that may hold numpy values."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def describe_filled(targets: Sequence[str]) -> str:
    """``'priors for 7 target(s): spinal_canal_stenosis x5, left_subarticular_stenosis x2'``."""
    from ..constants import CONDITIONS

    counts = {c: sum(t.startswith(c + "_l") for t in targets) for c in CONDITIONS}
    parts = [f"{c} x{n}" for c, n in counts.items() if n]
    return f"priors for {len(targets)} target(s) no model covered: " + ", ".join(parts)


def record_result(report: RunReport, result: RunResult, filled: dict[int, list[str]]) -> None:
    """The run's outcome in the report: every study's record (a study without one fell back
    whole), the prior targets the submission filled (``filled``: study -> targets), deadline,
    faults, memory and warnings."""
    for sid in result.study_ids:
        rec = result.records.setdefault(sid, StudyRecord(sid, status="fallback", fallbacks=["no result; prior rows"]))
        got = filled.get(sid, [])
        rec.set_prior_targets(len(got))
        if got and rec.status != "skipped":
            rec.fallbacks.append(describe_filled(got))
    report.deadline = result.deadline or {}
    report.warnings += result.warnings
    report.faults = result.faults
    report.memory = result.memory
    report.peak_rss_mb = result.peak_rss_mb
    report.n_studies = len(result.study_ids)
    report.add_studies([result.records[s] for s in result.study_ids])


def write_report(report: RunReport, path: Path, out_csv: Path, complete: bool) -> None:
    """The run report; failing to write it never fails a run whose CSV is written."""
    try:
        report.write(path)
    except OSError as e:
        logger.error("could not write the run report %s (%s); the submission %s is %s", path, e.strerror or e,
                     out_csv, "complete" if complete else "the priors-only safety net")
