"""The run loop on fake families (see predict_fakes.py): the deadline guard's decisions and
what a failing loop or chunk costs."""

import logging

import numpy as np
import predict_fakes as fakes
import pytest
from predict_fakes import IDS, KEEP, fake_manifest, fake_root, run_predict, use_fake_families

from rsna_infer.inference.engine import Predictor


@pytest.fixture
def fam(monkeypatch):
    use_fake_families(monkeypatch)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return fake_root(tmp_path_factory.mktemp("root"))


def test_deadline_guard_sheds_tta_then_members(fam, root, tmp_path):
    # Fake costs per study (x2 with TTA): 3 folds x 1 s + grade_spinal 1 s + grade_all 3 s = 7 s,
    # 14 s with TTA. Budget for 7 studies: 70 s (+ the 10% reserve): the full plan cannot fit.
    costs = {"kp_t2_f0": {"cost": 1}, "kp_t2_f1": {"cost": 1}, "kp_t1_f0": {"cost": 1},
             "grade_spinal": {"cost": 1}, "grade_all": {"cost": 3}}
    man = fake_manifest(tmp_path, **costs)
    fakes.CLOCK.t = 1000.0
    df, rep = run_predict(root, man, tmp_path / "a", chunk_size=1, time_budget_s=77.0, clock=fakes.CLOCK)
    d = rep["deadline"]
    assert d["shed"][0]["action"] == "tta off" and d["final_tta"] is False
    assert d["shed"][1]["action"] == "drop grade_spinal"  # the lower-weight share of its groups
    assert fakes.CLOCK.t - 1000.0 <= 77.0
    assert len(df) == 175 and np.isfinite(df.iloc[:, 1:].to_numpy()).all()


def test_deadline_gives_priors_to_studies_that_cannot_fit(fam, root, tmp_path):
    man = fake_manifest(tmp_path, grade_all={"cost": 20})
    fakes.CLOCK.t = 1000.0
    df, rep = run_predict(root, man, tmp_path / "a", chunk_size=2, time_budget_s=100.0, clock=fakes.CLOCK)
    d = rep["deadline"]
    assert d["studies_given_priors"] > 0 and d["shed"][-1]["action"] == "priors for the rest"
    skipped = [s for s, r in rep["studies"].items() if r["status"] == "skipped"]
    assert len(skipped) == d["studies_given_priors"] and skipped == [str(s) for s in IDS[-len(skipped):]]
    assert len(df) == 175 and np.allclose(df.iloc[:, 1:].sum(axis=1), 1)


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
    df, rep = run_predict(root, fake_manifest(tmp_path), tmp_path / "a", chunk_size=3)
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
    df, rep = run_predict(root, fake_manifest(tmp_path), tmp_path / "a", chunk_size=2)
    st = rep["studies"]
    assert st["15"]["status"] == st["16"]["status"] == "fallback" and "chunk: RuntimeError: boom" in st["15"]["errors"]
    assert st["17"]["status"] == "ok" and len(df) == 175


def test_with_a_budget_a_one_study_probe_chunk_measures_the_costs_first(fam, root, tmp_path, monkeypatch):
    sizes = []
    real = Predictor.run_chunk

    def run_chunk(self, loaded, plan, replica=0):
        sizes.append(len(loaded))
        return real(self, loaded, plan, replica)

    monkeypatch.setattr(Predictor, "run_chunk", run_chunk)
    run_predict(root, fake_manifest(tmp_path), tmp_path / "a", chunk_size=3, time_budget_s=3600.0)
    assert sizes == [1, 3, 3]
    sizes.clear()
    run_predict(root, fake_manifest(tmp_path), tmp_path / "b", chunk_size=3)
    assert sizes == [3, 3, 1]  # without a budget nothing is probed


def test_a_budget_already_spent_gives_priors_with_a_log_line_and_a_shed_entry(fam, root, tmp_path, caplog):
    from rsna_infer.io import discover_studies

    man = fake_manifest(tmp_path)
    fakes.CLOCK.t = 1000.0
    pred = Predictor(man, device="cpu", finalize=KEEP, clock=fakes.CLOCK)
    with caplog.at_level(logging.WARNING):
        res = pred.run(discover_studies(root), num_workers=0, time_budget_s=10.0, start=fakes.CLOCK.t - 20.0, progress=False)
    assert "no time left" in caplog.text
    assert [e["action"] for e in res.deadline["shed"]] == ["priors for the rest"]
    assert res.deadline["studies_given_priors"] == len(IDS)
    assert {r.status for r in res.records.values()} == {"skipped"}

