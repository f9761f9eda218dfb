"""The predictor on fake families (see predict_fakes.py): structure, streaming, failures,
deadline. End-to-end runs with the real families live in test_e2e_predict.py."""

import json
import logging

import numpy as np
import pandas as pd
import predict_fakes as fakes
import pytest
import torch
from predict_fakes import fake_entries, use_fake_cli, use_fake_families, write_fake_root

from rsna_infer import cli
from rsna_infer.constants import study_row_ids
from rsna_infer.api import predict
from rsna_infer.inference.engine import Predictor
from rsna_infer.models import manifest as mf
from rsna_infer.models.manifest import ManifestError, load_manifest
from rsna_infer.models.random_weights import make_random_manifest

IDS = [11, 12, 13, 14, 15, 16, 17]
KEEP = lambda study, kp: kp  # noqa: E731  (stage-1 finalize: the fakes need none)


@pytest.fixture
def fam(monkeypatch):
    use_fake_families(monkeypatch)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_fake_root(tmp_path_factory.mktemp("root"), IDS, missing={13: "Sagittal T2/STIR"})


def _manifest(tmp_path, **over):
    return make_random_manifest(tmp_path / "man", fake_entries(**over))


def _run(root, man, out, **kw):
    kw.setdefault("finalize", KEEP)
    kw.setdefault("progress", False)
    kw.setdefault("num_workers", 0)
    df = predict(root, out / "submission.csv", manifest=man, **kw)
    return df, json.loads((out / "run_report.json").read_text())


def test_submission_is_complete_and_valid(fam, root, tmp_path):
    df, rep = _run(root, _manifest(tmp_path), tmp_path / "a", chunk_size=3)
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


def test_identical_across_runs_and_workers(fam, root, tmp_path):
    man = _manifest(tmp_path)
    a, _ = _run(root, man, tmp_path / "a", num_workers=0, chunk_size=4)
    b, _ = _run(root, man, tmp_path / "b", num_workers=0, chunk_size=4)
    c, rep = _run(root, man, tmp_path / "c", num_workers=2, chunk_size=4)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    pd.testing.assert_frame_equal(a, c, check_exact=True)
    assert rep["settings"]["num_workers"] == 2 and rep["timings"]["load"] > 0


def test_two_device_replicas_give_the_same_result(fam, root, tmp_path):
    man = _manifest(tmp_path)
    a, _ = _run(root, man, tmp_path / "a", chunk_size=2)
    b, rep = _run(root, man, tmp_path / "b", chunk_size=2, device="cpu,cpu")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert rep["devices"] == ["cpu", "cpu"]


def test_stage1_folds_are_averaged_before_decode(fam, root, tmp_path):
    from rsna_infer.io import discover_studies

    man = _manifest(tmp_path)
    pred = Predictor(man, device="cpu", tta=False, finalize=KEEP)
    ref = [r for r in discover_studies(root) if r.study_id == 12]
    res = pred.run(ref, num_workers=0, progress=False)
    got = np.array(res.records[12].keypoints["sag2d_t2"]["world"])

    from rsna_infer.io import load_study

    study = load_study(ref[0])
    folds = [pred.replicas[0][n] for n in ("kp_t2_f0", "kp_t2_f1")]
    sample = folds[0].family.prepare(study)[0]
    batch = folds[0].family.collate([sample])
    with torch.inference_mode():
        outs = [m.family.run(m.model, batch).numpy()[0] for m in folds]
    expect = folds[0].family.decode(np.mean(outs, 0), sample, study)
    np.testing.assert_allclose(got, np.round(expect.world, 2), atol=1e-6)
    single = folds[0].family.decode(outs[0], sample, study)
    assert not np.allclose(single.world, expect.world, atol=0.5)  # the folds really differ


def test_one_study_failing_never_stops_the_run(fam, root, tmp_path):
    man = _manifest(tmp_path, grade_spinal={"fail_on": [14], "raise_on": [16]}, grade_all={"nan_on": [15]},
                    kp_t1_f0={"fail_on": [17]})
    df, rep = _run(root, man, tmp_path / "a", chunk_size=7)
    st = rep["studies"]
    assert "prepare roi/spinal#0: RuntimeError: injected fail failure for study 14" in st["14"]["errors"]
    assert st["14"]["status"] == "ok"  # grade_all still covers every target
    assert any("non-finite output dropped" in w for w in st["15"]["warnings"])
    assert st["15"]["status"] == "partial" and st["15"]["prior_targets"] == 20  # spinal from grade_spinal only
    assert any("run grade_spinal" in e for e in st["16"]["errors"])  # the batch was split; only 16 lost it
    assert not any("run grade_spinal" in e for s in ("11", "12", "17") for e in st[s]["errors"])
    assert any("prepare sag2d/t1" in e for e in st["17"]["errors"])
    assert "sag2d_t1" not in st["17"]["keypoints"] and "sag2d_t1" in st["12"]["keypoints"]
    assert rep["summary"]["studies"] == 7 and np.isfinite(df.iloc[:, 1:].to_numpy()).all()


