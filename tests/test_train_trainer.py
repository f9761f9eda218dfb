"""The generic loop on two minimal families (tests/train_toys.py, registered in place of sag2d
and roi), so it is tested independently of the real families (test_train_families.py)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import train_toys as T

from rsna_infer.keypoints import KeypointSet, StudyKeypoints
from rsna_infer.models.manifest import load_manifest
from rsna_infer.models.members import load_member
from rsna_infer.train.data import TrainingData
from rsna_infer.train.folds import SplitError, make_folds, save_folds, split_id
from rsna_infer.train.keypoint_store import load_keypoints, save_keypoints
from rsna_infer.train.trainer import train_fold, train_folds, warmup_cosine
from rsna_infer.train.validation import ValidationError

_cfg = T.toy_config


@pytest.fixture
def toy_families(monkeypatch):
    T.install(monkeypatch)


@pytest.fixture
def data(tmp_path):
    return TrainingData.open(T.write_toy_root(tmp_path / "root"), cache_dir=tmp_path / "cache", loader=T.toy_study)


def test_warmup_cosine_shape():
    lr = [warmup_cosine(s, 100, 10, 0.1) for s in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:])) and lr[-1] == pytest.approx(0.1, abs=1e-3)


def test_warm_up_is_capped_at_half_the_run(toy_families, data, tmp_path):
    """``--set epochs=1`` works whatever the config's warm-up, and the LR still decays."""
    cfg = _cfg("roi", "spinal", epochs=1, warmup_epochs=3)
    assert cfg.effective_warmup_epochs() == 0.5
    res = train_fold(cfg, data, 0, tmp_path / "r", progress=False)
    assert len(res.history) == 1 and res.history[0]["lr"] < cfg.lr


def test_stage2_run_learns_exports_and_writes_oof(toy_families, data, tmp_path):
    cfg = _cfg("roi", "spinal", epochs=12, lr=1e-2, ema_decay=0.9)
    untrained = train_fold(_cfg("roi", "spinal", epochs=1, lr=1e-9), data, 1, tmp_path / "untrained", progress=False)
    out = tmp_path / "run"
    res = train_fold(cfg, data, 1, out, progress=False)
    h = res.history
    assert len(h) == 12 and all(np.isfinite(r["train_loss"]) for r in h)
    assert {"val_metric", "val_spinal", "val_total"} <= set(h[0])
    # the grade is plainly visible: the trained model beats the untrained one by a wide margin
    assert res.best_metric < 0.6 * untrained.history[0]["val_spinal"], (res.best_metric, untrained.history)
    # files of the run
    folds = pd.read_csv(out / "folds.csv")
    assert len(folds) == 20 and json.loads((out / "config.json").read_text())["name"] == "toy_roi"
    z = np.load(res.oof_path)
    val_ids = sorted(folds.loc[folds.fold == 1, "study_id"])
    assert z["study_ids"].tolist() == val_ids and str(z["split"]) == split_id(folds)
    assert z["logits"].shape == (len(val_ids), 5, 5, 3) and z["mask"][:, 0].all() and not z["mask"][:, 1:].any()
    # the manifest entry loads exactly as the predictor loads it, and records the split
    man = load_manifest(res.manifest_path, verify=True)
    assert man.priors_given and [m.name for m in man.models] == ["toy_roi_f1"] and man.split == split_id(folds)
    assert "TRUE keypoints" in man.notes  # the toy validates on the truth, explicitly; the manifest says so
    member = load_member(man.models[0], man.resolve(man.models[0]))
    assert member.entry.sha256 == res.entry.sha256
    assert res.best_epoch == int(np.argmin([r["val_metric"] for r in h])) + 1
    record = json.loads((out / "run_f1.json").read_text())
    assert record["status"] == "complete" and record["split"] == split_id(folds) and record["selected_epoch"] == res.best_epoch
    assert record["validation"]["keypoints"] == "truth"
    assert (out / "checkpoints" / "f1_last.pt").is_file() and (out / "checkpoints" / "f1_best.pt").is_file()


