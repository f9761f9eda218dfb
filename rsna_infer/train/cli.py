"""``rsna-infer train --data ROOT --config CONFIG.json --fold K --out DIR``.

One config, one fold, one process (or one torchrun job: ``torchrun --nproc_per_node=N
-m rsna_infer.cli train ...``). Folds are independent jobs: run them in parallel on
different GPUs or machines with the same ``--out`` and merge their manifests afterwards
(``--merge``), then fit the blend on their out-of-fold files (``rsna-infer fit-blend``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .config import ConfigError, load_config, parse_override

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, help="Kaggle-layout training root (train.csv, train_label_coordinates.csv, train_images/)")
    parser.add_argument("--config", type=Path, help="training config JSON (see configs/)")
    parser.add_argument("--fold", default="0",
                        help="validation fold (0..n_folds-1), 'all' for every fold in turn, or -1 to train on every study")
    parser.add_argument("--out", type=Path, help="run folder (weights/, manifest_f*.json, oof_f*.npz, history, folds.csv)")
    parser.add_argument("--folds", type=Path, default=None, help="reuse this folds.csv instead of computing the split")
    parser.add_argument("--keypoints", type=Path, nargs="*", default=[],
                        help="stage 2 with keypoints=predicted|mixed: out-of-fold keypoints_oof_f*.npz files of stage-1 runs")
    parser.add_argument("--cache", type=Path, default=None, help="decoded-study cache folder (default: ROOT/.rsna_infer_cache)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set epochs=2 --set lr=3e-4 (repeatable)")
    parser.add_argument("--max-steps", type=int, default=None, help="cap optimiser steps per epoch (smoke tests)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars (logs only)")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="MANIFEST",
                        help="instead of training: merge these per-fold manifests into --out/weights_manifest.json")
    parser.add_argument("--oof-keypoints", type=Path, default=None, metavar="MANIFEST",
                        help="instead of training: run this stage-1 manifest's fold-k models on fold k's studies "
                             "(needs --data, --folds, --out) -> --out/keypoints_oof.npz for stage-2 runs")


def _folds_to_run(text: str, n_folds: int) -> list[int]:
    if text == "all":
        return list(range(n_folds))
    try:
        k = int(text)
    except ValueError:
        raise ConfigError(f"--fold must be an integer or 'all', got {text!r}") from None
    if not -1 <= k < n_folds:
        raise ConfigError(f"--fold {k} is outside 0..{n_folds - 1} (or -1 for every study)")
    return [k]


def run_cli(args: argparse.Namespace) -> int:
    from .manifests import merge_manifests

    if args.merge:
        if args.out is None:
            print("error: --merge needs --out")
            return 2
        path = merge_manifests(args.merge, args.out / "weights_manifest.json")
        print(f"merged {len(args.merge)} manifest(s) -> {path}")
        return 0
    if args.oof_keypoints is not None:
        return _oof_keypoints(args)
    missing = [f"--{k}" for k in ("data", "config", "out") if getattr(args, k) is None]
    if missing:
        print(f"error: {', '.join(missing)} required")
        return 2
    try:
        overrides = dict(parse_override(o) for o in args.overrides)
        cfg = load_config(args.config, overrides=overrides)
        folds = _folds_to_run(str(args.fold), cfg.n_folds)
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    if not args.data.is_dir():
        print(f"error: --data {args.data} is not a folder")
        return 2
    from .data import TrainingData
    from .trainer import train_fold

    data = TrainingData.open(args.data, cache_dir=args.cache)
    for k in folds:
        res = train_fold(cfg, data, k, args.out, folds_csv=args.folds,
                         keypoints_files=args.keypoints, device=args.device, max_steps=args.max_steps,
                         progress=not args.no_progress)
        metric = "" if res.best_metric is None else f", val_metric {res.best_metric:.4f}"
        print(f"{res.entry.name}: epoch {res.best_epoch}{metric} -> {res.manifest_path}")
    return 0


def _oof_keypoints(args: argparse.Namespace) -> int:
    missing = [f"--{k}" for k in ("data", "folds", "out") if getattr(args, k) is None]
    if missing:
        print(f"error: --oof-keypoints needs {', '.join(missing)}")
        return 2
    from .data import TrainingData
    from .keypoint_store import save_keypoints
    from .oof_keypoints import predict_oof_keypoints

    data = TrainingData.open(args.data, cache_dir=args.cache)
    kps = predict_oof_keypoints(args.oof_keypoints, data, args.folds, device=args.device or "cpu",
                                progress=not args.no_progress)
    path = save_keypoints(args.out / "keypoints_oof.npz", kps)
    print(f"out-of-fold keypoints of {len(kps)} studies -> {path}")
    return 0
