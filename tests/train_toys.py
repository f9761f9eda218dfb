"""Two minimal families (registered in place of sag2d and roi) and a toy training root, so
that the generic loop is tested independently of the real families; also runnable as a
script (``python tests/train_toys.py OUT ...``) for tests that hurt a run from outside.

The toy root: 20 studies of one small sagittal T2 stack; the spinal grade of level L1/L2 is
visible as a bright block (``+300 * grade``), so a model can learn it; the spinal keypoints
sit at fixed pixels per level (plus a small unlearnable offset per study).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from rsna_infer.constants import SAG_T2, TARGETS
from rsna_infer.io.volume import Study, Volume
from rsna_infer.keypoints import KeypointSet
from rsna_infer.models import registry
from rsna_infer.models.family import GradingFamily, KeypointFamily, Sample
from rsna_infer.train.config import TrainConfig

H, W = 12, 16
N_STUDIES = 20
#: seconds each toy ``prepare`` sleeps (the kill/resume test slows runs down to catch them mid-way)
SLOW = {"seconds": 0.0}


class _Net(nn.Module):
    def __init__(self, out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(H * W, 32), nn.ReLU(), nn.Linear(32, out))

    def forward(self, batch):
        return self.body(batch["image"])


def centre_slice(study):
    v = study.first(SAG_T2)
    z = v.shape[0] // 2
    img = (v.pixels[z] - 500.0) / 300.0
    return v, z, img[None].astype(np.float32)


class ToyKeypoints(KeypointFamily):
    name = "sag2d"

    def build(self):
        return _Net(10)

    def prepare(self, study, keypoints=None, rng=None):
        time.sleep(SLOW["seconds"])
        v, z, img = centre_slice(study)
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
        time.sleep(SLOW["seconds"])
        _, _, img = centre_slice(study)
        mask = np.zeros((5, 5), bool)
        mask[0] = True
        return [Sample(study.study_id, {"image": img}, mask=mask)]

    def example_batch(self, batch_size=2):
        return {"image": torch.zeros(batch_size, 1, H, W)}

    def run(self, model, batch, tta=False):
        return model(batch).view(-1, 5, 5, 3)

    def loss(self, output, labels, mask):
        return super().loss(output.view(-1, 5, 5, 3), labels, mask)


TOYS = {"sag2d": ToyKeypoints, "roi": ToyGrader}


def install(monkeypatch=None) -> None:
    """Make the registry hand out the toy families (via pytest's monkeypatch, or for good)."""
    real = registry.family_class
    fake = lambda name: TOYS.get(name) or real(name)  # noqa: E731
    if monkeypatch is not None:
        monkeypatch.setattr(registry, "family_class", fake)
    else:
        registry.family_class = fake


def grade(sid: int) -> int:
    return sid % 3


def toy_study(sid: int) -> Study:
    rng = np.random.default_rng(sid)
    n = 5
    pos = np.array([[8.0 - 4 * i, -50.0, 80.0] for i in range(n)])
    pix = rng.normal(500, 50, (n, H, W)).astype(np.float32)
    pix[:, 2:5, 3:12] += 300.0 * grade(sid)  # a visible "narrowing"
    return Study(sid, {SAG_T2: [Volume(pix, pos, [0, 1, 0], [0, 0, -1], (1.0, 1.0), np.arange(1, n + 1),
                                       study_id=sid, series_id=sid * 10, description=SAG_T2)]})


def write_toy_root(path: Path) -> Path:
    """train.csv and train_label_coordinates.csv of the toy studies (images come from `toy_study`)."""
    ids = list(range(1, N_STUDIES + 1))
    rows, coords = [], []
    for sid in ids:
        lab = ["Normal/Mild"] * 25
        lab[0] = ("Normal/Mild", "Moderate", "Severe")[grade(sid)]
        rows.append([sid, *lab])
        for lv, name in enumerate(["L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"]):
            coords.append((sid, sid * 10, 3, "Spinal Canal Stenosis", name, 3.0 + 2 * lv, 2.0 + lv + (sid % 4) * 0.5))
    path.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["study_id", *TARGETS]).to_csv(path / "train.csv", index=False)
    pd.DataFrame(coords, columns=["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]).to_csv(
        path / "train_label_coordinates.csv", index=False)
    return path


def toy_config(family: str, variant: str, **over) -> TrainConfig:
    d = {"name": f"toy_{family}", "family": family, "variant": variant, "arch": "none", "input": {"size": [H, W]},
         "epochs": 3, "lr": 3e-3, "batch_size": 4, "n_folds": 4, "seed": 1, "warmup_epochs": 0.5}
    if family == "roi":
        d["val_keypoints"] = "truth"  # the toys have no stage-1 predictions; tests that need them say so
    d.update(over)
    return TrainConfig.from_dict(d, check_family=False)


def main(argv: list[str] | None = None) -> int:
    """Train the toy grader on fold 0: ``train_toys.py ROOT OUT [--epochs N] [--slow S] [--resume]``."""
    p = argparse.ArgumentParser()
    p.add_argument("root", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    install()
    SLOW["seconds"] = args.slow
    from rsna_infer.train.data import TrainingData
    from rsna_infer.train.trainer import train_fold

    data = TrainingData.open(args.root, cache_dir=args.out / "cache", loader=toy_study)
    cfg = toy_config("roi", "spinal", epochs=args.epochs, ema_decay=0.9, lr=1e-2)
    train_fold(cfg, data, 0, args.out / "run", progress=False, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
