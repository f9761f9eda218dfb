"""From per-study costs to hours: device time per GPU kind, host time on N CPUs, the verdict
against the Kaggle limit and the shedding advice (the deadline guard's own ladder).

Model of the run loop (`rsna_infer.inference.engine`): loading workers (``min(4, cpus - 1)``, the
predictor's default, `rsna_infer.models.prep_groups.default_num_workers`) decode each study and run the
keypoint-free stage-1 preparation; each device thread runs the models of its chunks. The
preparation that needs keypoints runs in the main process: a stage-1 group that refines
keypoints (axial xy) between the forwards of its device thread, the stage-2 crops on a CPU
thread beside it, group by group while the device runs the earlier groups, so the device
waits only for the first group's crops (or for all of them, when cutting crops takes longer
than the stage-2 forwards). Per study the run is bound by the slowest of three paths:

- device path: ``(stage-1 device seconds + stage-1 main-process preparation
  + max(stage-2 device seconds + first stage-2 group's crops, all stage-2 crops)
  + the loading not hidden behind the device) / gpus``: the workers decode `read ahead`
  (workers + 2) studies beyond the chunk a device runs, so the rest of the next chunk,
  ``(chunk - read ahead) / chunk`` of its loading, is read while the device waits; plus,
  with streamed members, the weights moved to the device once per chunk;
- loading path: ``(decode + worker preparation) / workers``;
- CPU path: all host CPU seconds ``/ cpus``.

Plus a one-off setup (building, loading and checking every model). Figures are projections:
the device part rests on counted FLOPs and assumed (or calibrated) throughputs, the host
part on CPU seconds measured on this machine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..models.prep_groups import default_num_workers
from ..runtime.deadline import Plan, build_ladder, default_reserve_s
from ..runtime.memory import CUDA_CONTEXT_BYTES, MemoryPlan, member_memory, plan_memory, usable_bytes
from ..runtime.streaming import default_read_ahead
from .cost import EnsembleCost
from .gpus import GPU_KINDS, Calibration, GpuKind

#: Kaggle's notebook limit and the default budget given to the deadline guard (the
#: notebook's ``TIME_BUDGET_S``): 0.5 h kept for start-up, install and projection error.
KAGGLE_LIMIT_HOURS = 9.0
DEFAULT_BUDGET_HOURS = 8.5
#: One-off setup: a fixed part (imports, discovery, CUDA context, one dummy forward per model,
#: cudnn autotuning of the first shapes) plus reading the fp32 weights from the dataset.
SETUP_FIXED_S = 60.0
WEIGHTS_READ_MB_PER_S = 200.0
#: Studies per chunk (the predictor's default): a streamed ensemble moves its weights once per chunk.
CHUNK_STUDIES = 16


def loader_workers(cpus: int) -> int:
    """The predictor's default number of loading processes on a machine with ``cpus`` CPUs
    (`rsna_infer.models.prep_groups.default_num_workers`), at least one for the projection."""
    return max(1, default_num_workers(cpus))


@dataclass
class MemberRow:
    """One member's share of the projected run."""

    name: str
    stage: int
    family: str
    variant: str
    arch: str
    fold: int
    signature: str
    params: int
    samples_per_study: float
    tta_passes: int  # forwards per sample under this projection (1 without TTA)
    gflop_per_study: float
    tflops: float  # effective throughput assumed for it
    throughput_source: str
    device_s_per_study: float  # on one card
    device_hours: float  # for all studies, sharded over the cards
    share: float  # of the ensemble's device time


