"""``rsna-infer demo``: phantom test set -> predict with the packaged demo weights -> score
against the prior-only and uniform baselines, keypoint errors in mm (`rsna_infer.demo`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..demo import DemoWeightsMissing, format_result, run_demo
from ..output import atomic_write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--studies", type=int, default=20, help="phantom test studies (default 20)")
    parser.add_argument("--seed", type=int, default=None, help="phantom seed (default: the demo's test seed, never used in training)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the phantom, submission and run report here (default: a temp dir)")
    parser.add_argument("--manifest", type=Path, default=None, help="demo manifest (default: the packaged one)")
    parser.add_argument("--device", default="cpu", help="device for predict (default: cpu)")
    parser.add_argument("--no-tta", action="store_true", help="no flip TTA")
    parser.add_argument("--workers", type=int, default=0, help="predict preprocessing processes (default 0: in-process)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument("--mirror", action="store_true",
                        help="also predict the studies mirrored left/right in patient coordinates and compare the grades")


def run_cli(args: argparse.Namespace) -> int:
    if args.studies < 1:
        print("error: --studies must be >= 1")
        return 2
    try:
        res = run_demo(args.studies, args.seed, args.workdir, args.manifest, args.device, not args.no_tta, args.workers,
                       mirror=args.mirror)
    except DemoWeightsMissing as e:
        print(f"error: {e}")
        return 1
    except ValueError as e:
        print(f"error: {e}")
        return 2
    print(format_result(res))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(res.figures(), indent=1) + "\n")
    return 0
