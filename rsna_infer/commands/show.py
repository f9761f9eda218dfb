"""``rsna-infer show``: the QA page of one study (what the models saw, where the points landed).

It runs `rsna_infer.predict` on that study alone (in-process) with ``qa_dir=OUT`` and
``qa_worst=1``, so the page shows exactly what a full run computes for it; ``OUT`` also gets
the study's ``submission.csv`` and ``run_report.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("test_dir", type=Path, help="Kaggle-layout root (holds {split}_images/ and {split}_series_descriptions.csv)")
    parser.add_argument("--study", type=int, required=True, metavar="ID", help="study id to show")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for study_ID.html, its PNGs, index.html")
    parser.add_argument("--manifest", type=Path, default=None, help="weights manifest JSON (default: $RSNA_INFER_MANIFEST, else the packaged demo weights)")
    parser.add_argument("--labels", type=Path, default=None, metavar="CSV", help="train_label_coordinates.csv: draw the ground-truth points too")
    parser.add_argument("--split", default="test", help="which {split}_images folder to read (default: test; train for labelled studies)")
    parser.add_argument("--device", default=None, help="cuda | cuda:1 | cpu (default: a GPU if there is one, else CPU)")
    parser.add_argument("--no-tta", action="store_true", help="no flip TTA")


def run_cli(args: argparse.Namespace) -> int:
    from ..api import predict
    from ..models.manifest import ManifestError
    from ..viz import VizUnavailable

    out: Path = args.out
    try:
        predict(args.test_dir, out_csv=out / "submission.csv", manifest=args.manifest, device=args.device,
                tta=not args.no_tta, num_workers=0, split=args.split, progress=False, study_ids=[args.study],
                qa_dir=out, qa_worst=1, qa_labels=args.labels)
    except (ManifestError, FileNotFoundError, ValueError, VizUnavailable) as e:
        print(f"error: {e}")
        return 1
    page = out / f"study_{args.study}.html"
    if not page.is_file():
        print(f"error: the page {page} was not written (see the log above)")
        return 1
    print(f"wrote {page} (pictures in {out / f'study_{args.study}'}) and {out / 'index.html'}")
    return 0
