"""Out-of-fold stage-1 keypoints through the whole stage-1 chain, as at prediction time.

Each stage-1 run already writes the keypoints of *its own* family for its validation fold
(``keypoints_oof_f{k}.npz``). Stage 2 trained or validated on predicted keypoints should see
what the predictor will give it, though: every stage-1 family in order (the axial ``(x, y)``
model refining the level classifier's slices), folds averaged, then the cross-view step and
projection fallback (`rsna_infer.stage1.assemble.finalize`). This module runs that chain
with the fold-``k`` models on fold ``k``'s studies, for every fold of a stage-1 manifest.

CLI: ``rsna-infer train --oof-keypoints MANIFEST... --data ROOT --folds FOLDS.csv --out DIR``
(the runs' ``manifest_f*.json`` files, or a merged manifest) writes ``DIR/keypoints_oof.npz``
(pass it to stage-2 runs with ``--keypoints``). The manifests must come from the split of
``--folds`` (checked by id; the file records it too). It runs on the training device
(CUDA when available), like ``train``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..keypoints import StudyKeypoints
from ..models.family import KeypointFamily
from ..models.manifest import Manifest, load_manifest
from ..models.members import LoadedMember, load_member
from ..specs import STAGE1_FAMILIES, ModelEntry
from ..stage1.assemble import finalize, merge_decoded
from .data import TrainingData
from .distributed import default_device
from .folds import check_same_split, load_folds, split_id

logger = logging.getLogger(__name__)


def stage1_groups(members: list[LoadedMember]) -> list[list[LoadedMember]]:
    """Members grouped by family/variant (their folds are averaged), in prediction order."""
    rank = {f: i for i, f in enumerate(STAGE1_FAMILIES)}
    groups: dict[tuple[str, str], list[LoadedMember]] = {}
    for m in sorted(members, key=lambda m: (rank[m.entry.family], m.entry.variant, m.name)):
        groups.setdefault((m.entry.family, m.entry.variant), []).append(m)
    return list(groups.values())


@torch.inference_mode()
def predict_keypoints(groups: list[list[LoadedMember]], study, tta: bool = False, batch_size: int = 16) -> StudyKeypoints:
    """The study's keypoints from the stage-1 chain (fold outputs averaged before decoding)."""
    kp = StudyKeypoints(study.study_id)
    for group in groups:
        family = group[0].family
        assert isinstance(family, KeypointFamily)
        try:
            samples = family.prepare(study, kp)
        except Exception as e:  # as in the predictor: one failing family never stops a study
            logger.warning("study %s: %s prepare failed (%s: %s)", study.study_id, family.set_key, type(e).__name__, e)
            continue
        if not samples:
            continue
        outs = None
        for member in group:
            parts = []
            for k in range(0, len(samples), batch_size):
                batch = {n: t.to(member.device) for n, t in family.collate(samples[k:k + batch_size]).items()}
                with member.autocast():
                    parts.append(family.run(member.model, batch, tta=tta).float().cpu().numpy())
            o = np.concatenate(parts).astype(np.float64)
            outs = o if outs is None else outs + o
        outs = (outs / len(group)).astype(np.float32)
        sets = [family.decode(outs[i], s, study) for i, s in enumerate(samples)]
        kp = merge_decoded(family, sets, kp)
    return finalize(study, kp)


def stage1_entries(manifests: list[Manifest | str | Path] | Manifest | str | Path, folds_csv: str | Path) -> list[tuple[ModelEntry, Path]]:
    """Every stage-1 entry of ``manifests`` with its weights file, after checking that they
    were all trained on the split of ``folds_csv`` (`SplitError` naming both otherwise)."""
    if not isinstance(manifests, list):
        manifests = [manifests]
    mans = [m if isinstance(m, Manifest) else load_manifest(m) for m in manifests]
    check_same_split([(split_id(load_folds(folds_csv)), f"--folds {folds_csv}")]
                     + [(m.split, str(m.path or "manifest")) for m in mans], "--oof-keypoints manifests")
    out, names = [], set()
    for man in mans:
        for e in man.stage1:
            if e.name in names:
                raise ValueError(f"stage-1 entry {e.name!r} appears in more than one manifest")
            names.add(e.name)
            out.append((e, man.resolve(e)))
    if not out:
        raise ValueError(f"no stage-1 entry in {[str(m.path) for m in mans]}")
    return out


def predict_oof_keypoints(
    manifest: list[Manifest | str | Path] | Manifest | str | Path,
    data: TrainingData,
    folds_csv: str | Path,
    device: str | None = None,
    tta: bool = False,
    progress: bool = True,
) -> dict[int, StudyKeypoints]:
    """For every fold ``k`` of ``folds_csv``: the stage-1 chain of the manifests' fold-``k``
    entries on fold ``k``'s studies. Studies of folds without stage-1 entries are left out
    (with a warning; a stage-2 run validating on them then stops, see ``missing_keypoints``)."""
    from tqdm.auto import tqdm

    entries_all = stage1_entries(manifest, folds_csv)
    device = device or default_device()
    folds = load_folds(folds_csv)
    folds = folds[folds["study_id"].isin(data.study_ids)]
    out: dict[int, StudyKeypoints] = {}
    for k in sorted(set(folds["fold"].tolist())):
        entries = [(e, p) for e, p in entries_all if e.fold == k]
        if not entries:
            logger.warning("fold %d: no stage-1 entry of that fold in the manifests; its studies get no OOF keypoints", k)
            continue
        members = [load_member(e, p, device=device, tta=tta) for e, p in entries]
        groups = stage1_groups(members)
        ids = sorted(folds.loc[folds["fold"] == k, "study_id"].tolist())
        for sid in tqdm(ids, desc=f"oof keypoints fold {k}", unit="study", disable=not progress):
            out[int(sid)] = predict_keypoints(groups, data.study(sid), tta=tta)
    return out
