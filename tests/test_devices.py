"""Devices: the GPU-capability check against the torch build (torch.cuda monkeypatched: a
P100 under a build without sm_60), fault classification, and the replica set's failover,
hung-device and deadline handling."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rsna_infer.runtime import devices
from rsna_infer.runtime.devices import (
    FAILED,
    FINISHED,
    TIMED_OUT,
    DeviceError,
    ReplicaSet,
    build_runs_capability,
    is_device_fault,
    is_out_of_memory,
    resolve_devices,
)

BUILD = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


@pytest.mark.parametrize("cap, archs, ok", [
    ((7, 5), BUILD, True),
    ((8, 9), BUILD, True),  # sm_89 runs sm_86 cubins (same major, higher minor)
    ((6, 0), BUILD, False),  # P100
    ((6, 1), ["sm_60"], True),
    ((6, 0), ["sm_61"], False),  # a lower minor cannot run a higher one's cubins
    ((6, 0), ["sm_75", "compute_60"], True),  # PTX the driver compiles
    ((9, 0), ["sm_90a"], True),
    ((9, 1), ["sm_90a"], False),  # arch-specific cubins run on exactly that card
    ((12, 0), ["sm_120"], True),
    ((5, 0), [], True),  # unknown build list: not refused
])
def test_build_runs_capability(cap, archs, ok):
    assert build_runs_capability(cap, archs) is ok


@pytest.fixture
def p100(monkeypatch):
    """One visible GPU, a Tesla P100 (sm_60), under a build for sm_75 and newer."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla P100-PCIE-16GB")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(BUILD))


def test_a_named_gpu_the_build_cannot_run_is_an_error(p100):
    with pytest.raises(DeviceError) as e:
        resolve_devices("cuda")
    msg = str(e.value)
    assert "Tesla P100-PCIE-16GB" in msg and "sm_60" in msg and "sm_75, sm_80" in msg and "device='cpu'" in msg
    with pytest.raises(DeviceError, match="sm_60"):
        resolve_devices("cuda:0")


def test_by_default_an_unusable_gpu_means_cpu_with_a_loud_warning(p100, caplog):
    notes: list[str] = []
    assert resolve_devices(None, notes) == [torch.device("cpu")]
    assert len(notes) == 1 and "RUNNING ON CPU" in notes[0] and "Tesla P100" in notes[0]
    assert "RUNNING ON CPU" in caplog.text


def test_the_cpu_fallback_reaches_the_run_report(p100, monkeypatch, tmp_path):
    import json

    from predict_fakes import fake_entries, use_fake_families, write_fake_root

    from rsna_infer.api import predict
    from rsna_infer.models.random_weights import make_random_manifest

    use_fake_families(monkeypatch)
    root = write_fake_root(tmp_path / "root", [1, 2])
    man = make_random_manifest(tmp_path / "man", fake_entries())
    predict(root, tmp_path / "out" / "submission.csv", manifest=man, num_workers=0, progress=False,
            finalize=lambda s, k: k)
    rep = json.loads((tmp_path / "out" / "run_report.json").read_text())
    assert rep["devices"] == ["cpu"] and any("RUNNING ON CPU" in w for w in rep["warnings"])


def test_device_names_and_counts_are_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_devices("cuda")
    with pytest.raises(DeviceError, match="not a device name"):
        resolve_devices("gpu0")
    assert resolve_devices("cpu,cpu") == [torch.device("cpu")] * 2


def test_fault_classification():
    assert is_device_fault(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_device_fault(RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"))
    assert not is_device_fault(RuntimeError("shape mismatch"))
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert is_out_of_memory(oom) and not is_device_fault(oom)


# -- the replica set -------------------------------------------------------------------------


class _Study:
    def __init__(self, sid):
        self.study_id = sid


def _chunk(*ids):
    return [_Study(i) for i in ids]


def test_a_chunk_that_fails_on_one_replica_runs_on_another():
    def run(loaded, plan, replica):
        if replica == 1:
            raise RuntimeError("CUDA error: boom")
        return [s.study_id for s in loaded]

    with ReplicaSet(run, ["cuda:0", "cuda:1"]) as rs:
        rs.submit(_chunk(1, 2), "plan")
        rs.submit(_chunk(3, 4), "plan")
        got = sorted((o.status, tuple(o.output), o.replica) for o in rs.drain())
    assert got == [(FINISHED, (1, 2), 0), (FINISHED, (3, 4), 0)]
    assert [e["event"] for e in rs.events] == ["chunk failed"] and rs.replicas[1].strikes == 1


def test_a_replica_that_keeps_failing_is_retired_but_never_the_last():
    calls = []

    def run(loaded, plan, replica):
        calls.append(replica)
        if replica == 1:
            raise RuntimeError("CUDA error: boom")
        return "ok"

    with ReplicaSet(run, ["a", "b"]) as rs:
        for k in range(6):
            while not rs.can_take():
                assert rs.next().status == FINISHED
            rs.submit(_chunk(k), "plan")
        assert all(o.status == FINISHED for o in rs.drain())
        assert rs.replicas[1].retired and not rs.replicas[0].retired
        assert any("device b (replica 1) retired" in w for w in rs.warnings)
        assert calls.count(1) == ReplicaSet.MAX_STRIKES  # no chunk went to it after retirement
    def always_fails(loaded, plan, replica):
        raise RuntimeError("CUDA error: x")

    with ReplicaSet(always_fails, ["only"]) as rs:
        for k in range(3):
            rs.submit(_chunk(k), "plan")
            assert rs.next().status == FAILED
        assert rs.replicas[0].retired is None  # the last device is kept: each chunk is still tried


def test_a_hung_replica_is_abandoned_and_its_chunk_rerun(monkeypatch):
    monkeypatch.setattr(devices, "CHUNK_TIMEOUT_FLOOR_S", 0.5)
    release = threading.Event()

    def run(loaded, plan, replica):
        if replica == 0:
            release.wait(60)  # a device that never answers
        return replica

    rs = ReplicaSet(run, ["stuck", "fine"], study_timeout_s=0.1)
    try:
        rs.submit(_chunk(1), "plan")
        t0 = time.monotonic()
        out = rs.next()
        assert out.status == FINISHED and out.output == 1 and time.monotonic() - t0 < 30
        assert rs.replicas[0].retired and "no answer" in rs.replicas[0].retired
    finally:
        release.set()
        rs.close()


def test_at_the_deadline_a_running_chunk_is_given_up():
    release = threading.Event()
    rs = ReplicaSet(lambda loaded, plan, r: release.wait(60), ["slow"])
    try:
        rs.submit(_chunk(7), "plan")
        out = rs.next(deadline=time.monotonic() + 0.2)
        assert out.status == TIMED_OUT and "time budget ran out" in out.reason and out.chunk.study_ids == [7]
        assert not rs.busy
    finally:
        release.set()
        rs.close()
