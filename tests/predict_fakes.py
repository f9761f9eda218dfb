"""Tiny fake families and DICOM studies for the predictor tests.

The fakes are real `Family` subclasses (the predictor cannot tell them apart from the
stage-1/2 code): a keypoint family that regresses 5 spinal points on the centre sagittal
T2 slice, and a grader that reads a patch around those points. Their networks have a few
hundred parameters, so a whole run takes well under a second per study. They are registered
with ``rsna_infer.models.registry.register_family`` (see `use_fake_families`; `fake_cli.py`
does the same for a real ``rsna-infer`` process). Model kwargs steer failures and costs:
``fail_on`` (study ids whose prepare raises), ``nan_on`` (study ids whose output is NaN),
``raise_on`` (study ids whose presence makes a batch raise), ``cost`` (seconds a forward adds
to `CLOCK`, per sample, x2 with TTA), ``slow_on`` + ``slow_s`` (study ids whose prepare, in
the loading worker, sleeps that long: a study a test can catch a worker holding),
``oom_over`` (grader: a batch larger than this raises CUDA-style out-of-memory after
allocating a tensor that `OOM_PROBES` watches through a weakref; `OOM_FREED` records, for
every batch that runs after one, whether all those tensors were already freed).
"""

from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rsna_infer.constants import AXIAL_T2, SAG_T1, SAG_T2
from rsna_infer.io.volume import Volume
from rsna_infer.io.writer import write_volume
from rsna_infer.keypoints import KeypointSet
from rsna_infer.models.family import GradingFamily, KeypointFamily, Sample
from rsna_infer.options import Options, option


@dataclass(frozen=True)
class FakeOptions(Options):
    """The fakes' ``model_kwargs``: the failures and costs a test injects (see the module docstring)."""

    fail_on: list = option([], "study ids whose prepare raises")
    nan_on: list = option([], "study ids whose grades are NaN")
    raise_on: list = option([], "study ids whose presence makes a batch raise")
    slow_on: list = option([], "study ids whose prepare sleeps slow_s")
    slow_s: float = option(1.0, "seconds a slow_on study's prepare sleeps")
    cost: float = option(0.0, "seconds a forward adds to CLOCK per sample")
    oom_over: int | None = option(None, "a batch larger than this raises out-of-memory")


