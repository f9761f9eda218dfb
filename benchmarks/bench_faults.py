"""Hurt a real ``rsna-infer predict`` run the way machines do, and print what it cost.

    python benchmarks/bench_faults.py --studies 36 --workers 2 --budget 150

One phantom test root (`rsna_infer.synth`) and the tiny random-init ensemble of every family
(`rsna_infer.models.random_weights`); each scenario is a fresh CLI process, hurt from outside:

- ``clean``: nothing happens (the reference);
- ``sigkill``: SIGKILL one busy loading worker ``--kill-after`` seconds after the first
  worker appears (what the OOM killer does);
- ``sigkill-first x2``: SIGKILL the worker holding the first study, and again on its retry;
- ``sigstop``: SIGSTOP one busy worker for good (a hung read), with ``--time-budget``.

Per scenario: exit code, wall seconds, studies on full priors / with some prior targets,
studies with errors, worker deaths / hangs from the run report, and whether the CSV is
complete and valid. Targets (issue 12): SIGKILL costs at most the hurt study (never more than
3), exit 0; SIGSTOP with a budget B finishes by B with a complete CSV.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _busy_worker(proc: subprocess.Popen, label: str | None = None, exclude: tuple[int, ...] = (), timeout: float = 300) -> int:
    """A loading worker of ``proc`` busy with a study (``label``: that one), seen in /proc."""
    from rsna_infer.runtime.workers import named_children

    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        for pid, name in named_children(proc.pid).items():
            if pid in exclude or not name.startswith("rsna:") or name == "rsna:idle":
                continue
            if label is None or name == label:
                return pid
        time.sleep(0.01)
    raise RuntimeError(f"no worker busy with {label or 'a study'} (run ended: {proc.poll()})")


def _scenario(name: str, args: argparse.Namespace, root: Path, manifest: str, out: Path, first_id: int) -> dict:
    cmd = [sys.executable, "-m", "rsna_infer.cli", "predict", str(root), "--out", str(out / "submission.csv"),
           "--manifest", manifest, "--device", "cpu", "--workers", str(args.workers), "--chunk-size", str(args.chunk_size)]
    if name == "sigstop":
        cmd += ["--time-budget", str(args.budget)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    hurt: list[int] = []
    try:
        if name == "sigkill":
            _busy_worker(proc, timeout=300)
            time.sleep(args.kill_after)
            hurt.append(_busy_worker(proc))
            os.kill(hurt[-1], signal.SIGKILL)
        elif name == "sigkill-first x2":
            for _ in range(2):
                hurt.append(_busy_worker(proc, f"rsna:{first_id}", exclude=tuple(hurt)))
                os.kill(hurt[-1], signal.SIGKILL)
        elif name == "sigstop":
            _busy_worker(proc, timeout=300)
            time.sleep(args.kill_after)
            hurt.append(_busy_worker(proc))
            os.kill(hurt[-1], signal.SIGSTOP)
        _, err = proc.communicate(timeout=args.budget * 4 + 600)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in hurt:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    wall = time.monotonic() - t0
    row = {"scenario": name, "rc": proc.returncode, "wall_s": round(wall, 1)}
    report = out / "run_report.json"
    if not report.is_file():
        return {**row, "error": err.strip().splitlines()[-1:] if err else ""}
    rep = json.loads(report.read_text())
    from rsna_infer.submission import read_study_ids, read_submission, validate_submission

    try:
        validate_submission(read_submission(out / "submission.csv"), read_study_ids(root / "test_series_descriptions.csv"))
        valid = True
    except Exception:  # noqa: BLE001 - reported, not raised
        valid = False
    s = rep["summary"]
    return {**row, "run_wall_s": rep["wall_s"], "studies": s["studies"], "fallback": s.get("fallback", 0),
            "partial": s.get("partial", 0), "with_errors": s["studies_with_errors"],
            "worker_deaths": rep["faults"]["worker_processes"]["died"], "worker_hangs": rep["faults"]["worker_processes"]["hung"],
            "csv_valid": valid}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", type=int, default=36)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--budget", type=float, default=150.0, help="time budget of the sigstop scenario (seconds)")
    p.add_argument("--kill-after", type=float, default=2.0, help="seconds after the first busy worker before the signal")
    p.add_argument("--image-size", type=int, nargs=2, default=(192, 256), metavar=("MIN", "MAX"))
    p.add_argument("--scenarios", nargs="+", default=["clean", "sigkill", "sigkill-first x2", "sigstop"])
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--work", default=None, help="folder for the root and outputs (default: a temporary one)")
    args = p.parse_args()

    from rsna_infer.models.random_weights import make_random_manifest
    from rsna_infer.synth import make_dataset

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_faults_"))
    root = work / f"phantom_{args.studies}"
    if not (root / "test_series_descriptions.csv").is_file():
        make_dataset(root, args.studies, split="test", seed=args.seed, image_size=tuple(args.image_size))
    manifest = str(make_random_manifest(work / "tiny_manifest"))
    from rsna_infer.submission import read_study_ids

    first_id = read_study_ids(root / "test_series_descriptions.csv")[0]
    rows = [_scenario(name, args, root, manifest, work / name.replace(" ", "_"), first_id) for name in args.scenarios]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    main()
