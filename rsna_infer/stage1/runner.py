"""Run stage-1 families end to end on one study (tests, demos, the training loop's checks).

The predictor batches across studies itself (prepare -> collate -> run per fold -> mean ->
decode -> `merge_decoded` -> `finalize`); this helper is that same sequence for one study.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

import numpy as np

from ..keypoints import StudyKeypoints
from ..specs import STAGE1_FAMILIES
from .assemble import finalize as _finalize
from .assemble import merge_decoded

if TYPE_CHECKING:
    from torch import nn

    from ..io.volume import Study
    from ..models.family import KeypointFamily

logger = logging.getLogger(__name__)

Models = Union["nn.Module", Sequence["nn.Module"]]


def run_folds(family: "KeypointFamily", models: Models, batch: dict, tta: bool = False) -> np.ndarray:
    """Mean of ``family.run`` over the fold models (each in eval mode, on its own device)."""
    import torch

    folds = [models] if isinstance(models, torch.nn.Module) else list(models)
    if not folds:
        raise ValueError(f"{family.entry.name}: no models given")
    total = None
    with torch.inference_mode():
        for model in folds:
            model.eval()
            device = next(model.parameters()).device
            out = family.run(model, {k: v.to(device) for k, v in batch.items()}, tta=tta).float().cpu()
            total = out if total is None else total + out
    return (total / len(folds)).numpy()


def predict_keypoints(
    families_and_models: Sequence[tuple["KeypointFamily", Models]],
    study: "Study",
    keypoints: StudyKeypoints | None = None,
    tta: bool = False,
    finalize: bool = True,
) -> StudyKeypoints:
    """Keypoints of one study from stage-1 families (each with one model or a list of fold
    models). Families run in `STAGE1_FAMILIES` order (``axial_xy`` after ``axial_level``);
    ``finalize`` adds the cross-view report and the projection fallback."""
    kp = keypoints if keypoints is not None else StudyKeypoints(study.study_id)
    order = sorted(families_and_models, key=lambda fm: STAGE1_FAMILIES.index(fm[0].name))
    for family, models in order:
        samples = family.prepare(study, kp)
        if not samples:
            logger.info("study %s: nothing for %s (%s)", study.study_id, family.set_key, family.entry.name)
            continue
        out = run_folds(family, models, family.collate(samples), tta=tta)
        sets = [family.decode(out[i], s, study) for i, s in enumerate(samples)]
        kp = merge_decoded(family, sets, kp)
    return _finalize(study, kp) if finalize else kp
