"""QA pages (rsna_infer.viz): ranking, capture during a run, pictures, pages and their links.

Geometry is checked independently of viz: a drawn marker must sit where the keypoint's
patient coordinate lands in the model input (volume geometry -> canonical orientation ->
resize convention of `rsna_infer.imaging`), and the PNG pixel there has the level's colour.
"""

from __future__ import annotations

import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import predict_fakes as fakes
import pytest
from predict_fakes import fake_entries, use_fake_cli, use_fake_families, write_fake_root

from rsna_infer import cli, predict
from rsna_infer.demo import check_demo_weights
from rsna_infer.models.random_weights import make_random_manifest
from rsna_infer.viz import VizUnavailable
from rsna_infer.viz import rank as R
from rsna_infer.viz.draw import LEVEL_COLOURS

KEEP = lambda study, kp: kp  # noqa: E731  (the fake families need no stage-1 finalize)


# -- helpers ---------------------------------------------------------------------------------
class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        d = dict(attrs)
        if tag == "script":
            self.scripts += 1
        for key in ("href", "src"):
            if d.get(key):
                self.links.append(d[key])
        if d.get("id"):
            self.ids.add(d["id"])


def _check_links(qa: Path) -> int:
    """Every href/src of every page resolves (files exist, fragments are ids); returns the count."""
    n = 0
    for page in qa.glob("*.html"):
        p = _Links()
        p.feed(page.read_text())
        assert p.scripts == 0, page
        for link in p.links:
            assert "://" not in link and not link.startswith("//"), (page, link)  # nothing from the network
            target, _, frag = link.partition("#")
            if target:
                assert (page.parent / target).is_file(), (page.name, link)
            else:
                assert frag in p.ids, (page.name, link)
            n += 1
    return n


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def _expected_pixel(study, series_id: int, stack_index: int, view: str, world, size: tuple[int, int]) -> tuple[float, float, float]:
    """(row, col, canonical z) of a patient point in a plainly resized model input of ``size``,
    computed from the volume geometry and the canonical orientation alone."""
    from rsna_infer.imaging import orient

    vol = study.find(series_id, stack_index)
    o = orient(vol, view)
    c = o.to_canonical(vol.to_voxel(np.asarray(world, np.float64)))
    shape = o.shape
    u = (c + 0.5) / np.asarray(shape, np.float64)
    return float(u[1] * size[0] - 0.5), float(u[2] * size[1] - 0.5), float(c[0])


def _load(root: Path, sid: int, split: str):
    from rsna_infer.io import discover_studies, load_study

    ref = next(r for r in discover_studies(root, split=split) if int(r.study_id) == sid)
    return load_study(ref)


# -- ranking ---------------------------------------------------------------------------------
def test_entropy_and_keypoint_confidence_are_normalised():
    uniform = np.full((5, 5, 3), 1 / 3)
    sure = np.zeros((5, 5, 3))
    sure[..., 0] = 1.0
    assert R.predictive_entropy(uniform, None) == pytest.approx(1.0)
    assert R.predictive_entropy(sure, None) == pytest.approx(0.0, abs=1e-9)
    cov = np.zeros((5, 5), bool)
    assert R.predictive_entropy(uniform, cov) is None
    cov[0] = True
    mixed = sure.copy()
    mixed[1:] = 1 / 3  # uncovered targets (priors) do not count
    assert R.predictive_entropy(mixed, cov) == pytest.approx(0.0, abs=1e-9)

    from rsna_infer.keypoints import KeypointSet, StudyKeypoints

    kp = StudyKeypoints(1)
    assert R.keypoint_confidence(kp) is None
    s = KeypointSet.empty("spinal")
    kp.sets["a"] = s.with_points(np.ones(5, bool), world=np.zeros((5, 3)), voxel=np.zeros((5, 3)),
                                 series_id=np.ones(5, np.int64), confidence=np.full(5, 0.5))
    assert R.keypoint_confidence(kp) == pytest.approx(5 * 0.5 / 25)  # 20 missing points count 0


