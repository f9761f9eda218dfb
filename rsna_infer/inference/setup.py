"""Setting up a run's models before any DICOM is read: the manifest checked, the device
memory planned, every model built on every device and proved by one dummy forward; and what
the run report says about them (models, precision, device memory).

`rsna_infer.inference.engine.Predictor` calls these once, in its constructor, so that every
configuration error (`ManifestError`, `rsna_infer.runtime.devices.DeviceError`) shows in
seconds, not hours.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..constants import CONDITION_GROUP_INDEX, GROUPS
from ..models.manifest import Manifest, ManifestError, load_manifest
from ..models.prep_groups import PrepGroup
from ..specs import ModelEntry
from .report import Timings

if TYPE_CHECKING:
    import torch

    from ..estimate.typical import StudyGeometry
    from ..models.family import Family
    from ..models.members import LoadedMember
    from ..runtime.memory import MemoryPlan, Residency
    from ..settings import RunSettings

logger = logging.getLogger(__name__)

#: One replica of the ensemble: member name -> loaded member, on one device.
Replica = dict[str, "LoadedMember"]


def manifest_for_run(manifest: "Manifest | str | os.PathLike", verify: bool) -> Manifest:
    """The manifest (a `Manifest` or a path) with its files checked (sha256 with ``verify``)
    and its prediction rules (`Manifest.check_for_prediction`)."""
    man = manifest if isinstance(manifest, Manifest) else load_manifest(manifest, verify=verify)
    if isinstance(manifest, Manifest):
        man.check_files(verify=verify)
    man.check_for_prediction()
    return man


def family_or_manifest_error(entry: ModelEntry) -> "Family":
    """``entry``'s family object; a bad variant or bad kwargs is a `ManifestError` (as at load)."""
    from ..models.registry import make_family

    try:
        return make_family(entry)
    except Exception as e:
        raise ManifestError(f"model {entry.name!r}: cannot set up family {entry.family!r}: {e}") from e


def check_stage1_inputs(groups1: Sequence[PrepGroup], entries: dict[str, ModelEntry]) -> None:
    """Stage-1 folds are averaged on raw outputs, so they must share one input."""
    for g in groups1:
        first = entries[g.members[0]]
        for name in g.members[1:]:
            if entries[name].input != first.input:
                raise ManifestError(
                    f"stage-1 models {first.name!r} and {name!r} ({g.key}) have different input specs; "
                    "folds of one stage-1 family/variant are averaged on their raw outputs and must share one input"
                )


def prior_conditions(manifest: Manifest, notes: list[str]) -> np.ndarray:
    """[5 conditions] bool: the conditions of the manifest's ``prior_groups`` (the blend fit
    found no stage-2 member that beats the priors there), with a note; warns when the
    manifest has no stage-2 model at all."""
    if not manifest.stage2:
        logger.warning("the manifest has no stage-2 models: every row will be the class priors")
    if manifest.prior_groups:
        note = (f"condition group(s) {list(manifest.prior_groups)} get the class priors: the manifest's blend fit "
                "found no stage-2 member that beats them out of fold")
        logger.info("%s", note)
        notes.append(note)
    return np.array([GROUPS[g] in manifest.prior_groups for g in CONDITION_GROUP_INDEX])


def plan_memory(manifest: Manifest, device: "torch.device", settings: "RunSettings", groups: Sequence[PrepGroup],
                geometry: "StudyGeometry | None", timings: Timings, notes: list[str]) -> "MemoryPlan | None":
    """Each member's device memory on a typical study (``geometry``) at the batch size, and
    the mode (`rsna_infer.runtime.memory.plan_memory`), logged with its advice (also into
    ``notes``). None on the CPU without ``device_memory_gb`` and without
    ``members="streamed"``: nothing to plan for."""
    from ..estimate.cost import cost_manifest
    from ..models.members import dtype_name, weight_dtype
    from ..runtime.memory import device_memory_bytes, member_memory
    from ..runtime.memory import plan_memory as plan

    budget = device_memory_bytes(device, settings.device_memory_gb)
    if budget is None and settings.members != "streamed":
        return None
    t = time.perf_counter()
    cost = cost_manifest(manifest, geometry, measure_cpu=False, memory_batch=settings.batch_size, count_flops=False)
    rows = {}
    for e in manifest.models:
        sc = cost.member(e.name)
        dtype = dtype_name(weight_dtype(e, device, settings.precision))
        rows[e.name] = member_memory(e.name, cost.member_prep[e.name], sc.memory, sc.memory_batch, sc.memory_batch_bytes,
                                     dtype, autocast=device.type == "cuda")
    result = plan(rows, [(g.key, list(g.members)) for g in groups], budget, settings.members)
    timings.add("setup/memory_plan", time.perf_counter() - t)
    log = logger.warning if not result.fits else logger.info
    log("device memory: %s", result.reason)
    for a in result.advice:
        logger.warning("device memory: %s", a)
        notes.append(f"device memory: {a}")
    return result


