"""DICOM decoding throughput: `load_study` (sequential / threads / processes) against the floor,
a plain ``pydicom.dcmread(f).pixel_array`` loop over the same files.

    python benchmarks/bench_io.py --studies 8 --workers 2 --repeats 3

Writes a phantom test set in the Kaggle layout (three series per study, Kaggle-like sizes:
two sagittal series of 17 slices at 384x384 and an axial series of 40 slices at 320x320,
about 18 MB of DICOM per study, realistic header size), warms the page cache, then times
each mode round-robin; the best of ``--repeats`` runs is reported as studies/s and MB/s of DICOM read,
and as a ratio to the floor. Then the peak memory of `load_study` on the first study
(tracemalloc: every Python and numpy allocation), as a multiple of the float32 volumes it
returns. ``--source synth`` benchmarks `rsna_infer.synth.make_dataset` studies (test split,
default options) instead; ``--root`` re-uses an existing Kaggle-layout root.
"""

from __future__ import annotations

import argparse
import os
import gc
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pydicom

from rsna_infer.constants import AXIAL_T2, SAG_T1, SAG_T2
from rsna_infer.io import discover_studies, list_series_files, load_study, make_executor, write_slice

#: (type, slices, rows/cols, pixel spacing, IOP, slice spacing, TE, TR)
SERIES = (
    (SAG_T1, 17, 384, 0.6, (0, 1, 0, 0, 0, -1), 4.0, 10.0, 550.0),
    (SAG_T2, 17, 384, 0.6, (0, 1, 0, 0, 0, -1), 4.0, 100.0, 3500.0),
    (AXIAL_T2, 40, 320, 0.6, (1, 0, 0, 0, 1, 0), 4.0, 100.0, 4000.0),
)
#: Typical header clutter of a scanner file (real headers are 1-3 kB; parse time scales with it).
EXTRA_TAGS = {
    "Manufacturer": "PHANTOM", "ManufacturerModelName": "bench", "InstitutionName": "nowhere",
    "StationName": "bench1", "SoftwareVersions": "1.0", "ProtocolName": "lumbar spine",
    "PatientName": "Anon", "PatientSex": "O", "PatientAge": "050Y", "BodyPartExamined": "LSPINE",
    "MagneticFieldStrength": "1.5", "ImagingFrequency": "63.87", "NumberOfAverages": "2",
    "EchoTrainLength": "16", "FlipAngle": "90", "SAR": "0.5", "PercentSampling": "100",
    "PercentPhaseFieldOfView": "100", "PixelBandwidth": "190", "AcquisitionMatrix": [0, 384, 269, 0],
    "InPlanePhaseEncodingDirection": "ROW", "ReceiveCoilName": "SPINE", "TransmitCoilName": "BODY",
    "ScanningSequence": "SE", "SequenceVariant": "SK", "ScanOptions": "PFP", "MRAcquisitionType": "2D",
    "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"], "WindowCenter": "600", "WindowWidth": "1200",
    "StudyDescription": "MRI LUMBAR SPINE", "ReferringPhysicianName": "Anon", "AccessionNumber": "0",
    "FrameOfReferenceUID": "1.2.826.0.1.3680043.10.9.1", "PositionReferenceIndicator": "",
    "SliceLocation": "0", "AcquisitionNumber": "1", "PatientPosition": "HFS",
}


