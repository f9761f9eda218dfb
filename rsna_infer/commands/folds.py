"""``rsna-infer folds --data ROOT --out folds.csv``: the one study-level fold split every
model of the ensemble shares (docs/train.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..io.labels import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="Kaggle-layout training root (train.csv, train_images/)")
    parser.add_argument("--out", type=Path, required=True, help="folds CSV to write (study_id,fold)")
    parser.add_argument("--n-folds", type=int, default=5, help="number of folds (default 5)")
    parser.add_argument("--seed", type=int, default=42, help="shuffle seed (default 42)")


def run_cli(args: argparse.Namespace) -> int:
    from ..train.data import TrainingData
    from ..train.folds import make_folds, save_folds, split_id

    try:
        data = TrainingData.open(args.data)
        folds = make_folds(data.study_ids, data.label_array(data.study_ids), args.n_folds, args.seed)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    save_folds(folds, args.out)
    sizes = folds["fold"].value_counts().sort_index()
    print(f"{len(folds)} studies in {args.n_folds} folds ({', '.join(str(int(n)) for n in sizes)}), "
          f"split {split_id(folds)} -> {args.out}")
    return 0
