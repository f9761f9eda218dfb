"""The main job end to end at realistic sizes: per-stage wall and CPU seconds, studies/s,
peak RSS, and non-model time against a plain decode of the same files.

    python benchmarks/bench_predict.py --studies 20 60 --workers 0          # the baseline in README
    python benchmarks/bench_predict.py --studies 20 --workers 0 1 --json

Writes phantom test roots (`rsna_infer.synth`, test split, 384-512 px by default, 15-21
sagittal and ~30-45 axial slices per series, a second axial series in ``--second-axial-rate``
of the studies) and a manifest of tiny random-init models covering every family
(`rsna_infer.models.random_weights`; or ``--manifest``), then runs ``predict`` in a fresh subprocess
per (studies, workers) pair, so that peak RSS belongs to that run alone. Each configuration
runs twice:

1. **wall pass**: the run report's stage timers as they are (wall seconds), the run's wall
   time, studies/s, peak RSS of the main process and of the loading workers, and the CPU
   seconds of the whole process tree (``getrusage``);
2. **CPU pass** (skip with ``--no-cpu-pass``): the same run with ``time.perf_counter``
   replaced by ``time.thread_time`` in the child, so the very same stage timers read the CPU
   seconds of the thread that ran each stage (workers are forked and inherit it). With one
   torch thread (``--threads 1``, default) that is each stage's CPU time.

The reference is a plain ``pydicom.dcmread(f).pixel_array`` loop over every file of the
root (wall and CPU), run in the same child just before ``predict`` so both see the same load
on a shared machine. **Non-model time** = run wall - model setup - model forwards (the
``*/run`` timers); the issue-15 target is non-model time <= 1.5 x the plain decode, and peak
RSS flat (+-10 %) as the study count grows. Model time is small here (tiny models on the
CPU): the figures measure the pipeline around the models.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child(args: argparse.Namespace) -> None:
    """One predict run; prints a JSON line with the figures."""
    import torch

    torch.set_num_threads(args.threads)
    if args.cpu_clock:  # every stage timer now reads the CPU seconds of its own thread
        time.perf_counter = time.thread_time  # type: ignore[assignment]
    from rsna_infer import predict

    out = Path(args.out)
    plain = None
    if not args.cpu_clock:  # the reference, in the same process just before the run
        from rsna_infer.estimate.host import plain_decode

        plain = plain_decode(sorted(Path(args.root, "test_images").rglob("*.dcm"))).to_dict()
    w0 = time.monotonic()
    r0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    predict(args.root, out / "submission.csv", manifest=args.manifest, device=args.device, tta=not args.no_tta,
            num_workers=args.workers_one, chunk_size=args.chunk_size, progress=False)
    wall = time.monotonic() - w0
    rep = json.loads((out / "run_report.json").read_text())
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(r.ru_utime + r.ru_stime for r in (me, kids)) - sum(r.ru_utime + r.ru_stime for r in r0)
    print(json.dumps({
        "wall_s": wall, "studies": rep["n_studies"], "timings": rep["timings"],
        "peak_rss_mb": me.ru_maxrss / 1024, "peak_worker_rss_mb": rep["peak_rss_mb"].get("loader", 0.0) if args.workers_one else 0.0,
        "cpu_s": cpu,  # of predict (this process + finished workers), imports before it excluded
        "summary": rep.get("summary", {}), "plain_decode": plain,
    }))


def _run_child(args: argparse.Namespace, root: Path, out: Path, workers: int, manifest: str, cpu_clock: bool) -> dict:
    cmd = [sys.executable, __file__, "--one", "--root", str(root), "--out", str(out), "--workers-one", str(workers),
           "--manifest", manifest, "--chunk-size", str(args.chunk_size), "--threads", str(args.threads),
           "--device", args.device] + (["--no-tta"] if args.no_tta else []) + (["--cpu-clock"] if cpu_clock else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if res.returncode != 0:
        print(res.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"run failed: root={root} workers={workers} cpu_clock={cpu_clock}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _root_facts(root: Path) -> dict:
    """Files, MB and slices per series type of a phantom root."""
    from rsna_infer.constants import AXIAL_T2, SAG_T1, SAG_T2
    from rsna_infer.io import discover_studies

    refs = discover_studies(root, split="test")
    n = max(1, len(refs))
    files = list((root / "test_images").rglob("*.dcm"))
    axial = [s for r in refs for s in r.of_type(AXIAL_T2)]
    sag = [s for r in refs for t in (SAG_T1, SAG_T2) for s in r.of_type(t)]
    return {
        "files": len(files), "dicom_mb": sum(f.stat().st_size for f in files) / 1e6,
        "sagittal_slices_per_series": sum(s.n_files for s in sag) / max(1, len(sag)),
        "axial_slices_per_series": sum(s.n_files for s in axial) / max(1, len(axial)),
        "axial_series_per_study": len(axial) / n,
    }


def _non_model(run: dict, total: float) -> tuple[float, float, float]:
    """(setup, model forwards, everything else) seconds of one pass out of its ``total``."""
    t = run["timings"]
    model = sum(v for k, v in t.items() if k.endswith("/run"))
    setup = t.get("setup/models", 0.0)
    return setup, model, total - setup - model


def _figures(n: int, wall: dict, cpu: dict | None) -> dict:
    t = wall["timings"]
    plain = wall["plain_decode"]
    setup, model, non_model = _non_model(wall, wall["wall_s"])
    non_model_cpu = None if cpu is None else _non_model(cpu, cpu["cpu_s"])[2]  # the CPU pass: timers on CPU clocks
    stages = {k: {"wall_s": round(v, 3), "cpu_s": None if cpu is None else round(cpu["timings"].get(k, 0.0), 3)}
              for k, v in sorted(t.items(), key=lambda kv: -kv[1])}
    return {
        "wall_s": round(wall["wall_s"], 2), "cpu_s_total": round(wall["cpu_s"], 2), "setup_s": round(setup, 2),
        "model_s": round(model, 2), "non_model_s": round(non_model, 2),
        "studies_per_s": round(n / wall["wall_s"], 3),
        "studies_per_s_after_setup": round(n / max(1e-9, wall["wall_s"] - setup), 3),
        "non_model_over_plain_decode": round(non_model / plain["wall_s"], 2) if plain["wall_s"] > 0 else None,
        "non_model_cpu_s": None if non_model_cpu is None else round(non_model_cpu, 2),
        "non_model_over_plain_decode_cpu": None if non_model_cpu is None or plain["cpu_s"] <= 0 else round(non_model_cpu / plain["cpu_s"], 2),
        "peak_rss_mb": round(wall["peak_rss_mb"]), "peak_worker_rss_mb": round(wall["peak_worker_rss_mb"]),
        "plain_decode": plain, "stages": stages, "summary": wall.get("summary", {}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", type=int, nargs="+", default=[20], help="test-set sizes (one phantom root each)")
    p.add_argument("--workers", type=int, nargs="+", default=[0], help="num_workers values to compare")
    p.add_argument("--image-size", type=int, nargs=2, default=(384, 512), metavar=("MIN", "MAX"))
    p.add_argument("--second-axial-rate", type=float, default=0.2, help="share of studies with a second axial series")
    p.add_argument("--chunk-size", type=int, default=16, help="studies per chunk (predict's default 16)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-tta", action="store_true")
    p.add_argument("--no-cpu-pass", action="store_true", help="skip the second run that reads the stage timers on a CPU clock")
    p.add_argument("--manifest", default=None, help="default: tiny random-init models of every family")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--work", default=None, help="folder for the phantom roots (default: a temporary one; reused when given)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    # internal: run one configuration (the parent calls itself with these)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cpu-clock", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--workers-one", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        _child(args)
        return

    from rsna_infer.models.random_weights import make_random_manifest
    from rsna_infer.synth import make_dataset

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_predict_"))
    manifest = args.manifest or str(make_random_manifest(work / "tiny_manifest"))
    rows = []
    for n in args.studies:
        root = work / f"phantom_{n}_{args.image_size[0]}_{args.image_size[1]}"
        if not (root / "test_series_descriptions.csv").is_file():
            t = time.perf_counter()
            make_dataset(root, n, split="test", seed=args.seed, image_size=tuple(args.image_size),
                         second_axial_rate=args.second_axial_rate)
            print(f"phantom root: {n} studies, {tuple(args.image_size)} px, {time.perf_counter() - t:.1f}s", file=sys.stderr)
        facts = _root_facts(root)
        for w in args.workers:
            wall = _run_child(args, root, work / f"out_{n}_{w}", w, manifest, cpu_clock=False)
            cpu = None if args.no_cpu_pass else _run_child(args, root, work / f"out_{n}_{w}_cpu", w, manifest, cpu_clock=True)
            rows.append({"studies": n, "workers": w, **{k: round(v, 2) for k, v in facts.items()}, **_figures(n, wall, cpu)})
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"\n{'studies':>7} {'workers':>7} {'DICOM MB':>9} {'wall s':>7} {'CPU s':>7} {'studies/s':>9} {'model s':>8} "
          f"{'non-model s':>11} {'plain decode s':>14} {'ratio':>6} {'CPU ratio':>9} {'RSS MB':>7} {'worker RSS':>10}")
    for r in rows:
        print(f"{r['studies']:>7} {r['workers']:>7} {r['dicom_mb']:>9.0f} {r['wall_s']:>7.1f} {r['cpu_s_total']:>7.1f} "
              f"{r['studies_per_s']:>9.2f} {r['model_s']:>8.2f} {r['non_model_s']:>11.2f} {r['plain_decode']['wall_s']:>14.2f} "
              f"{r['non_model_over_plain_decode']:>6.2f} {str(r['non_model_over_plain_decode_cpu']):>9} {r['peak_rss_mb']:>7} "
              f"{r['peak_worker_rss_mb']:>10}")
    for r in rows:
        print(f"\nstudies={r['studies']} workers={r['workers']}: {r['sagittal_slices_per_series']:.1f} sagittal / "
              f"{r['axial_slices_per_series']:.1f} axial slices per series, {r['axial_series_per_study']:.2f} axial series "
              f"per study; setup {r['setup_s']:.1f} s")
        print(f"  {'stage':<44} {'wall s':>8} {'CPU s':>8}")
        for k, v in r["stages"].items():
            if v["wall_s"] >= 0.01:
                cpu = "-" if v["cpu_s"] is None else f"{v['cpu_s']:.2f}"
                print(f"  {k:<44} {v['wall_s']:>8.2f} {cpu:>8}")


if __name__ == "__main__":
    main()
