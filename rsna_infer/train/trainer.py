"""One training loop for every model family, on top of the `Family` interface.

The loop never knows which family it trains: inputs come from ``family.prepare(study,
keypoints, rng)`` (with an ``rng``: the family's training augmentation), targets from
``family.targets`` (stage 1) or the study's labels and ``Sample.mask`` (stage 2), the loss
from ``family.loss``. Around that: AdamW (no decay on biases and norms) with linear warm-up
and cosine decay per step, fp16 AMP on CUDA, gradient clipping, optional EMA, DDP under
torchrun, per-epoch validation (metric for graders, keypoint error in mm for keypoint
models), out-of-fold predictions, and the export of the selected weights as safetensors
plus a one-entry manifest (with class priors from the training labels).

Files written to ``out_dir`` (fold ``k``, member ``name``)::

    config.json                     the resolved config
    folds.csv                       the split (study_id, fold)
    history_f{k}.json               per-epoch metrics
    weights/{name}_f{k}.safetensors the exported weights
    manifest_f{k}.json              one entry + priors (merge folds with `merge_manifests`)
    oof_f{k}.npz                    stage 2: study_ids, logits [S,5,5,3], mask [S,5,5], labels
                                    stage 1: study_ids, kinds, per-point errors (mm)
    keypoints_oof_f{k}.npz          stage 1: decoded out-of-fold keypoints (for stage 2)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..constants import N_CONDITIONS, N_LEVELS
from ..family import Family, GradingFamily, KeypointFamily, Sample
from ..manifest import Manifest, export_model, save_manifest
from ..registry import make_family
from ..specs import ModelEntry
from ..stage1.keypoints import KeypointSet, StudyKeypoints
from ..submission import priors_from_labels
from . import distributed as D
from .config import TrainConfig
from .data import TrainingData
from .ema import ModelEMA
from .evaluate import LogitAccumulator, keypoint_errors, score_logits, summarise_errors
from .folds import load_folds, make_folds, save_folds, split
from .keypoint_store import load_keypoints, save_keypoints

logger = logging.getLogger(__name__)


# -- data -----------------------------------------------------------------------------------


@dataclass
class StudyItem:
    """What the dataset yields for one study: its samples and their targets."""

    study_id: int
    samples: list[Sample]
    targets: list[dict[str, np.ndarray]] = field(default_factory=list)  # stage 1, aligned with samples
    labels: np.ndarray | None = None  # stage 2: [5, 5]
    error: str | None = None


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    samples: list[Sample]
    study_ids: list[int]
    targets: dict[str, torch.Tensor] | None = None  # stage 1
    labels: torch.Tensor | None = None  # stage 2 [B, 5, 5]
    mask: torch.Tensor | None = None  # stage 2 [B, 5, 5]

    def to(self, device: torch.device) -> "Batch":
        mv = lambda d: None if d is None else {k: v.to(device, non_blocking=True) for k, v in d.items()}  # noqa: E731
        return Batch(
            mv(self.inputs), self.samples, self.study_ids, mv(self.targets),
            None if self.labels is None else self.labels.to(device),
            None if self.mask is None else self.mask.to(device),
        )


class StudyDataset(Dataset):
    """Index -> `StudyItem` of one study (``repeats`` passes over ``study_ids`` per epoch).

    Training items are augmented with an rng seeded by (seed, epoch, index): runs are
    reproducible and do not depend on the number of workers. A study the family cannot
    prepare is logged and yields no samples; it never stops the run.
    """

    def __init__(
        self,
        family: Family,
        data: TrainingData,
        study_ids: list[int],
        *,
        train: bool,
        seed: int = 0,
        repeats: int = 1,
        keypoint_source: str = "truth",
        predicted: dict[int, StudyKeypoints] | None = None,
        predicted_prob: float = 0.5,
    ) -> None:
        self.family, self.data, self.study_ids = family, data, [int(s) for s in study_ids]
        self.train, self.seed, self.repeats = train, seed, repeats if train else 1
        self.keypoint_source, self.predicted, self.predicted_prob = keypoint_source, predicted or {}, predicted_prob
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.study_ids) * self.repeats

    def _keypoints(self, sid: int, truth: StudyKeypoints, rng: np.random.Generator | None) -> StudyKeypoints:
        """Truth for stage 1 (targets) and for stage 2 unless predicted keypoints are asked for
        (then without the truth sets, so that crops come from the predictions)."""
        pred = self.predicted.get(sid)
        if self.family.stage == 1 or self.keypoint_source == "truth" or pred is None:
            return truth
        if self.keypoint_source == "mixed" and rng is not None and rng.random() >= self.predicted_prob:
            return truth
        return StudyKeypoints(sid, {k: s for k, s in pred.sets.items() if not k.startswith("truth_")}, dict(pred.report))

    def __getitem__(self, index: int) -> StudyItem:
        sid = self.study_ids[index % len(self.study_ids)]
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.train else None
        try:
            study = self.data.study(sid)
            truth = self.data.truth(sid, study)
            samples = self.family.prepare(study, self._keypoints(sid, truth, rng), rng)
            if isinstance(self.family, KeypointFamily):
                kept, targets = [], []
                for s in samples:
                    t = self.family.targets(s, study, truth)
                    if t is not None:
                        kept.append(s)
                        targets.append(t)
                # validation keeps every sample (all are decoded); training only those with targets
                return StudyItem(sid, kept if self.train else samples, targets if self.train else [])
            return StudyItem(sid, samples, labels=self.data.labels[sid])
        except Exception as e:  # one odd study never stops training
            logger.warning("study %s: %s cannot be prepared (%s: %s); skipped", sid, self.family.name, type(e).__name__, e)
            return StudyItem(sid, [], error=f"{type(e).__name__}: {e}")


def _full_mask(sample: Sample) -> np.ndarray:
    return np.ones((N_CONDITIONS, N_LEVELS), bool) if sample.mask is None else np.asarray(sample.mask, bool)


class Collate:
    """Flatten the studies' samples into one batch (None when no study yielded any)."""

    def __init__(self, family: Family, with_targets: bool) -> None:
        self.family, self.with_targets = family, with_targets

    def __call__(self, items: list[StudyItem]) -> Batch | None:
        samples = [s for it in items for s in it.samples]
        if not samples:
            return None
        sids = [it.study_id for it in items for _ in it.samples]
        batch = Batch(self.family.collate(samples), samples, sids)
        if self.family.stage == 1:
            if self.with_targets:
                tlist = [t for it in items for t in it.targets]
                custom = getattr(self.family, "collate_targets", None)  # a family may batch its targets itself
                batch.targets = custom(tlist) if custom is not None else {
                    k: torch.from_numpy(np.stack([np.asarray(t[k]) for t in tlist])) for k in tlist[0]}
        else:
            fam = self.family
            assert isinstance(fam, GradingFamily)
            batch.labels = torch.from_numpy(  # per sample: a left/right mirrored sample has swapped labels
                np.stack([np.asarray(fam.sample_labels(s, it.labels), np.int64) for it in items for s in it.samples])
            )
            batch.mask = torch.from_numpy(np.stack([_full_mask(s) for s in samples]))
        return batch


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


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# -- the run --------------------------------------------------------------------------------


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