def test_tiers_order_before_uncertainty():
    from rsna_infer.inference.report import StudyRecord

    probs = np.full((5, 5, 3), 1 / 3)
    cov = np.ones((5, 5), bool)
    ok = R.score_chunk_study(StudyRecord(1), probs, cov, None)
    err = StudyRecord(2)
    err.errors.append("run x: boom")
    errors = R.score_chunk_study(err, np.eye(3)[np.zeros((5, 5), int)], cov, None)
    partial_cov = cov.copy()
    partial_cov[4] = False
    partial = R.score_chunk_study(StudyRecord(3), probs, partial_cov, None)
    fallback = R.score_chunk_study(StudyRecord(4), None, None, None)
    assert [s.tier for s in (ok, errors, partial, fallback)] == [0, 2, 1, 3]
    order = sorted([ok, errors, partial, fallback], key=lambda s: s.key, reverse=True)
    assert [s.study_id for s in order] == [4, 2, 3, 1]
    assert R.score_record({"study_id": 9, "status": "skipped", "prior_targets": 25}).tier == 3
    assert R.score_record({"study_id": 9, "status": "ok", "prior_targets": 0, "errors": [], "fallbacks": []}).tier == 0


# -- drawing ---------------------------------------------------------------------------------
def test_a_marker_is_drawn_at_its_pixel_in_its_level_colour(tmp_path):
    from rsna_infer.viz.frames import Frame, Mark
    from rsna_infer.viz.draw import render_frame, to_display

    img = np.full((40, 50), 90, np.uint8)
    marks = [Mark("spinal", lv, 5.0 + 7 * lv, 10.3 + 6 * lv, False, 0.0) for lv in range(5)]
    marks += [Mark("subarticular", 5 + 2, 20.0, 44.0, False, 0.0), Mark("foraminal", 1, 33.4, 4.6, True, 0.0)]
    frame = Frame(img, "Sagittal T2/STIR", 1, 0, "g", "a test frame", 0.0, marks=marks)
    info = render_frame(frame, tmp_path / "f.png")
    px = _png(tmp_path / "f.png")
    s = info["scale"]
    assert px.shape[1] >= 50 * s and px.shape[0] > 40 * s  # legend below the image
    for m in marks:
        x, y = to_display(m.row, m.col, s)
        assert tuple(px[round(y), round(x)]) == LEVEL_COLOURS[m.level], m
    assert tuple(px[0, 0]) == (90, 90, 90)  # the image itself is the uint8 model input, unscaled in value


# -- runs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_qa(phantom_test_root, tmp_path_factory):
    """The demo weights on the phantom test root; QA pages for the 2 worst studies."""
    out = tmp_path_factory.mktemp("demo_qa")
    predict(phantom_test_root, out / "submission.csv", manifest=check_demo_weights(), device="cpu", num_workers=0,
            progress=False, chunk_size=2, qa_dir=out / "qa", qa_worst=2)
    return out


@pytest.fixture(scope="module")
def tiny_qa(phantom_test_root, tmp_path_factory):
    """Every family (tiny random weights, 3-D inputs and ROI companions included); 3 pages."""
    out = tmp_path_factory.mktemp("tiny_qa")
    man = make_random_manifest(out / "man", seed=3)
    predict(phantom_test_root, out / "submission.csv", manifest=man, device="cpu", num_workers=0, progress=False,
            chunk_size=4, qa_dir=out / "qa", qa_worst=3)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("run, n", [("demo_qa", 2), ("tiny_qa", 3)])
def test_qa_worst_writes_exactly_n_pages_of_the_worst(run, n, request):
    out = request.getfixturevalue(run)
    qa = out / "qa"
    pages = sorted(qa.glob("study_*.html"))
    assert len(pages) == n
    ranking = json.loads((qa / "ranking.json").read_text())
    rep = json.loads((out / "run_report.json").read_text())
    assert sorted(r["study_id"] for r in ranking) == sorted(int(s) for s in rep["studies"])
    assert {f"study_{r['study_id']}.html" for r in ranking[:n]} == {p.name for p in pages}
    assert all(r["page"] is None for r in ranking[n:])
    tier = {name: t for t, name in R.TIER_NAMES.items()}
    for a, b in zip(ranking, ranking[1:]):  # tier, then uncertainty (4 decimals in the JSON): worst first
        assert tier[a["tier"]] > tier[b["tier"]] or (tier[a["tier"]] == tier[b["tier"]] and a["uncertainty"] >= b["uncertainty"])
    assert not list(out.glob("*.png")) and not list(out.glob("*.html"))  # everything QA lives in qa_dir
    assert _check_links(qa) > 10


