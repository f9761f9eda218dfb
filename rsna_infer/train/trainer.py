"""One training loop for every model family, on top of the `Family` interface.

The loop never knows which family it trains (batches: `rsna_infer.train.samples`). Around
it: backbones started from pretrained weights (`rsna_infer.train.init_weights`), AdamW (no
decay on biases and norms) with linear warm-up and cosine decay per step, fp16 AMP on CUDA,
gradient clipping, optional EMA, DDP under torchrun (one process group for every fold of the
command), per-epoch validation sharded over the ranks (metric for graders, keypoint error in
mm for keypoint models; `rsna_infer.train.validation`), checkpoints every epoch and
``resume`` (`rsna_infer.train.checkpoint`), out-of-fold predictions, and the export of the
selected weights as safetensors plus a one-entry manifest (class priors from the training
labels, the fold split's id).

Files written to ``out_dir`` (fold ``k``, member ``name``; fold -1 trains on every study and
its files say ``all`` instead of ``f{k}``)::

    config.json                     the resolved config
    folds.csv                       the split (study_id, fold); its id is in every file below
    run_f{k}.json                   what the run was (split, initial weights, validation plan, resumes)
    history_f{k}.json               per-epoch metrics
    checkpoints/f{k}_{last,best}.*  resumable state of the last epoch, weights of the best
    weights/{name}_f{k}.safetensors the exported weights
    manifest_f{k}.json              one entry + priors + split (merge folds with `merge_manifests`)
    oof_f{k}.npz                    stage 2: study_ids, logits [S,5,5,3], mask [S,5,5], labels, split
                                    stage 1: study_ids, kinds, per-point errors (mm), split
    keypoints_oof_f{k}.npz          stage 1: decoded out-of-fold keypoints of this family
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..keypoints import StudyKeypoints
from ..models.family import Family, GradingFamily, KeypointFamily
from ..models.manifest import Manifest, export_model, load_manifest, save_manifest
from ..models.registry import make_family
from ..output import atomic_write, atomic_write_text
from ..specs import ModelEntry
from ..submission import priors_from_labels
from . import distributed as D
from .checkpoint import FoldFiles, comparable_config
from .config import TrainConfig
from .data import TrainingData
from .ema import ModelEMA
from .folds import check_same_split, load_folds, make_folds, save_folds, split, split_id
from .init_weights import init_backbones
from .keypoint_store import keypoints_split, load_keypoints, save_keypoints
from .samples import Batch, Collate, EpochIndices, EpochShuffle, ShareCacheBudget, StudyDataset, progress_bar
from .validation import ValidationPlan, Validator, validation_plan

logger = logging.getLogger(__name__)


class TrainError(ValueError):
    """A run cannot start or continue as asked; the message says what to change."""


# -- optimisation ---------------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weight matrices/kernels only, not on biases or norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear from ~0 to 1 over ``warmup`` steps, then cosine to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


# -- what a command shares across its folds -------------------------------------------------


@dataclass
class Split:
    """The fold split of a run: the rows of this run's studies, the split's id and origin."""

    frame: pd.DataFrame
    id: str
    source: str

    @property
    def folds(self) -> list[int]:
        return sorted(int(f) for f in set(self.frame["fold"].tolist()))


def resolve_split(cfg: TrainConfig, data: TrainingData, folds_csv: str | Path | None) -> Split:
    """The split from ``folds_csv`` (the ensemble's shared one), else computed from the
    config's ``n_folds`` and ``seed`` (with a warning: other runs must then match it)."""
    if folds_csv is not None:
        full = load_folds(folds_csv, data.study_ids)
        frame = full[full["study_id"].isin(data.study_ids)].reset_index(drop=True)
        return Split(frame, split_id(full), str(Path(folds_csv).resolve()))
    logger.warning("%s: no --folds given: the split is computed from this config (n_folds=%d, seed=%d); every model of "
                   "an ensemble must share one split: write it once with `rsna-infer folds` and pass --folds",
                   cfg.name, cfg.n_folds, cfg.seed)
    frame = make_folds(data.study_ids, data.label_array(data.study_ids), cfg.n_folds, cfg.seed)
    return Split(frame, split_id(frame), f"computed (n_folds={cfg.n_folds}, seed={cfg.seed})")


@dataclass
class Predicted:
    """Out-of-fold stage-1 keypoints given to a stage-2 run."""

    points: dict[int, StudyKeypoints]
    files: list[str]


def load_predicted(cfg: TrainConfig, files: list[str | Path] | tuple[str | Path, ...], split_: Split) -> Predicted | None:
    """Read ``--keypoints`` files; they must come from this run's split."""
    if cfg.stage == 1:
        return None
    if cfg.keypoints != "truth" and not files:
        raise TrainError(f"config {cfg.name!r} trains on keypoints={cfg.keypoints!r}: pass out-of-fold stage-1 keypoints "
                         "(--keypoints)")
    if not files:
        return None
    names = [str(Path(f)) for f in files]
    for f in names:
        if not keypoints_split(f):
            logger.warning("%s records no fold split: cannot check it was predicted on this run's split", f)
    check_same_split([(split_.id, f"this run's folds: {split_.source}")] + [(keypoints_split(f), f) for f in names],
                     "stage-2 training and its --keypoints")
    points = load_keypoints(*names)
    logger.info("predicted keypoints for %d studies from %d file(s)%s", len(points), len(names),
                "" if cfg.keypoints != "truth" else " (validation crops; training crops from the truth)")
    return Predicted(points, names)


@dataclass
class TrainResult:
    """What one fold run produced."""

    entry: ModelEntry  # as exported (file relative to out_dir, sha256 filled in)
    out_dir: Path
    manifest_path: Path
    history: list[dict[str, float]]
    best_epoch: int
    best_metric: float | None
    oof_path: Path | None = None
    keypoints_path: Path | None = None
    record: dict[str, Any] = field(default_factory=dict)


def train_folds(
    cfg: TrainConfig,
    data: TrainingData | str | Path,
    folds: list[int],
    out_dir: str | Path,
    *,
    folds_csv: str | Path | None = None,
    keypoints_files: list[str | Path] | tuple[str | Path, ...] = (),
    cache_dir: str | Path | None = None,
    device: str | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    resume: bool = False,
    dist_timeout_s: float | None = None,
) -> list[TrainResult]:
    """Train ``cfg`` on each fold of ``folds`` in turn (``-1``: on every study, no validation),
    in one process group under torchrun. Everything that can be checked is checked before the
    first step: the split, the keypoint files' split, every fold's validation plan.

    ``keypoints_files``: out-of-fold stage-1 keypoints (``--oof-keypoints``): stage-2
    validation crops come from them (config ``val_keypoints``), and training crops too when
    ``keypoints`` is "predicted"/"mixed". ``max_steps`` caps the optimiser steps per epoch
    (smoke tests). ``resume``: continue each fold from its last checkpoint (finished folds
    are kept). Under torchrun (``WORLD_SIZE > 1``) this runs on every rank.
    """
    info, dev, created = D.setup(device, dist_timeout_s)
    try:
        out_dir = Path(out_dir)
        if not isinstance(data, TrainingData):
            data = TrainingData.open(data, cache_dir=cache_dir)
        split_ = resolve_split(cfg, data, folds_csv)
        bad = [k for k in folds if k != -1 and k not in split_.folds]
        if bad:
            raise TrainError(f"fold(s) {bad} are not in the split ({split_.source}: folds {split_.folds})")
        predicted = load_predicted(cfg, keypoints_files, split_)
        plans = {k: validation_plan(cfg, k, split(split_.frame, k)[1], predicted.points if predicted else None,
                                    predicted.files if predicted else []) for k in folds}
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
            save_folds(split_.frame, out_dir / "folds.csv")
        # every rank decodes its share of what is not cached yet (`rsna-infer cache` does it beforehand)
        data.cache.ensure(split_.frame["study_id"].tolist(), progress=progress and info.is_main,
                          shard=(info.rank, info.world_size))
        D.barrier(info)
        results = []
        for k in folds:
            run = _FoldRun(cfg, data, k, out_dir, split_, predicted, plans[k], info, dev, max_steps, progress, resume)
            results.append(run.run())
        return results
    finally:
        if created:
            D.teardown(info)


def train_fold(cfg: TrainConfig, data: TrainingData | str | Path, fold: int, out_dir: str | Path, **kwargs: Any) -> TrainResult:
    """Train ``cfg`` on every fold but ``fold`` (``-1``: on every study); see `train_folds`."""
    return train_folds(cfg, data, [fold], out_dir, **kwargs)[0]


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("rsna-infer", "torch", "timm", "timm-3d"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


class _FoldRun:
    """One fold: build, (resume,) train epoch by epoch with a checkpoint each, export."""

    def __init__(self, cfg: TrainConfig, data: TrainingData, fold: int, out_dir: Path, split_: Split,
                 predicted: Predicted | None, plan: ValidationPlan, info: D.DistInfo, dev: torch.device,
                 max_steps: int | None, progress: bool, resume: bool) -> None:
        self.cfg, self.data, self.fold, self.split, self.predicted, self.plan = cfg, data, fold, split_, predicted, plan
        self.info, self.dev, self.max_steps, self.progress, self.resume = info, dev, max_steps, progress, resume
        self.files = FoldFiles(out_dir, fold)
        self.train_ids, self.val_ids = split(split_.frame, fold)

    # -- the whole run --------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, info = self.cfg, self.info
        done = self._finished_run()
        if done is not None:
            return done
        logger.info("%s fold %d: %d training and %d validation studies on %s%s", cfg.name, self.fold, len(self.train_ids),
                    len(self.plan.study_ids), self.dev, f" (rank {info.rank}/{info.world_size})" if info.enabled else "")
        torch.manual_seed(cfg.seed * 1000 + self.fold + 1)
        np.random.seed((cfg.seed * 1000 + self.fold + 1) % 2**32)
        self._build()
        state = self._load_checkpoint() if self.resume else None
        if state is None and info.is_main and self.files.last.is_file():
            logger.warning("%s fold %d: a checkpoint of an earlier run is in %s; starting afresh (pass --resume to "
                           "continue it)", cfg.name, self.fold, self.files.dir)
        init_reports = self._initialise(state)
        self.record = self._new_record(init_reports, state)
        if info.is_main:
            self.files.write_record(self.record)
        start = int(state["epoch"]) if state else 0
        for epoch in range(start, cfg.epochs):
            self._epoch(epoch)
        D.barrier(info)
        result = self._finish() if info.is_main else None
        D.barrier(info)
        if result is None:  # other ranks: what rank 0 exported
            result = TrainResult(self.entry, self.files.out_dir, self.files.manifest, self.history, 0, None)
        return result

    def _finished_run(self) -> TrainResult | None:
        """With ``resume``: the result of this fold when an identical run already finished."""
        if not self.resume:
            return None
        rec = self.files.read_record()
        if rec.get("status") != "complete" or not self.files.manifest.is_file():
            return None
        if comparable_config(rec.get("config", {})) != comparable_config(self.cfg.to_dict()) or rec.get("split") != self.split.id:
            raise TrainError(f"{self.cfg.name} fold {self.fold}: --resume, but {self.files.out_dir} holds a finished run of "
                             "another config or split; use another --out or drop --resume")
        logger.info("%s fold %d: finished already (%s); kept (--resume)", self.cfg.name, self.fold, self.files.manifest)
        man = load_manifest(self.files.manifest)
        history = json.loads(self.files.history.read_text()) if self.files.history.is_file() else []
        return TrainResult(man.models[0], self.files.out_dir, self.files.manifest, history, int(rec.get("selected_epoch", 0)),
                           rec.get("val_metric"), self.files.oof if self.files.oof.is_file() else None,
                           self.files.keypoints if self.files.keypoints.is_file() else None, rec)

    # -- set-up ---------------------------------------------------------------------------------
    def _build(self) -> None:
        cfg, info, dev = self.cfg, self.info, self.dev
        self.entry = cfg.model_entry(self.fold)
        self.family: Family = make_family(self.entry)
        self.raw_model = self.family.build().to(dev)
        pred = self.predicted.points if self.predicted else None
        self.train_ds = StudyDataset(self.family, self.data, self.train_ids, train=True, seed=cfg.seed * 1000 + self.fold,
                                     repeats=cfg.repeats, keypoint_source=cfg.keypoints, predicted=pred,
                                     predicted_prob=cfg.predicted_prob)
        if info.enabled:
            base: Any = torch.utils.data.DistributedSampler(self.train_ds, info.world_size, info.rank, shuffle=True, seed=cfg.seed)
        else:
            base = EpochShuffle(len(self.train_ds), cfg.seed * 1000 + self.fold)
        self.sampler = EpochIndices(base)
        self.loader = DataLoader(
            self.train_ds, batch_size=cfg.batch_size, sampler=self.sampler, num_workers=cfg.num_workers,
            persistent_workers=cfg.num_workers > 0, worker_init_fn=ShareCacheBudget(cfg.num_workers),
            collate_fn=Collate(self.family, with_targets=True), drop_last=False, pin_memory=dev.type == "cuda",
        )
        self.steps_per_epoch = len(self.loader) if self.max_steps is None else min(len(self.loader), self.max_steps)
        total = max(cfg.epochs * self.steps_per_epoch, 1)
        warmup_epochs = cfg.effective_warmup_epochs()
        if warmup_epochs < cfg.warmup_epochs and info.is_main:
            logger.info("%s: warm-up capped at half the run: %.3g of %d epoch(s)", cfg.name, warmup_epochs, cfg.epochs)
        warmup = int(round(warmup_epochs * self.steps_per_epoch))
        self.optimizer = torch.optim.AdamW(param_groups(self.raw_model, cfg.weight_decay), lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, total, warmup, cfg.min_lr_ratio))
        self.use_amp = cfg.amp and dev.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.priors = priors_from_labels(self.data.label_array(self.train_ids))
        self.validator = (Validator(cfg, self.family, self.data, self.plan, pred, self.priors, (info.rank, info.world_size))
                          if self.plan.study_ids else None)
        self.history: list[dict[str, float]] = []
        self.best = (math.inf, 0)  # (metric, epoch)

    def _initialise(self, state: dict[str, Any] | None) -> list[dict[str, Any]]:
        """Initial weights (rank 0; DDP hands them to the other ranks), DDP, EMA, and the
        checkpoint's state when resuming."""
        cfg, info = self.cfg, self.info
        reports: list[dict[str, Any]] = []
        if state is None and info.is_main and cfg.pretrained is not None:
            for r in init_backbones(self.raw_model, cfg.pretrained):
                d = r.to_dict()
                d["loaded"] = len(r.loaded)  # the keys themselves are many; counts suffice
                reports.append(d)
        if state is not None:
            self.raw_model.load_state_dict(state["model"])
            reports = list(state.get("init", []))
        self.model: nn.Module = self.raw_model
        if info.enabled:  # wrapping broadcasts rank 0's weights to every rank
            self.model = nn.parallel.DistributedDataParallel(
                self.raw_model, device_ids=[self.dev.index] if self.dev.type == "cuda" else None,
                find_unused_parameters=True)
        self.ema = ModelEMA(self.raw_model, cfg.ema_decay) if cfg.ema_decay else None
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            if self.ema is not None:
                self.ema.module.load_state_dict(state["ema"])
                self.ema.updates = int(state["ema_updates"])
            torch.set_rng_state(state["torch_rng"])
            if self.dev.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], self.dev)
            self.history = [dict(r) for r in state["history"]]
            self.best = (float(state["best_metric"]), int(state["best_epoch"]))
            logger.info("%s fold %d: resumed after epoch %d of %d (best so far: epoch %d)", cfg.name, self.fold,
                        int(state["epoch"]), cfg.epochs, self.best[1])
        return reports

    def _load_checkpoint(self) -> dict[str, Any] | None:
        state = self.files.load(self.files.last)
        if state is None:
            if self.info.is_main:
                logger.info("%s fold %d: --resume, but no checkpoint in %s: starting afresh", self.cfg.name, self.fold,
                            self.files.dir)
            return None
        problems = []
        if comparable_config(state["config"]) != comparable_config(self.cfg.to_dict()):
            a, b = comparable_config(state["config"]), comparable_config(self.cfg.to_dict())
            problems.append("the config changed (" + ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
                                                               for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)) + ")")
        if state["split"] != self.split.id:
            problems.append(f"the split changed ({state['split']} -> {self.split.id}, {self.split.source})")
        if int(state["steps_per_epoch"]) != self.steps_per_epoch:
            problems.append(f"the steps per epoch changed ({state['steps_per_epoch']} -> {self.steps_per_epoch}: another "
                            "--max-steps, batch size or number of processes)")
        if problems:
            raise TrainError(f"{self.cfg.name} fold {self.fold}: cannot resume {self.files.last}: {'; '.join(problems)}. "
                             "Undo the change, or start afresh without --resume")
        return state

    def _new_record(self, init_reports: list[dict[str, Any]], state: dict[str, Any] | None) -> dict[str, Any]:
        prev = self.files.read_record() if state is not None else {}
        resumes = list(prev.get("resumes", []))
        if state is not None:
            resumes.append({"after_epoch": int(state["epoch"]), "at": time.strftime("%Y-%m-%d %H:%M:%S")})
        return {
            "member": self.cfg.name, "entry": self.entry.name, "fold": self.fold, "status": "running",
            "split": self.split.id, "folds_csv": self.split.source, "config": self.cfg.to_dict(),
            "pretrained": self.cfg.pretrained, "initial_weights": init_reports,
            "validation": self.plan.record(),
            "keypoints_files": [{"path": f, "split": keypoints_split(f)} for f in (self.predicted.files if self.predicted else [])],
            "world_size": self.info.world_size, "device": str(self.dev), "steps_per_epoch": self.steps_per_epoch,
            "resumes": resumes, "versions": _versions(),
        }

    # -- one epoch ------------------------------------------------------------------------------
    def _epoch(self, epoch: int) -> None:
        cfg, info, dev, family = self.cfg, self.info, self.dev, self.family
        t0 = time.perf_counter()
        self.sampler.set_epoch(epoch)
        self.model.train()
        losses: list[float] = []
        bar = progress_bar(self.loader, self.steps_per_epoch, f"{cfg.name} f{self.fold} ep{epoch + 1}/{cfg.epochs}",
                        self.progress and info.is_main)
        join = self.model.join() if info.enabled else contextlib.nullcontext()
        with join:
            for step, batch in enumerate(bar):
                if self.max_steps is not None and step >= self.max_steps:
                    break
                if batch is None:
                    continue
                batch = batch.to(dev)
                with torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp):
                    output = self.model(batch.inputs)
                    loss = batch_loss(family, output, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{cfg.name} fold {self.fold}: non-finite loss at epoch {epoch + 1}, step {step}")
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if cfg.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update(self.raw_model)
                losses.append(float(loss.detach()))
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
        if D.all_reduce_mean(float(len(losses)), info, dev) == 0:
            raise RuntimeError(f"{cfg.name} fold {self.fold}: epoch {epoch + 1} had no trainable sample; "
                               f"check that {family.name} can prepare these studies (see the warnings above)")
        row: dict[str, float] = {
            "epoch": epoch + 1,
            "lr": float(self.scheduler.get_last_lr()[0]),
            "train_loss": D.all_reduce_mean(float(np.mean(losses)) if losses else float("nan"), info, dev),
        }
        oof = None
        if self.validator is not None:
            part = self.validator.run_shard(self.eval_model, dev, self.progress and info.is_main)
            parts = D.gather(part, info)
            metrics: dict[str, float] | None = None
            if info.is_main:
                assert parts is not None
                metrics, oof = self.validator.combine(parts)
            row.update(D.broadcast(metrics, info))
        row["seconds"] = time.perf_counter() - t0
        self.history.append(row)
        if info.is_main:
            self._checkpoint(epoch + 1, row, oof)
            logger.info("%s f%d epoch %d: %s", cfg.name, self.fold, epoch + 1,
                        ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
        D.barrier(info)

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are validated and exported (the EMA when on)."""
        return self.ema.module if self.ema is not None else self.raw_model

    def _checkpoint(self, epoch: int, row: dict[str, float], oof: dict[str, Any] | None) -> None:
        """Rank 0, after every epoch: out-of-fold files, best weights when improved, last state."""
        files = self.files
        if oof is not None:
            self._write_oof(oof, "last")
            if row["val_metric"] < self.best[0]:
                self.best = (float(row["val_metric"]), epoch)
                files.save(files.best, {"model": self.eval_model.state_dict(), "epoch": epoch, "metric": self.best[0]})
                files.promote("last", "best")
        state = {
            "config": self.cfg.to_dict(), "split": self.split.id, "fold": self.fold, "epoch": epoch,
            "steps_per_epoch": self.steps_per_epoch, "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.dev) if self.dev.type == "cuda" else None,
            "history": self.history, "best_metric": self.best[0], "best_epoch": self.best[1],
            "init": self.record.get("initial_weights", []),
        }
        if self.ema is not None:
            state.update(ema=self.ema.module.state_dict(), ema_updates=self.ema.updates)
        files.save(files.last, state)
        files.write_history(self.history)

    def _write_oof(self, oof: dict[str, Any], which: str) -> None:
        cfg, files = self.cfg, self.files
        tag = {"member": np.array(cfg.name), "fold": np.int64(self.fold), "split": np.array(self.split.id)}
        if cfg.stage == 2:
            path = files.oof_file(which)
            path.parent.mkdir(parents=True, exist_ok=True)
            arrays = dict(study_ids=oof["study_ids"], logits=oof["logits"], mask=oof["mask"], labels=oof["labels"])
            atomic_write(path, lambda fh: np.savez_compressed(fh, **tag, **arrays), binary=True)
        else:
            files.oof_file(which).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(files.oof_file(which), lambda fh: np.savez_compressed(fh, **tag, **oof["errors"]), binary=True)
            save_keypoints(files.keypoints_file(which), oof["keypoints"], split=self.split.id)

    # -- the end ------------------------------------------------------------------------------
    def _finish(self) -> TrainResult:
        cfg, files = self.cfg, self.files
        final = self.eval_model
        use_best = cfg.select == "best" and self.validator is not None and files.best.is_file()
        if use_best:
            final.load_state_dict(self.files.load(files.best)["model"])
            epoch, metric, which = self.best[1], self.best[0], "best"
        else:
            epoch = len(self.history)
            metric = self.history[-1].get("val_metric") if self.history else None
            which = "last"
        exported = export_model(_export_copy(final.eval(), cfg.export_dtype).cpu(), self.entry, files.out_dir)
        notes = f"{cfg.name} fold {self.fold}, epoch {epoch}"
        if self.plan.keypoints == "truth" and cfg.stage == 2 and self.plan.study_ids:
            notes += "; validated on TRUE keypoints (val_keypoints=truth): optimistic out-of-fold logits"
        manifest = Manifest(models=[exported], priors=self.priors, notes=notes, root=files.out_dir, priors_given=True,
                            split=self.split.id if self.fold >= 0 else "")
        manifest_path = save_manifest(manifest, files.manifest)
        oof_path, kp_path = files.publish(which) if self.validator is not None else (None, None)
        self.record.update(status="complete", selected_epoch=epoch, val_metric=metric,
                           weights=exported.file, sha256=exported.sha256)
        files.write_record(self.record)
        logger.info("%s fold %d: exported epoch %d%s -> %s", cfg.name, self.fold, epoch,
                    "" if metric is None else f" (val_metric {metric:.4f})", files.out_dir / exported.file)
        return TrainResult(exported, files.out_dir, manifest_path, self.history, epoch, metric, oof_path, kp_path, self.record)


def batch_loss(family: Family, output: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The family's training loss of one batch (labels and mask for graders, targets for keypoints)."""
    if isinstance(family, GradingFamily):
        return family.loss(output, batch.labels, batch.mask)
    assert isinstance(family, KeypointFamily) and batch.targets is not None
    return family.loss(output, batch.targets)


def _export_copy(model: nn.Module, dtype: str) -> nn.Module:
    """The model to save: itself, or an fp16 copy (demo weights: half the bytes)."""
    if dtype == "float16":
        import copy

        return copy.deepcopy(model).half()
    return model
