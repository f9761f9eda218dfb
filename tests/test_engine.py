"""The predictor on fake families (see predict_fakes.py): structure, replicas, fold
averaging, per-study failures, workers, batches, streamed members."""

import numpy as np
import pandas as pd
import predict_fakes as fakes
import pytest
import torch
from predict_fakes import IDS, KEEP, fake_entries, fake_manifest, fake_root, run_predict, use_fake_families, write_fake_root

from rsna_infer.inference.engine import Predictor
from rsna_infer.models.manifest import ManifestError
from rsna_infer.models.random_weights import make_random_manifest


@pytest.fixture
def fam(monkeypatch):
    use_fake_families(monkeypatch)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return fake_root(tmp_path_factory.mktemp("root"))


def test_identical_across_runs_and_workers(fam, root, tmp_path):
    man = fake_manifest(tmp_path)
    a, _ = run_predict(root, man, tmp_path / "a", num_workers=0, chunk_size=4)
    b, _ = run_predict(root, man, tmp_path / "b", num_workers=0, chunk_size=4)
    c, rep = run_predict(root, man, tmp_path / "c", num_workers=2, chunk_size=4)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    pd.testing.assert_frame_equal(a, c, check_exact=True)
    assert rep["settings"]["num_workers"] == 2 and rep["timings"]["load"] > 0


def test_two_device_replicas_give_the_same_result(fam, root, tmp_path):
    man = fake_manifest(tmp_path)
    a, _ = run_predict(root, man, tmp_path / "a", chunk_size=2)
    b, rep = run_predict(root, man, tmp_path / "b", chunk_size=2, device="cpu,cpu")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert rep["devices"] == ["cpu", "cpu"]


def test_stage1_folds_are_averaged_before_decode(fam, root, tmp_path):
    from rsna_infer.io import discover_studies

    man = fake_manifest(tmp_path)
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
    man = fake_manifest(tmp_path, grade_spinal={"fail_on": [14], "raise_on": [16]}, grade_all={"nan_on": [15]},
                    kp_t1_f0={"fail_on": [17]})
    df, rep = run_predict(root, man, tmp_path / "a", chunk_size=7)
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
    df, rep = run_predict(root, fake_manifest(tmp_path), tmp_path / "a")
    assert rep["studies"]["22"]["status"] == "fallback" and rep["studies"]["21"]["status"] == "ok"
    assert len(df) == 50
    assert any("none of the study's 18 DICOM file(s)" in e for e in rep["studies"]["22"]["errors"])
    assert rep["summary"]["studies_with_errors"] == 1


def test_dummy_forward_failure_is_a_config_error(fam, tmp_path, monkeypatch):
    man = fake_manifest(tmp_path)
    monkeypatch.setattr(fakes.FakeGrader, "example_batch", lambda self, batch_size=2: {"x": torch.zeros(batch_size, 1, 3, 3)})
    with pytest.raises(ManifestError, match="model 'grade_spinal': dummy forward failed"):
        Predictor(man, device="cpu", finalize=KEEP)


def test_stage1_folds_with_different_inputs_are_rejected(fam, tmp_path):
    entries = fake_entries()
    entries[1]["input"] = {"size": [12, 12]}
    with pytest.raises(ManifestError, match="kp_t2_f0.*kp_t2_f1.*different input specs"):
        Predictor(make_random_manifest(tmp_path, entries), device="cpu", finalize=KEEP)


def test_workers_that_cannot_start_move_loading_in_process(fam, root, tmp_path, monkeypatch):
    import rsna_infer.runtime.streaming as streaming

    def broken(threads):
        raise RuntimeError("no worker can start here")

    monkeypatch.setattr(streaming, "_worker_init", broken)
    clean, _ = run_predict(root, fake_manifest(tmp_path), tmp_path / "a", chunk_size=3)
    df, rep = run_predict(root, fake_manifest(tmp_path), tmp_path / "b", chunk_size=3, num_workers=2)
    pd.testing.assert_frame_equal(clean, df, check_exact=True)
    assert any("loading continues in-process" in w for w in rep["warnings"])


def test_a_study_that_hurt_a_worker_is_never_loaded_in_process():
    from rsna_infer.runtime.streaming import StudyStream

    class Ref:
        study_id = 5
        series = []

    stream = StudyStream([Ref()], [], num_workers=0)
    stream.count_attempt(5)
    (ls,) = stream.take(1)
    assert ls.study is None and "never run in the main process" in ls.errors[0]


def test_spawned_workers_give_the_same_result(fam, root, tmp_path):
    from rsna_infer.io import discover_studies

    man = fake_manifest(tmp_path)
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
    run_predict(root, fake_manifest(tmp_path), tmp_path / "a", chunk_size=7)
    t2 = [n for v, n in calls if v == "t2"]
    assert t2 == [6], calls  # one batch of the 6 studies with a Sagittal T2 (13 has none), for both folds


def test_streamed_members_match_resident_and_a_member_that_cannot_be_loaded_costs_only_its_output(
        fam, root, tmp_path, monkeypatch):
    from rsna_infer.models.members import LoadedMember

    man = fake_manifest(tmp_path)
    resident, _ = run_predict(root, man, tmp_path / "a", chunk_size=3)
    streamed, rep = run_predict(root, man, tmp_path / "b", chunk_size=3, members="streamed")
    pd.testing.assert_frame_equal(resident, streamed, check_exact=True)
    assert rep["memory"]["mode"] == "streamed" and rep["memory"]["loads"] >= 3 * 3  # groups x chunks

    real = LoadedMember.to_device

    def to_device(self):
        if self.name == "grade_spinal":
            raise RuntimeError("CUDA out of memory (injected) while loading")
        return real(self)

    monkeypatch.setattr(LoadedMember, "to_device", to_device)
    df, rep = run_predict(root, man, tmp_path / "c", chunk_size=3, members="streamed")
    st = rep["studies"]
    assert all(any("grade_spinal: its weights could not be loaded" in e for e in st[str(s)]["errors"]) for s in IDS if s != 13)
    assert st["12"]["status"] == "ok"  # grade_all still covers every target
    assert len(df) == len(resident) and np.isfinite(df.iloc[:, 1:].to_numpy()).all()

