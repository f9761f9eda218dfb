"""``rsna_infer.predict``: the one call. A Kaggle-layout test root in, ``submission.csv`` and
``run_report.json`` out.

`predict` is the run's frame around the engine (`rsna_infer.inference.engine.Predictor`):
its options are validated (`rsna_infer.settings.RunSettings`) and its clock started in one
place, then, so that every configuration or path mistake fails before a model runs: the
manifest -> the output folder -> study discovery -> the safety net (a priors-only CSV) ->
the models -> the studies -> the real CSV and the report -> the QA pages.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .inference.engine import Predictor
from .inference.report import RunReport, RunResult, Timings, record_result, write_report
from .models.manifest import Manifest, demo_entries, resolve_manifest_path
from .output import OutputError
from .settings import RunSettings

if TYPE_CHECKING:
    import pandas as pd

    from .io.discovery import StudyRef
    from .stage1.chain import Finalize
    from .viz.capture import QACollector

logger = logging.getLogger(__name__)

DEMO_WARNING = (
    "USING THE PACKAGED DEMO WEIGHTS: they were trained on synthetic phantom studies and are "
    "meaningless on real MRI. Pass manifest=... (CLI --manifest, or $RSNA_INFER_MANIFEST) for real weights."
)


def predict(
    test_dir: str | os.PathLike,
    out_csv: str | os.PathLike = "submission.csv",
    manifest: "str | os.PathLike | Manifest | None" = None,
    *,
    settings: RunSettings | None = None,
    clock: Callable[[], float] = time.monotonic,
    finalize: "Finalize | None" = None,
    **options: Any,
) -> "pd.DataFrame":
    """Write ``out_csv`` (25 rows per study of ``test_dir``'s series CSV) and
    ``run_report.json`` beside it; return the submission frame.

    ``manifest``: path or `Manifest`; default ``$RSNA_INFER_MANIFEST``, else the packaged
    demo manifest (phantom-trained weights, with a loud warning). ``options``: the run's
    options by name (`rsna_infer.settings.RunSettings`, e.g. ``device="cuda"``,
    ``tta=False``, ``num_workers=0``, ``time_budget_s=8.5 * 3600``, ``study_ids=[...]``,
    ``qa_dir=...``), or all of them at once as ``settings`` (``options`` then replace
    single fields). ``clock``: the time source the budget is measured with (the budget
    counts from this call); ``finalize``: the stage-1 finalisation
    ``(study, keypoints) -> keypoints`` (default `rsna_infer.stage1.assemble.finalize`).

    Order, so that every configuration or path mistake fails before a model runs, with an
    error that says what to fix (`ValueError` for an option, `ManifestError`,
    `rsna_infer.output.OutputError`, `rsna_infer.io.NoStudiesError`,
    `rsna_infer.runtime.devices.DeviceError`): the options are validated -> the manifest is
    validated (files, sha256, paths, blend groups) -> the output folder is probed -> studies
    are discovered -> a priors-only ``out_csv`` is written (the safety net: a run killed
    later still leaves a valid submission) -> the models are built and checked -> the
    studies stream through them -> the real ``out_csv`` replaces the safety net. Everything
    runs with ``HF_HUB_OFFLINE=1``.
    """
    from .models.backbones import hub_offline

    start = clock()  # the one place the run's clock starts: the time budget counts from here
    settings = RunSettings.of(settings, **options)  # the one place the options are validated
    with hub_offline():
        return _predict(test_dir, Path(out_csv), manifest, settings, clock, finalize, start)


def _predict(test_dir: str | os.PathLike, out_csv: Path, manifest: "str | os.PathLike | Manifest | None",
             settings: RunSettings, clock: Callable[[], float], finalize: "Finalize | None", start: float) -> "pd.DataFrame":
    t0 = time.perf_counter()
    collector = _qa_collector(settings)  # before any model is loaded: a missing Pillow or a bad labels file fails in seconds
    report = RunReport(test_dir=str(test_dir), out_csv=str(out_csv))
    rpath = settings.report_path or out_csv.with_name("run_report.json")
    man = _manifest_for_prediction(manifest, report)
    _probe_outputs(out_csv, rpath)
    t = time.perf_counter()
    refs = _discover(test_dir, settings)
    discover_s = time.perf_counter() - t
    _write_csv(None, out_csv, [int(r.study_id) for r in refs], man.priors)
    predictor = Predictor(man, settings, verify=False, finalize=finalize, clock=clock)
    report.devices = [str(d) for d in predictor.devices]
    report.warnings += predictor.notes
    report.models = predictor.models_info()
    report.settings = predictor.settings.report()
    result = predictor.run(refs, start=start, observer=collector)
    timings = Timings()
    timings.merge(predictor.timings)
    timings.merge(result.timings)
    timings.add("discover", discover_s)
    frame = _write_outputs(report, result, man, out_csv, rpath, timings)
    report.wall_s = round(time.perf_counter() - t0, 3)
    report.studies_per_s = round(len(result.study_ids) / result.wall_s, 4) if result.wall_s > 0 else 0.0
    write_report(report, rpath, out_csv, complete=True)
    logger.info("%d studies in %.1fs (%.2f studies/s); %s; report: %s", report.n_studies, report.wall_s,
                report.studies_per_s, report.summary, rpath)
    if collector is not None:  # the submission is written: a QA problem is logged, never raised
        try:
            collector.write(report.to_dict(), rpath)
        except Exception:
            logger.exception("writing the QA pages under %s failed", settings.qa_dir)
    return frame


def _qa_collector(settings: RunSettings) -> "QACollector | None":
    """The QA pages' observer (`rsna_infer.viz`), when ``qa_dir`` asks for them."""
    if settings.qa_dir is None:
        return None
    from .viz.capture import QACollector

    return QACollector(settings.qa_dir, worst=settings.qa_worst, labels=settings.qa_labels)


def _probe_outputs(out_csv: Path, report_path: Path) -> None:
    """Every output folder writable, before anything is computed."""
    from .output import probe_writable

    for folder in dict.fromkeys([out_csv.parent, report_path.parent]):
        probe_writable(folder)


def _discover(test_dir: str | os.PathLike, settings: RunSettings) -> list["StudyRef"]:
    """The studies of the series CSV (``study_ids`` of them, in that order, when given)."""
    from .io import NoStudiesError, describe_no_studies, discover_studies

    refs = discover_studies(test_dir, split=settings.split)
    if not refs:
        raise NoStudiesError(describe_no_studies(test_dir, settings.split))
    if settings.study_ids is not None:
        refs = _select_studies(refs, settings.study_ids, test_dir)
    for ref in refs:
        logger.debug("study %s: %s", ref.study_id, ref.problems)
    return refs


def _write_outputs(report: RunReport, result: RunResult, man: Manifest, out_csv: Path, rpath: Path,
                   timings: Timings) -> "pd.DataFrame":
    """The submission over the safety net, and the run's outcome in the report (written
    as it stands when the CSV cannot be)."""
    from .submission import assemble_submission

    t = time.perf_counter()
    assembled = assemble_submission(result.probs, result.study_ids, masks=result.coverage, priors=man.priors)
    record_result(report, result, assembled.filled)
    try:
        _write_csv(assembled.frame, out_csv, result.study_ids)
    except OutputError as e:
        report.warnings.append(str(e))
        write_report(report, rpath, out_csv, complete=False)
        raise
    timings.add("write", time.perf_counter() - t)
    report.timings = timings.to_dict()
    return assembled.frame


def _select_studies(refs: list["StudyRef"], study_ids: Sequence[int], test_dir: str | os.PathLike) -> list["StudyRef"]:
    """The refs of ``study_ids``, in their order; an unknown id is a configuration error."""
    by_id = {int(r.study_id): r for r in refs}
    missing = [int(s) for s in study_ids if int(s) not in by_id]
    if missing:
        some = ", ".join(str(s) for s in sorted(by_id)[:5])
        raise ValueError(f"study {missing[0]} is not in {test_dir} ({len(by_id)} studies, e.g. {some})")
    return [by_id[int(s)] for s in dict.fromkeys(study_ids)]


def _manifest_for_prediction(manifest: "str | os.PathLike | Manifest | None", report: RunReport) -> Manifest:
    """The manifest, validated for prediction (files present, sha256, paths, blend groups:
    `rsna_infer.inference.setup.manifest_for_run`, which the `Predictor` repeats without the
    hashing), and what the report says about it (path, hash, demo weights)."""
    from .inference.setup import manifest_for_run

    if isinstance(manifest, Manifest):
        man_path, is_demo = manifest.path, False
        man = manifest_for_run(manifest, verify=True)
    else:
        man_path, is_demo = resolve_manifest_path(manifest)
        man = manifest_for_run(man_path, verify=True)
    copied = [] if is_demo else demo_entries(man)  # demo weights copied elsewhere are still demo weights
    if is_demo or copied:
        is_demo = True
        logger.warning("%s\n%s\n%s", "!" * 88, DEMO_WARNING, "!" * 88)
        report.warnings.append(DEMO_WARNING + (f" (recognised by sha256: {', '.join(copied)})" if copied else ""))
    report.manifest = {"path": str(man_path) if man_path else None, "sha256": man.sha256, "demo": is_demo,
                       "notes": man.notes, "priors": "manifest" if man.priors_given else "default"}
    return man


def _write_csv(frame: "pd.DataFrame | None", out_csv: Path, study_ids: list[int], priors: np.ndarray | None = None) -> None:
    """The submission (``frame``), or with ``frame=None`` the priors-only safety net."""
    from .submission import prior_submission, write_submission

    try:
        if frame is None:
            write_submission(prior_submission(study_ids, priors), out_csv, study_ids)
            logger.info("safety net: a priors-only %s for %d studies is in place; the real one replaces it at the end",
                        out_csv, len(study_ids))
        else:
            write_submission(frame, out_csv, study_ids)
    except OSError as e:
        what = "the safety-net submission" if frame is None else "the final submission"
        kept = "" if frame is None else "; the priors-only safety net written at the start is still there"
        raise OutputError(f"cannot write {what} {out_csv}: {e.strerror or e}{kept}") from None