def test_unreadable_study_gets_priors(fam, tmp_path):
    root = write_fake_root(tmp_path / "root", [21, 22])
    for f in (root / "test_images" / "22").rglob("*.dcm"):
        f.write_bytes(b"garbage")
    df, rep = _run(root, _manifest(tmp_path), tmp_path / "a")
    assert rep["studies"]["22"]["status"] == "fallback" and rep["studies"]["21"]["status"] == "ok"
    assert len(df) == 50
    assert any("none of the study's 18 DICOM file(s)" in e for e in rep["studies"]["22"]["errors"])
    assert rep["summary"]["studies_with_errors"] == 1


def test_report_contents(fam, root, tmp_path):
    _, rep = _run(root, _manifest(tmp_path), tmp_path / "a", chunk_size=4)
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
    man = _manifest(tmp_path)
    w = tmp_path / "man" / "weights" / "grade_all.safetensors"
    w.write_bytes(w.read_bytes()[:-4] + b"abcd")
    with pytest.raises(ManifestError, match="grade_all.*sha256 mismatch.*grade_all.safetensors"):
        _run(root, man, tmp_path / "a")
    w.unlink()
    with pytest.raises(ManifestError, match="weights file not found: .*grade_all.safetensors"):
        _run(root, man, tmp_path / "a")
    assert reads == [] and not (tmp_path / "a" / "submission.csv").exists()


def test_dummy_forward_failure_is_a_config_error(fam, tmp_path, monkeypatch):
    man = _manifest(tmp_path)
    monkeypatch.setattr(fakes.FakeGrader, "example_batch", lambda self, batch_size=2: {"x": torch.zeros(batch_size, 1, 3, 3)})
    with pytest.raises(ManifestError, match="model 'grade_spinal': dummy forward failed"):
        Predictor(man, device="cpu", finalize=KEEP)


def test_stage1_folds_with_different_inputs_are_rejected(fam, tmp_path):
    entries = fake_entries()
    entries[1]["input"] = {"size": [12, 12]}
    with pytest.raises(ManifestError, match="kp_t2_f0.*kp_t2_f1.*different input specs"):
        Predictor(make_random_manifest(tmp_path, entries), device="cpu", finalize=KEEP)


def test_a_manifest_without_graders_writes_priors(fam, root, tmp_path, caplog):
    man = make_random_manifest(tmp_path / "m", fake_entries()[:3])
    with caplog.at_level(logging.WARNING):
        df, rep = _run(root, man, tmp_path / "a")
    assert "no stage-2 models" in caplog.text
    assert rep["summary"]["fallback"] == 7 and len(df) == 175


def test_demo_manifest_default_warns_loudly(fam, root, tmp_path, monkeypatch, caplog):
    man = _manifest(tmp_path)
    monkeypatch.setattr(mf, "packaged_demo_manifest", lambda: man)
    monkeypatch.delenv(mf.MANIFEST_ENV, raising=False)
    with caplog.at_level(logging.WARNING):
        df, rep = _run(root, None, tmp_path / "a")
    assert "DEMO WEIGHTS" in caplog.text and "phantom" in caplog.text
    assert rep["manifest"]["demo"] is True and any("DEMO WEIGHTS" in w for w in rep["warnings"])


def test_deadline_guard_sheds_tta_then_members(fam, root, tmp_path):
    # Fake costs per study (x2 with TTA): 3 folds x 1 s + grade_spinal 1 s + grade_all 3 s = 7 s,
    # 14 s with TTA. Budget for 7 studies: 70 s (+ the 10% reserve): the full plan cannot fit.
    costs = {"kp_t2_f0": {"cost": 1}, "kp_t2_f1": {"cost": 1}, "kp_t1_f0": {"cost": 1},
             "grade_spinal": {"cost": 1}, "grade_all": {"cost": 3}}
    man = _manifest(tmp_path, **costs)
    fakes.CLOCK.t = 1000.0
    df, rep = _run(root, man, tmp_path / "a", chunk_size=1, time_budget_s=77.0, clock=fakes.CLOCK)
    d = rep["deadline"]
    assert d["shed"][0]["action"] == "tta off" and d["final_tta"] is False
    assert d["shed"][1]["action"] == "drop grade_spinal"  # the lower-weight share of its groups
    assert fakes.CLOCK.t - 1000.0 <= 77.0
    assert len(df) == 175 and np.isfinite(df.iloc[:, 1:].to_numpy()).all()


