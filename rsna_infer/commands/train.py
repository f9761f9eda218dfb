"""``rsna-infer train --data ROOT --config CONFIG.json --folds FOLDS.csv --fold K|all --out DIR``.

One config, some folds (``all``: every fold of the split, one after the other), one process
or one torchrun job (``torchrun --standalone --nproc_per_node=N -m rsna_infer.cli train ...``:
one process group for every fold). Folds can also be separate jobs on other GPUs or
machines with the same ``--out``. Two more modes:

- ``--oof-keypoints MANIFEST...``: the stage-1 chain (fold-``k`` models on fold-``k``
  studies) -> ``--out/keypoints_oof.npz`` for stage-2 runs (``--keypoints``);
- ``--merge MANIFEST...``: one bundle-ready folder (weights copied, relative paths), then
  ``rsna-infer fit-blend`` writes the blend into it.

See docs/train.md for the whole path from the competition data to a Kaggle bundle.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..train.config import ConfigError, load_config, parse_override

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, help="Kaggle-layout training root (train.csv, train_label_coordinates.csv, train_images/)")
    parser.add_argument("--config", type=Path, help="training config JSON (see configs/)")
    parser.add_argument("--fold", default="0",
                        help="validation fold of the split, 'all' for every fold in turn, or -1 to train on every study")
    parser.add_argument("--out", type=Path, help="run folder (weights/, manifest_f*.json, oof_f*.npz, checkpoints/, ...)")
    parser.add_argument("--folds", type=Path, default=None,
                        help="the ensemble's fold split (rsna-infer folds); without it the split is computed from the config")
    parser.add_argument("--keypoints", type=Path, nargs="*", default=[],
                        help="stage 2: out-of-fold stage-1 keypoints (keypoints_oof.npz of --oof-keypoints); validation "
                             "crops come from them, and training crops with keypoints=predicted|mixed")
    parser.add_argument("--cache", type=Path, default=None, help="decoded-study cache folder (default: ROOT/.rsna_infer_cache)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set epochs=2 --set lr=3e-4 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue each fold from its last checkpoint in --out (finished folds are kept)")
    parser.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                        help="under torchrun: how long a rank may wait for the others (default 3600)")
    parser.add_argument("--max-steps", type=int, default=None, help="cap optimiser steps per epoch (smoke tests)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars (logs only)")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="MANIFEST",
                        help="instead of training: merge these manifests into --out/weights_manifest.json, weights "
                             "copied into --out/weights/ (a bundle-ready folder for fit-blend and build_wheel.sh)")
    parser.add_argument("--no-copy", action="store_true",
                        help="with --merge: reference the weights where they are (relative paths; not a bundle)")
    parser.add_argument("--oof-keypoints", type=Path, nargs="+", default=None, metavar="MANIFEST",
                        help="instead of training: run these stage-1 manifests' fold-k models on fold k's studies "
                             "(needs --data, --folds, --out) -> --out/keypoints_oof.npz for stage-2 runs")


def _parse_fold(text: str) -> int | None:
    """``--fold``: a fold number, -1, or None for ``all``."""
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--fold must be an integer or 'all', got {text!r}") from None


def _folds_to_run(fold: int | None, folds: list[int]) -> list[int]:
    if fold is None:
        return list(folds)
    if fold != -1 and fold not in folds:
        raise ConfigError(f"--fold {fold} is not a fold of the split (folds {folds}; or -1 for every study)")
    return [fold]


def _user_errors() -> tuple[type[Exception], ...]:
    from ..io.labels import DataError
    from ..models.manifest import ManifestError
    from ..train.folds import SplitError
    from ..train.init_weights import InitError
    from ..train.trainer import TrainError
    from ..train.validation import ValidationError

    return ConfigError, DataError, SplitError, InitError, TrainError, ValidationError, ManifestError, FileNotFoundError


def run_cli(args: argparse.Namespace) -> int:
    if args.merge:
        return _merge(args)
    if args.oof_keypoints is not None:
        return _oof_keypoints(args)
    missing = [f"--{k}" for k in ("data", "config", "out") if getattr(args, k) is None]
    if missing:
        print(f"error: {', '.join(missing)} required")
        return 2
    try:
        overrides = dict(parse_override(o) for o in args.overrides)
        cfg = load_config(args.config, overrides=overrides)
        fold = _parse_fold(str(args.fold))
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    if not args.data.is_dir():
        print(f"error: --data {args.data} is not a folder")
        return 2
    from ..train.data import TrainingData
    from ..train.trainer import resolve_split, train_folds

    try:
        data = TrainingData.open(args.data, cache_dir=args.cache)
        folds = _folds_to_run(fold, resolve_split(cfg, data, args.folds).folds)
        results = train_folds(cfg, data, folds, args.out, folds_csv=args.folds, keypoints_files=args.keypoints,
                              device=args.device, max_steps=args.max_steps, progress=not args.no_progress,
                              resume=args.resume, dist_timeout_s=args.dist_timeout)
    except _user_errors() as e:
        print(f"error: {e}")
        return 2
    from ..train.distributed import env_info

    if env_info().is_main:
        for res in results:
            metric = "" if res.best_metric is None else f", val_metric {res.best_metric:.4f}"
            print(f"{res.entry.name}: epoch {res.best_epoch}{metric} -> {res.manifest_path}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from ..models.manifest import demo_entries, load_manifest
    from ..train.manifests import merge_manifests

    if args.out is None:
        print("error: --merge needs --out")
        return 2
    try:
        path = merge_manifests(args.merge, args.out / "weights_manifest.json", copy_weights=not args.no_copy)
    except _user_errors() as e:
        print(f"error: {e}")
        return 2
    man = load_manifest(path)
    demo = demo_entries(man)
    print(f"merged {len(args.merge)} manifest(s): {len(man.stage1)} stage-1 and {len(man.stage2)} stage-2 model(s), "
          f"split {man.split or 'unrecorded'} -> {path}" + ("" if args.no_copy else f" (weights copied into {args.out / 'weights'})"))
    if demo:
        print(f"warning: {len(demo)} of them are the packaged DEMO weights (by sha256), meaningless on real MRI: {', '.join(demo)}")
    return 0


def _oof_keypoints(args: argparse.Namespace) -> int:
    missing = [f"--{k}" for k in ("data", "folds", "out") if getattr(args, k) is None]
    if missing:
        print(f"error: --oof-keypoints needs {', '.join(missing)}")
        return 2
    from ..train.data import TrainingData
    from ..train.folds import load_folds, split_id
    from ..train.keypoint_store import save_keypoints
    from ..train.oof_keypoints import predict_oof_keypoints

    try:
        data = TrainingData.open(args.data, cache_dir=args.cache)
        kps = predict_oof_keypoints(list(args.oof_keypoints), data, args.folds, device=args.device,
                                    progress=not args.no_progress)
        split = split_id(load_folds(args.folds))
    except _user_errors() + (ValueError,) as e:
        print(f"error: {e}")
        return 2
    path = save_keypoints(args.out / "keypoints_oof.npz", kps, split=split)
    print(f"out-of-fold keypoints of {len(kps)} studies (split {split}) -> {path}")
    return 0
