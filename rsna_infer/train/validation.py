"""Validation on the held-out fold: which studies, from which keypoints, on which rank.

Honest by default: a stage-2 model is validated on crops from the *predicted* out-of-fold
keypoints (``--keypoints``), as at test time, because its out-of-fold logits pick the best
epoch and fit the blend. `validation_plan` decides, before any training, what happens to
studies the keypoint files do not cover (config ``missing_keypoints``) and refuses a run
that would silently validate on the truth.

Under torchrun every rank validates a shard of the fold (`Validator.run_shard`) and rank 0
combines the shards (`Validator.combine`): no rank waits for a whole validation pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..keypoints import KeypointSet, StudyKeypoints
from ..models.family import Family, KeypointFamily
from .config import TrainConfig
from .data import TrainingData
from .evaluate import LogitAccumulator, keypoint_errors, score_logits, summarise_errors
from .samples import Batch, Collate, ShareCacheBudget, StudyDataset, full_mask, progress_bar

logger = logging.getLogger(__name__)


class ValidationError(ValueError):
    """Validation as configured would be dishonest or impossible; the message says what to pass."""


@dataclass
class ValidationPlan:
    """The studies a fold validates on and where their crops come from."""

    study_ids: list[int]
    truth_ids: list[int] = field(default_factory=list)  # validated on their true keypoints
    skipped_ids: list[int] = field(default_factory=list)  # left out: no predicted keypoints
    keypoints: str = "truth"  # "predicted" | "truth" (stage 1: targets are always the truth)

    def record(self) -> dict[str, Any]:
        return {"n_studies": len(self.study_ids), "keypoints": self.keypoints,
                "truth_keypoint_studies": self.truth_ids, "skipped_studies": self.skipped_ids}


def validation_plan(cfg: TrainConfig, fold: int, val_ids: list[int], predicted: dict[int, StudyKeypoints] | None,
                    files: list[str]) -> ValidationPlan:
    """What fold ``fold`` validates on; raises `ValidationError` instead of a silent fallback."""
    if cfg.stage == 1 or not val_ids:
        return ValidationPlan(list(val_ids))
    if cfg.val_keypoints == "truth":
        logger.warning("%s fold %d: validating on the TRUE keypoints (val_keypoints=truth): the out-of-fold logits are "
                       "optimistic, and so are the epoch selection and the blend fitted on them", cfg.name, fold)
        return ValidationPlan(list(val_ids), truth_ids=list(val_ids), keypoints="truth")
    if predicted is None:
        raise ValidationError(
            f"{cfg.name}: stage-2 validation crops come from predicted out-of-fold keypoints, as at test time: pass "
            "--keypoints KEYPOINTS_OOF.npz (rsna-infer train --oof-keypoints), or --set val_keypoints=truth to "
            "validate on the true keypoints (optimistic; recorded in the run)")
    missing = [s for s in val_ids if s not in predicted]
    where = ", ".join(files)
    if not missing:
        return ValidationPlan(list(val_ids), keypoints="predicted")
    msg = (f"{cfg.name} fold {fold}: {len(missing)} of {len(val_ids)} validation studies have no predicted keypoints "
           f"in {where} (e.g. {missing[:5]})")
    if cfg.missing_keypoints == "error":
        raise ValidationError(f"{msg}; run --oof-keypoints with the stage-1 models of every fold on the same --folds, "
                              "or choose --set missing_keypoints=truth (validate them on the truth) or =skip")
    if cfg.missing_keypoints == "truth":
        logger.warning("%s; they are validated on their TRUE keypoints (missing_keypoints=truth)", msg)
        return ValidationPlan(list(val_ids), truth_ids=missing, keypoints="predicted")
    logger.warning("%s; they are left out of validation (missing_keypoints=skip)", msg)
    return ValidationPlan([s for s in val_ids if s not in set(missing)], skipped_ids=missing, keypoints="predicted")


class Validator:
    """Validation of one fold: deterministic inputs, no TTA, sharded over ranks."""

    def __init__(self, cfg: TrainConfig, family: Family, data: TrainingData, plan: ValidationPlan,
                 predicted: dict[int, StudyKeypoints] | None, priors: np.ndarray, shard: tuple[int, int] = (0, 1)) -> None:
        self.cfg, self.family, self.data, self.plan, self.priors = cfg, family, data, plan, priors
        self.val_ids = plan.study_ids
        rank, world = shard
        self.shard_ids = self.val_ids[rank::world]
        source = "predicted" if plan.keypoints == "predicted" else "truth"
        ds = StudyDataset(family, data, self.shard_ids, train=False, keypoint_source=source, predicted=predicted or {})
        workers = cfg.num_workers if self.shard_ids else 0
        self.loader = DataLoader(ds, batch_size=cfg.val_batch_size or cfg.batch_size, shuffle=False,
                                 num_workers=workers, persistent_workers=workers > 0,
                                 worker_init_fn=ShareCacheBudget(workers),
                                 collate_fn=Collate(family, with_targets=False))

    # -- one rank ---------------------------------------------------------------------------
    @torch.inference_mode()
    def run_shard(self, model: nn.Module, dev: torch.device, progress: bool) -> dict[str, Any]:
        """This rank's part: stage 2 ``{"ids", "logits", "mask"}``; stage 1 ``{"preds", "errors"}``."""
        model.eval()
        if self.family.stage == 2:
            acc = LogitAccumulator(self.shard_ids)
            for batch, out in self._outputs(model, dev, progress):
                for i, (sid, s) in enumerate(zip(batch.study_ids, batch.samples)):
                    acc.add(sid, out[i], full_mask(s))
            logits, mask = acc.result()
            return {"ids": list(self.shard_ids), "logits": logits, "mask": mask}
        family = self.family
        assert isinstance(family, KeypointFamily)
        decoded: dict[int, list[KeypointSet]] = {}
        for batch, out in self._outputs(model, dev, progress):
            for i, (sid, s) in enumerate(zip(batch.study_ids, batch.samples)):
                decoded.setdefault(sid, []).append(family.decode(out[i], s, self.data.study(sid)))
        preds: dict[int, StudyKeypoints] = {}
        errors: dict[int, dict[str, np.ndarray]] = {}
        for sid in self.shard_ids:
            kp = StudyKeypoints(sid)
            merged = merge_sets(family, decoded.get(sid, []))
            if merged is not None:
                kp.sets[family.set_key] = merged
            preds[sid] = kp
            errors[sid] = keypoint_errors(kp, self.data.truth(sid), self.data.study(sid))
            if not errors[sid]:  # nothing decoded: count this study's labelled points as missed
                kind = KIND_BY_SET_KEY.get(family.set_key)
                t = self.data.truth(sid).get(f"truth_{kind}") if kind else None
                if t is not None:
                    errors[sid] = {kind: np.where(t.valid, np.inf, np.nan)}
        return {"preds": preds, "errors": errors}

    def _outputs(self, model: nn.Module, dev: torch.device, progress: bool) -> Iterator[tuple[Batch, np.ndarray]]:
        if not self.shard_ids:
            return
        bar = progress_bar(self.loader, len(self.loader), "validate", progress)
        for batch in bar:
            if batch is None:
                continue
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.cfg.amp and dev.type == "cuda"):
                out = self.family.run(model, batch.to(dev).inputs, tta=False)
            yield batch, out.float().cpu().numpy()

    # -- rank 0 -----------------------------------------------------------------------------
    def combine(self, parts: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, Any]]:
        """Metrics and out-of-fold arrays of the whole fold from every rank's part."""
        if self.family.stage == 2:
            index = {s: i for i, s in enumerate(self.val_ids)}
            logits = np.zeros((len(self.val_ids), *parts[0]["logits"].shape[1:]), np.float32)
            mask = np.zeros((len(self.val_ids), *parts[0]["mask"].shape[1:]), bool)
            for p in parts:
                rows = [index[s] for s in p["ids"]]
                logits[rows], mask[rows] = p["logits"], p["mask"]
            labels = self.data.label_array(self.val_ids)
            comp = score_logits(logits, mask, labels, self.priors)
            metrics = {"val_metric": comp["covered"], "val_total": comp["total"],
                       **{f"val_{k}": v for k, v in comp.items() if k not in ("total", "covered")}}
            return metrics, {"study_ids": np.asarray(self.val_ids, np.int64), "logits": logits, "mask": mask,
                             "labels": labels}
        preds = {s: kp for p in parts for s, kp in p["preds"].items()}
        errors = {s: e for p in parts for s, e in p["errors"].items()}
        metrics = summarise_errors(errors)
        metrics["val_metric"] = metrics["err_z_mm" if self.family.name in THROUGH_PLANE_ONLY else "err_mm"]
        kinds = sorted({k for e in errors.values() for k in e})
        arrays = {"study_ids": np.asarray(self.val_ids, np.int64)}
        for k in kinds:
            n = len(KeypointSet.empty(k.removeprefix("z_")))
            name = f"err_z_mm_{k[2:]}" if k.startswith("z_") else f"err_mm_{k}"
            arrays[name] = np.stack([errors[s].get(k, np.full(n, np.nan)) for s in self.val_ids])
        return {f"val_{k}" if not k.startswith("val_") else k: v for k, v in metrics.items()}, {
            "errors": arrays, "keypoints": preds}


def merge_sets(family: KeypointFamily, sets: list[KeypointSet]) -> KeypointSet | None:
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
THROUGH_PLANE_ONLY = {"axial_level"}

KIND_BY_SET_KEY = {
    "sag2d_t2": "spinal", "sag3d_t2": "spinal", "sag2d_t1": "foraminal", "sag3d_t1": "foraminal",
    "axial3d": "subarticular", "axial_level": "subarticular", "axial_xy": "subarticular",
}
