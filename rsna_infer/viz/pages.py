"""The QA pages: one self-contained HTML page per study, one index page per run.

Layout of ``qa_dir``::

    index.html                  the run: status counts, per-stage time, deadline decisions,
                                warnings, every study ranked (links to the pages written)
    ranking.json                the same ranking, for tools
    study_<id>.html             one study: probabilities, pictures, keypoints, cross-view
                                check, warnings/errors/fallbacks, crops
    study_<id>/NN_*.png         model-input slices with keypoints; crops_NN_*.png grids
    study_<id>/qa.json          what each picture shows and where each marker was drawn

Pages use inline CSS, no script and no network; images are files beside the page, linked
relatively, so the folder can be zipped, downloaded from Kaggle and opened anywhere.
"""

from __future__ import annotations

import html
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..constants import CLASS_TO_LABEL, CONDITIONS, LEVEL_TO_COORD_LEVEL, LEVELS, N_LEVELS, SIDES, study_row_ids
from ..inference.report import json_default
from ..output import atomic_write_text
from .rank import TIER_NAMES, StudyScore, score_record

if TYPE_CHECKING:
    from .frames import StudyCapture

logger = logging.getLogger(__name__)


class Collected(Protocol):
    """What the pages read of a run's collector (`rsna_infer.viz.capture.QACollector`)."""

    out_dir: Path
    worst: int
    scores: dict[int, StudyScore]

    def captures(self) -> dict[int, StudyCapture]: ...

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.2em 2em;color:#1b1b1b;background:#fafafa}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
h3{font-size:1.05em;margin:1em 0 .3em}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ccc;padding:2px 7px;text-align:left;vertical-align:top}
th{background:#eee}td.num{text-align:right;font-variant-numeric:tabular-nums}
.g0{background:#dff3df}.g1{background:#ffe7c2}.g2{background:#ffd0d0}.prior{background:#e6e6e6;color:#666}
.badge{display:inline-block;padding:1px 8px;border-radius:9px;color:#fff;font-weight:600}
.s-ok{background:#3a9a3a}.s-partial{background:#d08a00}.s-fallback,.s-skipped{background:#c0392b}.s-errors{background:#8e44ad}
.warn{background:#fff4d6;border-left:4px solid #e0a800;padding:.3em .7em;margin:.5em 0}
.demo{background:#ffd9d9;border-left:4px solid #c0392b;padding:.3em .7em;margin:.5em 0;font-weight:600}
figure{display:inline-block;margin:0 14px 14px 0;vertical-align:top}figcaption{font-size:12px;max-width:420px;color:#444}
img{image-rendering:pixelated;border:1px solid #999}small{color:#666}code{font-size:12px}
nav a{margin-right:1em}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def _table(header: list[str], rows: list[list[str]], raw: bool = False) -> str:
    """A table; cells are escaped unless ``raw`` (then they are trusted HTML)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if raw else _e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _list(items: list[str], empty: str = "none") -> str:
    if not items:
        return f"<p><small>{_e(empty)}</small></p>"
    return "<ul>" + "".join(f"<li><code>{_e(i)}</code></li>" for i in items) + "</ul>"


def _badge(status: str) -> str:
    return f'<span class="badge s-{_e(status)}">{_e(status)}</span>'


def _rel(target: str | os.PathLike | None, start: Path) -> str | None:
    """Relative link from ``start`` to ``target`` when the file exists, else None."""
    if not target or not Path(target).is_file():
        return None
    return Path(os.path.relpath(Path(target).resolve(), start.resolve())).as_posix()


def _level(i: int) -> str:
    return LEVEL_TO_COORD_LEVEL[LEVELS[i]]


def _point_name(kind: str, i: int) -> str:
    return _level(i) if kind == "spinal" else f"{SIDES[i // N_LEVELS]} {_level(i % N_LEVELS)}"


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_fmt(x, nd) for x in v) + ")"
    return str(v)


# ----------------------------------------------------------------------------------------
# Study page
# ----------------------------------------------------------------------------------------
def _probability_table(probs: np.ndarray | None, coverage: np.ndarray | None) -> str:
    if probs is None:
        return "<p><small>no probabilities (the study is not in the submission)</small></p>"
    rows = []
    for c, cond in enumerate(CONDITIONS):
        cells = [f"<th>{_e(cond)}</th>"]
        for lv in range(N_LEVELS):
            p = probs[c, lv]
            k = int(np.argmax(p))
            prior = coverage is None or not bool(coverage[c, lv])
            cls = "prior" if prior else f"g{k}"
            label = "prior" if prior else _e(CLASS_TO_LABEL[k])
            cells.append(f'<td class="{cls}">{label} {p[k]:.2f}<br><small>{p[0]:.2f} / {p[1]:.2f} / {p[2]:.2f}</small></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = "<tr><th>condition \\ level</th>" + "".join(f"<th>{_e(_level(i))}</th>" for i in range(N_LEVELS)) + "</tr>"
    return (f"<table>{head}{''.join(rows)}</table><p><small>Cells: most likely grade and its probability; below, "
            "normal/mild / moderate / severe as submitted. Grey: no model covered the target (manifest priors).</small></p>")


def _cross_view(cv: dict[str, Any]) -> str:
    if not cv:
        return "<p><small>no cross-view check was run (no sagittal canal points)</small></p>"
    parts = []
    facts = [[k, _fmt(v)] for k, v in cv.items() if not isinstance(v, dict) and k != "replaced"]
    if facts:
        parts.append(_table(["check", "value"], facts))
    for key, val in cv.items():
        if isinstance(val, dict) and "distance_mm" in val:
            d = val.get("distance_mm") or []
            parts.append(f"<h3>{_e(key)} vs the sagittal canal points: median {_fmt(val.get('median_mm'))} mm, "
                         f"max {_fmt(val.get('max_mm'))} mm over {_e(val.get('n', 0))} point(s)</h3>")
            parts.append(_table(["point", "distance along the axial normal (mm)"],
                                [[_point_name("subarticular", i), _fmt(x)] for i, x in enumerate(d)]))
    replaced = cv.get("replaced") or {}
    if replaced:
        parts.append("<h3>low-confidence axial points replaced by the sagittal projection</h3>")
        parts.append(_list([f"{k}: {', '.join(v)}" for k, v in replaced.items()]))
    return "".join(parts)


def _frames_html(cap: "StudyCapture", folder: str, drawn: dict[str, dict[str, Any]]) -> str:
    if not cap.frames:
        return "<p><small>no model-input slice carries a keypoint of this study</small></p>"
    out = []
    current = None
    for f in cap.frames:
        if f.series_type != current:
            current = f.series_type
            out.append(f"<h3>{_e(current or 'other series')}</h3>")
        src = f"{folder}/{f.name}.png"
        marks = drawn.get(f.name, {}).get("marks", [])
        pts = "; ".join(
            f"{m['kind']} {m['name']}{' (truth)' if m['truth'] else ''}"
            + ("" if m["truth"] else f" conf {m['confidence']:.2f} from {m['provenance'] or '?'}")
            + (f", {m['dz_slices']:.1f} slices off" if m["dz_slices"] > 0.5 else "")
            for m in marks)
        out.append(f'<figure id="f-{_e(f.name)}"><a href="{_e(src)}"><img src="{_e(src)}" alt="{_e(f.label)}"></a>'
                   f"<figcaption>series {f.series_id} stack {f.stack_index}: {_e(f.label)}<br><small>{_e(pts)}</small>"
                   "</figcaption></figure>")
    return "".join(out)


def _points_html(cap: "StudyCapture") -> str:
    if not cap.points:
        return "<p><small>no keypoints</small></p>"
    rows = []
    truth = any(p["has_truth"] for p in cap.points)
    for p in cap.points:
        frame = f'<a href="#f-{_e(p["frame"])}">{_e(p["frame"])}</a>' if p["frame"] else "–"
        row = [_e(p["kind"]), _e(p["name"]), f"{p['confidence']:.3f}" if p["valid"] else "missing", _e(p["provenance"] or "–"),
               _e(f"{p['series_id']}/{p['stack_index']}" if p["valid"] else "–"), _e(_fmt(p["voxel"], 1)),
               _e(_fmt(p["world"], 1)), frame]
        if truth:
            row.append(_e(_fmt(p["truth_mm"], 1)) if p["has_truth"] else "not labelled")
        rows.append(row)
    header = ["kind", "point", "confidence", "provenance (set)", "series/stack", "voxel (z, y, x)", "patient (x, y, z) mm", "picture"]
    if truth:
        header.append("distance to truth (mm)")
    return _table(header, rows, raw=True)


def _sets_html(cap: "StudyCapture") -> str:
    if not cap.sets:
        return "<p><small>no keypoint sets</small></p>"
    rows = [[s["key"], s["kind"], s["source"] or "–", f"{s['valid']}/{s['points']}", _fmt(s["mean_confidence"], 3),
             " ".join(f"{c:.2f}" for c in s["confidence"])] for s in cap.sets]
    return _table(["set", "kind", "source", "valid points", "mean confidence", "confidence per point"], rows)


def _grids_html(cap: "StudyCapture", folder: str) -> str:
    if not cap.grids:
        return "<p><small>no stage-2 crops (no grader prepared a sample for this study, or its inputs have no known layout)</small></p>"
    out = []
    for g in cap.grids:
        src = f"{folder}/{g.name}.png"
        notes = [f"{name}: " + "; ".join(f"{t.title}: {t.note}" for t in tiles) for name, tiles in g.rows]
        out.append(f'<figure><a href="{_e(src)}"><img src="{_e(src)}" alt="{_e(g.group)} crops"></a>'
                   f"<figcaption>{_e(g.group)} ({_e(', '.join(g.members))})<details><summary>where each crop came from"
                   f"</summary><small>{'<br>'.join(_e(n) for n in notes)}</small></details></figcaption></figure>")
    return "".join(out)


def study_page(sid: int, rank: int, n_ranked: int, score: StudyScore, rec: dict[str, Any], cap: "StudyCapture | None",
               probs: np.ndarray | None, drawn: dict[str, dict[str, Any]], links: dict[str, str | None]) -> str:
    folder = f"study_{sid}"
    status = rec.get("status", "?")
    nav = ['<a href="index.html">run index</a>']
    nav += [f'<a href="{_e(href)}">{_e(name)}</a>' for name, href in links.items() if href]
    body = [f"<nav>{''.join(nav)}</nav>", f"<h1>Study {sid} {_badge(status)}</h1>",
            f"<p>QA rank {rank} of {n_ranked}: <b>{_e(score.reason)}</b> (uncertainty {score.uncertainty:.3f}); "
            f"{_e(rec.get('prior_targets', 0))} of 25 targets from priors; {_fmt(rec.get('seconds'))} s.</p>"]
    problems = list(rec.get("errors", [])) + list(rec.get("fallbacks", []))
    if problems:
        body.append('<div class="warn">' + "<br>".join(_e(p) for p in problems) + "</div>")
    body.append("<h2>Predicted probabilities</h2>")
    body.append(_probability_table(probs, cap.coverage if cap is not None else None))
    body.append("<h2>Warnings, errors, fallbacks</h2>")
    body.append("<h3>warnings</h3>" + _list(list(rec.get("warnings", []))))
    body.append("<h3>errors</h3>" + _list(list(rec.get("errors", []))))
    body.append("<h3>fallbacks</h3>" + _list(list(rec.get("fallbacks", []))))
    if cap is None:
        body.append("<p><b>No pictures:</b> this study never reached the end of a chunk (it was skipped by the deadline "
                    "guard, could not be read, or its chunk failed), so nothing the models saw was captured.</p>")
    else:
        if cap.notes:
            body.append("<h3>QA capture notes</h3>" + _list(cap.notes))
        body.append("<h2>Keypoints on the model inputs</h2>")
        body.append("<p><small>Each picture is one slice of a model input as the model saw it (canonical orientation, "
                    "resized, on the normalisation's clip range; sagittal: anterior left, superior up; axial: anterior up, "
                    "patient left on the right). Colour = level, circle = spinal, triangle = left, square = right, "
                    "x = ground truth; a white outline marks a point that lies off the drawn slice.</small></p>")
        body.append(_frames_html(cap, folder, drawn))
        body.append("<h2>Keypoints: confidence and provenance (merged best per kind)</h2>")
        body.append(_points_html(cap))
        if cap.truth_unplaced:
            body.append("<h3>label points not found in the decoded series</h3>" + _list(cap.truth_unplaced))
        body.append("<h3>every keypoint set</h3>" + _sets_html(cap))
    body.append("<h2>Cross-view check</h2>")
    body.append(_cross_view((rec.get("cross_view") or {}).get("cross_view", {})))
    if cap is not None:
        body.append("<h2>Stage-2 crops</h2>")
        body.append(_grids_html(cap, folder))
        if cap.volumes:
            body.append("<h2>Stacks</h2>")
            body.append(_table(["series type", "series", "stack", "shape (z, y, x)", "pixel mm (row, col)", "slice spacing mm"],
                               [[v["series_type"], v["series_id"], v["stack_index"], _fmt(v["shape"]), _fmt(v["spacing_mm"], 3),
                                 _fmt(v["slice_spacing_mm"], 3)] for v in cap.volumes]))
    return _page(f"study {sid}", "\n".join(body))


# ----------------------------------------------------------------------------------------
# Index page
# ----------------------------------------------------------------------------------------
def index_page(report: dict[str, Any], ranked: list[StudyScore], pages: dict[int, str], links: dict[str, str | None],
               worst: int) -> str:
    studies = report.get("studies", {})
    man = report.get("manifest", {})
    body = ["<h1>rsna_infer run</h1>"]
    nav = [f'<a href="{_e(href)}">{_e(name)}</a>' for name, href in links.items() if href]
    if nav:
        body.append(f"<nav>{''.join(nav)}</nav>")
    if man.get("demo"):
        body.append('<div class="demo">This run used the packaged demo weights (trained on phantoms; meaningless on real MRI).</div>')
    info = [["test root", report.get("test_dir", "")], ["submission", report.get("out_csv", "")],
            ["started", report.get("started", "")], ["manifest", f"{man.get('path')} (sha256 {str(man.get('sha256', ''))[:12]}…)"],
            ["devices", ", ".join(report.get("devices", []))],
            ["settings", ", ".join(f"{k}={v}" for k, v in report.get("settings", {}).items())],
            ["studies", report.get("n_studies", 0)], ["wall", f"{_fmt(report.get('wall_s'))} s ({_fmt(report.get('studies_per_s'), 3)} studies/s)"],
            ["peak RSS MB", ", ".join(f"{k} {v}" for k, v in report.get("peak_rss_mb", {}).items())],
            ["versions", ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items() if v)]]
    body.append(_table(["", ""], [[str(a), str(b)] for a, b in info]))
    body.append("<h2>Status</h2>")
    summary = report.get("summary", {})
    body.append(_table(["status", "studies"], [[k, v] for k, v in summary.items()]))
    if report.get("warnings"):
        body.append("<h2>Run warnings</h2>" + _list(list(report["warnings"])))
    body.append("<h2>Time per stage</h2>")
    timings = sorted(report.get("timings", {}).items(), key=lambda kv: -kv[1])
    body.append(_table(["stage", "seconds"], [[k, f"{v:.3f}"] for k, v in timings]))
    body.append("<p><small>load / prepare_at_load are summed over studies in the loading workers (they overlap the "
                "model time); wait_for_data is how long the models waited for them.</small></p>")
    body.append("<h2>Deadline decisions</h2>")
    dl = report.get("deadline") or {}
    if not dl:
        body.append("<p><small>no time budget was given: everything ran.</small></p>")
    else:
        body.append(_table(["", ""], [["budget s", _fmt(dl.get("budget_s"))], ["reserve s", _fmt(dl.get("reserve_s"))],
                                      ["final plan", dl.get("final_plan")], ["final TTA", dl.get("final_tta")],
                                      ["studies given priors unread", dl.get("studies_given_priors")]]))
        shed = dl.get("shed") or []
        if shed:
            keys = list(shed[0])
            body.append(_table(keys, [[_fmt(ev.get(k)) for k in keys] for ev in shed]))
        else:
            body.append("<p><small>nothing was shed.</small></p>")
    body.append("<h2>Studies, most problematic first</h2>")
    body.append("<p><small>Ranking: tier first (" + ", ".join(f"{v}" for v in TIER_NAMES.values()) + "), then "
                "uncertainty = (1 − mean keypoint confidence + mean normalised predictive entropy) / 2, then the number "
                f"of warnings. Pages were written for the {len(pages)} worst (qa_worst={worst}).</small></p>")
    rows = []
    for rank, s in enumerate(ranked, 1):
        rec = studies.get(str(s.study_id), {})
        link = f'<a href="{_e(pages[s.study_id])}">{s.study_id}</a>' if s.study_id in pages else str(s.study_id)
        rows.append([str(rank), link, _badge(rec.get("status", "?")), _e(TIER_NAMES[s.tier]), _fmt(s.keypoint_confidence, 3),
                     _fmt(s.entropy, 3), f"{s.uncertainty:.3f}", _e(rec.get("prior_targets", "")),
                     _e(len(rec.get("warnings", []))), _e(len(rec.get("errors", []))), _fmt(rec.get("seconds"))])
    body.append(_table(["rank", "study", "status", "tier", "keypoint conf", "entropy", "uncertainty", "prior targets",
                        "warnings", "errors", "seconds"], rows, raw=True))
    return _page("rsna_infer run", "\n".join(body))


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------
def _submission_probs(out_csv: str | None, sids: list[int]) -> dict[int, np.ndarray]:
    """The submitted [5, 5, 3] rows of ``sids`` (empty when the CSV is not there)."""
    if not out_csv or not Path(out_csv).is_file() or not sids:
        return {}
    import pandas as pd

    from ..constants import CLASSES

    df = pd.read_csv(out_csv).set_index("row_id")
    out = {}
    for sid in sids:
        ids = study_row_ids(sid)
        if all(i in df.index for i in ids):
            out[sid] = df.loc[ids, list(CLASSES)].to_numpy(np.float64).reshape(len(CONDITIONS), N_LEVELS, -1)
    return out


def rank_studies(collector: Collected, report: dict[str, Any]) -> list[StudyScore]:
    """Every study of the report, most problematic first (captured scores, else from the report)."""
    scores = {}
    for key, rec in report.get("studies", {}).items():
        sid = int(key)
        scores[sid] = collector.scores.get(sid) or score_record({**rec, "study_id": sid})
    return sorted(scores.values(), key=lambda s: s.key, reverse=True)


def write_pages(collector: Collected, report: dict[str, Any], report_path: str | os.PathLike | None = None) -> Path:
    """Write the study pages of the ``collector.worst`` top-ranked studies and ``index.html``."""
    from .draw import render_frame, render_grid

    t0 = time.perf_counter()
    qa = collector.out_dir
    qa.mkdir(parents=True, exist_ok=True)
    ranked = rank_studies(collector, report)
    chosen = ranked[: collector.worst]
    captures = collector.captures()
    submitted = _submission_probs(report.get("out_csv"), [s.study_id for s in chosen])
    links = {"run_report.json": _rel(report_path, qa), "submission": _rel(report.get("out_csv"), qa)}
    pages: dict[int, str] = {}
    for rank, score in enumerate(chosen, 1):
        sid = score.study_id
        cap = captures.get(sid)
        folder = qa / f"study_{sid}"
        drawn: dict[str, dict[str, Any]] = {}
        grids: dict[str, dict[str, Any]] = {}
        if cap is not None:
            for f in cap.frames:
                drawn[f.name] = render_frame(f, folder / f"{f.name}.png")
            probs_for_tiles = submitted.get(sid, cap.probs)
            for g in cap.grids:
                grids[g.name] = render_grid(g, probs_for_tiles, cap.coverage, folder / f"{g.name}.png")
        probs = submitted.get(sid, cap.probs if cap is not None else None)
        rec = report.get("studies", {}).get(str(sid), {})
        page = study_page(sid, rank, len(ranked), score, rec, cap, probs, drawn, links)
        atomic_write_text(qa / f"study_{sid}.html", page)
        pages[sid] = f"study_{sid}.html"
        if cap is not None:
            sidecar = {
                "study_id": sid, "rank": rank, "score": score.to_dict(),
                "frames": [{"file": f"{f.name}.png", "group": f.group, "series_type": f.series_type, "series_id": f.series_id,
                            "stack_index": f.stack_index, "canon_z": round(f.canon_z, 4), "label": f.label, **drawn[f.name]}
                           for f in cap.frames],
                "grids": [{"file": f"{g.name}.png", "group": g.group, "members": g.members, **grids[g.name]} for g in cap.grids],
                "points": cap.points, "sets": cap.sets, "notes": cap.notes,
            }
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / "qa.json", json.dumps(sidecar, indent=1, default=json_default) + "\n")
    atomic_write_text(qa / "ranking.json", json.dumps([{**s.to_dict(), "page": pages.get(s.study_id)} for s in ranked], indent=1) + "\n")
    links["ranking.json"] = "ranking.json"
    index = qa / "index.html"
    atomic_write_text(index, index_page(report, ranked, pages, links, collector.worst))
    logger.info("QA pages: %d study page(s) and %s in %.1fs", len(pages), index, time.perf_counter() - t0)
    return index