def write_phantoms(root: Path, n_studies: int, seed: int = 0) -> None:
    """Kaggle-layout studies with smooth random images (so compression-free sizes are real)."""
    rng = np.random.default_rng(seed)
    img_root = root / "test_images"
    rows = ["study_id,series_id,series_description"]
    for s in range(n_studies):
        study_id = 1000 + s
        for k, (desc, z, size, ps, iop, step, te, tr) in enumerate(SERIES):
            series_id = study_id * 10 + k
            rows.append(f"{study_id},{series_id},{desc}")
            base = rng.integers(0, 1500, size=(size // 8, size // 8))
            img = np.kron(base, np.ones((8, 8), dtype=np.int64))
            normal = np.cross(iop[:3], iop[3:])
            uid = pydicom.uid.generate_uid()
            for i in range(z):
                pos = np.array([-100.0, -100.0, 50.0]) + (i - z / 2) * step * normal
                write_slice(
                    img_root / str(study_id) / str(series_id) / f"{i + 1}.dcm",
                    img + i,
                    position=pos, orientation=iop, pixel_spacing=(ps, ps), instance_number=i + 1,
                    series_instance_uid=uid, series_description=desc, study_id=study_id,
                    series_id=series_id, echo_time=te, repetition_time=tr, slice_thickness=step,
                    extra=EXTRA_TAGS,
                )
    (root / "test_series_descriptions.csv").write_text("\n".join(rows) + "\n")


def _files(refs) -> list[Path]:
    return [p for r in refs for s in r.series if s.path is not None for p in list_series_files(s.path)]


def _floor(files: list[Path]) -> None:
    for f in files:
        _ = pydicom.dcmread(f).pixel_array


def _load_seq(ref):
    return load_study(ref, parallel="sequential")


def peak_memory(fn: Callable[[], object]) -> tuple[float, object]:
    """(peak traced bytes while ``fn`` runs, its result); allocations before it do not count."""
    gc.collect()
    tracemalloc.start()
    try:
        out = fn()
        return float(tracemalloc.get_traced_memory()[1]), out
    finally:
        tracemalloc.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, help="existing Kaggle-layout root (default: write phantoms)")
    ap.add_argument("--source", choices=("phantom", "synth"), default="phantom",
                    help="phantom: fixed Kaggle-sized series (default); synth: rsna_infer.synth.make_dataset")
    ap.add_argument("--studies", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    tmp = None
    root = args.root
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_io_")
        root = Path(tmp.name)
        t = time.perf_counter()
        if args.source == "synth":
            from rsna_infer.synth import make_dataset

            make_dataset(root, args.studies, split="test", seed=0)
        else:
            write_phantoms(root, args.studies)
        print(f"wrote {args.studies} {args.source} studies in {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    refs = discover_studies(root)
    t_disc = time.perf_counter() - t
    files = _files(refs)
    mb = sum(f.stat().st_size for f in files) / 1e6
    for f in files:  # warm the page cache: we measure decoding, not the disk
        f.read_bytes()
    n = len(refs)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (other work skews wall times)")
    print(f"{n} studies, {len(files)} files, {mb:.1f} MB; discovery (CSV) {t_disc * 1e3:.1f} ms")
    t = time.perf_counter()
    (root / "test_series_descriptions.csv").rename(root / "csv.bak")
    try:
        discover_studies(root)
        print(f"discovery without CSV (header-only pass): {(time.perf_counter() - t) * 1e3:.1f} ms")
    finally:
        (root / "csv.bak").rename(root / "test_series_descriptions.csv")

    thread_pool = make_executor("thread", args.workers)
    process_pool = make_executor("process", args.workers)
    list(process_pool.map(abs, range(args.workers)))  # start the workers before timing
    study_pool = ProcessPoolExecutor(max_workers=args.workers)
    list(study_pool.map(abs, range(args.workers)))
    modes: dict[str, Callable[[], object]] = {
        "floor: dcmread().pixel_array loop": lambda: _floor(files),
        "load_study sequential": lambda: [_load_seq(r) for r in refs],
        f"load_study threads x{args.workers}": lambda: [load_study(r, executor=thread_pool) for r in refs],
        f"load_study processes x{args.workers}": lambda: [load_study(r, executor=process_pool) for r in refs],
        f"studies on processes x{args.workers} (sequential inside)": lambda: list(study_pool.map(_load_seq, refs)),
    }
    times: dict[str, list[float]] = {name: [] for name in modes}
    cpu: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.repeats):  # round-robin: every mode sees the same background load
        for name, fn in modes.items():
            c, t = time.process_time(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    rows = [(name, min(ts), statistics.median(ts), min(cpu[name])) for name, ts in times.items()]
    memory = []
    for name, fn in (("sequential", lambda: _load_seq(refs[0])),
                     (f"threads x{args.workers}", lambda: load_study(refs[0], executor=thread_pool))):
        peak, study = peak_memory(fn)
        memory.append((name, peak, study.nbytes()))
    thread_pool.shutdown()
    process_pool.shutdown()
    study_pool.shutdown()
    floor = rows[0][1]
    print(f"\n{'mode':<52} {'studies/s':>9} {'MB/s':>7} {'best s':>7} {'median s':>8} {'vs floor':>8} "
          f"{'CPU ms/file':>11}")
    for name, best, med, cpu_s in rows:
        # CPU time of this process (all its threads); worker processes are not counted
        cpu_txt = f"{cpu_s / len(files) * 1e3:11.3f}" if "process" not in name else f"{'-':>11}"
        print(f"{name:<52} {n / best:9.2f} {mb / best:7.1f} {best:7.3f} {med:8.3f} {floor / best:7.2f}x {cpu_txt}")
    print("\npeak memory of load_study on one study (tracemalloc), against the float32 volumes it returns:")
    for name, peak, vol in memory:
        print(f"  {name:<14} peak {peak / 1e6:7.1f} MB, volumes {vol / 1e6:7.1f} MB = {peak / vol:.2f}x")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
