"""A run that survives its machine: faults injected the way machines fail, mostly from
outside a real ``rsna-infer predict`` process (signals to its workers, a file-size limit,
a bad path), plus a failing device replica and CUDA-style out-of-memory in-process.

Each test asserts a clear outcome, a complete valid submission where the run could go on,
and that run_report.json says what happened. The runs use the fake families of
predict_fakes.py (seconds per run); `benchmarks/bench_faults.py` hurts the real tiny
ensemble the same way and prints the figures. The pool itself: tests/test_workers.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import predict_fakes as fakes
import pytest
from predict_fakes import fake_entries, use_fake_families, write_fake_root

from rsna_infer.constants import CLASSES, study_row_ids
from rsna_infer.api import predict
from rsna_infer.inference.engine import Predictor
from rsna_infer.models.random_weights import make_random_manifest
from rsna_infer.output import OutputError
from rsna_infer.runtime.workers import named_children

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals and /proc are Linux's")

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
IDS = list(range(101, 113))
KEEP = lambda study, kp: kp  # noqa: E731  (stage-1 finalize: the fakes need none)
#: Runs a command under a file-size limit (RLIMIT_FSIZE): writes past it fail with EFBIG, as
#: on a full disk. Works as root, where a read-only chmod does not.
LIMITED = "import os, resource, sys; n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); os.execv(sys.argv[2], sys.argv[2:])"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_fake_root(tmp_path_factory.mktemp("root"), IDS)


def _manifest(path: Path, **over) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        use_fake_families(mp)
        return make_random_manifest(path, fake_entries(**over))


@pytest.fixture
def fam(monkeypatch):
    use_fake_families(monkeypatch)


def _check_csv(csv: Path, ids=IDS) -> pd.DataFrame:
    df = pd.read_csv(csv, dtype={"row_id": str})
    assert list(df.row_id) == [r for s in ids for r in study_row_ids(s)]
    v = df[list(CLASSES)].to_numpy()
    assert np.isfinite(v).all() and (v >= 0).all() and np.allclose(v.sum(1), 1, atol=1e-6)
    return df


def _report(out: Path) -> dict:
    return json.loads((out / "run_report.json").read_text())


# -- a real process, hurt from outside --------------------------------------------------------


def _cli(root: Path, out: Path, man: Path, *extra: str, limit_bytes: int | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(TESTS / "fake_cli.py"), "predict", str(root), "--out", str(out / "submission.csv"),
           "--manifest", str(man), "--device", "cpu", *extra]
    if limit_bytes is not None:
        cmd = [sys.executable, "-c", LIMITED, str(limit_bytes), *cmd]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the run did not end within {timeout}s:\n{err[-3000:]}")
    return proc.returncode, out, err


def _worker_holding(proc: subprocess.Popen, study_id: int, timeout: float = 180, exclude: tuple[int, ...] = ()) -> int:
    """The pid of ``proc``'s loading worker busy with ``study_id``, seen from outside
    (not one of ``exclude``: a worker just killed may linger until it is reaped)."""
    label, end = f"rsna:{study_id}", time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before a worker took study {study_id}:\n{proc.stderr.read()[-3000:]}")
        for pid, comm in named_children(proc.pid).items():
            if comm == label and pid not in exclude:
                return pid
        time.sleep(0.02)
    raise AssertionError(f"no worker took study {study_id} within {timeout}s")


def test_sigkill_of_one_worker_mid_run_costs_no_study(root, tmp_path):
    """The OOM killer takes a worker in the middle of the run: the study it held is tried
    again in a fresh worker; nothing else notices; exit 0 with every study predicted."""
    target = IDS[6]
    man = _manifest(tmp_path / "man", kp_t2_f0={"slow_on": [target], "slow_s": 1.5})
    proc = _cli(root, tmp_path / "out", man, "--workers", "2", "--chunk-size", "3")
    victim = _worker_holding(proc, target)
    os.kill(victim, signal.SIGKILL)
    rc, out, err = _finish(proc)
    assert rc == 0, err[-3000:]
    _check_csv(tmp_path / "out" / "submission.csv")
    rep = _report(tmp_path / "out")
    events = rep["faults"]["workers"]
    assert [(e["study_id"], e["event"], e["attempt"]) for e in events] == [(target, "worker died", 1)]
    assert "SIGKILL" in events[0]["detail"] and rep["faults"]["worker_processes"]["died"] == 1
    assert {s: r["status"] for s, r in rep["studies"].items()} == {str(s): "ok" for s in IDS}
    assert any("worker died on try 1" in w for w in rep["studies"][str(target)]["warnings"])


def test_a_study_that_kills_two_workers_gets_priors_and_never_runs_in_the_main_process(root, tmp_path):
    """The first study kills the worker that holds it, and again on its second try (the old
    code then loaded it in the main process, which it would kill too): it gets prior rows,
    every other study is predicted, the main process lives, exit 0."""
    target = IDS[0]
    man = _manifest(tmp_path / "man", kp_t2_f0={"slow_on": [target], "slow_s": 1.5})
    proc = _cli(root, tmp_path / "out", man, "--workers", "2", "--chunk-size", "4")
    first = _worker_holding(proc, target)
    os.kill(first, signal.SIGKILL)
    os.kill(_worker_holding(proc, target, exclude=(first,)), signal.SIGKILL)
    rc, out, err = _finish(proc)
    assert rc == 0, err[-3000:]
    df = _check_csv(tmp_path / "out" / "submission.csv")
    rep = _report(tmp_path / "out")
    st = rep["studies"]
    assert st[str(target)]["status"] == "fallback" and st[str(target)]["prior_targets"] == 25
    assert any(e.startswith("worker died: WorkerDied") and "SIGKILL" in e for e in st[str(target)]["errors"])
    assert all(st[str(s)]["status"] == "ok" for s in IDS[1:])
    assert rep["summary"]["fallback"] == 1 and rep["summary"]["studies_with_errors"] == 1
    assert [e["attempt"] for e in rep["faults"]["workers"]] == [1, 2]
    assert any(f"study {target}: a loading worker died on it 2 time(s)" in w for w in rep["warnings"])
    from rsna_infer.models.manifest import load_manifest

    rows = df[df.row_id.str.startswith(f"{target}_")][list(CLASSES)].to_numpy()
    np.testing.assert_allclose(rows, load_manifest(man).priors.reshape(25, 3), atol=1e-12)


def test_sigstop_of_one_worker_with_a_budget_finishes_in_time(root, tmp_path):
    """A worker hangs for good (SIGSTOP: a stuck read). With a 40 s budget the per-study
    watchdog (a tenth of the budget, at least 5 s) kills it; that study gets priors, the
    rest are predicted, and the run ends inside the budget with a complete CSV."""
    target, budget = IDS[4], 40.0
    man = _manifest(tmp_path / "man", kp_t2_f0={"slow_on": [target], "slow_s": 1.5})
    proc = _cli(root, tmp_path / "out", man, "--workers", "2", "--chunk-size", "3", "--time-budget", str(budget))
    victim = _worker_holding(proc, target)
    os.kill(victim, signal.SIGSTOP)
    try:
        rc, out, err = _finish(proc, timeout=budget + 120)
    finally:
        try:
            os.kill(victim, signal.SIGKILL)
            raise AssertionError("the stopped worker outlived the run")
        except ProcessLookupError:
            pass
    assert rc == 0, err[-3000:]
    _check_csv(tmp_path / "out" / "submission.csv")
    rep = _report(tmp_path / "out")
    assert rep["wall_s"] <= budget
    st = rep["studies"][str(target)]
    assert st["status"] == "fallback" and any(e.startswith("worker hung: WorkerTimeout") for e in st["errors"])
    assert [e["event"] for e in rep["faults"]["workers"]] == ["worker hung"]
    assert rep["faults"]["worker_processes"]["hung"] == 1
    assert all(rep["studies"][str(s)]["status"] == "ok" for s in IDS if s != target)


def _cli_in_process(capsys, *args: str) -> tuple[int, str]:
    """The CLI in this process (the same code as the console script, minus interpreter start-up)."""
    from rsna_infer import cli

    rc = cli.main(["predict", *args, "--device", "cpu", "--workers", "0"])
    return rc, capsys.readouterr().err


def test_the_wrong_split_fails_in_seconds_naming_the_paths(fam, root, tmp_path, capsys):
    man = _manifest(tmp_path / "man")
    rc, err = _cli_in_process(capsys, str(root), "--out", str(tmp_path / "out" / "submission.csv"), "--manifest", str(man),
                              "--split", "train")
    assert rc == 1 and "Traceback" not in err
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1
    assert "no studies found for split 'train'" in line[0] and str(root / "train_series_descriptions.csv") in line[0]
    assert "pass --split test" in line[0]
    assert not (tmp_path / "out" / "submission.csv").exists()


def test_an_output_folder_that_cannot_be_created_fails_before_the_models(fam, root, tmp_path, capsys):
    """A path under a regular file cannot be a folder, for root too (chmod does not stop root)."""
    man = _manifest(tmp_path / "man")
    (tmp_path / "afile").write_text("not a folder")
    out = tmp_path / "afile" / "sub"
    rc, err = _cli_in_process(capsys, str(root), "--out", str(out / "submission.csv"), "--manifest", str(man))
    assert rc == 1 and "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        f"error: cannot create the output folder {out}: Not a directory; choose a writable location"
    ]


@pytest.mark.parametrize("case", ["probe", "safety net", "report"])
def test_a_full_disk(case, root, tmp_path):
    """Writes past a file-size limit fail as on a full disk. Nothing fits: the probe fails
    before any model is built. The CSV does not fit: the safety net fails, same. Only the
    report does not fit: the complete CSV stands, exit 0, and no partial file is left."""
    from rsna_infer.output import PROBE_BYTES
    from rsna_infer.submission import prior_submission

    man = _manifest(tmp_path / "man")
    csv_bytes = len(prior_submission(IDS).to_csv(index=False).encode())
    limit = {"probe": PROBE_BYTES // 2, "safety net": (PROBE_BYTES + csv_bytes) // 2, "report": int(csv_bytes * 1.3)}[case]
    assert PROBE_BYTES < csv_bytes
    out = tmp_path / "out"
    rc, stdout, err = _finish(_cli(root, out, man, "--workers", "0", limit_bytes=limit))
    assert "Traceback" not in err
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    if case == "report":
        assert rc == 0, err[-3000:]
        _check_csv(out / "submission.csv")
        assert not (out / "run_report.json").exists()
        assert "could not write the run report" in err and "is complete" in err
        return
    assert rc == 1
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    want = "cannot write to the output folder" if case == "probe" else "cannot write the safety-net submission"
    assert len(line) == 1 and want in line[0] and "File too large" in line[0], err[-2000:]
    assert not (out / "submission.csv").exists() and "predictor ready" not in err  # no model was built


# -- in-process: devices, memory, configuration ----------------------------------------------


def _run(root, man, out, **kw):
    kw.setdefault("finalize", KEEP)
    kw.setdefault("progress", False)
    kw.setdefault("num_workers", 0)
    df = predict(root, out / "submission.csv", manifest=man, **kw)
    return df, _report(out)


def _poison_replica(monkeypatch, replica: int, n_models: int, error: str) -> None:
    """Every model of replica ``replica`` raises ``error`` after its (passing) dummy forward."""
    from rsna_infer.models import members

    real, calls = members.load_member, [0]

    def load_member(*args, **kwargs):
        m = real(*args, **kwargs)
        if calls[0] // n_models == replica:
            def broken(*a, **k):
                raise RuntimeError(error)

            m.model.forward = broken
        calls[0] += 1
        return m

    monkeypatch.setattr(members, "load_member", load_member)


CUDA_FAULT = "CUDA error: an illegal memory access was encountered"


def test_a_failing_replica_hands_its_chunks_to_another_and_is_retired(fam, root, tmp_path, monkeypatch):
    man = _manifest(tmp_path / "man")
    clean, _ = _run(root, man, tmp_path / "clean", chunk_size=2)
    _poison_replica(monkeypatch, 1, len(fake_entries()), CUDA_FAULT)
    df, rep = _run(root, man, tmp_path / "a", chunk_size=2, device="cpu,cpu")
    pd.testing.assert_frame_equal(clean, df, check_exact=True)  # nothing lost, nothing changed
    assert rep["summary"]["ok"] == len(IDS)
    faults = rep["faults"]
    failed = [e for e in faults["devices"] if e["event"] == "chunk failed"]
    assert failed and all(e["replica"] == 1 and CUDA_FAULT in e["detail"] for e in failed)
    assert faults["retired_devices"] == [{"device": "cpu", "replica": 1, "why": faults["retired_devices"][0]["why"]}]
    assert any("device cpu (replica 1) retired" in w for w in rep["warnings"])


def test_when_every_replica_fails_the_run_still_writes_every_row(fam, root, tmp_path, monkeypatch):
    man = _manifest(tmp_path / "man")
    _poison_replica(monkeypatch, 0, len(fake_entries()), CUDA_FAULT)
    df, rep = _run(root, man, tmp_path / "a", chunk_size=4)
    _check_csv(tmp_path / "a" / "submission.csv")
    assert rep["summary"]["fallback"] == len(IDS) and rep["summary"]["studies_with_errors"] == len(IDS)
    assert all(f"chunk: RuntimeError: {CUDA_FAULT}" in r["errors"] for r in rep["studies"].values())


def test_out_of_memory_retry_runs_after_the_failed_attempt_is_freed(fam, root, tmp_path):
    """A batch over the (fake) memory limit raises CUDA out-of-memory after allocating its
    activations; the halves must run only once those are gone (the old code split inside the
    ``except`` block, where the traceback kept them alive)."""
    fakes.OOM_PROBES.clear()
    fakes.OOM_FREED.clear()
    man = _manifest(tmp_path / "man", grade_all={"oom_over": 2})
    df, rep = _run(root, man, tmp_path / "a", chunk_size=4, batch_size=4, tta=False)
    assert fakes.OOM_PROBES and fakes.OOM_FREED and all(fakes.OOM_FREED)
    assert rep["faults"]["oom_retries"] >= len(fakes.OOM_PROBES) > 0
    assert rep["summary"]["ok"] == len(IDS)


def test_path_and_config_mistakes_fail_before_any_model_is_built(fam, root, tmp_path, monkeypatch):
    from rsna_infer.io import NoStudiesError
    from rsna_infer.models.manifest import ManifestError

    built = []

    def no_models(self, *args, **kwargs):
        built.append(1)
        raise AssertionError("the models were about to be built")

    monkeypatch.setattr(Predictor, "__init__", no_models)
    man = _manifest(tmp_path / "man")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="cannot create the output folder"):
        _run(root, man, tmp_path / "afile" / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoStudiesError, match=r"no studies found for split 'test': looked at .*empty/test_series_descriptions\.csv \(missing\)"):
        _run(tmp_path / "empty", man, tmp_path / "b")
    data = json.loads(man.read_text())
    data["models"][3]["blend"] = {"spinal": 1.0}
    data["models"][4]["blend"] = {"spinal": 1.0}
    bad = tmp_path / "man" / "zero_groups.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"\['foraminal', 'subarticular'\] sum to zero"):
        _run(root, bad, tmp_path / "c")
    data = json.loads(man.read_text())
    data["models"][0]["file"] = "../elsewhere/kp_t2_f0.safetensors"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "kp_t2_f0.safetensors").write_bytes((tmp_path / "man" / "weights" / "kp_t2_f0.safetensors").read_bytes())
    bad.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="outside the manifest's folder"):
        _run(root, bad, tmp_path / "d")
    assert built == [] and not any((tmp_path / d / "submission.csv").exists() for d in "bcd")


def test_predict_runs_with_the_hub_offline(fam, root, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    man = _manifest(tmp_path / "man")
    fakes.BUILD_ENV.clear()
    _run(root, man, tmp_path / "a")
    assert fakes.BUILD_ENV and set(fakes.BUILD_ENV) == {"1"}
    assert "HF_HUB_OFFLINE" not in os.environ  # restored afterwards


def test_the_safety_net_is_in_place_before_the_models_run(fam, root, tmp_path, monkeypatch):
    """Right after discovery a priors-only CSV exists, so a run killed during the models
    still leaves a valid submission; the real one replaces it (mode as open() gives it)."""
    from rsna_infer.output import current_umask

    man = _manifest(tmp_path / "man")
    seen = {}
    real = Predictor.run

    def run(self, refs, **kw):
        seen["csv"] = _check_csv(tmp_path / "a" / "submission.csv").copy()
        return real(self, refs, **kw)

    monkeypatch.setattr(Predictor, "run", run)
    df, _ = _run(root, man, tmp_path / "a")
    from rsna_infer.models.manifest import load_manifest

    priors = load_manifest(man).priors.reshape(-1, 3)
    np.testing.assert_allclose(seen["csv"][list(CLASSES)].to_numpy(), np.tile(priors, (len(IDS), 1)), atol=1e-12)
    assert not np.allclose(df[list(CLASSES)].to_numpy(), seen["csv"][list(CLASSES)].to_numpy())
    for name in ("submission.csv", "run_report.json"):
        assert (tmp_path / "a" / name).stat().st_mode & 0o777 == 0o666 & ~current_umask()


def test_a_hung_device_is_given_up_and_the_run_still_writes_every_row(fam, root, tmp_path, monkeypatch):
    """The only device stops answering in the middle of a chunk (a hung kernel): past the
    chunk timeout it is abandoned, that chunk and the studies not read yet get prior rows
    with the reason, and the CSV is written."""
    import threading

    from rsna_infer.runtime import devices

    monkeypatch.setattr(devices, "CHUNK_TIMEOUT_FLOOR_S", 3.0)
    release = threading.Event()
    real = Predictor.run_chunk

    def run_chunk(self, loaded, plan, replica=0):
        if any(ls.study_id == IDS[4] for ls in loaded):
            release.wait(120)
        return real(self, loaded, plan, replica)

    monkeypatch.setattr(Predictor, "run_chunk", run_chunk)
    try:
        df, rep = _run(root, _manifest(tmp_path / "man"), tmp_path / "a", chunk_size=3, study_timeout_s=0.01)
    finally:
        release.set()
    _check_csv(tmp_path / "a" / "submission.csv")
    st = rep["studies"]
    assert [st[str(s)]["status"] for s in IDS[:3]] == ["ok"] * 3
    assert all(any("no answer from cpu within 3s" in e for e in st[str(s)]["errors"]) for s in IDS[3:6])
    assert all("no working device left; prior rows" in st[str(s)]["fallbacks"] for s in IDS[6:])
    assert rep["faults"]["retired_devices"][0]["why"].startswith("no answer")
    assert any("no working device left" in w for w in rep["warnings"])