@dataclass
class PathTimes:
    """Seconds per study on each path, and which one bounds the run."""

    device_s: float  # model forwards on one card
    main_prepare_s: float  # keypoint-dependent preparation in the main process (all of it, CPU seconds)
    loader_s: float  # decode + worker preparation, CPU seconds on one core
    decode_s: float
    device_path_s: float
    loader_path_s: float
    cpu_path_s: float
    stream_s: float = 0.0  # weights moved to the device per study when members are streamed

    @property
    def per_study_s(self) -> float:
        return max(self.device_path_s, self.loader_path_s, self.cpu_path_s)

    @property
    def bottleneck(self) -> str:
        paths = {"device (+ main-process preparation)": self.device_path_s, "loading workers": self.loader_path_s,
                 "host CPUs": self.cpu_path_s}
        return max(paths, key=paths.__getitem__)


@dataclass
class LadderStep:
    label: str
    tta: bool
    members: int
    projected_hours: float
    fits: bool


@dataclass
class Estimate:
    """A projected run; `to_dict` is the ``--json`` output."""

    n_studies: int
    gpu: GpuKind
    gpus: int
    tta: bool
    cpus: int
    members: list[MemberRow]
    paths: PathTimes
    setup_s: float
    projected_hours: float
    limit_hours: float
    budget_hours: float
    usable_hours: float  # budget minus the deadline guard's reserve
    fits: bool
    ladder: list[LadderStep]
    advice: list[str]
    calibrated: str
    cost: EnsembleCost
    notes: list[str] = field(default_factory=list)
    memory: MemoryPlan | None = None  # on one card of ``gpu`` (None: the cost has no memory figures)
    memory_by_kind: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return "fits" if self.fits else "does not fit"

    def to_dict(self) -> dict[str, Any]:
        p = self.paths
        return {
            "manifest": self.cost.manifest_path,
            "n_studies": self.n_studies,
            "gpu": {"kind": self.gpu.key, "name": self.gpu.name, "count": self.gpus, "peak_tflops": self.gpu.peak_tflops,
                    "prior_efficiency": self.gpu.efficiency, "memory_gb": self.gpu.memory_gb, "source": self.gpu.source,
                    "calibration": self.calibrated},
            "tta": self.tta,
            "cpus": self.cpus,
            "loader_workers": loader_workers(self.cpus),
            "projected_hours": round(self.projected_hours, 4),
            "limit_hours": self.limit_hours,
            "budget_hours": self.budget_hours,
            "usable_hours": round(self.usable_hours, 4),
            "verdict": self.verdict,
            "fits": self.fits,
            "bottleneck": p.bottleneck,
            "per_study_s": {k: _sig(v) for k, v in asdict(p).items()} | {"per_study_s": _sig(p.per_study_s)},
            "setup_s": round(self.setup_s, 1),
            "tflop_per_study": round(sum(m.gflop_per_study for m in self.members) / 1e3, 4),
            "members": [{k: (_sig(v) if isinstance(v, float) else v) for k, v in asdict(m).items()} for m in self.members],
            "ladder": [asdict(s) | {"projected_hours": round(s.projected_hours, 4)} for s in self.ladder],
            "advice": self.advice,
            "memory": None if self.memory is None else self.memory.to_dict(),
            "memory_by_gpu_kind": self.memory_by_kind,
            "costs": self.cost.to_dict(),
            "notes": self.notes + self.cost.notes,
        }


def _sig(x: float, digits: int = 6) -> float:
    """``x`` to ``digits`` significant digits (tiny per-member hours must not round to 0)."""
    return float(f"{x:.{digits}g}")


def _throughput(gpu: GpuKind, signature: str, calibration: Calibration | None) -> tuple[float, str]:
    if calibration is None:
        return gpu.effective_tflops, f"prior ({gpu.peak_tflops:g} peak x {gpu.efficiency:g})"
    return calibration.throughput(gpu, signature)


