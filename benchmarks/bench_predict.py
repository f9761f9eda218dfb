"""The main job end to end: studies/s, per-stage times and peak memory of `rsna_infer.predict`.

    python benchmarks/bench_predict.py --studies 8 24 --workers 0 2 --image-size 256 384

Writes phantom test roots (`rsna_infer.synth`, test split, one per ``--studies`` value) and a
manifest of tiny random-init models covering every family (`rsna_infer.random_weights`; or
``--manifest`` for real weights), then runs ``predict`` once per (studies, workers) pair,
each in a fresh subprocess so that peak RSS (main process, and worker processes separately)
belongs to that run alone. Prints one table row per run plus the per-stage seconds of the
run report. Peak RSS that does not grow with ``--studies`` is the streaming's memory bound.
Model time here is small (tiny models on CPU); the figures measure the pipeline around the
models: decoding, preprocessing, crops, batching, blending, writing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _one(args: argparse.Namespace) -> None:
    """Child: one predict run; prints a JSON line with the figures."""
    import torch

    torch.set_num_threads(args.threads)
    from rsna_infer import predict

    out = Path(args.out)
    t0 = time.perf_counter()
    predict(args.root, out / "submission.csv", manifest=args.manifest, device=args.device, tta=not args.no_tta,
            num_workers=args.workers_one, chunk_size=args.chunk_size, progress=False)
    wall = time.perf_counter() - t0
    rep = json.loads((out / "run_report.json").read_text())
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = rep["peak_rss_mb"]["loader"] if args.workers_one > 0 else 0.0  # from the workers themselves
    print(json.dumps({"wall_s": wall, "studies": rep["n_studies"], "studies_per_s": rep["n_studies"] / wall,
                      "loop_studies_per_s": rep["studies_per_s"], "peak_rss_mb": me, "peak_worker_rss_mb": kids,
                      "timings": rep["timings"]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", type=int, nargs="+", default=[8], help="test-set sizes (one phantom root each)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="num_workers values to compare")
    p.add_argument("--image-size", type=int, nargs=2, default=(256, 384), metavar=("MIN", "MAX"))
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-tta", action="store_true")
    p.add_argument("--manifest", default=None, help="default: tiny random-init models of every family")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--work", default=None, help="folder for the phantom roots (default: a temporary one)")
    # internal: run one configuration (the parent calls itself with these)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--workers-one", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        _one(args)
        return

    from rsna_infer.random_weights import make_random_manifest
    from rsna_infer.synth import make_dataset

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_predict_"))
    manifest = args.manifest or str(make_random_manifest(work / "tiny_manifest"))
    rows = []
    for n in args.studies:
        root = work / f"phantom_{n}"
        if not (root / "test_series_descriptions.csv").is_file():
            t = time.perf_counter()
            make_dataset(root, n, split="test", seed=args.seed, image_size=tuple(args.image_size))
            print(f"phantom root: {n} studies, {tuple(args.image_size)} px, {time.perf_counter() - t:.1f}s", file=sys.stderr)
        mb = sum(f.stat().st_size for f in (root / "test_images").rglob("*.dcm")) / 1e6
        for w in args.workers:
            cmd = [sys.executable, __file__, "--one", "--root", str(root), "--out", str(work / f"out_{n}_{w}"),
                   "--workers-one", str(w), "--manifest", manifest, "--chunk-size", str(args.chunk_size),
                   "--threads", str(args.threads), "--device", args.device] + (["--no-tta"] if args.no_tta else [])
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"run failed: studies={n} workers={w}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            r.update(n=n, workers=w, dicom_mb=mb)
            rows.append(r)
    print(f"\n{'studies':>7} {'workers':>7} {'DICOM MB':>9} {'wall s':>8} {'studies/s':>10} {'main RSS MB':>12} {'worker RSS MB':>14}")
    for r in rows:
        print(f"{r['n']:>7} {r['workers']:>7} {r['dicom_mb']:>9.1f} {r['wall_s']:>8.1f} {r['studies_per_s']:>10.2f} "
              f"{r['peak_rss_mb']:>12.0f} {r['peak_worker_rss_mb']:>14.0f}")
    for r in rows:
        print(f"\nstage seconds, studies={r['n']} workers={r['workers']}:")
        for k, v in sorted(r["timings"].items(), key=lambda kv: -kv[1]):
            if v >= 0.01:
                print(f"  {k:<40} {v:8.2f}")


if __name__ == "__main__":
    main()