@pytest.mark.slow
def test_tiny_run_pictures_every_view_with_exact_geometry(tiny_qa, phantom_test_root):
    """Every mark of every picture (2-D channels and resampled 3-D slices) sits where the
    keypoint's patient coordinate lands in that model input."""
    from rsna_infer.models.manifest import load_manifest

    rep = json.loads((tiny_qa / "run_report.json").read_text())
    sizes = {f"{e.family}/{e.variant}": tuple(e.input.size[-2:]) for e in load_manifest(tiny_qa / "man" / "weights_manifest.json").models}
    groups, checked = set(), 0
    for side in (tiny_qa / "qa").glob("study_*/qa.json"):
        d = json.loads(side.read_text())
        study = _load(phantom_test_root, d["study_id"], "test")
        best = rep["studies"][str(d["study_id"])]["keypoints"]
        assert d["grids"], "stage-2 crops are pictured"
        for f in d["frames"]:
            groups.add(f["group"])
            assert (side.parent / f["file"]).is_file()
            view = "axial" if f["series_type"] == "Axial T2" else "sagittal"
            for m in f["marks"]:
                world = best[f"best/{m['kind']}"]["world"][m["index"]]
                row, col, cz = _expected_pixel(study, f["series_id"], f["stack_index"], view, world, sizes[f["group"]])
                assert abs(row - m["row"]) < 0.05 and abs(col - m["col"]) < 0.05, (f["file"], m)
                assert abs(abs(cz - f["canon_z"]) - m["dz_slices"]) < 0.01, (f["file"], m)
                checked += 1
    assert checked > 20
    assert {"sag3d/t2", "axial3d/default"} & groups, groups  # resampled 3-D inputs are pictured too
    page = next((tiny_qa / "qa").glob("study_*.html")).read_text()
    for section in ("Predicted probabilities", "Keypoints on the model inputs", "Cross-view check", "Stage-2 crops",
                    "provenance", "Warnings, errors, fallbacks"):
        assert section in page


@pytest.mark.slow
def test_demo_markers_land_on_their_keypoint_pixels(demo_qa, phantom_test_root):
    from rsna_infer.models.manifest import load_manifest

    rep = json.loads((demo_qa / "run_report.json").read_text())
    sizes = {f"{e.family}/{e.variant}": tuple(e.input.size[-2:]) for e in load_manifest(check_demo_weights()).models}
    n = 0
    for side in (demo_qa / "qa").glob("study_*/qa.json"):
        d = json.loads(side.read_text())
        study = _load(phantom_test_root, d["study_id"], "test")
        # every sagittal T2 input the spinal points are marked on (sag2d channels, sag3d slices)
        for frame in (f for f in d["frames"] if f["group"] in ("sag2d/t2", "sag3d/t2") and any(m["kind"] == "spinal" for m in f["marks"])):
            px = _png(side.parent / frame["file"])
            s = frame["scale"]
            assert px.shape[1] >= 64 * s and px.shape[0] >= 64 * s
            world = rep["studies"][str(d["study_id"])]["keypoints"]["best/spinal"]["world"]
            spinal = [m for m in frame["marks"] if m["kind"] == "spinal"]
            for m in spinal:
                row, col, _ = _expected_pixel(study, frame["series_id"], frame["stack_index"], "sagittal", world[m["index"]], sizes[frame["group"]])
                x, y = (col + 0.5) * s - 0.5, (row + 0.5) * s - 0.5
                crowded = any(o is not m and np.hypot(o["x"] - x, o["y"] - y) < 2.5 * s for o in frame["marks"])
                if not crowded:
                    assert tuple(px[round(y), round(x)]) == LEVEL_COLOURS[m["index"]], (frame["file"], m)
                    n += 1
    assert n >= 5


