"""`rsna_infer.predict` on fake families (see predict_fakes.py): the submission, the report,
configuration errors that fail before anything runs. End-to-end runs with the real families
live in test_e2e_predict.py."""

import logging

import numpy as np
import pandas as pd
import pytest
from predict_fakes import IDS, fake_entries, fake_manifest, fake_root, run_predict, use_fake_families

from rsna_infer.constants import study_row_ids
from rsna_infer.models import manifest as mf
from rsna_infer.models.manifest import ManifestError, load_manifest
from rsna_infer.models.random_weights import make_random_manifest


@pytest.fixture
def fam(monkeypatch):
    use_fake_families(monkeypatch)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return fake_root(tmp_path_factory.mktemp("root"))


def test_submission_is_complete_and_valid(fam, root, tmp_path):
    df, rep = run_predict(root, fake_manifest(tmp_path), tmp_path / "a", chunk_size=3)
    assert list(df.columns) == ["row_id", "normal_mild", "moderate", "severe"]
    assert list(df.row_id) == [r for s in IDS for r in study_row_ids(s)]
    v = df[["normal_mild", "moderate", "severe"]].to_numpy()
    assert np.isfinite(v).all() and (v >= 0).all() and np.allclose(v.sum(1), 1, atol=1e-6)
    on_disk = pd.read_csv(tmp_path / "a" / "submission.csv")
    np.testing.assert_allclose(on_disk[["normal_mild", "moderate", "severe"]].to_numpy(), v, atol=1e-9)
    # study 13 has no Sagittal T2: no spinal keypoints, so no grader input: priors + the io warning
    s13 = rep["studies"]["13"]
    assert s13["status"] == "fallback" and s13["prior_targets"] == 25
    assert any("Sagittal T2/STIR" in w for w in s13["warnings"])
    man = load_manifest(tmp_path / "man" / "weights_manifest.json")
    np.testing.assert_allclose(v[[i for i, r in enumerate(df.row_id) if r.startswith("13_")]], man.priors.reshape(25, 3))
    # 'grade_spinal' covers spinal, 'grade_all' everything: the others are fully covered
    assert all(rep["studies"][str(s)]["status"] == "ok" for s in IDS if s != 13)


def test_report_contents(fam, root, tmp_path):
    _, rep = run_predict(root, fake_manifest(tmp_path), tmp_path / "a", chunk_size=4)
    for k in ("python", "rsna-infer", "torch", "timm", "pydicom"):
        assert rep["versions"][k], k
    man_file = tmp_path / "man" / "weights_manifest.json"
    assert rep["manifest"]["sha256"] == mf.sha256_file(man_file) and rep["manifest"]["demo"] is False
    assert [m["name"] for m in rep["models"]] == [e["name"] for e in fake_entries()]
    assert all(m["sha256"] and m["params"] > 0 for m in rep["models"])
    t = rep["timings"]
    for key in ("setup/models", "discover", "stage1/kp_t2_f0/run", "stage1/sag2d/t2/decode", "stage2/grade_all/run",
                "stage2/roi/all#0/prepare", "blend", "write"):
        assert key in t, key
    assert rep["n_studies"] == 7 and rep["studies_per_s"] > 0 and rep["settings"]["tta"] is True
    kp = rep["studies"]["12"]["keypoints"]
    assert len(kp["sag2d_t2"]["world"]) == 5 and kp["best/spinal"]["kind"] == "spinal"
    assert all(len(p) == 3 for p in kp["sag2d_t2"]["world"])


def test_config_errors_fail_before_any_dicom_is_read(fam, root, tmp_path, monkeypatch):
    import rsna_infer.io as rio

    reads = []
    monkeypatch.setattr(rio, "discover_studies", lambda *a, **k: reads.append(a) or [])
    man = fake_manifest(tmp_path)
    w = tmp_path / "man" / "weights" / "grade_all.safetensors"
    w.write_bytes(w.read_bytes()[:-4] + b"abcd")
    with pytest.raises(ManifestError, match="grade_all.*sha256 mismatch.*grade_all.safetensors"):
        run_predict(root, man, tmp_path / "a")
    w.unlink()
    with pytest.raises(ManifestError, match="weights file not found: .*grade_all.safetensors"):
        run_predict(root, man, tmp_path / "a")
    assert reads == [] and not (tmp_path / "a" / "submission.csv").exists()


def test_a_manifest_without_graders_writes_priors(fam, root, tmp_path, caplog):
    man = make_random_manifest(tmp_path / "m", fake_entries()[:3])
    with caplog.at_level(logging.WARNING):
        df, rep = run_predict(root, man, tmp_path / "a")
    assert "no stage-2 models" in caplog.text
    assert rep["summary"]["fallback"] == 7 and len(df) == 175


def test_demo_manifest_default_warns_loudly(fam, root, tmp_path, monkeypatch, caplog):
    man = fake_manifest(tmp_path)
    monkeypatch.setattr(mf, "packaged_demo_manifest", lambda: man)
    monkeypatch.delenv(mf.MANIFEST_ENV, raising=False)
    with caplog.at_level(logging.WARNING):
        df, rep = run_predict(root, None, tmp_path / "a")
    assert "DEMO WEIGHTS" in caplog.text and "phantom" in caplog.text
    assert rep["manifest"]["demo"] is True and any("DEMO WEIGHTS" in w for w in rep["warnings"])


@pytest.mark.parametrize("budget", [0, -5, float("nan")])
def test_a_bad_time_budget_fails_before_anything_runs(fam, root, tmp_path, budget):
    with pytest.raises(ValueError, match="time_budget_s must be a positive number"):
        run_predict(root, tmp_path / "never_read.json", tmp_path / "a", time_budget_s=budget)

