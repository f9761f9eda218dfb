"""``rsna-infer predict``: the main job from the command line.

The run's flags are generated from `rsna_infer.settings.RunSettings` (one per option that
declares a flag); this module adds only the run's three paths (the test root, ``--out``,
``--manifest``) and turns a configuration or path error into one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .. import settings

if TYPE_CHECKING:
    from ..stage1.chain import Finalize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("test_dir", type=Path, help="Kaggle-layout root holding test_images/ and test_series_descriptions.csv")
    parser.add_argument("--out", type=Path, default=Path("submission.csv"),
                        help="submission CSV (default: submission.csv); run_report.json goes beside it")
    parser.add_argument("--manifest", type=Path, default=None,
                        help="weights manifest JSON (default: $RSNA_INFER_MANIFEST, else the packaged demo weights)")
    settings.add_arguments(parser)


def run_cli(args: argparse.Namespace, *, finalize: "Finalize | None" = None) -> int:
    """Exit 0 with a complete CSV; 1 with one line on stderr saying what to fix.
    ``finalize``: the stage-1 finalisation (`rsna_infer.api.predict`'s; tests with fake
    families pass one that keeps their keypoints)."""
    from ..api import predict
    from ..models.manifest import ManifestError
    from ..output import OutputError
    from ..runtime.devices import DeviceError
    from ..viz import VizUnavailable

    try:
        run = settings.RunSettings.from_cli(args)
        df = predict(args.test_dir, out_csv=args.out, manifest=args.manifest, settings=run, finalize=finalize)
    except (ManifestError, DeviceError, OutputError, FileNotFoundError, ValueError, OSError, VizUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({len(df)} rows) and {args.out.with_name('run_report.json')}")
    if args.qa_dir is not None:
        print(f"QA pages: {args.qa_dir / 'index.html'}")
    return 0