def load_replicas(manifest: Manifest, devices: Sequence["torch.device"], settings: "RunSettings",
                  resident: bool) -> tuple[list[Replica], dict[str, float]]:
    """One replica of the ensemble per device, every member built, loaded strictly and
    checked (`rsna_infer.models.members.load_member`); and the seconds per member."""
    from ..models.members import load_member

    replicas: list[Replica] = []
    load_s: dict[str, float] = {}
    for dev in devices:
        replica = {}
        for entry in manifest.models:
            t = time.perf_counter()
            replica[entry.name] = load_member(entry, manifest.resolve(entry), device=dev, tta=settings.tta,
                                              precision=settings.precision, channels_last=settings.channels_last,
                                              resident=resident)
            load_s[entry.name] = load_s.get(entry.name, 0.0) + time.perf_counter() - t
        replicas.append(replica)
    return replicas, load_s


def set_streaming(replicas: Sequence[Replica], streamed: bool) -> list["Residency"]:
    """Every replica's members moved to pinned host memory (``streamed``) or onto the device
    for good; the new residency of each replica."""
    from ..models.members import to_pinned_host
    from ..runtime.memory import Residency

    for rep in replicas:
        for m in rep.values():
            if streamed:
                to_pinned_host(m)
            else:
                m.keep_on_device()
    return [Residency(rep, streamed) for rep in replicas]


def precision_label(replica: Replica) -> str:
    """How the members run, for the report: ``"fp16 weights, fp16 autocast"`` (the most
    common), with the exceptions named."""
    kinds: dict[str, list[str]] = {}
    for n, m in replica.items():
        kinds.setdefault(m.precision, []).append(n)
    main = max(kinds, key=lambda k: len(kinds[k]))
    rest = [f"{k}: {', '.join(v)}" for k, v in kinds.items() if k != main]
    return main + (f" ({'; '.join(rest)})" if rest else "")


def models_info(manifest: Manifest, replica: Replica, load_s: dict[str, float]) -> list[dict[str, Any]]:
    """One line per member for the run report."""
    out = []
    for e in manifest.models:
        m = replica[e.name].model
        out.append({
            "name": e.name, "stage": e.stage, "family": e.family, "variant": e.variant, "arch": e.arch,
            "fold": e.fold, "file": e.file, "sha256": e.sha256, "blend": dict(e.blend),
            "params": int(sum(p.numel() for p in m.parameters())),
            "load_s": round(load_s.get(e.name, 0.0), 3),
        })
    return out


def memory_report(settings: "RunSettings", plan: "MemoryPlan | None", replicas: Sequence[Replica],
                  residency: Sequence["Residency"], devices: Sequence["torch.device"],
                  measured: dict[str, int] | None = None) -> dict[str, Any]:
    """Device memory for the run report: the mode, the plan (per member: weights and
    activations at the batch size), what was measured per member, and the peak."""
    import torch

    mb = 2**20
    streamed = settings.members == "streamed"
    rep: dict[str, Any] = {"mode": settings.members, "precision": settings.precision, "batch_size": settings.batch_size}
    if plan is not None:
        rep["plan"] = plan.to_dict()
    rep["weights_mb"] = {n: round(m.weight_bytes / mb, 1) for n, m in replicas[0].items()}
    if measured:
        rep["measured_activation_mb"] = {n: round(b / mb, 1) for n, b in sorted(measured.items())}
    if streamed:
        rep["loads"] = sum(r.loads for r in residency)
        rep["load_s"] = round(sum(r.load_s for r in residency), 3)
    peak_w = max(r.peak_weight_bytes for r in residency)
    if devices[0].type == "cuda":
        rep["measured_peak_mb"] = {str(d): round(torch.cuda.max_memory_allocated(d) / mb, 1) for d in devices}
    elif measured:  # the CPU standing in for a card: the weights held at once plus the largest forward
        rep["measured_peak_mb"] = {"cpu": round((peak_w + max(measured.values())) / mb, 1)}
    rep["peak_weights_on_device_mb"] = round(peak_w / mb, 1)
    return rep