def test_deadline_gives_priors_to_studies_that_cannot_fit(fam, root, tmp_path):
    man = _manifest(tmp_path, grade_all={"cost": 20})
    fakes.CLOCK.t = 1000.0
    df, rep = _run(root, man, tmp_path / "a", chunk_size=2, time_budget_s=100.0, clock=fakes.CLOCK)
    d = rep["deadline"]
    assert d["studies_given_priors"] > 0 and d["shed"][-1]["action"] == "priors for the rest"
    skipped = [s for s, r in rep["studies"].items() if r["status"] == "skipped"]
    assert len(skipped) == d["studies_given_priors"] and skipped == [str(s) for s in IDS[-len(skipped):]]
    assert len(df) == 175 and np.allclose(df.iloc[:, 1:].sum(axis=1), 1)


def test_cli_predict(fam, root, tmp_path, capsys, monkeypatch):
    man = _manifest(tmp_path)
    out = tmp_path / "cli" / "sub.csv"
    use_fake_cli(monkeypatch)
    rc = cli.main(["predict", str(root), "--out", str(out), "--manifest", str(man), "--workers", "0", "--no-tta",
                   "--device", "cpu", "--chunk-size", "3"])
    assert rc == 0 and out.is_file() and (out.parent / "run_report.json").is_file()
    assert len(pd.read_csv(out)) == 175
    assert json.loads((out.parent / "run_report.json").read_text())["settings"]["tta"] is False
    assert cli.main(["predict", str(root), "--out", str(out), "--manifest", str(tmp_path / "none.json")]) == 1
    err = capsys.readouterr().err
    assert "manifest not found" in err and "Traceback" not in err


def test_an_unexpected_error_mid_run_still_writes_a_valid_submission(fam, root, tmp_path, monkeypatch):
    import rsna_infer.runtime.streaming as streaming

    real_take = streaming.StudyStream.take
    calls = []

    def take(self, n, **kw):
        calls.append(n)
        if len(calls) == 2:
            raise OSError("disk went away")
        return real_take(self, n, **kw)

    monkeypatch.setattr(streaming.StudyStream, "take", take)
    df, rep = _run(root, _manifest(tmp_path), tmp_path / "a", chunk_size=3)
    assert len(df) == 175 and np.allclose(df.iloc[:, 1:].sum(axis=1), 1)
    assert any("run stopped early after 3 of 7 studies: OSError: disk went away" in w for w in rep["warnings"])
    assert [rep["studies"][str(s)]["status"] for s in IDS[3:]] == ["fallback"] * 4
    assert rep["studies"]["11"]["status"] == "ok"


def test_a_chunk_that_raises_costs_only_that_chunk(fam, root, tmp_path, monkeypatch):
    real = Predictor.run_chunk

    def run_chunk(self, loaded, plan, replica=0, *more):
        if any(ls.study_id == 15 for ls in loaded):
            raise RuntimeError("boom")
        return real(self, loaded, plan, replica, *more)

    monkeypatch.setattr(Predictor, "run_chunk", run_chunk)
    df, rep = _run(root, _manifest(tmp_path), tmp_path / "a", chunk_size=2)
    st = rep["studies"]
    assert st["15"]["status"] == st["16"]["status"] == "fallback" and "chunk: RuntimeError: boom" in st["15"]["errors"]
    assert st["17"]["status"] == "ok" and len(df) == 175


@pytest.mark.parametrize("budget", [0, -5, float("nan")])
def test_a_bad_time_budget_fails_before_anything_runs(fam, root, tmp_path, budget):
    with pytest.raises(ValueError, match="time_budget_s must be a positive number"):
        _run(root, tmp_path / "never_read.json", tmp_path / "a", time_budget_s=budget)


def test_with_a_budget_a_one_study_probe_chunk_measures_the_costs_first(fam, root, tmp_path, monkeypatch):
    sizes = []
    real = Predictor.run_chunk

    def run_chunk(self, loaded, plan, replica=0):
        sizes.append(len(loaded))
        return real(self, loaded, plan, replica)

    monkeypatch.setattr(Predictor, "run_chunk", run_chunk)
    _run(root, _manifest(tmp_path), tmp_path / "a", chunk_size=3, time_budget_s=3600.0)
    assert sizes == [1, 3, 3]
    sizes.clear()
    _run(root, _manifest(tmp_path), tmp_path / "b", chunk_size=3)
    assert sizes == [3, 3, 1]  # without a budget nothing is probed


