"""Every real family through the generic loop on a phantom training root: a few epochs of
training reach every part of the network (the gradient flows into backbone and head), the
losses stay finite, and the exported entry loads the way the predictor loads it.

No assertion on the loss going down: on 6 phantom studies and a few tiny steps, whether it
does is float noise (the learning itself is tested on a learnable toy problem with a margin,
test_train_trainer.py).

The configs are the shipped demo configs (configs/demo/), shortened, so this also proves they
are valid."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rsna_infer.models.manifest import load_manifest
from rsna_infer.models.members import load_member
from rsna_infer.models.registry import make_family
from rsna_infer.train.config import load_config
from rsna_infer.train.data import TrainingData
from rsna_infer.train.keypoint_store import load_keypoints
from rsna_infer.train.trainer import train_fold

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
ALL = sorted(p.stem for p in CONFIGS.glob("*.json") if p.stem != "plan")
SHORT = {"epochs": 4, "batch_size": 2, "repeats": 2, "n_folds": 3, "warmup_epochs": 0.0, "ema_decay": None,
         "export_dtype": "float32"}


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
    if raw["family"] in ("roi", "fusion"):
        over["val_keypoints"] = "truth"  # no stage-1 predictions here; explicit (and recorded)
    cfg = load_config(CONFIGS / f"{name}.json", overrides=over)
    torch.manual_seed(cfg.seed * 1000 + 0 + 1)  # what the trainer seeds before building fold 0's network
    initial = {k: v.clone() for k, v in make_family(cfg.model_entry(0)).build().state_dict().items()}
    res = train_fold(cfg, data, 0, tmp_path, progress=False)
    losses = [r["train_loss"] for r in res.history]
    assert np.all(np.isfinite(losses)), losses
    assert np.isfinite(res.history[-1]["val_metric"])
    trained = load_file(str(tmp_path / res.entry.file))
    assert trained.keys() == initial.keys()
    floats = [k for k, v in initial.items() if v.is_floating_point() and not k.endswith(("running_mean", "running_var"))]
    moved = [k for k in floats if not torch.equal(trained[k].float(), initial[k].float())]
    assert len(moved) >= 0.9 * len(floats), sorted(set(floats) - set(moved))[:10]
    assert any(k.startswith("backbone.") or ".backbone." in k for k in moved)
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
