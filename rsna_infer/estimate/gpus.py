"""Device throughput: what each GPU kind is assumed to sustain, and the calibration file a
measured run (``benchmarks/gpu_check.py``) writes to replace the assumption.

The projection is ``device seconds = counted FLOPs / effective FLOP/s``, with
``effective = peak × efficiency``. The peaks are vendor datasheet figures (dense fp16 on the
tensor cores where the card has them, i.e. what fp16 autocast uses). The efficiencies are
**priors, not measurements**: the fraction of peak that eager PyTorch conv-net inference
under fp16 autocast reaches at batch sizes of 8-32, set from the order of magnitude of public
ResNet-50 mixed-precision inference throughputs (roughly 9 of 65 TFLOP/s on a T4, 6 of 19 on
a P100, 20-25 of 312 on an A100, 40-45 of 989 on an H100). Depthwise convolutions
(ConvNeXt), dense concatenations (DenseNet) and small 128-px crops do worse than ResNet-50,
so the priors sit at or below those ratios. A calibration file measured on a real card
replaces them. Importing this module does not import torch.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..output import atomic_write_text
from ..validate import parse_fields

#: Calibration file format version this code reads and writes.
CALIBRATION_VERSION = 1


@dataclass(frozen=True)
class GpuKind:
    """One GPU model: peak throughput (TFLOP/s) and memory from its datasheet, the assumed
    efficiency of our inference, and where the figures come from."""

    key: str
    name: str
    peak_tflops: float  # dense fp16 (tensor cores where present): what fp16 autocast runs on
    peak_fp32_tflops: float
    memory_gb: float
    efficiency: float  # prior fraction of ``peak_tflops`` sustained; replaced by calibration
    source: str
    #: host-to-device copies from pinned memory, GB/s: what streaming members costs. Priors:
    #: about half the bus's x16 rate (PCIe 3: 16 GB/s, PCIe 4: 32, PCIe 5 / SXM: 64).
    h2d_gbps: float = 6.0

    @property
    def effective_tflops(self) -> float:
        return self.peak_tflops * self.efficiency


GPU_KINDS: dict[str, GpuKind] = {
    "t4": GpuKind(
        "t4", "NVIDIA T4 (Kaggle 'GPU T4 x2': two of them)", 65.0, 8.1, 16.0, 0.10,
        "NVIDIA T4 datasheet: 65 TFLOPS mixed-precision FP16/FP32 tensor, 8.1 TFLOPS FP32, 16 GB GDDR6, 70 W "
        "(power-capped: sustained clocks sit below boost)", 6.0,
    ),
    "p100": GpuKind(
        "p100", "NVIDIA Tesla P100 PCIe 16 GB (Kaggle 'GPU P100')", 18.7, 9.3, 16.0, 0.25,
        "NVIDIA Tesla P100 PCIe datasheet: 18.7 TFLOPS FP16 (no tensor cores), 9.3 TFLOPS FP32, 16 GB HBM2", 6.0,
    ),
    "a100": GpuKind(
        "a100", "NVIDIA A100 (SXM4 / PCIe)", 312.0, 19.5, 80.0, 0.07,
        "NVIDIA A100 datasheet: 312 TFLOPS FP16 tensor dense (624 with sparsity), 19.5 TFLOPS FP32, 40/80 GB", 12.0,
    ),
    "h100": GpuKind(
        "h100", "NVIDIA H100 SXM (H200: same compute)", 989.0, 67.0, 80.0, 0.045,
        "NVIDIA H100 datasheet: 989 TFLOPS FP16 tensor dense SXM (1,979 with sparsity; PCIe 756), 67 TFLOPS FP32, 80 GB",
        25.0,
    ),
}


def gpu_kind(key: str) -> GpuKind:
    try:
        return GPU_KINDS[key.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU kind {key!r}; expected one of {sorted(GPU_KINDS)}") from None


def kind_of_device_name(name: str) -> str | None:
    """``"Tesla T4"`` -> ``"t4"``, ``"NVIDIA H200"`` -> ``"h100"`` (same compute); None when unknown."""
    n = name.upper()
    for pattern, key in ((r"\bT4\b", "t4"), (r"P100", "p100"), (r"A100", "a100"), (r"H100|H200|GH200", "h100")):
        if re.search(pattern, n):
            return key
    return None


@dataclass
class MemberTiming:
    """Measured forward of one cost signature (one distinct model) on the calibration card."""

    signature: str
    name: str  # one member with this signature, for people reading the file
    batch: int  # samples per timed call
    flops_per_call: float
    seconds_per_call: float

    @property
    def effective_tflops(self) -> float:
        return self.flops_per_call / self.seconds_per_call / 1e12 if self.seconds_per_call > 0 else 0.0


@dataclass
class Calibration:
    """What ``benchmarks/gpu_check.py`` measured on one card; ``rsna-infer estimate
    --calibration FILE`` uses it instead of the efficiency priors.

    ``overall_tflops``: effective throughput of the measured ensemble on a typical study (its
    FLOPs divided by the sum of its members' measured forward times). ``members``: per cost
    signature. ``extra``: the end-to-end figures of the check (studies/s, busy share, peak
    memory, fp16 vs fp32 agreement), kept for the record.
    """

    device_name: str
    kind: str | None  # a `GPU_KINDS` key, "cpu", or None (unknown card)
    overall_tflops: float
    members: dict[str, MemberTiming] = field(default_factory=dict)
    torch_version: str = ""
    precision: str = "fp16 autocast"
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CALIBRATION_VERSION,
            "device_name": self.device_name,
            "kind": self.kind,
            "overall_tflops": self.overall_tflops,
            "torch_version": self.torch_version,
            "precision": self.precision,
            "created": self.created,
            "members": [asdict(m) | {"effective_tflops": m.effective_tflops} for m in self.members.values()],
            "extra": self.extra,
        }

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, default=float) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        """Read and validate a calibration file; `ValueError` names what is wrong."""
        path = Path(path)
        where = f"calibration {path}"
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{where}: cannot read ({e})") from None
        if not isinstance(d, dict) or d.get("version") != CALIBRATION_VERSION:
            raise ValueError(f"{where}: expected an object with version {CALIBRATION_VERSION} "
                             "(written by benchmarks/gpu_check.py)")

        def members(value: Any, label: str) -> dict[str, MemberTiming]:
            if not isinstance(value, list):
                raise ValueError(f"{label} must be a list, got {type(value).__name__}")
            timings = [MemberTiming(**parse_fields(MemberTiming, m, f"{label}[{i}]", error=ValueError,
                                                   ignore=("effective_tflops",)))
                       for i, m in enumerate(value)]
            return {t.signature: t for t in timings}

        cal = cls(**parse_fields(cls, d, where, sep=": ", error=ValueError, ignore=("version",), skip=("path",),
                                 convert={"members": members}), path=path)
        if not cal.overall_tflops > 0:
            raise ValueError(f"{where}: overall_tflops must be > 0, got {cal.overall_tflops}")
        return cal

    def throughput(self, gpu: GpuKind, signature: str) -> tuple[float, str]:
        """Effective TFLOP/s of ``signature`` on ``gpu`` and how it was obtained.

        Same kind of card: the member's measured throughput (else the ensemble's). Another
        kind: only the member's speed *relative* to the measured ensemble transfers; the
        target card's prior sets the level.
        """
        m = self.members.get(signature)
        rel = m.effective_tflops / self.overall_tflops if m is not None and m.effective_tflops > 0 else 1.0
        if self.kind == gpu.key:
            if m is not None and m.effective_tflops > 0:
                return m.effective_tflops, "calibrated (member measured)"
            return self.overall_tflops, "calibrated (ensemble average)"
        return gpu.effective_tflops * rel, f"prior x relative speed measured on {self.device_name or self.kind}"