def test_a_budget_already_spent_gives_priors_with_a_log_line_and_a_shed_entry(fam, root, tmp_path, caplog):
    from rsna_infer.io import discover_studies

    man = _manifest(tmp_path)
    fakes.CLOCK.t = 1000.0
    pred = Predictor(man, device="cpu", finalize=KEEP, clock=fakes.CLOCK)
    with caplog.at_level(logging.WARNING):
        res = pred.run(discover_studies(root), num_workers=0, time_budget_s=10.0, start=fakes.CLOCK.t - 20.0, progress=False)
    assert "no time left" in caplog.text
    assert [e["action"] for e in res.deadline["shed"]] == ["priors for the rest"]
    assert res.deadline["studies_given_priors"] == len(IDS)
    assert {r.status for r in res.records.values()} == {"skipped"}


def test_workers_that_cannot_start_move_loading_in_process(fam, root, tmp_path, monkeypatch):
    import rsna_infer.runtime.streaming as streaming

    def broken(threads):
        raise RuntimeError("no worker can start here")

    monkeypatch.setattr(streaming, "_worker_init", broken)
    clean, _ = _run(root, _manifest(tmp_path), tmp_path / "a", chunk_size=3)
    df, rep = _run(root, _manifest(tmp_path), tmp_path / "b", chunk_size=3, num_workers=2)
    pd.testing.assert_frame_equal(clean, df, check_exact=True)
    assert any("loading continues in-process" in w for w in rep["warnings"])


def test_a_study_that_hurt_a_worker_is_never_loaded_in_process():
    from rsna_infer.runtime.streaming import StudyStream

    class Ref:
        study_id = 5
        series = []

    stream = StudyStream([Ref()], [], num_workers=0)
    stream._attempts[5] = 1
    (ls,) = stream.take(1)
    assert ls.study is None and "never run in the main process" in ls.errors[0]


def test_spawned_workers_give_the_same_result(fam, root, tmp_path):
    from rsna_infer.io import discover_studies

    man = _manifest(tmp_path)
    pred = Predictor(man, device="cpu", finalize=KEEP)
    refs = discover_studies(root)
    a = pred.run(refs, num_workers=0, chunk_size=3, progress=False)
    b = pred.run(refs, num_workers=2, chunk_size=3, progress=False, start_method="spawn")
    assert sorted(a.probs) == sorted(b.probs)
    for sid in a.probs:
        np.testing.assert_array_equal(a.probs[sid], b.probs[sid])
    assert b.faults["worker_processes"]["started"] == 2 and b.faults["workers"] == []


def test_a_fold_group_collates_and_copies_each_batch_once(fam, root, tmp_path, monkeypatch):
    """The two t2 folds share their batches: collate runs once per batch, not once per fold,
    and the fold outputs are still each fold's own (averaged before decode, see above)."""
    calls = []
    real = fakes.FakeSag.collate

    def collate(self, samples):
        calls.append((self.entry.variant, len(samples)))
        return real(self, samples)

    monkeypatch.setattr(fakes.FakeSag, "collate", collate)
    _run(root, _manifest(tmp_path), tmp_path / "a", chunk_size=7)
    t2 = [n for v, n in calls if v == "t2"]
    assert t2 == [6], calls  # one batch of the 6 studies with a Sagittal T2 (13 has none), for both folds


def test_streamed_members_match_resident_and_a_member_that_cannot_be_loaded_costs_only_its_output(
        fam, root, tmp_path, monkeypatch):
    from rsna_infer.models.members import LoadedMember

    man = _manifest(tmp_path)
    resident, _ = _run(root, man, tmp_path / "a", chunk_size=3)
    streamed, rep = _run(root, man, tmp_path / "b", chunk_size=3, members="streamed")
    pd.testing.assert_frame_equal(resident, streamed, check_exact=True)
    assert rep["memory"]["mode"] == "streamed" and rep["memory"]["loads"] >= 3 * 3  # groups x chunks

    real = LoadedMember.to_device

    def to_device(self):
        if self.name == "grade_spinal":
            raise RuntimeError("CUDA out of memory (injected) while loading")
        return real(self)

    monkeypatch.setattr(LoadedMember, "to_device", to_device)
    df, rep = _run(root, man, tmp_path / "c", chunk_size=3, members="streamed")
    st = rep["studies"]
    assert all(any("grade_spinal: its weights could not be loaded" in e for e in st[str(s)]["errors"]) for s in IDS if s != 13)
    assert st["12"]["status"] == "ok"  # grade_all still covers every target
    assert len(df) == len(resident) and np.isfinite(df.iloc[:, 1:].to_numpy()).all()