def _seed_everything(seed: int) -> None:
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _resolve_folds(cfg: TrainConfig, data: TrainingData, folds_csv: str | Path | None, out_dir: Path, info: D.DistInfo):
    if folds_csv is not None:
        folds = load_folds(folds_csv, data.study_ids)
        folds = folds[folds["study_id"].isin(data.study_ids)].reset_index(drop=True)
    else:
        folds = make_folds(data.study_ids, data.label_array(data.study_ids), cfg.n_folds, cfg.seed)
    if info.is_main:
        save_folds(folds, out_dir / "folds.csv")
    return folds


def train_fold(
    cfg: TrainConfig,
    data: TrainingData | str | Path,
    fold: int,
    out_dir: str | Path,
    *,
    folds_csv: str | Path | None = None,
    keypoints_files: list[str | Path] | tuple[str | Path, ...] = (),
    cache_dir: str | Path | None = None,
    device: str | None = None,
    max_steps: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``cfg`` on every fold but ``fold`` (``-1``: on every study, no validation),
    validate on ``fold`` each epoch, export the selected weights and write the run files.

    ``keypoints_files``: out-of-fold stage-1 keypoints (``keypoints_oof.npz`` of
    `rsna_infer.train.oof_keypoints`): stage-2 validation crops, hence the out-of-fold logits,
    come from them, and training crops too when the config's ``keypoints`` is
    "predicted"/"mixed". ``max_steps`` caps the optimiser steps
    per epoch (smoke tests). Under torchrun (``WORLD_SIZE > 1``) this runs on every rank.
    """
    info, dev = D.setup(device)
    out_dir = Path(out_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    _seed_everything(cfg.seed * 1000 + fold + 1)
    if not isinstance(data, TrainingData):
        data = TrainingData.open(data, cache_dir=cache_dir)
    folds = _resolve_folds(cfg, data, folds_csv, out_dir, info)
    train_ids, val_ids = split(folds, fold)
    logger.info("%s fold %d: %d training and %d validation studies on %s%s", cfg.name, fold, len(train_ids),
                len(val_ids), dev, f" (rank {info.rank}/{info.world_size})" if info.enabled else "")
    if info.is_main:
        data.cache.ensure(train_ids + val_ids, progress=progress)
    D.barrier(info)

    predicted: dict[int, StudyKeypoints] = {}
    if cfg.stage == 2 and cfg.keypoints != "truth" and not keypoints_files:
        raise ValueError(f"config {cfg.name!r} uses keypoints={cfg.keypoints!r}: pass out-of-fold stage-1 keypoints (--keypoints)")
    if cfg.stage == 2 and keypoints_files:
        predicted = load_keypoints(*keypoints_files)
        logger.info("predicted keypoints for %d studies from %d file(s)%s", len(predicted), len(keypoints_files),
                    "" if cfg.keypoints != "truth" else " (validation crops only; training crops from the truth)")

    entry = cfg.model_entry(fold)
    family = make_family(entry)
    model = family.build().to(dev)
    raw_model = model
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=True
        )

    train_ds = StudyDataset(family, data, train_ids, train=True, seed=cfg.seed * 1000 + fold, repeats=cfg.repeats,
                            keypoint_source=cfg.keypoints, predicted=predicted, predicted_prob=cfg.predicted_prob)
    if info.enabled:
        sampler: Any = torch.utils.data.DistributedSampler(train_ds, info.world_size, info.rank, shuffle=True, seed=cfg.seed)
    else:
        sampler = _EpochShuffle(len(train_ds), cfg.seed * 1000 + fold)
    loader = DataLoader(
        train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
        collate_fn=Collate(family, with_targets=True), drop_last=False, pin_memory=dev.type == "cuda",
    )
    steps_per_epoch = len(loader) if max_steps is None else min(len(loader), max_steps)
    total = max(cfg.epochs * steps_per_epoch, 1)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup, cfg.min_lr_ratio))
    use_amp = cfg.amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    ema = ModelEMA(raw_model, cfg.ema_decay) if cfg.ema_decay else None
    priors = priors_from_labels(data.label_array(train_ids))

    validator = _Validator(cfg, family, data, val_ids, predicted, priors) if (val_ids and info.is_main) else None
    history: list[dict[str, float]] = []
    best = (math.inf, -1)
    best_state: dict[str, torch.Tensor] | None = None
    best_oof: dict[str, Any] | None = None

    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        train_ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        model.train()
        losses = []
        bar = _progress(loader, steps_per_epoch, f"{cfg.name} f{fold} ep{epoch + 1}/{cfg.epochs}", progress and info.is_main)
        join = model.join() if info.enabled else contextlib.nullcontext()
        with join:
            for step, batch in enumerate(bar):
                if max_steps is not None and step >= max_steps:
                    break
                if batch is None:
                    continue
                batch = batch.to(dev)
                with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                    output = model(batch.inputs)
                    loss = _loss(family, output, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{cfg.name} fold {fold}: non-finite loss at epoch {epoch + 1}, step {step}")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if ema is not None:
                    ema.update(raw_model)
                losses.append(float(loss.detach()))
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if not losses and info.is_main:
            raise RuntimeError(f"{cfg.name} fold {fold}: epoch {epoch + 1} had no trainable sample; "
                               f"check that {family.name} can prepare these studies (see the warnings above)")
        row: dict[str, float] = {
            "epoch": epoch + 1,
            "lr": float(scheduler.get_last_lr()[0]),
            "train_loss": D.all_reduce_mean(float(np.mean(losses)) if losses else float("nan"), info, dev),
        }
        eval_model = ema.module if ema is not None else raw_model
        if validator is not None:
            metrics, oof = validator.run(eval_model, dev, progress)
            row.update(metrics)
            if row["val_metric"] < best[0]:
                best = (row["val_metric"], epoch + 1)
                best_state = {k: v.detach().clone() for k, v in eval_model.state_dict().items()}
                best_oof = oof
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        if info.is_main:
            logger.info("%s f%d epoch %d: %s", cfg.name, fold, epoch + 1,
                        ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
            (out_dir / f"history_f{fold}.json").write_text(json.dumps(history, indent=1) + "\n")
        D.barrier(info)

    result = None
    if info.is_main:
        final = ema.module if ema is not None else raw_model
        if cfg.select == "best" and best_state is not None:
            final.load_state_dict(best_state)
            selected_epoch, selected_metric, oof = best[1], best[0], best_oof
        else:
            selected_epoch = cfg.epochs
            selected_metric = history[-1].get("val_metric") if history else None
            oof = validator.last_oof if validator is not None else None
        result = _finish(cfg, fold, final, entry, out_dir, history, selected_epoch, selected_metric, oof, priors)
    D.barrier(info)
    D.teardown(info)
    if result is None:  # other ranks: the entry rank 0 exported
        result = TrainResult(entry, out_dir, out_dir / f"manifest_f{fold}.json", history, 0, None)
    return result


def _loss(family: Family, output: torch.Tensor, batch: Batch) -> torch.Tensor:
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


def _finish(cfg, fold, model, entry, out_dir, history, epoch, metric, oof, priors) -> TrainResult:
    exported = export_model(_export_copy(model.eval(), cfg.export_dtype).cpu(), entry, out_dir)
    manifest = Manifest(models=[exported], priors=priors, notes=f"{cfg.name} fold {fold}, epoch {epoch}",
                        root=out_dir, priors_given=True)
    manifest_path = save_manifest(manifest, out_dir / f"manifest_f{fold}.json")
    oof_path = kp_path = None
    if oof is not None:
        oof_path = out_dir / f"oof_f{fold}.npz"
        if cfg.stage == 2:
            np.savez_compressed(oof_path, member=np.array(cfg.name), fold=np.int64(fold), study_ids=oof["study_ids"],
                                logits=oof["logits"], mask=oof["mask"], labels=oof["labels"])
        else:
            np.savez_compressed(oof_path, member=np.array(cfg.name), fold=np.int64(fold), **oof["errors"])
            kp_path = save_keypoints(out_dir / f"keypoints_oof_f{fold}.npz", oof["keypoints"])
    logger.info("%s fold %d: exported epoch %d%s -> %s", cfg.name, fold, epoch,
                "" if metric is None else f" (val_metric {metric:.4f})", out_dir / exported.file)
    return TrainResult(exported, out_dir, manifest_path, history, epoch, metric, oof_path, kp_path)


class _EpochShuffle(torch.utils.data.Sampler):
    """Single-process sampler: a fresh permutation per epoch from (seed, epoch)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


def _progress(loader: Any, total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


class _Validator:
    """Validation on the held-out fold (rank 0): deterministic inputs, no TTA."""

    def __init__(self, cfg: TrainConfig, family: Family, data: TrainingData, val_ids: list[int],
                 predicted: dict[int, StudyKeypoints], priors: np.ndarray) -> None:
        self.cfg, self.family, self.data, self.val_ids, self.priors = cfg, family, data, val_ids, priors
        # validation mirrors test time: crops from predicted keypoints whenever they are given
        ds = StudyDataset(family, data, val_ids, train=False, keypoint_source="predicted" if predicted else "truth",
                          predicted=predicted)
        self.loader = DataLoader(ds, batch_size=cfg.val_batch_size or cfg.batch_size, shuffle=False,
                                 num_workers=cfg.num_workers, collate_fn=Collate(family, with_targets=False))
        self.last_oof: dict[str, Any] | None = None

    @torch.inference_mode()
    def run(self, model: nn.Module, dev: torch.device, progress: bool) -> tuple[dict[str, float], dict[str, Any]]:
        model.eval()
        if self.family.stage == 2:
            metrics, oof = self._grading(model, dev, progress)
        else:
            metrics, oof = self._keypoints(model, dev, progress)
        self.last_oof = oof
        return metrics, oof

    def _outputs(self, model: nn.Module, dev: torch.device, progress: bool) -> Iterator[tuple[Batch, np.ndarray]]:
        bar = _progress(self.loader, len(self.loader), "validate", progress)
        for batch in bar:
            if batch is None:
                continue
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.cfg.amp and dev.type == "cuda"):
                out = self.family.run(model, batch.to(dev).inputs, tta=False)
            yield batch, out.float().cpu().numpy()

    def _grading(self, model, dev, progress):
        acc = LogitAccumulator(self.val_ids)
        for batch, out in self._outputs(model, dev, progress):
            for i, (sid, s) in enumerate(zip(batch.study_ids, batch.samples)):
                acc.add(sid, out[i], _full_mask(s))
        logits, mask = acc.result()
        labels = self.data.label_array(self.val_ids)
        comp = score_logits(logits, mask, labels, self.priors)
        metrics = {"val_metric": comp["covered"], "val_total": comp["total"],
                   **{f"val_{k}": v for k, v in comp.items() if k not in ("total", "covered")}}
        return metrics, {"study_ids": np.asarray(self.val_ids, np.int64), "logits": logits, "mask": mask, "labels": labels}

    def _keypoints(self, model, dev, progress):
        family = self.family
        assert isinstance(family, KeypointFamily)
        decoded: dict[int, list[KeypointSet]] = {}
        for batch, out in self._outputs(model, dev, progress):
            for i, (sid, s) in enumerate(zip(batch.study_ids, batch.samples)):
                decoded.setdefault(sid, []).append(family.decode(out[i], s, self.data.study(sid)))
        preds: dict[int, StudyKeypoints] = {}
        errors: dict[int, dict[str, np.ndarray]] = {}
        for sid in self.val_ids:
            kp = StudyKeypoints(sid)
            merged = _merge_sets(family, decoded.get(sid, []))
            if merged is not None:
                kp.sets[family.set_key] = merged
            preds[sid] = kp
            errors[sid] = keypoint_errors(kp, self.data.truth(sid), self.data.study(sid))
            if not errors[sid]:  # nothing decoded: count this study's labelled points as missed
                truth = self.data.truth(sid)
                kind = _KIND_BY_SET_KEY.get(family.set_key)
                if kind is not None:
                    t = truth.get(f"truth_{kind}")
                    errors[sid] = {kind: np.where(t.valid, np.inf, np.nan)}
        metrics = summarise_errors(errors)
        metrics["val_metric"] = metrics["err_z_mm" if family.name in _THROUGH_PLANE_ONLY else "err_mm"]
        kinds = sorted({k for e in errors.values() for k in e})
        arrays = {"study_ids": np.asarray(self.val_ids, np.int64)}
        for k in kinds:
            n = len(KeypointSet.empty(k.removeprefix("z_")))
            name = f"err_z_mm_{k[2:]}" if k.startswith("z_") else f"err_mm_{k}"
            arrays[name] = np.stack([errors[s].get(k, np.full(n, np.nan)) for s in self.val_ids])
        return {f"val_{k}" if not k.startswith("val_") else k: v for k, v in metrics.items()}, {
            "errors": arrays, "keypoints": preds}


def _merge_sets(family: KeypointFamily, sets: list[KeypointSet]) -> KeypointSet | None:
    """One set per study from its samples' sets (the family's own rule when it has one, else
    the most confident valid point)."""
    if not sets:
        return None
    merge = getattr(family, "merge_sets", None)
    if merge is not None:
        return merge(sets)
    out = sets[0]
    for s in sets[1:]:
        out = out.merge_most_confident(s)
    return out


#: Families that predict no (x, y) of their own (the axial level classifier puts its points
#: at the slice centre): they are selected on the through-plane error alone.
_THROUGH_PLANE_ONLY = {"axial_level"}

_KIND_BY_SET_KEY = {
    "sag2d_t2": "spinal", "sag3d_t2": "spinal", "sag2d_t1": "foraminal", "sag3d_t1": "foraminal",
    "axial3d": "subarticular", "axial_level": "subarticular", "axial_xy": "subarticular",
}
