"""``rsna-infer estimate --manifest M.json --studies 2000 --gpu t4 [--gpus 2]``: will this
ensemble finish inside the Kaggle limit, and what to shed if not (docs/speed.md)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..estimate import DEFAULT_BUDGET_HOURS, GPU_KINDS, StudyGeometry, estimate, format_estimate

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", type=Path, default=None,
                        help="weights manifest JSON; weight files need not exist (default: $RSNA_INFER_MANIFEST, else the packaged demo)")
    parser.add_argument("--studies", type=int, default=2000, help="test-set size to project (default 2000)")
    parser.add_argument("--gpu", choices=sorted(GPU_KINDS), default="t4", help="GPU kind (default t4)")
    parser.add_argument("--gpus", type=int, default=1, help="number of cards; studies are sharded over them (default 1)")
    parser.add_argument("--no-tta", action="store_true", help="project without flip TTA")
    parser.add_argument("--cpus", type=int, default=4, help="CPUs of the target machine (default 4, Kaggle)")
    parser.add_argument("--calibration", type=Path, default=None, help="calibration JSON written by benchmarks/gpu_check.py")
    parser.add_argument("--budget-hours", type=float, default=DEFAULT_BUDGET_HOURS,
                        help=f"time budget given to the deadline guard (default {DEFAULT_BUDGET_HOURS})")
    d = StudyGeometry()
    parser.add_argument("--sagittal-slices", type=int, default=d.sagittal_slices, help=f"typical study: slices per sagittal series (default {d.sagittal_slices})")
    parser.add_argument("--axial-slices", type=int, default=d.axial_slices, help=f"typical study: slices per axial series (default {d.axial_slices})")
    parser.add_argument("--image-px", type=int, default=d.image_px, help=f"typical study: rows = columns of every slice (default {d.image_px})")
    parser.add_argument("--no-cpu-measure", action="store_true", help="skip the decode measurement on phantom studies")
    parser.add_argument("--batch-size", type=int, default=32, help="the predictor's batch size on the card, for device memory (default 32)")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")


def run_cli(args: argparse.Namespace) -> int:
    from ..models.manifest import ManifestError, resolve_manifest_path

    try:
        path, is_demo = resolve_manifest_path(args.manifest)
        if is_demo:
            logger.warning("no --manifest: estimating the packaged demo ensemble")
        geometry = StudyGeometry(sagittal_slices=args.sagittal_slices, axial_slices=args.axial_slices, image_px=args.image_px)
        est = estimate(path, args.studies, gpu=args.gpu, gpus=args.gpus, tta=not args.no_tta, cpus=args.cpus,
                       calibration=args.calibration, geometry=geometry, measure_cpu=not args.no_cpu_measure,
                       budget_hours=args.budget_hours, batch_size=args.batch_size)
    except (ManifestError, ValueError) as e:
        print(f"error: {e}")
        return 1
    print(json.dumps(est.to_dict(), indent=1) if args.json else format_estimate(est))
    return 0
