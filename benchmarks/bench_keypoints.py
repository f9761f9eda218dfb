"""Keypoint accuracy and left/right mirror consistency of an ensemble on fresh phantom studies.

    python benchmarks/bench_keypoints.py                      # packaged demo weights, 30 studies
    python benchmarks/bench_keypoints.py --studies 30 --mirror --json kp.json
    python benchmarks/bench_keypoints.py --manifest runs/weights_manifest.json --no-tta

1. Writes a fresh phantom *test* set (``--seed``, never a training seed of the demo weights)
   with the demo's phantom options plus the realism switches (`REALISM`: second axial
   series, several tilted axial stacks, mirrored/swapped in-plane axes, descending instance
   numbers, mixed matrix sizes, mixed transfer syntaxes, dropped optional tags, stray and
   truncated files; a missing series is left out because it makes some points unknowable).
2. Runs `rsna_infer.predict` and compares the merged keypoints of ``run_report.json``
   (``best/<kind>``) with the phantom's true 3-D points (`rsna_infer.demo.keypoint_stats`): per
   kind the mean, median, p90 and max distance (mm), the through-plane part (along patient x
   for the sagittal kinds, along patient z for the axial one, i.e. roughly along the slice
   normal), the fraction of true points predicted, and which sets the points came from.
3. With ``--mirror``: writes the same studies mirrored left<->right in patient coordinates
   (`rsna_infer.demo.mirror_root`: every DICOM's ImagePositionPatient and ImageOrientationPatient
   x components negated, pixels untouched), predicts them too, and prints the mean
   |p_mirrored - p_original| over the sided rows (foraminal, subarticular) with left/right
   rows swapped and unswapped. A model that grades the mirror as the mirror of the original
   has a swapped figure near 0; the issue-14 target is swapped <= 0.3 x unswapped.

Figures are printed (and written with ``--json``); nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: Realism switches of the benchmark phantom (on top of the demo weights' phantom options).
REALISM: dict[str, Any] = {
    "missing_series_rate": 0.0,  # a study without, say, T2 has spinal points no model can see
    "second_axial_rate": 0.3,
    "multi_stack_rate": 0.3,
    "flipped_axes_rate": 0.3,
    "descending_instance_rate": 0.3,
    "mixed_slice_size_rate": 0.1,
    "transfer_syntax": "mixed",
    "missing_tags_rate": 0.2,
    "truncated_file_rate": 0.1,
    "stray_file_rate": 0.1,
}
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", type=int, default=30)
    p.add_argument("--seed", type=int, default=4242, help="phantom seed (must not be a training seed)")
    p.add_argument("--manifest", type=Path, default=None, help="default: the packaged demo weights")
    p.add_argument("--mirror", action="store_true", help="also predict the left/right mirrored studies")
    p.add_argument("--plain", action="store_true", help="no realism switches (the demo's own phantom options)")
    p.add_argument("--no-tta", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="keep the phantom roots and reports here")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    torch.set_num_threads(args.threads)
    from rsna_infer import predict
    from rsna_infer.demo import check_demo_weights, keypoint_stats, load_settings, mirror_figures, mirror_root
    from rsna_infer.synth import load_keypoints_world, make_dataset

    man = check_demo_weights(args.manifest)
    try:
        settings = load_settings(man)
    except FileNotFoundError:
        settings = {}
    if args.seed in settings.get("train_seeds", []):
        raise SystemExit(f"seed {args.seed} trained these weights; pick another")
    options = {**settings.get("synth_options", {}), **({} if args.plain else REALISM)}
    tmp = tempfile.TemporaryDirectory(prefix="bench_kp_") if args.work is None else None
    work = Path(tmp.name) if tmp is not None else args.work
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"studies": args.studies, "seed": args.seed, "manifest": str(man), "options": options,
                              "tta": not args.no_tta}
    try:
        root = work / "phantom"
        make_dataset(root, args.studies, split="test", seed=args.seed, progress=False, **options)
        t0 = time.perf_counter()
        sub = predict(root, root / "submission.csv", manifest=man, device="cpu", tta=not args.no_tta, num_workers=0,
                      progress=False)
        result["predict_s"] = time.perf_counter() - t0
        report = json.loads((root / "run_report.json").read_text())
        result["keypoints"] = keypoint_stats(report, load_keypoints_world(root, "test"))
        if args.mirror:
            mroot = work / "phantom_mirrored"
            mirror_root(root, mroot)
            sub_m = predict(mroot, mroot / "submission.csv", manifest=man, device="cpu", tta=not args.no_tta,
                            num_workers=0, progress=False)
            result["mirror"] = mirror_figures(sub, sub_m)
    finally:
        if tmp is not None:
            tmp.cleanup()

    print(f"{args.studies} phantom studies (seed {args.seed}{', realism switches on' if not args.plain else ''}), "
          f"TTA {'on' if not args.no_tta else 'off'}, predict {result['predict_s']:.1f} s")
    print(f"{'kind':<13}{'mean':>7}{'p50':>7}{'p90':>7}{'max':>7}{'through':>9}{'found':>7}  origin of the points")
    for kind, s in result["keypoints"].items():
        origin = ", ".join(f"{k} {v}" for k, v in s["origin"].items())
        print(f"{kind:<13}{s['mean_mm']:7.2f}{s['p50_mm']:7.2f}{s['p90_mm']:7.2f}{s['max_mm']:7.2f}"
              f"{s['through_mm']:9.2f}{100 * s['found']:6.0f}%  {origin}")
    if "mirror" in result:
        m = result["mirror"]
        print(f"mirror: mean |dp| sided rows, left/right swapped {m['swapped']:.4f}, unswapped {m['unswapped']:.4f}, "
              f"ratio {m['ratio']:.3f} (spinal rows {m['spinal']:.4f})")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
