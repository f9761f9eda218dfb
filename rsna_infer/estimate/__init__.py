"""``rsna-infer estimate``: will this ensemble finish inside the Kaggle limit, before a
9-hour submission is spent finding out?

    rsna-infer estimate --manifest weights_manifest.json --studies 2000 --gpu t4 --gpus 2

Per member: FLOPs per study at the manifest's real input contract on a typical study (the
families' own ``prepare``/``run``, counted with torch's ``FlopCounterMode`` on random
weights; no weight file is read), projected device time from the effective throughput of
the GPU kind (datasheet peak x an assumed efficiency, or a calibration file measured by
``benchmarks/gpu_check.py``), the host's CPU time for decoding and preparation (measured
here on phantom studies, divided over the target's CPUs), the verdict against the limit and
the work to shed, in the deadline guard's order, to fit. Never touches the network.

Python: ``estimate(manifest, n_studies, gpu="t4", ...) -> Estimate``; or
``cost_manifest(...)`` once and `project` for many settings. The command is
`rsna_infer.commands.estimate`. See docs/speed.md.
"""

from __future__ import annotations

import os

from .cost import EnsembleCost, cost_manifest, cost_signature
from .gpus import GPU_KINDS, Calibration, GpuKind, MemberTiming, gpu_kind, kind_of_device_name
from .projection import DEFAULT_BUDGET_HOURS, KAGGLE_LIMIT_HOURS, Estimate, MemberRow, loader_workers, project
from .typical import StudyGeometry, keypoints_in, typical_study, typical_world_points

__all__ = [
    "DEFAULT_BUDGET_HOURS",
    "GPU_KINDS",
    "KAGGLE_LIMIT_HOURS",
    "Calibration",
    "EnsembleCost",
    "Estimate",
    "GpuKind",
    "MemberRow",
    "MemberTiming",
    "StudyGeometry",
    "cost_manifest",
    "cost_signature",
    "estimate",
    "format_estimate",
    "gpu_kind",
    "keypoints_in",
    "kind_of_device_name",
    "loader_workers",
    "project",
    "typical_study",
    "typical_world_points",
]

def estimate(
    manifest: "str | os.PathLike | object",
    n_studies: int = 2000,
    gpu: str = "t4",
    gpus: int = 1,
    tta: bool = True,
    cpus: int = 4,
    calibration: "str | os.PathLike | Calibration | None" = None,
    geometry: StudyGeometry | None = None,
    measure_cpu: bool = True,
    budget_hours: float = DEFAULT_BUDGET_HOURS,
    limit_hours: float = KAGGLE_LIMIT_HOURS,
    cpu_studies: int = 2,
    cpu_image_size: tuple[int, int] = (384, 512),
    batch_size: int = 32,
) -> Estimate:
    """Cost ``manifest`` (a path or `Manifest`; weight files need not exist) and project a
    run of ``n_studies`` on ``gpus`` x ``gpu`` with ``cpus`` CPUs. ``measure_cpu``: decode
    ``cpu_studies`` phantom studies of ``cpu_image_size`` px to measure the decode rate.
    ``batch_size``: the predictor's batch on the card (32 on CUDA), for the device memory."""
    from ..models.manifest import Manifest, load_manifest

    man = manifest if isinstance(manifest, Manifest) else load_manifest(manifest, check_files=False)
    cal = calibration if isinstance(calibration, Calibration) or calibration is None else Calibration.load(calibration)
    cost = cost_manifest(man, geometry, measure_cpu=measure_cpu, cpu_studies=cpu_studies, cpu_image_size=cpu_image_size,
                         memory_batch=batch_size)
    return project(cost, n_studies, gpu_kind(gpu), gpus=gpus, tta=tta, cpus=cpus, calibration=cal,
                   budget_hours=budget_hours, limit_hours=limit_hours)


