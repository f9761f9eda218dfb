"""The stage-1 chain, written once: fold mean -> decode -> merge, group by group, then finalize.

For each group of stage-1 models (the folds of one family/variant, in `STAGE1_FAMILIES`
order, so ``axial_xy`` runs after the ``axial_level`` set it refines): every sample of the
studies is prepared, each fold runs on it, the folds' raw outputs are averaged
(`fold_mean`: on what the networks output, before decoding), each mean is decoded into a
keypoint set, and a study's sets are merged into its keypoints (`merge_decoded`). Last,
``finalize`` (default `rsna_infer.stage1.assemble.finalize`: sagittal merge, cross-view
check, projection fallback) turns them into the keypoints stage 2 reads.

`stage1_chain` is that loop; its callers say only how samples are obtained and how the folds
run:

- the predictor (`rsna_infer.inference.engine`), batched over a chunk's studies, with
  batches across studies, out-of-memory halving and failures that cost one study;
- `predict_keypoints`, on one study with plain torch modules (tests, demos);
- the out-of-fold keypoints (`rsna_infer.train.oof_keypoints`) with loaded fold members.

So the three cannot drift apart: the same averaging, decoding, merging and finalisation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from ..keypoints import StudyKeypoints
from ..specs import STAGE1_FAMILIES
from .assemble import merge_decoded

if TYPE_CHECKING:
    from torch import nn

    from ..io.volume import Study
    from ..models.family import KeypointFamily, Sample

logger = logging.getLogger(__name__)

#: The stage-1 finalisation ``(study, keypoints) -> keypoints``.
Finalize = Callable[["Study", StudyKeypoints], StudyKeypoints]
#: Called with ``(what failed, study id, exception)`` where one study's step fails; the
#: default (`raise_error`) lets the exception through.
OnError = Callable[[str, int, BaseException], None]
#: ``(study id, sample)`` pairs of a group.
Items = list[tuple[int, "Sample"]]
Models = Union["nn.Module", Sequence["nn.Module"]]


@dataclass(frozen=True)
class Stage1Group:
    """One group of the chain: ``key`` (``"sag2d/t2"``, in messages and timings), the
    ``family`` that prepares, decodes and merges, and ``folds``, what the caller's ``run``
    needs to run them (modules, loaded members, member names)."""

    key: str
    family: "KeypointFamily"
    folds: Any


def raise_error(where: str, study_id: int, exc: BaseException) -> None:
    """The default `OnError`: nothing is tolerated."""
    raise exc


def default_finalize() -> Finalize:
    """`rsna_infer.stage1.assemble.finalize`, the finalisation every run uses unless told otherwise."""
    from .assemble import finalize

    return finalize


def fold_mean(runs: Sequence[Sequence["np.ndarray | None"]]) -> list["np.ndarray | None"]:
    """Per sample, the mean of the folds' raw outputs (``runs[fold][sample]``, None where a
    fold has no output for it), summed in float64 and returned as float32; None where no
    fold produced one."""
    n = len(runs[0]) if runs else 0
    sums: list[np.ndarray | None] = [None] * n
    counts = np.zeros(n, np.int64)
    for outs in runs:
        for i, o in enumerate(outs):
            if o is not None:
                sums[i] = o.astype(np.float64) if sums[i] is None else sums[i] + o
                counts[i] += 1
    return [None if s is None else (s / counts[i]).astype(np.float32) for i, s in enumerate(sums)]


def decode_and_merge(group: Stage1Group, items: Items, means: Sequence["np.ndarray | None"],
                     studies: Mapping[int, "Study"], kps: dict[int, StudyKeypoints], on_error: OnError = raise_error) -> None:
    """Decode every sample's mean output and merge each study's sets into ``kps`` (in place)."""
    family = group.family
    decoded: dict[int, list] = {}
    for (sid, sample), mean in zip(items, means):
        if mean is None:
            continue
        try:
            ks = family.decode(mean, sample, studies[sid])
        except Exception as e:
            on_error(f"decode {group.key}", sid, e)
            continue
        decoded.setdefault(sid, []).append(ks)
    for sid, sets in decoded.items():
        try:
            kps[sid] = merge_decoded(family, sets, kps[sid])
        except Exception as e:
            on_error(f"merge {group.key}", sid, e)


def finalize_all(finalize: Finalize, studies: Mapping[int, "Study"], kps: dict[int, StudyKeypoints],
                 on_error: OnError = raise_error) -> None:
    """``finalize`` every study's keypoints in ``kps`` (in place; None from it keeps them)."""
    for sid, study in studies.items():
        try:
            done = finalize(study, kps[sid])
            if done is not None:
                kps[sid] = done
        except Exception as e:
            on_error("stage1 finalize", sid, e)


