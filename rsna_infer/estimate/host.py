"""Host-side measurements: wall and CPU seconds of decoding and preparation.

CPU seconds come from ``time.process_time`` (every thread of this process), measured with one
torch thread as the loading workers run (`rsna_infer.runtime.streaming`), so a figure divides by the
number of CPUs that share the work. Other jobs on a shared machine inflate wall seconds far
more than CPU seconds; the estimate uses CPU seconds.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class StageTime:
    """Accumulated wall and CPU seconds of one stage over ``calls`` calls."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    calls: int = 0

    def add(self, wall_s: float, cpu_s: float, calls: int = 1) -> None:
        self.wall_s += float(wall_s)
        self.cpu_s += float(cpu_s)
        self.calls += int(calls)

    def to_dict(self, digits: int = 4) -> dict[str, float]:
        return {"wall_s": round(self.wall_s, digits), "cpu_s": round(self.cpu_s, digits), "calls": self.calls}


@contextlib.contextmanager
def timed(stage: StageTime) -> Iterator[None]:
    """Add the wall and CPU seconds of the ``with`` body to ``stage``."""
    w, c = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        stage.add(time.perf_counter() - w, time.process_time() - c)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread inside the block (as in the loading workers), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def plain_decode(files: Sequence[str | os.PathLike]) -> StageTime:
    """The reference a reader is compared with: ``pydicom.dcmread(f).pixel_array`` per file."""
    import pydicom

    st = StageTime()
    for f in files:
        with timed(st):
            pydicom.dcmread(str(f)).pixel_array  # noqa: B018 - decoding is the point
    return st


@dataclass
class DecodeRate:
    """`rsna_infer.io.load_study` measured on phantom studies: CPU seconds per MB of DICOM."""

    studies: int
    mb: float
    files: int
    load: StageTime
    plain: StageTime
    image_size: tuple[int, int]
    write_s: float  # making the phantoms (not part of the rate)

    @property
    def cpu_s_per_mb(self) -> float:
        return self.load.cpu_s / self.mb if self.mb > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "studies": self.studies, "dicom_mb": round(self.mb, 2), "files": self.files,
            "image_size": list(self.image_size), "load_study": self.load.to_dict(), "plain_pydicom": self.plain.to_dict(),
            "cpu_s_per_mb": round(self.cpu_s_per_mb, 5), "phantom_write_s": round(self.write_s, 2),
        }


def measure_decode(n_studies: int = 2, image_size: tuple[int, int] = (384, 512), seed: int = 11,
                   work_dir: str | os.PathLike | None = None) -> DecodeRate:
    """Write ``n_studies`` phantom test studies (`rsna_infer.synth`) to a temporary folder,
    decode each once with `load_study` (one decode thread) and once with plain pydicom."""
    from ..io import discover_studies, list_series_files, load_study
    from ..synth import make_dataset

    with tempfile.TemporaryDirectory(prefix="rsna_estimate_", dir=work_dir) as tmp:
        t = time.perf_counter()
        ds = make_dataset(Path(tmp) / "phantom", int(n_studies), split="test", seed=seed, image_size=tuple(image_size))
        write_s = time.perf_counter() - t
        refs = discover_studies(ds.root, split="test")
        files = [p for ref in refs for s in ref.series if s.readable for p in list_series_files(s.path)]
        mb = sum(Path(f).stat().st_size for f in files) / 1e6
        load = StageTime()
        with one_torch_thread():
            for ref in refs:
                with timed(load):
                    load_study(ref, workers=1)
            plain = plain_decode(files)
    return DecodeRate(len(refs), mb, len(files), load, plain, (int(image_size[0]), int(image_size[1])), write_s)
