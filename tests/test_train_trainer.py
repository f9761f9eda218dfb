"""The generic loop on two minimal families (registered in place of sag2d and roi), so it is
tested independently of the real families (those are trained in test_train_families.py)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from rsna_infer import registry
from rsna_infer.constants import SAG_T2, TARGETS
from rsna_infer.family import GradingFamily, KeypointFamily, Sample
from rsna_infer.io.volume import Study, Volume
from rsna_infer.manifest import load_manifest
from rsna_infer.members import load_member
from rsna_infer.stage1.keypoints import KeypointSet
from rsna_infer.train.config import TrainConfig
from rsna_infer.train.data import TrainingData
from rsna_infer.train.keypoint_store import load_keypoints
from rsna_infer.train.trainer import train_fold, warmup_cosine

H, W = 12, 16


class _Net(nn.Module):
    def __init__(self, out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(H * W, 32), nn.ReLU(), nn.Linear(32, out))

    def forward(self, batch):
        return self.body(batch["image"])


def _centre(study):
    v = study.first(SAG_T2)
    z = v.shape[0] // 2
    img = (v.pixels[z] - 500.0) / 300.0
    return v, z, img[None].astype(np.float32)


class ToyKeypoints(KeypointFamily):
    name = "sag2d"

    def build(self):
        return _Net(10)

    def prepare(self, study, keypoints=None, rng=None):
        v, z, img = _centre(study)
        if rng is not None:
            img = img + rng.normal(0, 0.01, img.shape).astype(np.float32)
        return [Sample(study.study_id, {"image": img}, {"series_id": v.series_id, "z": z})]

    def example_batch(self, batch_size=2):
        return {"image": torch.zeros(batch_size, 1, H, W)}

    def run(self, model, batch, tta=False):
        return model(batch)

    def targets(self, sample, study, truth):
        t = truth.get("truth_spinal")
        if t is None or not t.valid.any():
            return None
        yx = np.nan_to_num(t.voxel[:, 1:] / [H, W]).astype(np.float32)
        return {"yx": yx, "valid": t.valid.astype(np.float32)}

    def loss(self, output, targets):
        err = (output.view(-1, 5, 2) - targets["yx"]) ** 2
        return (err.sum(-1) * targets["valid"]).sum() / targets["valid"].sum().clamp(min=1)

    def decode(self, output, sample, study):
        v = study.find(sample.meta["series_id"])
        yx = np.asarray(output).reshape(5, 2) * [H, W]
        voxel = np.column_stack([np.full(5, sample.meta["z"]), yx])
        return KeypointSet("spinal", v.to_world(voxel), voxel, np.full(5, v.series_id), np.zeros(5, int), np.ones(5), "sag2d_t2")


class ToyGrader(GradingFamily):
    name = "roi"

    def build(self):
        return _Net(75)

    def prepare(self, study, keypoints=None, rng=None):
        _, _, img = _centre(study)
        mask = np.zeros((5, 5), bool)
        mask[0] = True
        return [Sample(study.study_id, {"image": img}, mask=mask)]

    def example_batch(self, batch_size=2):
        return {"image": torch.zeros(batch_size, 1, H, W)}

    def run(self, model, batch, tta=False):
        return model(batch).view(-1, 5, 5, 3)

    def loss(self, output, labels, mask):
        return super().loss(output.view(-1, 5, 5, 3), labels, mask)


@pytest.fixture
def toy_families(monkeypatch):
    real = registry.family_class
    toys = {"sag2d": ToyKeypoints, "roi": ToyGrader}
    monkeypatch.setattr(registry, "family_class", lambda name: toys.get(name) or real(name))


def _study(sid: int, severity: int) -> Study:
    rng = np.random.default_rng(sid)
    n = 5
    pos = np.array([[8.0 - 4 * i, -50.0, 80.0] for i in range(n)])
    pix = rng.normal(500, 50, (n, H, W)).astype(np.float32)
    pix[:, 2:5, 3:12] += 300.0 * severity  # a visible "narrowing"
    return Study(sid, {SAG_T2: [Volume(pix, pos, [0, 1, 0], [0, 0, -1], (1.0, 1.0), np.arange(1, n + 1),
                                       study_id=sid, series_id=sid * 10, description=SAG_T2)]})


@pytest.fixture
def toy_root(tmp_path):
    ids = list(range(1, 21))
    sev = {sid: sid % 3 for sid in ids}
    rows = []
    coords = []
    for sid in ids:
        lab = ["Normal/Mild"] * 25
        lab[0] = ("Normal/Mild", "Moderate", "Severe")[sev[sid]]
        rows.append([sid, *lab])
        for lv, name in enumerate(["L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"]):
            coords.append((sid, sid * 10, 3, "Spinal Canal Stenosis", name, 3.0 + 2 * lv, 2.0 + lv + (sid % 4) * 0.5))
    pd.DataFrame(rows, columns=["study_id", *TARGETS]).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(coords, columns=["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]).to_csv(
        tmp_path / "train_label_coordinates.csv", index=False)
    return tmp_path, (lambda sid: _study(sid, sev[sid]))


def _cfg(family, variant, **over):
    d = {"name": f"toy_{family}", "family": family, "variant": variant, "arch": "none", "input": {"size": [H, W]},
         "epochs": 3, "lr": 3e-3, "batch_size": 4, "n_folds": 4, "seed": 1, "warmup_epochs": 0.5}
    d.update(over)
    return TrainConfig.from_dict(d, check_family=False)


def test_warmup_cosine_shape():
    lr = [warmup_cosine(s, 100, 10, 0.1) for s in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:])) and lr[-1] == pytest.approx(0.1, abs=1e-3)


def test_stage2_run_learns_exports_and_writes_oof(toy_families, toy_root, tmp_path):
    root, loader = toy_root
    data = TrainingData.open(root, cache_dir=tmp_path / "cache", loader=loader)
    cfg = _cfg("roi", "spinal", epochs=6, ema_decay=0.9)
    out = tmp_path / "run"
    res = train_fold(cfg, data, 1, out, progress=False)
    h = res.history
    assert len(h) == 6 and h[-1]["train_loss"] < h[0]["train_loss"]
    assert {"val_metric", "val_spinal", "val_total"} <= set(h[0])
    # files of the run
    folds = pd.read_csv(out / "folds.csv")
    assert len(folds) == 20 and json.loads((out / "config.json").read_text())["name"] == "toy_roi"
    z = np.load(res.oof_path)
    val_ids = sorted(folds.loc[folds.fold == 1, "study_id"])
    assert z["study_ids"].tolist() == val_ids
    assert z["logits"].shape == (len(val_ids), 5, 5, 3) and z["mask"][:, 0].all() and not z["mask"][:, 1:].any()
    # the manifest entry loads exactly as the predictor loads it
    man = load_manifest(res.manifest_path, verify=True)
    assert man.priors_given and [m.name for m in man.models] == ["toy_roi_f1"]
    member = load_member(man.models[0], man.resolve(man.models[0]))
    assert member.entry.sha256 == res.entry.sha256
    assert res.best_epoch == int(np.argmin([r["val_metric"] for r in h])) + 1


def test_stage1_run_reports_mm_errors_and_oof_keypoints(toy_families, toy_root, tmp_path):
    root, loader = toy_root
    data = TrainingData.open(root, cache_dir=tmp_path / "cache", loader=loader)
    res = train_fold(_cfg("sag2d", "t2", epochs=4, select="last"), data, 0, tmp_path / "kp", progress=False)
    h = res.history
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert h[-1]["val_err_mm"] == h[-1]["val_metric"] and h[-1]["val_coverage"] == 1.0
    assert h[-1]["val_err_mm_spinal"] < h[0]["val_err_mm_spinal"]
    kps = load_keypoints(res.keypoints_path)
    z = np.load(res.oof_path)
    assert sorted(kps) == z["study_ids"].tolist() and z["err_mm_spinal"].shape == (len(kps), 5)
    assert all(k.get("sag2d_t2").valid.all() for k in kps.values())
    assert res.best_epoch == 4


def test_same_seed_same_weights(toy_families, toy_root, tmp_path):
    root, loader = toy_root
    data = TrainingData.open(root, cache_dir=tmp_path / "cache", loader=loader)
    a = train_fold(_cfg("roi", "spinal", epochs=2), data, 0, tmp_path / "a", progress=False)
    b = train_fold(_cfg("roi", "spinal", epochs=2), data, 0, tmp_path / "b", progress=False)
    c = train_fold(_cfg("roi", "spinal", epochs=2, seed=2), data, 0, tmp_path / "c", progress=False)
    from safetensors.torch import load_file

    wa, wb, wc = (load_file(str(r.out_dir / r.entry.file)) for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]


def test_all_studies_fold_and_fp16_export(toy_families, toy_root, tmp_path):
    root, loader = toy_root
    data = TrainingData.open(root, cache_dir=tmp_path / "cache", loader=loader)
    res = train_fold(_cfg("roi", "spinal", epochs=1, export_dtype="float16"), data, -1, tmp_path / "all", progress=False)
    assert res.oof_path is None and res.entry.name == "toy_roi_all"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "all" / res.entry.file), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    man = load_manifest(res.manifest_path)
    load_member(man.models[0], man.resolve(man.models[0]))  # fp16 file into the fp32 network


def test_unpreparable_studies_are_skipped_but_not_all(toy_families, toy_root, tmp_path, monkeypatch, caplog):
    root, loader = toy_root
    data = TrainingData.open(root, cache_dir=tmp_path / "cache", loader=loader)
    original = ToyGrader.prepare

    def flaky(self, study, keypoints=None, rng=None):
        if study.study_id == 3:
            raise ValueError("no sagittal T2")
        return original(self, study, keypoints, rng)

    monkeypatch.setattr(ToyGrader, "prepare", flaky)
    train_fold(_cfg("roi", "spinal", epochs=1), data, 0, tmp_path / "r", progress=False)
    assert "study 3" in caplog.text
    monkeypatch.setattr(ToyGrader, "prepare", lambda *a, **k: [])
    with pytest.raises(RuntimeError, match="no trainable sample"):
        train_fold(_cfg("roi", "spinal", epochs=1), data, 0, tmp_path / "r2", progress=False)


def _ddp_rank(rank, port, root, cache, out, queue):
    import os

    os.environ.update({"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    try:
        root_path, loader = root
        data = TrainingData.open(root_path, cache_dir=cache, loader=loader)
        res = train_fold(_cfg("roi", "spinal", epochs=2), data, 0, out, device="cpu", progress=False)
        queue.put((rank, res.history[-1]["train_loss"]))
    except Exception as e:  # reported to the parent
        queue.put((rank, repr(e)))


def test_two_process_ddp_on_cpu(toy_families, toy_root, tmp_path):
    """What torchrun does on two GPUs, on CPU with gloo: both ranks train, rank 0 exports."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ddp_rank, args=(r, port, toy_root, tmp_path / "cache", tmp_path / "ddp", q)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all(isinstance(v, float) for v in results.values()), results
    assert results[0] == pytest.approx(results[1])  # the logged loss is the mean over ranks
    man = load_manifest(tmp_path / "ddp" / "manifest_f0.json", verify=True)
    assert [m.name for m in man.models] == ["toy_roi_f0"] and (tmp_path / "ddp" / "oof_f0.npz").is_file()