def memory_plan(cost: EnsembleCost, gpu: GpuKind, mode: str = "auto", members: frozenset[str] | None = None) -> MemoryPlan | None:
    """The predictor's device-memory plan for ``cost``'s ensemble on one card of ``gpu``:
    weights in fp16 (fp32 for members that ask), activations under fp16 autocast at the
    cost's ``memory_batch``; None when the cost was made without memory figures."""
    rows = {}
    for e in cost.entries:
        if members is not None and e.name not in members:
            continue
        sc = cost.member(e.name)
        if sc.memory is None:
            return None
        rows[e.name] = member_memory(e.name, cost.member_prep[e.name], sc.memory, sc.memory_batch, sc.memory_batch_bytes,
                                     "fp32" if e.precision == "fp32" else "fp16", autocast=True)
    groups = [(p.key, [n for n in p.members if n in rows]) for p in cost.preps.values()]
    budget = usable_bytes(gpu.memory_gb * 1e9 - CUDA_CONTEXT_BYTES)
    return plan_memory(rows, [(g, n) for g, n in groups if n], budget, mode)


def _paths(cost: EnsembleCost, gpu: GpuKind, gpus: int, cpus: int, plan: Plan,
           calibration: Calibration | None) -> tuple[PathTimes, dict[str, float]]:
    device = {}
    for e in cost.entries:
        if e.name in plan.members:
            sig = cost.member_signature[e.name]
            tflops, _ = _throughput(gpu, sig, calibration)
            device[e.name] = cost.signatures[sig].flops_per_study(plan.tta) / (tflops * 1e12)
    main = [p for p in cost.preps.values() if not p.in_worker and plan.members.intersection(p.members)]
    main1 = sum(p.cpu_s_per_study for p in main if p.stage == 1)  # between the device's forwards
    crops = [p.cpu_s_per_study for p in main if p.stage == 2]  # on the crop thread, in run order
    decode = cost.decode_cpu_s_per_study or 0.0
    loader = decode + sum(p.cpu_s_per_study for p in cost.preps.values() if p.in_worker)  # workers prepare every group
    stage = {e.name: e.stage for e in cost.entries}
    dev1 = sum(s for n, s in device.items() if stage[n] == 1)
    dev2 = sum(device.values()) - dev1
    mem = memory_plan(cost, gpu, members=plan.members)
    stream = 0.0
    if mem is not None and mem.mode == "streamed":  # every chunk loads every member once
        stream = mem.weights_bytes / (gpu.h2d_gbps * 1e9) / CHUNK_STUDIES
    workers = loader_workers(cpus)
    unhidden = max(0, CHUNK_STUDIES - default_read_ahead(workers)) / CHUNK_STUDIES * loader / workers
    critical = dev1 + main1 + max(dev2 + (crops[0] if crops else 0.0), sum(crops)) + stream + unhidden
    main_all = main1 + sum(crops)
    paths = PathTimes(dev1 + dev2, main_all, loader, decode, critical / gpus, loader / loader_workers(cpus),
                      (loader + main_all) / cpus, stream)
    return paths, device