@pytest.mark.slow
def test_cli_show_draws_the_ground_truth(phantom_train, tmp_path, capsys):
    """``rsna-infer show`` on a labelled (train) study: the truth is drawn at its label pixel."""
    from rsna_infer.io.labels import read_coordinates, truth_keypoints

    root = phantom_train.root
    labels = root / "train_label_coordinates.csv"
    sid = int(sorted(read_coordinates(labels))[0])
    out = tmp_path / "show"
    rc = cli.main(["show", str(root), "--split", "train", "--study", str(sid), "--out", str(out), "--labels", str(labels),
                   "--manifest", str(check_demo_weights()), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().out
    assert f"study_{sid}.html" in capsys.readouterr().out
    assert [p.name for p in out.glob("study_*.html")] == [f"study_{sid}.html"]
    assert (out / "submission.csv").is_file() and (out / "index.html").is_file()
    _check_links(out)
    d = json.loads((out / f"study_{sid}" / "qa.json").read_text())
    from rsna_infer.models.manifest import load_manifest

    sizes = {f"{e.family}/{e.variant}": tuple(e.input.size[-2:]) for e in load_manifest(check_demo_weights()).models}
    study = _load(root, sid, "train")
    truth = truth_keypoints(study, read_coordinates(labels)[sid])
    n = 0
    for f in d["frames"]:
        px = _png(out / f"study_{sid}" / f["file"])
        view = "axial" if f["series_type"] == "Axial T2" else "sagittal"
        size = sizes[f["group"]]
        for m in (m for m in f["marks"] if m["truth"]):
            t = truth.get(f"truth_{m['kind']}")
            row, col, _ = _expected_pixel(study, f["series_id"], f["stack_index"], view, t.world[m["index"]], size)
            assert abs(row - m["row"]) < 1e-3 and abs(col - m["col"]) < 1e-3
            x, y = (col + 0.5) * f["scale"] - 0.5, (row + 0.5) * f["scale"] - 0.5
            others = [o for o in f["marks"] if o["truth"] and o is not m]
            if all(np.hypot(o["x"] - x, o["y"] - y) > 3 * f["scale"] for o in others):
                assert tuple(px[round(y), round(x)]) == LEVEL_COLOURS[m["index"] % 5], (f["file"], m)
                n += 1
    assert n >= 10
    page = (out / f"study_{sid}.html").read_text()
    assert "distance to truth (mm)" in page


# -- the run without QA, failures, Pillow --------------------------------------------------
@pytest.fixture
def fam(monkeypatch):
    use_fake_families(monkeypatch)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    return write_fake_root(tmp_path_factory.mktemp("root"), [21, 22, 23, 24, 25], missing={23: "Sagittal T2/STIR"})


def _fake_run(root, tmp_path, entries=None, **kw):
    man = make_random_manifest(tmp_path / "man", entries or fake_entries())
    kw.setdefault("finalize", KEEP)
    predict(root, tmp_path / "out" / "submission.csv", manifest=man, device="cpu", num_workers=0, progress=False, **kw)
    return tmp_path / "out"


def test_no_viz_code_runs_without_qa_dir(fam, fake_root, tmp_path, monkeypatch):
    from rsna_infer.viz import capture, draw, pages

    def boom(*a, **k):
        raise AssertionError("viz code ran without qa_dir")

    monkeypatch.setattr(capture.QACollector, "__init__", boom)
    monkeypatch.setattr(capture.ChunkCapture, "__init__", boom)
    monkeypatch.setattr(capture, "crop_grid", boom)
    monkeypatch.setattr(draw, "render_frame", boom)
    monkeypatch.setattr(pages, "write_pages", boom)
    out = _fake_run(fake_root, tmp_path)
    assert (out / "submission.csv").is_file()
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".png", ".html")]