class FakeClock:
    """A clock the fake families advance by their declared cost (deadline tests)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


CLOCK = FakeClock()
#: Weak references to the tensors of batches that ran out of memory, and, per batch run
#: after one, whether every one of them was freed by then.
OOM_PROBES: list[weakref.ref] = []
OOM_FREED: list[bool] = []
#: ``HF_HUB_OFFLINE`` as each fake network saw it when built.
BUILD_ENV: list[str | None] = []


class _Net(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * n_in, n_out)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(batch["x"])))
        return self.fc(x.flatten(1))


def _resample(img: np.ndarray, h: int, w: int) -> np.ndarray:
    ys = np.linspace(0, img.shape[0] - 1, h).round().astype(int)
    xs = np.linspace(0, img.shape[1] - 1, w).round().astype(int)
    return img[np.ix_(ys, xs)]


def _hooks(entry, study_id: int, kind: str) -> None:
    if study_id in entry.model_kwargs.get(f"{kind}_on", []):
        raise RuntimeError(f"injected {kind} failure for study {study_id}")
    if study_id in entry.model_kwargs.get("slow_on", []):
        time.sleep(float(entry.model_kwargs.get("slow_s", 1.0)))


def _maybe_out_of_memory(entry, batch_size: int) -> None:
    limit = entry.model_kwargs.get("oom_over")
    if limit is None:
        return
    if batch_size > limit:
        activations = torch.ones(batch_size, 256, 256)
        OOM_PROBES.append(weakref.ref(activations))
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected): batch {batch_size} > {limit}")
    if OOM_PROBES:
        OOM_FREED.append(all(r() is None for r in OOM_PROBES))


class FakeSag(KeypointFamily):
    name = "sag2d"
    options_type = FakeOptions

    def build(self) -> nn.Module:
        BUILD_ENV.append(os.environ.get("HF_HUB_OFFLINE"))
        h, w = self.spec.size[-2:]
        return _Net(h * w, 10)

    def prepare(self, study, keypoints=None, rng=None):
        _hooks(self.entry, study.study_id, "fail")
        vol = study.first(SAG_T2 if self.entry.variant == "t2" else SAG_T1)
        if vol is None:
            return []
        z = vol.shape[0] // 2
        img = self.spec.norm.apply(_resample(vol.pixels[z], *self.spec.size[-2:]))
        meta = {"series_id": vol.series_id, "stack_index": vol.stack_index, "z": z}
        return [Sample(study.study_id, {"x": img[None].astype(np.float32)}, meta)]

    def example_batch(self, batch_size: int = 2):
        return {"x": torch.zeros(batch_size, 1, *self.spec.size[-2:])}

    def run(self, model, batch, tta=False):
        y = torch.sigmoid(model(batch))
        if tta:
            y2 = torch.sigmoid(model({"x": batch["x"].flip(-1)}))
            y2 = y2.view(-1, 5, 2) * torch.tensor([-1.0, 1.0], device=y2.device) + torch.tensor([1.0, 0.0], device=y2.device)
            y = (y + y2.reshape(y.shape)) / 2
        CLOCK.advance(float(self.entry.model_kwargs.get("cost", 0.0)) * len(y) * (2 if tta else 1))
        return y

    def decode(self, output, sample, study):
        vol = study.find(sample.meta["series_id"], sample.meta["stack_index"])
        _, h, w = vol.shape
        xy = np.asarray(output, np.float64).reshape(5, 2) * [w - 1, h - 1]
        voxel = np.stack([np.full(5, float(sample.meta["z"])), xy[:, 1], xy[:, 0]], axis=1)
        kind = "spinal" if self.entry.variant == "t2" else "foraminal"
        if kind == "foraminal":
            voxel = np.concatenate([voxel, voxel])
        n = len(voxel)
        return KeypointSet(kind, vol.to_world(voxel), voxel, np.full(n, vol.series_id), np.full(n, vol.stack_index),
                           np.full(n, 0.9), source=self.set_key)

    def targets(self, sample, study, truth):
        return None

    def loss(self, output, targets):
        return output.sum() * 0


class FakeGrader(GradingFamily):
    options_type = FakeOptions
    name = "roi"
    patch = 8

    def build(self) -> nn.Module:
        return _Net(5 * self.patch * self.patch, 75)

    def prepare(self, study, keypoints=None, rng=None):
        _hooks(self.entry, study.study_id, "fail")
        kp = keypoints.best("spinal") if keypoints is not None else None
        vol = study.first(SAG_T2)
        if kp is None or vol is None or not kp.valid.any():
            return []
        p = self.patch
        tiles = []
        for i in range(5):
            if not kp.valid[i]:
                tiles.append(np.zeros((p, p), np.float32))
                continue
            z, y, x = np.rint(vol.to_voxel(kp.world[i])).astype(int)
            z = int(np.clip(z, 0, vol.shape[0] - 1))
            y0 = int(np.clip(y - p // 2, 0, vol.shape[1] - p))
            x0 = int(np.clip(x - p // 2, 0, vol.shape[2] - p))
            tiles.append(self.spec.norm.apply(vol.pixels[z, y0 : y0 + p, x0 : x0 + p]))
        img = np.concatenate(tiles, axis=0)[None].astype(np.float32)  # [1, 5p, p]
        if self.entry.variant == "all":
            mask = np.ones((5, 5), bool)
        else:
            mask = np.zeros((5, 5), bool)
            mask[0] = kp.valid
        sid = np.array([study.study_id], np.float32)  # rides along so run() can poison one study
        return [Sample(study.study_id, {"x": img, "sid": sid}, {"series_id": vol.series_id}, mask)]

    def example_batch(self, batch_size: int = 2):
        return {"x": torch.zeros(batch_size, 1, 5 * self.patch, self.patch), "sid": torch.zeros(batch_size, 1)}

    def run(self, model, batch, tta=False):
        _maybe_out_of_memory(self.entry, len(batch["x"]))
        y = model(batch).view(-1, 5, 5, 3)
        if tta:
            y = (y + model({"x": batch["x"].flip(-1)}).view(-1, 5, 5, 3)) / 2
        raise_on = self.entry.model_kwargs.get("raise_on", [])
        if raise_on and bool(torch.isin(batch["sid"][:, 0], torch.tensor(raise_on, dtype=torch.float32)).any()):
            raise RuntimeError("injected batch failure")
        nan_on = torch.tensor(self.entry.model_kwargs.get("nan_on", []), dtype=torch.float32, device=y.device)
        poisoned = torch.isin(batch["sid"][:, 0], nan_on).view(-1, 1, 1, 1)
        y = torch.where(poisoned, torch.nan, y)
        CLOCK.advance(float(self.entry.model_kwargs.get("cost", 0.0)) * len(y) * (2 if tta else 1))
        return y


FAKE_PATHS = {"sag2d": f"{__name__}:FakeSag", "roi": f"{__name__}:FakeGrader"}
#: The studies of `fake_root`; 13 has no Sagittal T2 series.
IDS = [11, 12, 13, 14, 15, 16, 17]
KEEP = lambda study, kp: kp  # noqa: E731  (stage-1 finalize: the fakes need none)


def use_fake_families(monkeypatch) -> None:
    """Point the registry's sag2d and roi at the fakes for one test (on a copy of the
    registry that ``monkeypatch`` puts back after it)."""
    from rsna_infer.models import registry

    monkeypatch.setattr(registry, "FAMILY_PATHS", dict(registry.FAMILY_PATHS))
    for k, v in FAKE_PATHS.items():
        registry.register_family(k, v)


def use_fake_cli(monkeypatch) -> None:
    """``rsna-infer predict`` in this process without a stage-1 finalize (see fake_cli.py)."""
    from rsna_infer import cli

    monkeypatch.setitem(cli.COMMANDS, "predict", ("fake_cli", cli.COMMANDS["predict"][1]))


def fake_entries(**over) -> list[dict]:
    """Two stage-1 folds (t2) + one t1 + two graders with different blend weights."""
    norm = {"lo_pct": 0.0, "hi_pct": 100.0}
    base = [
        {"name": "kp_t2_f0", "family": "sag2d", "variant": "t2", "arch": "fake", "fold": 0,
         "input": {"size": [16, 16], "norm": norm}, "file": "-"},
        {"name": "kp_t2_f1", "family": "sag2d", "variant": "t2", "arch": "fake", "fold": 1,
         "input": {"size": [16, 16], "norm": norm}, "file": "-"},
        {"name": "kp_t1_f0", "family": "sag2d", "variant": "t1", "arch": "fake",
         "input": {"size": [16, 16], "norm": norm}, "file": "-"},
        {"name": "grade_spinal", "family": "roi", "variant": "spinal", "arch": "fake",
         "input": {"size": [8, 8], "norm": norm}, "file": "-", "blend": {"spinal": 2.0}},
        {"name": "grade_all", "family": "roi", "variant": "all", "arch": "fake",
         "input": {"size": [8, 8], "norm": norm}, "file": "-", "blend": {"spinal": 1.0, "foraminal": 1.0, "subarticular": 1.0}},
    ]
    for e in base:
        e.setdefault("model_kwargs", {}).update(over.get(e["name"], {}))
    return base


def _volume(study_id: int, series_id: int, desc: str, rng: np.random.Generator, n: int = 6, size: int = 24) -> Volume:
    if desc == AXIAL_T2:
        row, col, normal = np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0])
    else:
        row, col, normal = np.array([0, 1.0, 0]), np.array([0, 0, -1.0]), np.array([-1.0, 0, 0])
    pos = np.array([-12.0, -12.0, 12.0]) + np.arange(n)[:, None] * 3.0 * normal
    yy, xx = np.mgrid[:size, :size]
    blob = np.exp(-((yy - size / 2 - rng.integers(-4, 5)) ** 2 + (xx - size / 2) ** 2) / 30.0)
    pix = 200 + 600 * blob[None] * rng.uniform(0.5, 1.5, (n, 1, 1)) + rng.normal(0, 20, (n, size, size))
    return Volume(np.clip(pix, 0, None).astype(np.float32), pos, row, col, (1.0, 1.0), np.arange(1, n + 1),
                  study_id=study_id, series_id=series_id, description=desc)


def write_fake_root(root: Path, study_ids: list[int], seed: int = 0, missing: dict[int, str] | None = None) -> Path:
    """A Kaggle-layout test root: per study a Sagittal T1, a Sagittal T2/STIR and an Axial T2
    series of small noisy images. ``missing[study] = description`` leaves that series'
    folder out (it stays in the CSV)."""
    rng = np.random.default_rng(seed)
    rows = []
    for sid in study_ids:
        for k, desc in enumerate((SAG_T1, SAG_T2, AXIAL_T2)):
            ser = sid * 10 + k
            rows.append(f"{sid},{ser},{desc}")
            vol = _volume(sid, ser, desc, rng)
            if missing and missing.get(sid) == desc:
                continue
            write_volume(root / "test_images" / str(sid) / str(ser), vol, series_description=desc)
    (root / "test_series_descriptions.csv").write_text("study_id,series_id,series_description\n" + "\n".join(rows) + "\n")
    return root


def fake_root(root: Path) -> Path:
    """The test root most predictor tests share: `IDS`, study 13 without its Sagittal T2."""
    return write_fake_root(root, IDS, missing={13: SAG_T2})


def fake_manifest(tmp_path: Path, **over) -> Path:
    """A random-weights manifest of `fake_entries` (``over``: model kwargs per entry) under ``tmp_path/man``."""
    from rsna_infer.models.random_weights import make_random_manifest

    return make_random_manifest(tmp_path / "man", fake_entries(**over))


def run_predict(root: Path, man, out: Path, **kw):
    """`rsna_infer.predict` on the fakes (no stage-1 finalize, no progress bar, in-process
    loading unless ``kw`` says otherwise): the frame and the run report."""
    import json

    from rsna_infer.api import predict

    kw.setdefault("finalize", KEEP)
    kw.setdefault("progress", False)
    kw.setdefault("num_workers", 0)
    df = predict(root, out / "submission.csv", manifest=man, **kw)
    return df, json.loads((out / "run_report.json").read_text())