def project(
    cost: EnsembleCost,
    n_studies: int,
    gpu: GpuKind,
    gpus: int = 1,
    tta: bool = True,
    cpus: int = 4,
    calibration: Calibration | None = None,
    limit_hours: float = KAGGLE_LIMIT_HOURS,
    budget_hours: float = DEFAULT_BUDGET_HOURS,
) -> Estimate:
    """Project a run of ``n_studies`` on ``gpus`` cards of ``gpu`` with ``cpus`` CPUs."""
    if n_studies < 0 or gpus < 1 or cpus < 1:
        raise ValueError("n_studies must be >= 0, gpus and cpus >= 1")
    if not 0 < budget_hours <= limit_hours:
        raise ValueError(f"budget_hours must be in (0, limit_hours={limit_hours}], got {budget_hours}")
    weight_mb = 4 * sum(cost.member(e.name).params for e in cost.entries) / 1e6
    setup_s = SETUP_FIXED_S + weight_mb / WEIGHTS_READ_MB_PER_S
    budget_s = budget_hours * 3600.0
    usable_s = budget_s - default_reserve_s(budget_s)

    def hours(plan: Plan) -> tuple[float, PathTimes, dict[str, float]]:
        paths, device = _paths(cost, gpu, gpus, cpus, plan, calibration)
        return (setup_s + n_studies * paths.per_study_s) / 3600.0, paths, device

    ladder_plans = build_ladder(cost.entries, tta)
    steps = []
    for plan in ladder_plans:
        h, _, _ = hours(plan)
        steps.append(LadderStep(plan.label, plan.tta, len(plan.members), h, h * 3600.0 <= usable_s))
    total_h, paths, device = hours(ladder_plans[0])
    total_dev = sum(device.values()) or 1.0
    rows = []
    for e in cost.entries:
        sc = cost.member(e.name)
        tflops, source = _throughput(gpu, sc.signature, calibration)
        s = device[e.name]
        rows.append(MemberRow(
            e.name, e.stage, e.family, e.variant, e.arch, e.fold, sc.signature, sc.params, sc.samples_per_study,
            sc.tta_passes if tta else 1, sc.flops_per_study(tta) / 1e9, tflops, source, s,
            n_studies * s / gpus / 3600.0, s / total_dev,
        ))
    fits = total_h * 3600.0 <= usable_s
    advice = _advice(steps, fits, n_studies, setup_s, usable_s, paths)
    notes = ["projections, not measurements: device time = counted FLOPs / assumed effective throughput"
             + ("" if calibration else " (uncalibrated priors; run benchmarks/gpu_check.py on a real card and pass --calibration)")]
    if paths.bottleneck != "device (+ main-process preparation)":
        notes.append(f"the host bounds this run ({paths.bottleneck}): more or faster CPUs, or lighter decoding, help; "
                     "shedding models barely does")
    calibrated = "none (priors)" if calibration is None else f"{calibration.path or ''} ({calibration.device_name})"
    mem = memory_plan(cost, gpu)
    by_kind = {}
    for key, kind in GPU_KINDS.items():
        m = memory_plan(cost, kind)
        if m is not None:
            by_kind[key] = {"memory_gb": kind.memory_gb, "usable_mb": round((m.budget_bytes or 0) / 2**20, 1),
                            "resident_mb": round(m.resident_bytes / 2**20, 1), "mode": m.mode,
                            "planned_peak_mb": round(m.peak_bytes / 2**20, 1), "fits": m.fits}
    if mem is not None:
        advice += [f"device memory: {a}" for a in mem.advice]
        if mem.mode == "streamed":
            notes.append(f"members streamed on a {gpu.key.upper()} ({mem.reason}): {paths.stream_s:.3f} s per study "
                         f"of weight copies at {gpu.h2d_gbps:g} GB/s, counted on the device path")
    return Estimate(n_studies, gpu, gpus, tta, cpus, rows, paths, setup_s, total_h, limit_hours, budget_hours,
                    usable_s / 3600.0, fits, steps, advice, calibrated, cost, notes, mem, by_kind)


def _advice(steps: list[LadderStep], fits: bool, n: int, setup_s: float, usable_s: float, paths: PathTimes) -> list[str]:
    """What to drop, in the deadline guard's order, until the run fits."""
    if fits:
        return [f"fits as is ({steps[0].projected_hours:.2f} h of {usable_s / 3600:.2f} h usable)"]
    for k, s in enumerate(steps):
        if s.fits:
            taken = [t.label for t in steps[1 : k + 1]]
            return [f"to fit in {usable_s / 3600:.2f} h, shed in the deadline guard's order: " + ", then ".join(taken)
                    + f" -> {s.projected_hours:.2f} h with {s.members} member(s){'' if s.tta else ', no TTA'}"]
    last = steps[-1]
    per = (last.projected_hours * 3600.0 - setup_s) / max(n, 1)
    done = int(max(0.0, usable_s - setup_s) // per) if per > 0 else n
    return [f"does not fit even after every shedding step ({last.projected_hours:.2f} h at plan {last.label!r}); "
            f"the deadline guard would run about {min(done, n)} of {n} studies and give the rest prior rows. "
            "Use a smaller ensemble, fewer folds or smaller inputs"]
