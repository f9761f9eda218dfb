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
from ..stage1.chain import Stage1Group, default_finalize, group_key, stage1_chain
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


def _warn(where: str, study_id: int, exc: BaseException) -> None:
    """As in the predictor: one failing step costs that study that step's keypoints, no more."""
    logger.warning("study %s: %s failed (%s: %s)", study_id, where, type(exc).__name__, exc)


@torch.inference_mode()
def predict_keypoints(groups: list[list[LoadedMember]], study, tta: bool = False, batch_size: int = 16) -> StudyKeypoints:
    """The study's keypoints from the stage-1 chain (`rsna_infer.stage1.chain.stage1_chain`:
    fold outputs averaged before decoding, then merge and finalize)."""
    sid = study.study_id
    chain = []
    for group in groups:
        family = group[0].family
        assert isinstance(family, KeypointFamily)
        chain.append(Stage1Group(group_key(family), family, group))

    def samples(g: Stage1Group, kps: dict[int, StudyKeypoints]) -> list:
        try:
            return [(sid, s) for s in g.family.prepare(study, kps[sid])]
        except Exception as e:
            _warn(f"prepare {g.key}", sid, e)
            return []

    def run(g: Stage1Group, items: list) -> list[list[np.ndarray]]:
        samples_ = [s for _, s in items]
        runs = []
        for member in g.folds:
            parts = []
            for k in range(0, len(samples_), batch_size):
                batch = {n: t.to(member.device) for n, t in g.family.collate(samples_[k:k + batch_size]).items()}
                with member.autocast():
                    parts.append(g.family.run(member.model, batch, tta=tta).float().cpu().numpy())
            runs.append(list(np.concatenate(parts)))
        return runs

    return stage1_chain({sid: study}, chain, samples, run, default_finalize(), on_error=_warn)[sid]


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