def test_stage1_run_reports_mm_errors_and_oof_keypoints(toy_families, data, tmp_path):
    untrained = train_fold(_cfg("sag2d", "t2", epochs=1, lr=1e-9), data, 0, tmp_path / "untrained", progress=False)
    res = train_fold(_cfg("sag2d", "t2", epochs=6, select="last"), data, 0, tmp_path / "kp", progress=False)
    h = res.history
    assert h[-1]["val_err_mm"] == h[-1]["val_metric"] and h[-1]["val_coverage"] == 1.0
    # the per-level positions are learnable (a per-study offset is not): a wide margin over the untrained model
    assert h[-1]["val_err_mm_spinal"] < 0.75 * untrained.history[0]["val_err_mm_spinal"], (h, untrained.history)
    kps = load_keypoints(res.keypoints_path)
    z = np.load(res.oof_path)
    assert sorted(kps) == z["study_ids"].tolist() and z["err_mm_spinal"].shape == (len(kps), 5)
    assert all(k.get("sag2d_t2").valid.all() for k in kps.values())
    assert res.best_epoch == 6


def test_same_seed_same_weights_whatever_the_workers(toy_families, data, tmp_path):
    """Reproducible, and persistent workers still see every epoch's augmentation."""
    a = train_fold(_cfg("roi", "spinal", epochs=2), data, 0, tmp_path / "a", progress=False)
    b = train_fold(_cfg("roi", "spinal", epochs=2, num_workers=2), data, 0, tmp_path / "b", progress=False)
    c = train_fold(_cfg("roi", "spinal", epochs=2, seed=2), data, 0, tmp_path / "c", progress=False)
    from safetensors.torch import load_file

    wa, wb, wc = (load_file(str(r.out_dir / r.entry.file)) for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]


def test_epoch_reaches_persistent_workers(toy_families, data):
    """Augmentation differs per epoch even though worker processes keep their dataset copy."""
    from torch.utils.data import DataLoader

    from rsna_infer.models.registry import make_family
    from rsna_infer.train.samples import Collate, EpochIndices, EpochShuffle, StudyDataset

    fam = make_family(_cfg("sag2d", "t2").model_entry(0))
    ds = StudyDataset(fam, data, data.study_ids[:4], train=True, seed=3)
    sampler = EpochIndices(EpochShuffle(len(ds), 3))
    loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=1, persistent_workers=True,
                        collate_fn=Collate(fam, with_targets=True))
    seen = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen.append(next(iter(loader)))
    order = [sorted(range(4), key=lambda i: b.study_ids[i]) for b in seen]
    x0, x1 = (b.inputs["image"][o] for b, o in zip(seen, order))
    assert not torch.equal(x0, x1)


