"""Every real family through the generic loop on a phantom training root: a few epochs lower
its training loss, and the exported entry loads the way the predictor loads it.

The configs are the shipped demo configs (configs/demo/), shortened, so this also proves they
are valid."""

import json
from pathlib import Path

import numpy as np
import pytest

from rsna_infer.manifest import load_manifest
from rsna_infer.members import load_member
from rsna_infer.train.config import load_config
from rsna_infer.train.data import TrainingData
from rsna_infer.train.keypoint_store import load_keypoints
from rsna_infer.train.trainer import train_fold

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
ALL = sorted(p.stem for p in CONFIGS.glob("*.json") if p.stem != "plan")
SHORT = {"epochs": 4, "batch_size": 2, "repeats": 2, "n_folds": 3, "warmup_epochs": 0.0, "ema_decay": None}


@pytest.fixture(scope="module")
def data(phantom_train_root, tmp_path_factory):
    d = TrainingData.open(phantom_train_root, cache_dir=tmp_path_factory.mktemp("cache"))
    d.cache.ensure(d.study_ids, progress=False)
    return d


def test_demo_plan_names_existing_configs():
    plan = json.loads((CONFIGS / "plan.json").read_text())
    for name in plan["stage1"] + plan["stage2"]:
        assert name in ALL
    assert plan["test_seed"] != plan["train_seed"]


@pytest.mark.parametrize("name", ALL)
def test_family_trains_and_exports(name, data, tmp_path):
    raw = json.loads((CONFIGS / f"{name}.json").read_text())
    over = dict(SHORT)
    if len(raw["input"]["size"]) == 3:  # 3-D backbones: the smallest input they take, to stay fast
        over["input"] = {**raw["input"], "size": [16, 32, 32]}
    cfg = load_config(CONFIGS / f"{name}.json", overrides=over)
    res = train_fold(cfg, data, 0, tmp_path, progress=False)
    losses = [r["train_loss"] for r in res.history]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert np.isfinite(res.history[-1]["val_metric"])
    man = load_manifest(res.manifest_path, verify=True)
    entry = man.models[0]
    assert entry.name == f"{cfg.name}_f0" and entry.family == cfg.family and entry.stage == cfg.stage
    member = load_member(entry, man.resolve(entry))  # strict load + dummy forward, as the predictor does
    assert member.model is not None
    if cfg.stage == 1:
        kps = load_keypoints(res.keypoints_path)
        assert kps and all(k.sets for k in kps.values())
    else:
        z = np.load(res.oof_path)
        assert z["logits"].shape[1:] == (5, 5, 3) and z["mask"].any()
