"""End to end: phantom test roots through every real family (tiny random-init models)."""

import json
import sys

import numpy as np
import pandas as pd
import pytest

from rsna_infer import predict
from rsna_infer.constants import CLASSES, study_row_ids
from rsna_infer.models.manifest import ManifestError
from rsna_infer.models.random_weights import make_random_manifest
from rsna_infer.synth import make_dataset

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def tiny_manifest(tmp_path_factory):
    return make_random_manifest(tmp_path_factory.mktemp("tiny"), seed=3)


def _run(root, man, out, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("progress", False)
    kw.setdefault("chunk_size", 4)
    df = predict(root, out / "submission.csv", manifest=man, device="cpu", **kw)
    return df, json.loads((out / "run_report.json").read_text())


def _check_valid(df, root, split="test"):
    ids = sorted(pd.read_csv(root / f"{split}_series_descriptions.csv").study_id.unique())
    assert list(df.row_id) == [r for s in ids for r in study_row_ids(s)]
    v = df[list(CLASSES)].to_numpy()
    assert np.isfinite(v).all() and (v >= 0).all()
    np.testing.assert_allclose(v.sum(1), 1.0, atol=1e-6)


@pytest.fixture(scope="module")
def baseline(phantom_test_root, tiny_manifest, tmp_path_factory):
    """One in-process run on the shared phantom root, watched by a socket audit hook."""
    events = []
    armed = [True]

    def hook(event, args):
        if armed[0] and event.startswith("socket.") and event != "socket.__new__":
            events.append((event, args))

    sys.addaudithook(hook)  # hooks cannot be removed: 'armed' switches it off afterwards
    try:
        df, rep = _run(phantom_test_root, tiny_manifest, tmp_path_factory.mktemp("baseline"))
    finally:
        armed[0] = False
    return df, rep, events


def test_phantom_run_is_complete_and_valid(phantom_test_root, baseline):
    df, rep, _ = baseline
    _check_valid(df, phantom_test_root)
    solution = pd.read_csv(phantom_test_root / "solution.csv")
    assert set(df.row_id) == set(solution.row_id)
    # a clean phantom: every study fully predicted by the models, no errors
    assert rep["summary"]["ok"] == rep["n_studies"] == 4 and rep["summary"]["studies_with_errors"] == 0
    for sid, rec in rep["studies"].items():
        kp = rec["keypoints"]
        for kind, n in (("spinal", 5), ("foraminal", 10), ("subarticular", 10)):
            pts = kp[f"best/{kind}"]["world"]
            assert len(pts) == n and all(p is None or len(p) == 3 for p in pts)
        assert {"sag2d_t2", "sag3d_t2", "sag2d_t1", "sag3d_t1", "axial3d", "axial_level"} <= set(kp)
        assert "cross_view" in rec["cross_view"]
    assert {m["family"] for m in rep["models"]} == {"sag2d", "sag3d", "axial3d", "axial_level", "axial_xy", "fusion", "roi"}


def test_no_socket_is_opened_during_a_run(baseline):
    assert baseline[2] == []


def test_identical_across_runs_and_num_workers(phantom_test_root, tiny_manifest, baseline, tmp_path):
    again, rep = _run(phantom_test_root, tiny_manifest, tmp_path / "w2", num_workers=2, chunk_size=4)
    pd.testing.assert_frame_equal(baseline[0], again, check_exact=True)
    assert rep["settings"]["num_workers"] == 2


#: Every realism switch of the phantom at rate 1, in three roots (geometry, files, gaps).
SWITCHES = {
    "geometry": {"second_axial_rate": 1.0, "multi_stack_rate": 1.0, "mixed_slice_size_rate": 1.0,
                 "descending_instance_rate": 1.0, "stir_rate": 1.0},
    "files": {"transfer_syntax": "mixed", "missing_tags_rate": 1.0, "truncated_file_rate": 1.0, "stray_file_rate": 1.0},
    "gaps": {"missing_series_rate": 1.0, "n_axial_series": 3},
}


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_every_realism_switch_survives(switch, tiny_manifest, tmp_path):
    root = make_dataset(tmp_path / "root", 3, split="test", seed=11, image_size=(40, 56), **SWITCHES[switch]).root
    df, rep = _run(root, tiny_manifest, tmp_path / "out")
    _check_valid(df, root)
    for sid, rec in rep["studies"].items():
        assert rec["errors"] == [], (sid, rec["errors"])
        if switch != "gaps":
            assert rec["status"] == "ok", (sid, rec["status"], rec["fallbacks"])
        else:  # one series type is missing in every study: reported, and the others still predict
            assert any("no " in w for w in rec["warnings"]), sid
            assert rec["prior_targets"] < 25, sid
    if switch == "files":
        assert any(rec["warnings"] for rec in rep["studies"].values())


def test_weight_problems_fail_fast_naming_the_file(phantom_test_root, tiny_manifest, tmp_path):
    import shutil

    man_dir = tmp_path / "m"
    shutil.copytree(tiny_manifest.parent, man_dir)
    w = man_dir / "weights" / "roi_spinal.safetensors"
    w.write_bytes(w.read_bytes()[:-16] + bytes(16))
    with pytest.raises(ManifestError, match=r"roi_spinal.*sha256 mismatch for .*roi_spinal\.safetensors"):
        _run(phantom_test_root, man_dir / "weights_manifest.json", tmp_path / "a")
    w.unlink()
    with pytest.raises(ManifestError, match=r"weights file not found: .*roi_spinal\.safetensors"):
        _run(phantom_test_root, man_dir / "weights_manifest.json", tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_each_dicom_file_is_decoded_exactly_once(tiny_manifest, tmp_path, monkeypatch):
    """No second DICOM read (README: reads every DICOM once). Every file of every series (three axial series
    included) goes through pydicom once in a predict run, with its pixels."""
    import threading
    from collections import Counter

    import pydicom

    from rsna_infer.io import dicom

    root = make_dataset(tmp_path / "root", 2, split="test", seed=5, image_size=(40, 56), n_axial_series=3).root
    files = sorted(str(p) for p in (root / "test_images").rglob("*.dcm"))
    assert files
    lock = threading.Lock()
    by_path: Counter = Counter()
    header_only: list[str] = []
    parses = [0]
    real_private, real_dcmread = dicom.parse_dicom, pydicom.dcmread

    def counting_private(path, *, stop_before_pixels):
        with lock:
            by_path[str(path)] += 1
            if stop_before_pixels:
                header_only.append(str(path))
        return real_private(path, stop_before_pixels=stop_before_pixels)

    def counting_dcmread(*args, **kwargs):
        with lock:
            parses[0] += 1
        return real_dcmread(*args, **kwargs)

    monkeypatch.setattr(dicom, "parse_dicom", counting_private)
    monkeypatch.setattr(pydicom, "dcmread", counting_dcmread)
    df, rep = _run(root, tiny_manifest, tmp_path / "out")
    _check_valid(df, root)
    assert rep["summary"]["studies_with_errors"] == 0
    assert sorted(by_path) == files
    assert set(by_path.values()) == {1}, {p: n for p, n in by_path.items() if n != 1}
    assert header_only == []
    assert parses[0] == len(files)


def test_a_group_the_blend_fit_gave_to_the_priors_is_not_a_fallback(phantom_test_root, tiny_manifest, baseline, tmp_path):
    """`fit-blend` may find that no member beats the class priors for a group: the manifest
    then lists it in ``prior_groups`` with zero weights; those rows are the priors on purpose,
    the other groups are unchanged and no study counts as a fallback."""
    from dataclasses import replace

    from rsna_infer.constants import CONDITION_GROUP_INDEX, GROUPS
    from rsna_infer.models.manifest import load_manifest, save_manifest

    man = load_manifest(tiny_manifest)
    models = [replace(m, blend={**{g: 1.0 for g in GROUPS}, **m.blend, "foraminal": 0.0}) if m.stage == 2 else m
              for m in man.models]
    path = save_manifest(replace(man, models=models, prior_groups=("foraminal",)), tiny_manifest.parent / "priors_foraminal.json")
    df, rep = _run(phantom_test_root, path, tmp_path)
    _check_valid(df, phantom_test_root)
    assert any("get the class priors" in w for w in rep["warnings"])
    assert rep["summary"]["prior_targets"] == 0 and rep["summary"]["ok"] == rep["n_studies"]
    base_df = baseline[0]
    v, b = df[list(CLASSES)].to_numpy().reshape(-1, 5, 5, 3), base_df[list(CLASSES)].to_numpy().reshape(-1, 5, 5, 3)
    foraminal = np.array([GROUPS[g] == "foraminal" for g in CONDITION_GROUP_INDEX])
    np.testing.assert_allclose(v[:, foraminal], np.broadcast_to(man.priors[foraminal], v[:, foraminal].shape), atol=1e-6)
    assert not np.allclose(b[:, foraminal], v[:, foraminal])
    np.testing.assert_allclose(v[:, ~foraminal], b[:, ~foraminal], atol=1e-6)


def test_streamed_members_give_the_same_csv_and_the_plan_matches_the_run(phantom_test_root, tiny_manifest, baseline,
                                                                         tmp_path):
    """A device budget (standing in for the card) that the resident ensemble exceeds switches
    to streamed members: byte-identical CSV; the report has the mode, the plan per member
    and what was measured, and the plan's activations match the measured ones."""
    from rsna_infer.inference.engine import Predictor

    probe = Predictor(tiny_manifest, device="cpu", batch_size=4, device_memory_gb=1000.0, verify=False)
    plan = probe.memory_plan
    assert plan.mode == "resident" and plan.streamed_bytes < plan.resident_bytes
    gb = (plan.resident_bytes + plan.streamed_bytes) / 2 / 0.85 / 1e9  # between the two: only streaming fits
    df, rep = _run(phantom_test_root, tiny_manifest, tmp_path / "s", batch_size=4, device_memory_gb=gb)
    ref, _ = _run(phantom_test_root, tiny_manifest, tmp_path / "r", batch_size=4)
    pd.testing.assert_frame_equal(df, ref, check_exact=True)
    mem = rep["memory"]
    assert rep["settings"]["members"] == mem["mode"] == "streamed" and mem["plan"]["fits"]
    assert mem["loads"] >= len(plan.groups) and mem["peak_weights_on_device_mb"] < mem["plan"]["weights_mb"]
    planned, measured = mem["plan"]["members"], mem["measured_activation_mb"]
    assert set(measured) == set(planned)
    for name, got in measured.items():
        want = planned[name]["activation_mb"]
        if name == "axial_level":  # its input grows with the stacks' slices: the typical study has more
            assert 0.2 * want <= got <= 1.1 * want, (name, got, want)
        else:  # fixed input shapes, full batches of 4: the replay is the run (stated margin: 10 %)
            assert abs(got - want) <= 0.1 * want + 0.1, (name, got, want)
    forced, rep2 = _run(phantom_test_root, tiny_manifest, tmp_path / "f", batch_size=4, members="streamed")
    pd.testing.assert_frame_equal(forced, ref, check_exact=True)
    assert rep2["memory"]["mode"] == "streamed" and "budget_mb" in rep2["memory"]["plan"]


def test_half_precision_weights_agree_with_fp32(phantom_test_root, tiny_manifest, baseline, tmp_path):
    """On the CPU ``precision="fp16"`` rounds every weight (but normalisation layers) to fp16
    and computes in fp32: what holding the weights in half precision loses. The blended
    probabilities move by at most 1e-3 (measured: 4e-5 on these random weights; 0 on the
    demo weights, stored in fp16). Half-precision arithmetic itself is checked on a GPU by
    benchmarks/gpu_check.py."""
    df, rep = _run(phantom_test_root, tiny_manifest, tmp_path / "h", precision="fp16")
    a, b = baseline[0][list(CLASSES)].to_numpy(), df[list(CLASSES)].to_numpy()
    assert rep["settings"]["precision"] == "fp32 (weights rounded to fp16)"
    assert np.abs(a - b).max() <= 1e-3
    assert not np.array_equal(a, b)  # the rounding did happen