def format_estimate(est: Estimate) -> str:
    """The human-readable report (the CLI's default output)."""
    g, p, geo = est.gpu, est.paths, est.cost.geometry
    lines = [
        f"{len(est.members)} model(s), {est.n_studies} studies, {est.gpus} x {g.key.upper()}, flip TTA {'on' if est.tta else 'off'}, "
        f"{est.cpus} CPUs ({loader_workers(est.cpus)} loading workers)",
        f"typical study: {geo.sagittal_slices} slices per sagittal series, {geo.mean_axial_series:.2f} axial series x "
        f"{geo.axial_slices} slices, {geo.image_px} px, {geo.dicom_mb:g} MB of DICOM",
        f"device throughput: {est.calibrated}; prior {g.peak_tflops:g} TFLOP/s peak x {g.efficiency:g} = "
        f"{g.effective_tflops:.1f} TFLOP/s ({g.source})",
        "",
    ]
    head = ("member", "samples", "GFLOP/study", "TFLOP/s", "device h", "share")
    rows = [(m.name, f"{m.samples_per_study:.2f}", f"{m.gflop_per_study:,.1f}" if m.gflop_per_study >= 10 else f"{m.gflop_per_study:.3f}", f"{m.tflops:.1f}", f"{m.device_hours:.3f}",
             f"{100 * m.share:.1f}%") for m in est.members]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines += [fmt(head), *map(fmt, rows)]
    gflop = sum(m.gflop_per_study for m in est.members)
    lines += [
        "",
        f"per study: {_flop(gflop)}; device {p.device_s:.3f} s on one card, main-process preparation "
        f"{p.main_prepare_s:.3f} s, loading {p.loader_s:.3f} CPU s (decode {p.decode_s:.3f} s) -> bound by {p.bottleneck} "
        f"at {p.per_study_s:.3f} s per study",
        f"setup: ~{est.setup_s / 60:.1f} min (build, load and check every model)",
        f"PROJECTED {est.projected_hours:.2f} h for {est.n_studies} studies: {est.verdict.upper()} "
        f"(budget {est.budget_hours:g} h of the {est.limit_hours:g} h limit, {est.usable_hours:.2f} h usable after the guard's reserve)",
    ]
    if est.memory is not None:
        m = est.memory
        lines.append(f"device memory on one {g.key.upper()} ({g.memory_gb:g} GB, {m.budget_bytes / 2**30:.1f} GiB usable): "
                     f"weights {m.weights_bytes / 2**30:.2f} GiB (fp16), all resident {m.resident_bytes / 2**30:.2f} GiB "
                     f"-> {m.mode.upper()}" + ("" if m.fits else " (DOES NOT FIT)"))
        big = sorted(m.members.values(), key=lambda r: -r.total_bytes)[:3]
        lines.append("largest per member (weights + activations at batch " + str(big[0].batch if big else 0) + "): " + ", ".join(
            f"{r.name} {r.weight_bytes / 2**20:,.0f} + {r.activation_bytes / 2**20:,.0f} MB" for r in big))
        lines.append("by GPU kind: " + "; ".join(f"{k} {v['mode']}{'' if v['fits'] else ' (does not fit)'} "
                                                  f"({v['planned_peak_mb'] / 1024:.1f} of {v['usable_mb'] / 1024:.1f} GiB)"
                                                  for k, v in est.memory_by_kind.items()))
    lines += [f"advice: {a}" for a in est.advice]
    if not est.fits or len(est.ladder) > 1:
        lines.append("shedding ladder (deadline guard order): " + "; ".join(
            f"{s.label} {s.projected_hours:.2f} h" for s in est.ladder[:8]) + (" ..." if len(est.ladder) > 8 else ""))
    lines += [f"note: {n}" for n in est.notes + est.cost.notes]
    return "\n".join(lines)


def _flop(gflop: float) -> str:
    return f"{gflop / 1e3:.2f} TFLOP" if gflop >= 100 else f"{gflop:.3g} GFLOP"
