"""``rsna-infer score``: score a submission CSV against train.csv-style labels or a solution CSV.

Torch-free: the metric is numpy and pandas only.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pandas as pd

from ..metric import COMPONENTS, ScoringError, labels_to_solution, score_components, submission_studies

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("submission", type=Path, help="submission CSV: row_id,normal_mild,moderate,severe")
    truth = parser.add_mutually_exclusive_group(required=True)
    truth.add_argument("--labels", type=Path, help="train.csv-style labels (study_id + 25 label columns; blanks unscored)")
    truth.add_argument("--solution", type=Path, help="solution CSV in the metric's format: row_id,normal_mild,moderate,severe,sample_weight")
    parser.add_argument(
        "--all-studies",
        action="store_true",
        help="with --labels: require every labelled study in the submission (default: score the studies the submission holds)",
    )
    parser.add_argument("--any-severe-scalar", type=float, default=1.0, help="weight of the any_severe_spinal loss (Kaggle: 1.0)")
    parser.add_argument("--no-renormalize", action="store_true", help="do not divide rows by their sum (scikit-learn >= 1.5 semantics)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise ScoringError(f"{what} file {path} does not exist")
    return pd.read_csv(path)


def run_cli(args: argparse.Namespace) -> int:
    """Score a submission CSV; print the total and the four components. Exit 2 on bad input."""
    try:
        submission = _read_csv(args.submission, "submission")
        if args.solution is not None:
            solution = _read_csv(args.solution, "solution")
            scope = f"solution {args.solution}"
        else:
            labels = _read_csv(args.labels, "labels")
            study_ids = None
            if not args.all_studies:
                study_ids = submission_studies(submission)
            solution = labels_to_solution(labels, study_ids)
            n_label = len(labels)
            n_scored = n_label if study_ids is None else len(study_ids)
            scope = f"labels {args.labels}: {n_scored} of {n_label} studies"
        result = score_components(
            solution, submission, any_severe_scalar=args.any_severe_scalar, renormalize=not args.no_renormalize
        )
    except ScoringError as err:
        logger.error("%s", err)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"scored {args.submission} against {scope}")
        for name in COMPONENTS:
            print(f"  {name:<18} {result[name]:.6f}")
        print(f"  {'total':<18} {result['total']:.6f}")
    return 0
