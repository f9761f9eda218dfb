"""``rsna-infer cache``, ``folds``, ``train`` on a phantom training root: a stage-1 run, the
out-of-fold keypoint chain, stage-2 runs, the merged bundle folder, ``fit-blend``; mixed fold
splits refused at every step that combines runs."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from rsna_infer.cli import main
from rsna_infer.models.manifest import load_manifest
from rsna_infer.train.folds import split_id
from rsna_infer.train.keypoint_store import keypoints_split, load_keypoints

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
FAST = ["--set", "epochs=1", "--set", "warmup_epochs=0", "--set", "n_folds=3", "--set", "batch_size=2", "--max-steps", "2", "--no-progress"]


def test_folds_train_merge_oof_keypoints_and_fit_blend(phantom_train_root, tmp_path, capsys):
    cache = ["--cache", str(tmp_path / "cache")]
    assert main(["cache", "--data", str(phantom_train_root), *cache, "--workers", "2", "--no-progress"]) == 0
    assert "6 studies: 0 were cached, 6 decoded now" in capsys.readouterr().out
    folds = tmp_path / "folds.csv"
    assert main(["folds", "--data", str(phantom_train_root), "--out", str(folds), "--n-folds", "3"]) == 0
    split = split_id(pd.read_csv(folds))
    assert f"6 studies in 3 folds (2, 2, 2), split {split}" in capsys.readouterr().out
    s1 = tmp_path / "sag2d_t2"
    assert main(["train", "--data", str(phantom_train_root), "--config", str(CONFIGS / "sag2d_t2.json"), "--folds", str(folds),
                 "--fold", "all", "--out", str(s1), *cache, *FAST]) == 0
    assert sorted(p.name for p in s1.glob("manifest_f*.json")) == ["manifest_f0.json", "manifest_f1.json", "manifest_f2.json"]
    assert all(load_manifest(p).split == split for p in s1.glob("manifest_f*.json"))

    # out-of-fold keypoints straight from the runs' manifests, checked against the split
    assert main(["train", "--oof-keypoints", *map(str, sorted(s1.glob("manifest_f*.json"))), "--data", str(phantom_train_root),
                 "--folds", str(folds), "--out", str(tmp_path / "kp"), *cache, "--no-progress"]) == 0
    kp_file = tmp_path / "kp" / "keypoints_oof.npz"
    kps = load_keypoints(kp_file)
    assert len(kps) == 6 and all("sag2d_t2" in k.sets for k in kps.values())
    assert all("projection" in k.sets for k in kps.values())  # the cross-view step ran too
    assert keypoints_split(kp_file) == split

    runs = []
    for name in ("roi_spinal", "fusion"):
        out = tmp_path / name
        assert main(["train", "--data", str(phantom_train_root), "--config", str(CONFIGS / f"{name}.json"),
                     "--fold", "all", "--out", str(out), "--folds", str(folds), "--keypoints", str(kp_file), *cache, *FAST]) == 0
        assert json.loads((out / "run_f0.json").read_text())["validation"]["keypoints"] == "predicted"
        runs.append(out)
    manifests = [str(p) for r in [s1, *runs] for p in sorted(r.glob("manifest_f*.json"))]
    bundle = tmp_path / "bundle"
    assert main(["train", "--merge", *manifests, "--out", str(bundle)]) == 0
    capsys.readouterr()
    man_path = bundle / "weights_manifest.json"
    raw = json.loads(man_path.read_text())
    assert raw["split"] == split and all(m["file"] == f"weights/{m['name']}.safetensors" for m in raw["models"])
    assert main(["fit-blend", *map(str, runs), "--manifest", str(man_path)]) == 0
    text = capsys.readouterr().out
    assert "fitted blend" in text and "demo_roi_spinal" in text and "demo_fusion" in text and "class priors" in text
    # the folder is self-contained: moved elsewhere, it verifies and loads as is
    moved = tmp_path / "elsewhere" / "bundle"
    shutil.move(str(bundle), str(moved))
    man = load_manifest(moved / "weights_manifest.json", verify=True)
    assert all(set(m.blend) == {"spinal", "foraminal", "subarticular"} for m in man.stage2)
    spinal = sum(m.blend["spinal"] for m in man.stage2)
    assert np.isclose(spinal, 1.0, atol=1e-4) or spinal == 0  # a blend, or the priors where no member beats them
    # roi_spinal predicts nothing outside the spinal group
    assert all(m.blend["foraminal"] == 0 for m in man.stage2 if m.name.startswith("demo_roi_spinal"))

    # one split for the ensemble: another split is refused with both named
    other = tmp_path / "other_folds.csv"
    assert main(["folds", "--data", str(phantom_train_root), "--out", str(other), "--n-folds", "3", "--seed", "7"]) == 0
    other_split = split_id(pd.read_csv(other))
    assert other_split != split
    capsys.readouterr()
    assert main(["train", "--oof-keypoints", *map(str, sorted(s1.glob("manifest_f*.json"))), "--data", str(phantom_train_root),
                 "--folds", str(other), "--out", str(tmp_path / "kp2"), *cache, "--no-progress"]) == 2
    out = capsys.readouterr().out
    assert split in out and other_split in out and "different fold splits" in out
    foreign = tmp_path / "foreign"
    assert main(["train", "--data", str(phantom_train_root), "--config", str(CONFIGS / "roi_spinal.json"), "--fold", "0",
                 "--out", str(foreign), "--folds", str(other), "--set", "val_keypoints=truth", *cache, *FAST]) == 0
    capsys.readouterr()
    assert main(["train", "--merge", *manifests, str(foreign / "manifest_f0.json"), "--out", str(tmp_path / "mixed")]) == 2
    out = capsys.readouterr().out
    assert split in out and other_split in out and "foreign/manifest_f0.json" in out
    assert main(["train", "--data", str(phantom_train_root), "--config", str(CONFIGS / "roi_spinal.json"), "--fold", "0",
                 "--out", str(tmp_path / "r"), "--folds", str(other), "--keypoints", str(kp_file), *cache, *FAST]) == 2
    out = capsys.readouterr().out
    assert split in out and other_split in out and "keypoints_oof.npz" in out


def test_train_cli_fails_fast_on_a_bad_config(tmp_path, capsys):
    bad = json.loads((CONFIGS / "roi_spinal.json").read_text())
    bad["epocs"] = 3
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert main(["train", "--data", str(tmp_path), "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o")]) == 2
    assert "epocs" in capsys.readouterr().out
    assert main(["train", "--data", str(tmp_path), "--config", str(CONFIGS / "roi_spinal.json"), "--out",
                 str(tmp_path / "o"), "--fold", "seven"]) == 2
    assert "--fold must be an integer" in capsys.readouterr().out


def test_train_cli_refuses_a_fold_outside_the_split(phantom_train_root, tmp_path, capsys):
    assert main(["train", "--data", str(phantom_train_root), "--config", str(CONFIGS / "roi_spinal.json"), "--out",
                 str(tmp_path / "o"), "--cache", str(tmp_path / "cache"), "--fold", "7", "--set", "n_folds=3"]) == 2
    assert "--fold 7 is not a fold of the split" in capsys.readouterr().out


def test_oof_keypoints_run_on_the_training_device_by_default(monkeypatch, tmp_path):
    """Like ``train``: CUDA when available (here faked), not CPU."""
    import torch

    from rsna_infer.train import distributed, oof_keypoints

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.default_device() == "cuda"
    seen = []

    class Stop(Exception):
        pass

    def fake_load(entry, path, device="cpu", tta=False):
        seen.append(device)
        raise Stop

    monkeypatch.setattr(oof_keypoints, "load_member", fake_load)
    monkeypatch.setattr(oof_keypoints, "stage1_entries", lambda m, f: [(type("E", (), {"fold": 0})(), tmp_path)])
    pd.DataFrame({"study_id": [1], "fold": [0]}).to_csv(tmp_path / "folds.csv", index=False)
    data = type("D", (), {"study_ids": [1]})()
    import pytest

    with pytest.raises(Stop):
        oof_keypoints.predict_oof_keypoints([], data, tmp_path / "folds.csv", progress=False)
    assert seen == ["cuda"]
