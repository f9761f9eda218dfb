"""What QA pages cost: `rsna_infer.predict` without ``qa_dir``, with it, and (optionally) the
same no-QA run on another checkout (e.g. the code before the observer hook existed).

    python benchmarks/bench_viz.py --studies 16 --repeats 3 --qa-worst 10
    python benchmarks/bench_viz.py --studies 16 --repeats 3 --baseline /work/main   # + main's code

Writes one phantom test root (`rsna_infer.synth`) and a manifest of tiny random-init models of
every family (or ``--manifest``), then runs each mode ``--repeats`` times, interleaved
(off, on[, baseline], off, on, ...), each in a fresh in-process (``num_workers=0``) subprocess
with one torch thread, so that the machine's drift hits every mode alike. Prints the median
wall time and CPU time (``time.process_time`` of the predict call: much less sensitive to
other jobs on a shared machine than wall time) of each mode and the ratios; ``qa/capture`` (seconds spent capturing inside the
chunks) and the page-writing time of the ``on`` runs are printed too; "loop" is the run without
building the models (``wall_s - setup/models`` of the run report). On a shared machine compare
the ratios, not the seconds, and use enough repeats: single runs vary by 30 % there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _one(args: argparse.Namespace) -> None:
    """Child: one predict run; prints a JSON line with the figures."""
    import torch

    torch.set_num_threads(1)
    from rsna_infer import predict

    out = Path(args.out)
    kw = {} if args.qa_dir is None else {"qa_dir": args.qa_dir, "qa_worst": args.qa_worst}
    t0, c0 = time.perf_counter(), time.process_time()
    predict(args.root, out / "submission.csv", manifest=args.manifest, device="cpu", num_workers=0,
            chunk_size=args.chunk_size, progress=False, **kw)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rep = json.loads((out / "run_report.json").read_text())
    pngs = len(list(Path(args.qa_dir).rglob("*.png"))) if args.qa_dir else 0
    loop = rep["wall_s"] - rep["timings"].get("setup/models", 0.0)  # the run itself, without building the models
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "loop_s": loop, "report_wall_s": rep["wall_s"], "capture_s": rep["timings"].get("qa/capture", 0.0),
                      "pages_s": wall - rep["wall_s"], "pngs": pngs, "studies": rep["n_studies"]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--qa-worst", type=int, default=10)
    p.add_argument("--image-size", type=int, nargs=2, default=(256, 384), metavar=("MIN", "MAX"))
    p.add_argument("--chunk-size", type=int, default=4)
    p.add_argument("--manifest", default=None, help="default: tiny random-init models of every family")
    p.add_argument("--baseline", default=None, metavar="CHECKOUT", help="also time the no-QA run with this checkout's rsna_infer")
    p.add_argument("--seed", type=int, default=6)
    p.add_argument("--work", default=None, help="folder for the phantom root and outputs (default: a temporary one)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--qa-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        _one(args)
        return

    from rsna_infer.models.random_weights import make_random_manifest
    from rsna_infer.synth import make_dataset

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_viz_"))
    manifest = args.manifest or str(make_random_manifest(work / "tiny_manifest"))
    root = work / f"phantom_{args.studies}"
    if not (root / "test_series_descriptions.csv").is_file():
        make_dataset(root, args.studies, split="test", seed=args.seed, image_size=tuple(args.image_size))
    here = str(Path(__file__).resolve().parents[1])
    modes = {"off": here, "on": here}
    if args.baseline:
        modes["baseline off"] = str(Path(args.baseline).resolve())
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    names = list(modes)
    for r in range(args.repeats):
        for mode in names[r % len(names):] + names[: r % len(names)]:  # rotate the order: drift hits every mode
            checkout = modes[mode]
            out = work / f"out_{mode.replace(' ', '_')}_{r}"
            cmd = [sys.executable, __file__, "--one", "--root", str(root), "--out", str(out), "--manifest", manifest,
                   "--chunk-size", str(args.chunk_size), "--qa-worst", str(args.qa_worst)]
            if mode == "on":
                cmd += ["--qa-dir", str(out / "qa")]
            env = dict(os.environ, PYTHONPATH=checkout)
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=checkout)
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"run failed: {mode}")
            runs[mode].append(json.loads(res.stdout.strip().splitlines()[-1]))
    med = {m: statistics.median(x["wall_s"] for x in v) for m, v in runs.items()}
    cpu = {m: statistics.median(x["cpu_s"] for x in v) for m, v in runs.items()}
    loop = {m: statistics.median(x["loop_s"] for x in v) for m, v in runs.items()}
    print(f"\n{args.studies} studies, {args.repeats} runs per mode, qa_worst={args.qa_worst}; medians")
    print(f"{'mode':<14} {'wall s':>8} {'CPU s':>8} {'loop s':>8} {'CPU s of each run':>40} {'PNGs':>5}")
    for m, v in runs.items():
        each = " ".join(f"{x['cpu_s']:.2f}" for x in v)
        print(f"{m:<14} {med[m]:>8.2f} {cpu[m]:>8.2f} {loop[m]:>8.2f} {each:>40} {v[0]['pngs']:>5}")
    on = runs["on"]
    print(f"on/off: wall {med['on'] / med['off']:.3f}, CPU {cpu['on'] / cpu['off']:.3f}, loop {loop['on'] / loop['off']:.3f}; "
          f"capture inside the chunks {statistics.median(x['capture_s'] for x in on):.3f} s, "
          f"pages {statistics.median(x['pages_s'] for x in on):.2f} s")
    if "baseline off" in med:
        b = "baseline off"
        print(f"off/baseline off: wall {med['off'] / med[b]:.3f}, CPU {cpu['off'] / cpu[b]:.3f}, loop {loop['off'] / loop[b]:.3f}")

if __name__ == "__main__":
    main()