def stage1_chain(
    studies: Mapping[int, "Study"],
    groups: Sequence[Stage1Group],
    samples: Callable[[Stage1Group, dict[int, StudyKeypoints]], Items],
    run: Callable[[Stage1Group, Items], Sequence[Sequence["np.ndarray | None"]]],
    finalize: Finalize | None = None,
    on_error: OnError = raise_error,
    keypoints: Mapping[int, StudyKeypoints] | None = None,
    timed: Callable[[str, float], None] | None = None,
) -> dict[int, StudyKeypoints]:
    """The keypoints of ``studies`` (see the module docstring). ``samples(group, kps)``: the
    ``(study id, sample)`` pairs of a group, prepared on the keypoints so far; ``run(group,
    items)``: each fold's outputs for them (``[fold][sample]``, None where one failed).
    ``keypoints``: where to start (default empty). ``timed(key, seconds)`` receives
    ``stage1/<group>/decode`` and ``stage1/finalize``."""
    start = keypoints or {}
    kps = {sid: start[sid] if sid in start else StudyKeypoints(sid) for sid in studies}
    for g in groups:
        items = samples(g, kps)
        if not items:
            continue
        means = fold_mean(run(g, items))
        t = time.perf_counter()
        decode_and_merge(g, items, means, studies, kps, on_error)
        if timed is not None:
            timed(f"stage1/{g.key}/decode", time.perf_counter() - t)
    if finalize is not None:
        t = time.perf_counter()
        finalize_all(finalize, studies, kps, on_error)
        if timed is not None:
            timed("stage1/finalize", time.perf_counter() - t)
    return kps


def group_key(family: "KeypointFamily") -> str:
    """``"sag2d/t2"``: how a family/variant group is named in messages and timings."""
    return f"{family.entry.family}/{family.entry.variant}"


# -- one study, plain torch modules ---------------------------------------------------------


def fold_outputs(family: "KeypointFamily", models: Models, batch: dict, tta: bool = False) -> list[list[np.ndarray]]:
    """``family.run`` of each fold model on ``batch`` (each in eval mode, on its own device):
    ``[fold][sample]``, float32 on the host."""
    import torch

    folds = [models] if isinstance(models, torch.nn.Module) else list(models)
    if not folds:
        raise ValueError(f"{family.entry.name}: no models given")
    out = []
    with torch.inference_mode():
        for model in folds:
            model.eval()
            device = next(model.parameters()).device
            y = family.run(model, {k: v.to(device) for k, v in batch.items()}, tta=tta)
            out.append(list(y.float().cpu().numpy()))
    return out


def run_folds(family: "KeypointFamily", models: Models, batch: dict, tta: bool = False) -> np.ndarray:
    """Mean of ``family.run`` over the fold models (`fold_mean`), one row per sample of ``batch``."""
    return np.stack(fold_mean(fold_outputs(family, models, batch, tta)))  # type: ignore[arg-type]


def predict_keypoints(
    families_and_models: Sequence[tuple["KeypointFamily", Models]],
    study: "Study",
    keypoints: StudyKeypoints | None = None,
    tta: bool = False,
    finalize: bool = True,
) -> StudyKeypoints:
    """Keypoints of one study from stage-1 families (each with one model or a list of fold
    models), through `stage1_chain`. Families run in `STAGE1_FAMILIES` order (``axial_xy``
    after ``axial_level``); ``finalize`` adds the cross-view report and the projection
    fallback."""
    order = sorted(families_and_models, key=lambda fm: STAGE1_FAMILIES.index(fm[0].name))
    groups = [Stage1Group(group_key(f), f, models) for f, models in order]
    sid = study.study_id

    def samples(g: Stage1Group, kps: dict[int, StudyKeypoints]) -> Items:
        got = g.family.prepare(study, kps[sid])
        if not got:
            logger.info("study %s: nothing for %s (%s)", sid, g.family.set_key, g.family.entry.name)
        return [(sid, s) for s in got]

    def run(g: Stage1Group, items: Items) -> list[list[np.ndarray]]:
        return fold_outputs(g.family, g.folds, g.family.collate([s for _, s in items]), tta=tta)

    kps = stage1_chain({sid: study}, groups, samples, run, default_finalize() if finalize else None,
                       keypoints={sid: keypoints} if keypoints is not None else None)
    return kps[sid]
