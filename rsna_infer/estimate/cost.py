"""What one study costs each member of a manifest: samples, FLOPs, parameters, and the CPU
seconds of its preparation, all measured on a typical study (`rsna_infer.estimate.typical`)
through the families' own ``prepare``/``collate``/``run``.

Costs are computed once per *cost signature* (family, variant, arch, arch kwargs, input,
model kwargs): folds of one model cost the same, so a 5-fold group is counted once. CPU
preparation is measured once per *preparation group*, the unit the predictor prepares
samples for (stage 1: family/variant; stage 2: family/variant/input/model kwargs).
Nothing is cached between calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..models.prep_groups import preparation_groups
from ..models.registry import make_family
from ..runtime.memory import RunMemory, batch_bytes, run_memory
from ..specs import ModelEntry
from .flops import CallFlops, count_run
from .host import DecodeRate, StageTime, measure_decode, one_torch_thread, timed
from .typical import StudyGeometry, keypoints_in, typical_study, typical_world_points

if TYPE_CHECKING:
    from ..io import Study
    from ..keypoints import StudyKeypoints
    from ..models.family import Family, Sample
    from ..models.manifest import Manifest

logger = logging.getLogger(__name__)


def cost_signature(entry: ModelEntry) -> str:
    """``family/variant/arch#hash``: equal for entries whose networks and inputs are equal
    (folds), different otherwise. Calibration files key measured speeds by it."""
    blob = json.dumps([entry.family, entry.variant, entry.arch, entry.arch_kwargs, entry.input.to_dict(), entry.model_kwargs],
                      sort_keys=True, default=str)
    return f"{entry.family}/{entry.variant}/{entry.arch}#{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


@dataclass
class ShapeCost:
    """One distinct sample shape of a member: how many per study, FLOPs of one."""

    inputs: dict[str, list[int]]
    per_study: float
    flops: CallFlops
    example: "Sample | None" = field(default=None, repr=False)  # one such sample (benchmarks batch it)

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "per_study": round(self.per_study, 4), "gflop_tta": round(self.flops.tta / 1e9, 3),
                "gflop_plain": round(self.flops.plain / 1e9, 3), "tta_passes": self.flops.tta_passes, "method": self.flops.method}


@dataclass
class SignatureCost:
    """Per-study cost of one distinct model (shared by its folds)."""

    signature: str
    name: str  # the first member with this signature
    params: int
    shapes: list[ShapeCost]
    count_s: float
    note: str = ""
    memory: "RunMemory | None" = None  # of one run at ``memory_batch`` samples of the largest shape
    memory_batch: int = 0
    memory_batch_bytes: int = 0  # that batch's own bytes (fp32, on the device)

    @property
    def samples_per_study(self) -> float:
        return float(sum(s.per_study for s in self.shapes))

    def flops_per_study(self, tta: bool) -> float:
        return float(sum(s.per_study * (s.flops.tta if tta else s.flops.plain) for s in self.shapes))

    @property
    def tta_passes(self) -> int:
        return max((s.flops.tta_passes for s in self.shapes), default=1)

    def to_dict(self) -> dict[str, Any]:
        return {"signature": self.signature, "name": self.name, "params": self.params,
                "samples_per_study": round(self.samples_per_study, 4),
                "gflop_per_study_tta": round(self.flops_per_study(True) / 1e9, 3),
                "gflop_per_study_plain": round(self.flops_per_study(False) / 1e9, 3),
                "shapes": [s.to_dict() for s in self.shapes], "count_s": round(self.count_s, 3), "note": self.note,
                "memory": None if self.memory is None else {
                    "batch": self.memory_batch, "batch_mb": round(self.memory_batch_bytes / 2**20, 1),
                    "activation_mb_fp32": round(self.memory.activation_bytes / 2**20, 1), "method": self.memory.method,
                    "weight_mb_fp32": round(self.memory.weight_bytes_fp32 / 2**20, 1),
                    "weight_mb_half": round(self.memory.weight_bytes_half / 2**20, 1)}}


@dataclass
class PrepCost:
    """CPU cost of one preparation group per typical study."""

    key: str
    stage: int
    in_worker: bool  # prepared by the loading workers (no keypoints needed)
    members: list[str]
    time: StageTime  # summed over the typical studies, weighted to one study
    samples_per_study: float

    @property
    def cpu_s_per_study(self) -> float:
        return self.time.cpu_s

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "stage": self.stage, "where": "loading workers" if self.in_worker else "main process",
                "members": self.members, "cpu_s_per_study": round(self.time.cpu_s, 4),
                "wall_s_per_study": round(self.time.wall_s, 4), "samples_per_study": round(self.samples_per_study, 4)}


@dataclass
class EnsembleCost:
    """Everything `rsna_infer.estimate.project` needs, independent of GPU kind and test-set size."""

    entries: list[ModelEntry]
    geometry: StudyGeometry
    signatures: dict[str, SignatureCost]
    member_signature: dict[str, str]
    preps: dict[str, PrepCost]
    member_prep: dict[str, str]
    decode: DecodeRate | None
    seconds: float  # spent computing this
    notes: list[str] = field(default_factory=list)
    manifest_path: str | None = None

    def member(self, name: str) -> SignatureCost:
        return self.signatures[self.member_signature[name]]

    @property
    def decode_cpu_s_per_study(self) -> float | None:
        return None if self.decode is None else self.decode.cpu_s_per_mb * self.geometry.dicom_mb

    def to_dict(self) -> dict[str, Any]:
        return {"geometry": self.geometry.to_dict(), "signatures": [s.to_dict() for s in self.signatures.values()],
                "preparation": [p.to_dict() for p in self.preps.values()],
                "decode": None if self.decode is None else self.decode.to_dict(),
                "decode_cpu_s_per_study": None if self.decode is None else round(self.decode_cpu_s_per_study or 0.0, 4),
                "seconds": round(self.seconds, 2), "notes": self.notes}


def _shape_key(sample: "Sample") -> tuple:
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in sample.inputs.items()))


def cost_manifest(
    manifest: "Manifest",
    geometry: StudyGeometry | None = None,
    measure_cpu: bool = True,
    cpu_studies: int = 2,
    cpu_image_size: tuple[int, int] = (384, 512),
    seed: int = 0,
    memory_batch: int | None = 32,
    count_flops: bool = True,
) -> EnsembleCost:
    """Cost every member of ``manifest`` on the typical studies of ``geometry``.

    ``measure_cpu``: also decode ``cpu_studies`` phantom studies of ``cpu_image_size`` px
    (written to a temporary folder) to measure the decode rate; preparation is always timed
    (it runs anyway to get the samples). ``memory_batch``: also replay each distinct model at
    that many samples of its largest input shape for its device memory (`rsna_infer.runtime.memory`;
    None: skip). ``count_flops=False`` skips the FLOP count (the predictor's memory plan). No
    weight file is read.
    """
    g = geometry or StudyGeometry()
    t0 = time.perf_counter()
    notes: list[str] = []
    entries = list(manifest.models)
    families = {e.name: make_family(e) for e in entries}
    studies = _typical_studies(entries, families, g, seed)
    preps, samples, member_prep = _preparation_costs(entries, families, studies, notes)
    signatures: dict[str, SignatureCost] = {}
    member_signature: dict[str, str] = {}
    for e in entries:
        sig = cost_signature(e)
        member_signature[e.name] = sig
        if sig not in signatures:
            signatures[sig] = _signature_cost(sig, e, families[e.name], samples[member_prep[e.name]],
                                              member_prep[e.name], notes, count_flops, memory_batch)

    decode = None
    if measure_cpu:
        decode = measure_decode(cpu_studies, cpu_image_size, seed=seed + 11)
    else:
        notes.append("decode not measured (measure_cpu=False): the loading workers' decode time is left out")
    return EnsembleCost(entries, g, signatures, member_signature, preps, member_prep, decode,
                        time.perf_counter() - t0, notes, str(manifest.path) if manifest.path else None)


def _typical_studies(entries: list[ModelEntry], families: dict[str, "Family"], g: StudyGeometry,
                     seed: int) -> list[tuple["Study", float, "StudyKeypoints"]]:
    """One typical study per axial-series count, its share of studies, and keypoints under
    every stage-1 set key the manifest has (plus a neutral one for manifests without stage 1)."""
    set_keys: dict[str, set[str]] = {k: {f"typical_{k}"} for k in ("spinal", "foraminal", "subarticular")}
    for e in entries:
        fam = families[e.name]
        kind, key = getattr(fam, "kind", None), getattr(fam, "set_key", None)
        if e.stage == 1 and kind in set_keys and key:
            set_keys[kind].add(key)
    world = typical_world_points(g)
    studies = []
    for i, (n_axial, weight) in enumerate(g.axial_series):
        study = typical_study(g, n_axial, study_id=i + 1, seed=seed + i)
        studies.append((study, weight, keypoints_in(study, world, set_keys)))
    return studies


def _preparation_costs(entries: list[ModelEntry], families: dict[str, "Family"], studies: list,
                       notes: list[str]) -> tuple[dict[str, PrepCost], dict[str, list], dict[str, str]]:
    """Per preparation group (the predictor's own, `rsna_infer.models.prep_groups`): its CPU time and the
    samples it makes of each typical study (with the study's weight); the group of each member."""
    preps: dict[str, PrepCost] = {}
    samples: dict[str, list[tuple[list[Sample], float]]] = {}
    member_prep: dict[str, str] = {}
    groups1, groups2 = preparation_groups(entries, families)
    for grp in groups1 + groups2:
        key, in_worker = grp.key, grp.in_worker
        member_prep.update({n: key for n in grp.members})
        fam = families[grp.members[0]]
        st = StageTime()
        got: list[tuple[list[Sample], float]] = []
        with one_torch_thread():
            for study, weight, kps in studies:
                one = StageTime()
                try:
                    with timed(one):
                        out = list(fam.prepare(study, None if in_worker else kps))
                except Exception as ex:  # a family that cannot read the typical study: say so, count its example
                    notes.append(f"{key}: prepare failed on the typical study ({type(ex).__name__}: {ex}); "
                                 "counted one example_batch sample per study")
                    out = []
                st.add(weight * one.wall_s, weight * one.cpu_s, 1)
                got.append((out, weight))
        samples[key] = got
        preps[key] = PrepCost(key, grp.stage, in_worker, list(grp.members), st, sum(w * len(s) for s, w in got))
    return preps, samples, member_prep


def _signature_cost(sig: str, e: ModelEntry, fam: "Family", prepared: list[tuple[list[Sample], float]],
                    prep_key: str, notes: list[str], count_flops: bool, memory_batch: int | None) -> SignatureCost:
    """FLOPs (one count per distinct input shape, weighted by its share of studies) and,
    with ``memory_batch``, the device memory of one distinct model."""
    t = time.perf_counter()
    by_shape: dict[tuple, tuple[Sample, float]] = {}
    for out, weight in prepared:
        for s in out:
            k = _shape_key(s)
            first, w = by_shape.get(k, (s, 0.0))
            by_shape[k] = (first, w + weight)
    note = ""
    if by_shape:
        batches = [(fam.collate([s]), w, s) for s, w in by_shape.values()]
    else:
        note = "the typical study gave no sample: one example_batch sample per study counted"
        if not any(n.startswith(prep_key) for n in notes):
            notes.append(f"{e.name}: {note}")
        batches = [(fam.example_batch(1), 1.0, None)]
    shapes, params, model = [], 0, None
    for batch, w, example in batches:
        if count_flops:
            flops, params, model = count_run(fam, batch, model)
        else:
            flops = CallFlops(0.0, 0.0, 1, "not counted")
        shapes.append(ShapeCost({k: list(v.shape[1:]) for k, v in batch.items()}, w, flops, example))
    cost = SignatureCost(sig, e.name, params, shapes, time.perf_counter() - t, note)
    if memory_batch:
        big = max(batches, key=lambda b: batch_bytes(b[0]))
        one = [big[2]] if big[2] is not None else None
        full = fam.collate(one * int(memory_batch)) if one else fam.example_batch(int(memory_batch))
        with one_torch_thread():
            cost.memory, model = run_memory(fam, full, model)
        cost.memory_batch, cost.memory_batch_bytes = int(memory_batch), batch_bytes(full)
        if not count_flops:
            cost.params = int(cost.memory.weight_bytes_fp32 // 4)
        del full
    logger.debug("%s: %.1f GFLOP per study with TTA (%s)", sig, cost.flops_per_study(True) / 1e9,
                 ", ".join(s.flops.method for s in shapes))
    return cost
