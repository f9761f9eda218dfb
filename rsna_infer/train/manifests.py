"""Putting fold runs together: merge per-fold manifests into one bundle-ready folder, name
members, and write blend weights into entries.

``rsna-infer train --merge runs/*/manifest_f*.json --out DIR`` copies every weight file into
``DIR/weights/`` and writes ``DIR/weights_manifest.json`` with paths relative to it, so that
``DIR`` is self-contained: ``rsna-infer fit-blend ... --manifest DIR/weights_manifest.json``
writes the blend into it and ``build_wheel.sh DIR OUT`` takes it as is. The inputs must come
from one fold split (checked by id).

A *member* of the ensemble is one config (``name``); its folds are the entries
``{name}_f{k}``. The blend (`rsna_infer.models.ensemble`) weighs every entry, so a member's weight
in a group is spread evenly over its fold entries: a 5-fold member and a 1-fold member with
equal fitted weights count equally.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..constants import GROUPS
from ..models.manifest import Manifest, ManifestError, demo_entries, load_manifest, save_manifest
from ..output import atomic_copy
from ..specs import ModelEntry
from .folds import check_same_split

logger = logging.getLogger(__name__)

_FOLD_SUFFIX = re.compile(r"_(f\d+|all)$")


def member_name(entry: ModelEntry | str) -> str:
    """``roi_spinal_f3`` -> ``roi_spinal`` (the config name an entry was trained from)."""
    name = entry if isinstance(entry, str) else entry.name
    return _FOLD_SUFFIX.sub("", name)


def merge_manifests(
    paths: list[str | Path],
    out_path: str | Path,
    *,
    copy_weights: bool = True,
    notes: str | None = None,
    priors: np.ndarray | None = None,
) -> Path:
    """One manifest with every entry of ``paths`` (names must be unique), weight files
    copied into ``out_path``'s ``weights/`` folder (``copy_weights=False``: referenced where
    they are, relative to ``out_path``; not a bundle). The inputs must share one fold split
    (`SplitError` naming both otherwise); the merged manifest records it. Priors: ``priors``
    if given, else the mean of the inputs' fitted priors."""
    out_path = Path(out_path).expanduser().resolve()
    root = out_path.parent
    models: list[ModelEntry] = []
    fitted = []
    note_parts = []
    mans = [load_manifest(p, verify=copy_weights) for p in paths]
    split = check_same_split([(m.split, str(m.path)) for m in mans], "merged manifests")
    for man in mans:
        if man.priors_given:
            fitted.append(man.priors)
        if man.notes:
            note_parts.append(man.notes)
        for m in man.models:
            src = man.resolve(m).resolve()
            if copy_weights:
                dest = root / "weights" / f"{m.name}.safetensors"
                dest.parent.mkdir(parents=True, exist_ok=True)
                if dest.resolve() != src:
                    atomic_copy(src, dest)
                src = dest
            models.append(replace(m, file=Path(os.path.relpath(src, root)).as_posix()))
    names = [m.name for m in models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ManifestError(f"cannot merge: model name(s) {dup} appear in more than one input manifest")
    if priors is None and fitted:
        priors = np.mean(fitted, axis=0)
    merged = Manifest(
        models=sorted(models, key=lambda m: (m.stage, m.family, m.variant, m.name)),
        priors=priors if priors is not None else Manifest().priors,
        notes=notes if notes is not None else "; ".join(dict.fromkeys(note_parts)),
        root=root,
        priors_given=priors is not None,
        split=split,
    )
    if copy_weights:
        kept = {Path(m.file).name for m in models}
        stale = sorted(p.name for p in (root / "weights").glob("*.safetensors") if p.name not in kept)
        if stale:  # not deleted (the folder may be someone's run folder); build_wheel.sh would ship them
            logger.warning("%s holds %d weight file(s) the merged manifest does not use (a previous merge?); delete them "
                           "before building the bundle: %s", root / "weights", len(stale), ", ".join(stale[:5]))
    demo = demo_entries(merged)
    if demo:
        logger.warning("merged manifest %s holds %d DEMO model(s) (packaged phantom-trained weights, recognised by sha256): %s",
                       out_path, len(demo), ", ".join(demo))
    return save_manifest(merged, out_path)


def set_blend_weights(manifest: Manifest, weights: dict[str, dict[str, float]],
                      prior_groups: Sequence[str] = ()) -> Manifest:
    """Copy of ``manifest`` whose stage-2 entries carry ``weights[member][group]``, divided
    by the member's number of fold entries. Members not in ``weights`` get weight 0.
    ``prior_groups``: the groups the fit gave the class priors (every weight there 0)."""
    counts: dict[str, int] = {}
    for m in manifest.stage2:
        counts[member_name(m)] = counts.get(member_name(m), 0) + 1
    unknown = sorted(set(weights) - set(counts))
    if unknown:
        raise ManifestError(f"blend weights for member(s) {unknown} that the manifest does not hold; it has {sorted(counts)}")
    models = []
    for m in manifest.models:
        if m.stage == 2:
            w = weights.get(member_name(m), {})
            m = replace(m, blend={g: round(float(w.get(g, 0.0)) / counts[member_name(m)], 6) for g in GROUPS})
        models.append(m)
    return replace(manifest, models=models, prior_groups=tuple(prior_groups))