def test_failures_and_deadline_skips_rank_first_and_get_pages(fam, fake_root, tmp_path):
    entries = fake_entries(kp_t2_f0={"fail_on": [22]}, grade_all={"cost": 20})
    fakes.CLOCK.t = 1000.0
    out = _fake_run(fake_root, tmp_path, entries, qa_dir=tmp_path / "qa", qa_worst=3, chunk_size=1, time_budget_s=160.0,
                    clock=fakes.CLOCK)
    rep = json.loads((out / "run_report.json").read_text())
    ranking = json.loads((tmp_path / "qa" / "ranking.json").read_text())
    skipped = [int(s) for s, r in rep["studies"].items() if r["status"] == "skipped"]
    assert skipped, "the budget must leave some studies unread"
    assert [r["tier"] for r in ranking] == sorted((r["tier"] for r in ranking), key=list(R.TIER_NAMES.values()).index)
    assert {r["study_id"] for r in ranking[: len(skipped)]} == set(skipped)  # unread: nothing known, uncertainty 1
    assert len(list((tmp_path / "qa").glob("study_*.html"))) == 3
    first = (tmp_path / "qa" / f"study_{ranking[0]['study_id']}.html").read_text()
    assert "No pictures" in first or "no model-input slice" in first
    index = (tmp_path / "qa" / "index.html").read_text()
    for what in ("Deadline decisions", "priors for the rest", "Time per stage", "Status"):
        assert what in index
    _check_links(tmp_path / "qa")


def test_qa_worst_above_the_study_count_pages_every_study(fam, fake_root, tmp_path):
    _fake_run(fake_root, tmp_path, qa_dir=tmp_path / "qa", qa_worst=50)
    assert len(list((tmp_path / "qa").glob("study_*.html"))) == 5
    _check_links(tmp_path / "qa")


def test_memory_holds_at_most_qa_worst_captures(fam, fake_root, tmp_path, monkeypatch):
    from rsna_infer.viz import capture

    sizes, closed = [], []
    offer, close = capture.QACollector.offer, capture.ChunkCapture.close

    def watch_offer(self, cap):
        offer(self, cap)
        sizes.append(len(self._heap))

    def watch_close(self, studies, kps, out):
        close(self, studies, kps, out)
        closed.append(len(self._inputs) + len(self._grids))

    monkeypatch.setattr(capture.QACollector, "offer", watch_offer)
    monkeypatch.setattr(capture.ChunkCapture, "close", watch_close)
    _fake_run(fake_root, tmp_path, qa_dir=tmp_path / "qa", qa_worst=2, chunk_size=1)
    assert sizes and max(sizes) <= 2
    assert len(closed) == 5 and set(closed) == {0}  # every chunk released its samples
    assert len(list((tmp_path / "qa").glob("study_*.html"))) == 2


def test_without_pillow_qa_fails_fast_naming_the_extra(fam, fake_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "PIL.ImageDraw", None)
    with pytest.raises(VizUnavailable, match=r"rsna-infer\[viz\]"):
        _fake_run(fake_root, tmp_path, qa_dir=tmp_path / "qa")
    assert not (tmp_path / "out").exists()  # before any model or DICOM
    man = make_random_manifest(tmp_path / "man2", fake_entries())
    rc = cli.main(["predict", str(fake_root), "--out", str(tmp_path / "o" / "s.csv"), "--manifest", str(man),
                   "--qa-dir", str(tmp_path / "qa")])
    assert rc == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "rsna-infer[viz]" in lines[0]


def test_show_an_unknown_study_is_a_clear_error(fam, fake_root, tmp_path, capsys):
    man = make_random_manifest(tmp_path / "man", fake_entries())
    rc = cli.main(["show", str(fake_root), "--study", "999", "--out", str(tmp_path / "s"), "--manifest", str(man)])
    assert rc == 1
    assert "study 999 is not in" in capsys.readouterr().out


def test_cli_predict_writes_qa_pages(fam, fake_root, tmp_path, monkeypatch, capsys):
    use_fake_cli(monkeypatch)
    man = make_random_manifest(tmp_path / "man", fake_entries())
    rc = cli.main(["predict", str(fake_root), "--out", str(tmp_path / "o" / "s.csv"), "--manifest", str(man), "--workers", "0",
                   "--device", "cpu", "--qa-dir", str(tmp_path / "qa"), "--qa-worst", "2"])
    assert rc == 0
    assert f"QA pages: {tmp_path / 'qa' / 'index.html'}" in capsys.readouterr().out
    assert len(list((tmp_path / "qa").glob("study_*.html"))) == 2
    _check_links(tmp_path / "qa")