def test_all_studies_fold_and_fp16_export(toy_families, data, tmp_path):
    res = train_fold(_cfg("roi", "spinal", epochs=1, export_dtype="float16"), data, -1, tmp_path / "all", progress=False)
    assert res.oof_path is None and res.entry.name == "toy_roi_all"
    assert res.entry.fold == -1  # never recorded as fold 0: it has no out-of-fold studies
    from safetensors import safe_open

    with safe_open(str(tmp_path / "all" / res.entry.file), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    man = load_manifest(tmp_path / "all" / "manifest_all.json")
    assert man.models[0].fold == -1 and man.split == ""
    load_member(man.models[0], man.resolve(man.models[0]))  # fp16 file into the fp32 network


def test_unpreparable_studies_are_skipped_but_not_all(toy_families, data, tmp_path, monkeypatch, caplog):
    original = T.ToyGrader.prepare

    def flaky(self, study, keypoints=None, rng=None):
        if study.study_id == 3:
            raise ValueError("no sagittal T2")
        return original(self, study, keypoints, rng)

    monkeypatch.setattr(T.ToyGrader, "prepare", flaky)
    train_fold(_cfg("roi", "spinal", epochs=1), data, 0, tmp_path / "r", progress=False)
    assert "study 3" in caplog.text
    monkeypatch.setattr(T.ToyGrader, "prepare", lambda *a, **k: [])
    with pytest.raises(RuntimeError, match="no trainable sample"):
        train_fold(_cfg("roi", "spinal", epochs=1), data, 0, tmp_path / "r2", progress=False)


# -- honest stage-2 validation ------------------------------------------------------------------


def _folds_csv(data, tmp_path, seed=0):
    return save_folds(make_folds(data.study_ids, data.label_array(data.study_ids), 4, seed), tmp_path / f"folds{seed}.csv")


def _keypoints_file(path, study_ids, split):
    kps = {}
    for sid in study_ids:
        s = KeypointSet("spinal", np.zeros((5, 3)), np.full((5, 3), 2.0), np.full(5, sid * 10), np.zeros(5, int),
                        np.ones(5), "sag2d_t2")
        kps[sid] = StudyKeypoints(sid, {"sag2d_t2": s})
    return save_keypoints(path, kps, split=split)


def test_stage2_validation_needs_predicted_keypoints(toy_families, data, tmp_path):
    folds = _folds_csv(data, tmp_path)
    with pytest.raises(ValidationError, match="--keypoints"):
        train_fold(_cfg("roi", "spinal", val_keypoints="predicted"), data, 0, tmp_path / "r", folds_csv=folds, progress=False)
    assert not (tmp_path / "r" / "checkpoints").exists()  # refused before any training


def test_study_without_predicted_keypoints_is_an_error_or_a_recorded_choice(toy_families, data, tmp_path):
    folds = _folds_csv(data, tmp_path)
    frame = pd.read_csv(folds)
    val = sorted(frame.loc[frame.fold == 0, "study_id"])
    kp = _keypoints_file(tmp_path / "kp.npz", [s for s in data.study_ids if s != val[0]], split_id(frame))
    cfg = dict(val_keypoints="predicted", epochs=1)
    with pytest.raises(ValidationError, match=rf"1 of {len(val)} validation studies.*{val[0]}"):
        train_fold(_cfg("roi", "spinal", **cfg), data, 0, tmp_path / "e", folds_csv=folds, keypoints_files=[kp], progress=False)
    res = train_fold(_cfg("roi", "spinal", missing_keypoints="truth", **cfg), data, 0, tmp_path / "t", folds_csv=folds,
                     keypoints_files=[kp], progress=False)
    assert res.record["validation"]["truth_keypoint_studies"] == [val[0]]
    assert np.load(res.oof_path)["study_ids"].tolist() == val
    res = train_fold(_cfg("roi", "spinal", missing_keypoints="skip", **cfg), data, 0, tmp_path / "s", folds_csv=folds,
                     keypoints_files=[kp], progress=False)
    assert res.record["validation"]["skipped_studies"] == [val[0]]
    assert np.load(res.oof_path)["study_ids"].tolist() == val[1:]
    assert json.loads((tmp_path / "s" / "run_f0.json").read_text())["validation"]["keypoints"] == "predicted"


def test_keypoints_of_another_split_are_refused(toy_families, data, tmp_path):
    ours, theirs = _folds_csv(data, tmp_path, 0), _folds_csv(data, tmp_path, 1)
    kp = _keypoints_file(tmp_path / "kp.npz", data.study_ids, split_id(pd.read_csv(theirs)))
    with pytest.raises(SplitError, match=rf"{split_id(pd.read_csv(ours))}.*{split_id(pd.read_csv(theirs))}.*kp.npz"):
        train_fold(_cfg("roi", "spinal", val_keypoints="predicted"), data, 0, tmp_path / "r", folds_csv=ours,
                   keypoints_files=[kp], progress=False)


# -- checkpoints and resume -----------------------------------------------------------------------


def _toy_run(root, out, *extra, **kw):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("train_toys.py")
    return subprocess.Popen([sys.executable, str(script), str(root), str(out), *extra], **kw)


def _last_epoch(path):
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # not written yet
        return 0


def test_a_killed_run_resumes_where_it_stopped(tmp_path):
    """Kill a run from outside after epoch 2's checkpoint, resume it, and end with exactly the
    weights, history and optimizer/scheduler/EMA state of a run that was never interrupted."""
    import time

    root = T.write_toy_root(tmp_path / "root")
    ref = _toy_run(root, tmp_path / "ref", "--epochs", "5")
    assert ref.wait(timeout=300) == 0
    victim = _toy_run(root, tmp_path / "killed", "--epochs", "5", "--slow", "0.05")
    last = tmp_path / "killed" / "run" / "checkpoints" / "f0_last.pt"
    deadline = time.monotonic() + 300
    while _last_epoch(last) < 2 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.kill()
    victim.wait(timeout=60)
    killed_at = _last_epoch(last)
    assert 2 <= killed_at < 5, killed_at  # it died mid-run, with a checkpoint behind it
    assert not (tmp_path / "killed" / "run" / "manifest_f0.json").exists()
    resumed = _toy_run(root, tmp_path / "killed", "--epochs", "5", "--resume")
    assert resumed.wait(timeout=300) == 0

    a, b = (tmp_path / d / "run" for d in ("ref", "killed"))
    from safetensors.torch import load_file

    wa, wb = (load_file(str(d / "weights" / "toy_roi_f0.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    ha, hb = (json.loads((d / "history_f0.json").read_text()) for d in (a, b))
    assert [r["epoch"] for r in hb] == [1, 2, 3, 4, 5] and len(ha) == 5
    for ra, rb in zip(ha, hb):
        assert ra.keys() == rb.keys() and all(ra[k] == pytest.approx(rb[k], abs=1e-6) for k in ra if k != "seconds")
    sa, sb = (torch.load(d / "checkpoints" / "f0_last.pt", weights_only=True) for d in (a, b))
    assert sa["scheduler"]["last_epoch"] == sb["scheduler"]["last_epoch"] and sa["ema_updates"] == sb["ema_updates"]
    for (ka, ta), (kb, tb) in zip(sa["optimizer"]["state"].items(), sb["optimizer"]["state"].items()):
        assert torch.allclose(ta["exp_avg_sq"], tb["exp_avg_sq"], atol=1e-9) and float(ta["step"]) == float(tb["step"])
    record = json.loads((b / "run_f0.json").read_text())
    assert record["status"] == "complete" and record["resumes"][0]["after_epoch"] == killed_at


def test_resume_refuses_a_changed_config_and_keeps_finished_folds(toy_families, data, tmp_path):
    from rsna_infer.train.trainer import TrainError

    train_fold(_cfg("roi", "spinal", epochs=2), data, 0, tmp_path / "r", progress=False)
    (tmp_path / "r" / "run_f0.json").write_text(json.dumps({**json.loads((tmp_path / "r" / "run_f0.json").read_text()),
                                                            "status": "running"}))
    with pytest.raises(TrainError, match=r"lr: 0.003 -> 0.001"):
        train_fold(_cfg("roi", "spinal", epochs=2, lr=1e-3), data, 0, tmp_path / "r", progress=False, resume=True)
    res = train_fold(_cfg("roi", "spinal", epochs=2), data, 0, tmp_path / "r", progress=False, resume=True)
    assert [r["epoch"] for r in res.history] == [1, 2]  # nothing left to train: exported from the checkpoint
    again = train_fold(_cfg("roi", "spinal", epochs=2), data, 0, tmp_path / "r", progress=False, resume=True)
    assert again.entry.sha256 == res.entry.sha256  # finished: kept as is


# -- several processes ----------------------------------------------------------------------------


def _ddp_rank(rank, port, root, cache, out, queue):
    import os

    os.environ.update({"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    try:
        data = TrainingData.open(root, cache_dir=cache, loader=T.toy_study)
        res = train_folds(_cfg("roi", "spinal", epochs=2), data, [0, 1, 2, 3], out, device="cpu", progress=False)
        queue.put((rank, [r.history[-1]["train_loss"] for r in res]))
    except Exception as e:  # reported to the parent
        queue.put((rank, repr(e)))


def test_two_process_ddp_on_cpu_every_fold_in_one_group(toy_families, tmp_path):
    """What torchrun does on two GPUs, on CPU with gloo: both ranks train every fold in one
    process group, validation is shared, rank 0 exports."""
    import multiprocessing as mp
    import socket

    root = T.write_toy_root(tmp_path / "root")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ddp_rank, args=(r, port, root, tmp_path / "cache", tmp_path / "ddp", q)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all(isinstance(v, list) for v in results.values()), results
    assert results[0] == pytest.approx(results[1])  # the logged loss is the mean over ranks
    folds = pd.read_csv(tmp_path / "ddp" / "folds.csv")
    for k in range(4):
        man = load_manifest(tmp_path / "ddp" / f"manifest_f{k}.json", verify=True)
        assert [m.name for m in man.models] == [f"toy_roi_f{k}"]
        # the two ranks' validation shards were gathered: every study of the fold is in the OOF file
        z = np.load(tmp_path / "ddp" / f"oof_f{k}.npz")
        assert z["study_ids"].tolist() == sorted(folds.loc[folds.fold == k, "study_id"])


class _BudgetProbe(torch.utils.data.Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.data.cache.memory_bytes


def test_loader_workers_share_the_cache_budget(data):
    """Persistent workers each keep a cache; together they stay within the one budget."""
    from torch.utils.data import DataLoader

    from rsna_infer.train.samples import ShareCacheBudget

    full = data.cache.memory_bytes
    loader = DataLoader(_BudgetProbe(data), batch_size=1, num_workers=2, worker_init_fn=ShareCacheBudget(2))
    assert {int(b) for b in loader} == {full // 2}
    assert data.cache.memory_bytes == full  # the main process keeps its own
