"""``rsna-infer train`` on a phantom training root: a stage-1 and a stage-2 run, merged, the
out-of-fold keypoint chain, then ``rsna-infer fit-blend`` on the result."""

import json
from pathlib import Path

import numpy as np

from rsna_infer.cli import main
from rsna_infer.manifest import load_manifest
from rsna_infer.train.keypoint_store import load_keypoints

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
FAST = ["--set", "epochs=1", "--set", "warmup_epochs=0", "--set", "n_folds=3", "--set", "batch_size=2", "--max-steps", "2", "--no-progress"]


def test_train_merge_oof_keypoints_and_fit_blend(phantom_train_root, tmp_path, capsys):
    cache = ["--cache", str(tmp_path / "cache")]
    s1 = tmp_path / "sag2d_t2"
    assert main(["train", "--data", str(phantom_train_root), "--config", str(CONFIGS / "sag2d_t2.json"),
                 "--fold", "all", "--out", str(s1), *cache, *FAST]) == 0
    folds = s1 / "folds.csv"
    assert sorted(p.name for p in s1.glob("manifest_f*.json")) == ["manifest_f0.json", "manifest_f1.json", "manifest_f2.json"]

    # the split is saved with the run and reused verbatim by later runs
    assert main(["train", "--merge", *map(str, sorted(s1.glob("manifest_f*.json"))), "--out", str(tmp_path / "s1")]) == 0
    man1 = load_manifest(tmp_path / "s1" / "weights_manifest.json", verify=True)
    assert [m.fold for m in man1.models] == [0, 1, 2]

    assert main(["train", "--oof-keypoints", str(tmp_path / "s1" / "weights_manifest.json"), "--data", str(phantom_train_root),
                 "--folds", str(folds), "--out", str(tmp_path / "kp"), *cache, "--no-progress"]) == 0
    kps = load_keypoints(tmp_path / "kp" / "keypoints_oof.npz")
    assert len(kps) == 6 and all("sag2d_t2" in k.sets for k in kps.values())
    assert all("projection" in k.sets for k in kps.values())  # the cross-view step ran too

    runs = []
    for name in ("roi_spinal", "fusion"):
        out = tmp_path / name
        assert main(["train", "--data", str(phantom_train_root), "--config", str(CONFIGS / f"{name}.json"),
                     "--fold", "all", "--out", str(out), "--folds", str(folds), "--keypoints",
                     str(tmp_path / "kp" / "keypoints_oof.npz"), *cache, *FAST]) == 0
        runs.append(out)
    manifests = [str(p) for r in [s1, *runs] for p in sorted(r.glob("manifest_f*.json"))]
    assert main(["train", "--merge", *manifests, "--out", str(tmp_path / "all")]) == 0
    capsys.readouterr()
    man_path = tmp_path / "all" / "weights_manifest.json"
    assert main(["fit-blend", *map(str, runs), "--manifest", str(man_path)]) == 0
    text = capsys.readouterr().out
    assert "fitted blend" in text and "demo_roi_spinal" in text and "demo_fusion" in text
    man = load_manifest(man_path, verify=True)
    spinal = sum(m.blend["spinal"] for m in man.stage2)
    assert np.isclose(spinal, 1.0, atol=1e-4)
    assert all(set(m.blend) == {"spinal", "foraminal", "subarticular"} for m in man.stage2)
    # roi_spinal predicts nothing outside the spinal group
    assert all(m.blend["foraminal"] == 0 for m in man.stage2 if m.name.startswith("demo_roi_spinal"))


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
