"""``rsna-infer cache --data ROOT [--cache DIR] [--workers N]``: decode every training study
once into the training cache, in parallel (docs/train.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..io.labels import DataError
from ..io.parallel import usable_cpus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="Kaggle-layout training root")
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (default: ROOT/.rsna_infer_cache)")
    parser.add_argument("--workers", type=int, default=usable_cpus(), help="decoding processes (default: every usable core)")
    parser.add_argument("--no-progress", action="store_true")


def run_cli(args: argparse.Namespace) -> int:
    from ..train.data import TrainingData

    try:
        data = TrainingData.open(args.data, cache_dir=args.cache)
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    before = sum(data.cache.path(s).is_file() for s in data.study_ids)
    done = data.cache.ensure(data.study_ids, progress=not args.no_progress, workers=max(0, args.workers))
    missing = sum(not data.cache.path(s).is_file() for s in data.study_ids)
    print(f"{len(data.study_ids)} studies: {before} were cached, {done} decoded now"
          f"{f', {missing} NOT decodable (see the warnings; training skips them)' if missing else ''} -> {data.cache.cache_dir}")
    return 0
