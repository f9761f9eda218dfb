"""Device memory of an ensemble: what each member needs, whether they all fit on the card at
once, and when they do not, how to stream them.

Per member (`MemberMemory`): **weight bytes** as held on the device (fp16 on a GPU except
normalisation layers, `rsna_infer.models.members`), and **peak activation bytes** of one ``run``
(flip TTA included) at the configured batch size on the input shapes of a typical study
(`rsna_infer.estimate.typical`): the forward is replayed on ``meta`` tensors (shapes only, no
arithmetic) under `LiveBytes`, which adds up every tensor from its creation to its release;
models with data-dependent shapes are replayed with the shape-only mode
(`rsna_infer.runtime.shape_only`). Activations are counted in fp32 and halved under fp16 autocast
(most activations are fp16 there; layer-norm and softmax outputs stay fp32, so this is
slightly low); the batch on the device is added, and with fp32 weights under autocast the
fp16 weight copies autocast keeps (half the weight bytes).

`MemoryPlan`: with every member resident a replica needs the sum of the weights plus the
largest activation peak; if that exceeds the budget (the card's free memory, or
``device_memory_gb``, times `USABLE_FRACTION`) the members are **streamed**: a group of folds
(or, when a group alone does not fit, one member) is loaded, runs over the chunk, and makes
room for the next, in stage order. The plan says what to change when even that does not fit.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..models.family import Family

logger = logging.getLogger(__name__)

#: Share of the budget the plan fills: the rest is kept for the caching allocator's
#: fragmentation, cudnn workspaces and the shapes of real studies larger than the typical one.
USABLE_FRACTION = 0.85
#: CUDA context and library handles, not in the allocator's free memory figure of a card
#: that has not been initialised (used for GPU kinds in `rsna-infer estimate`).
CUDA_CONTEXT_BYTES = 500 * 2**20
#: ``members=`` of the predictor.
MODES: tuple[str, ...] = ("auto", "resident", "streamed")
MB = 2**20


class LiveBytes:
    """Peak bytes of the tensors alive while a model runs: every new storage counted from
    its creation to its release (meta tensors included: they have sizes), and the
    placeholders of the shape-only mode (views of one shared zero buffer) at the size of
    the tensor they stand for. Views and in-place results are not new memory. ``decompose``:
    replay composite operators as their parts (for the replays; measuring a real run keeps
    its operators, so its numbers are computed exactly as without the probe)."""

    def __init__(self, placeholders: Any = None, decompose: bool = True) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN202
                kwargs = kwargs or {}
                if decompose:  # composite ops (linear, conv2d) as their parts, like FlopCounterMode (the
                    with self:  # shape-only mode below knows those); re-entered, so the parts are seen too
                        out = func.decompose(*args, **kwargs)
                    if out is not NotImplemented:
                        return out
                out = func(*args, **kwargs)
                schema = func._schema
                if not (schema.is_mutable or any(r.alias_info is not None for r in schema.returns)):
                    tracker._track_outputs(out)
                return out

        self._mode = _Mode()
        self.placeholders = placeholders
        self.live = 0
        self.peak = 0
        self._storages: dict[int, Any] = {}
        self._objects: list[Any] = []

    def __enter__(self) -> "LiveBytes":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)

    def _add(self, n: int) -> None:
        self.live += n
        self.peak = max(self.peak, self.live)

    def _release(self, n: int) -> None:
        self.live -= n

    def _track_outputs(self, out: Any) -> None:
        import torch
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            if self.placeholders is not None and t in self.placeholders:
                n = t.numel() * t.element_size()
                self._add(n)
                self._objects.append(weakref.ref(t, lambda _r, n=n: self._release(n)))
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in self._storages:
                continue
            n = st.nbytes()
            self._add(n)
            self._storages[key] = weakref.ref(st, lambda _r, k=key, n=n: (self._storages.pop(k, None), self._release(n)))


@dataclass(frozen=True)
class RunMemory:
    """What one ``run`` of a model needs besides its input batch: the fp32 activation peak and
    the weights held in fp32 and in half precision (norm layers fp32)."""

    activation_bytes: int
    method: str  # "meta" | "shape-only"
    weight_bytes_fp32: int
    weight_bytes_half: int


def run_memory(family: "Family", batch: dict[str, "torch.Tensor"], model: "nn.Module | None" = None
               ) -> tuple[RunMemory, "nn.Module | None"]:
    """Peak bytes allocated by ``family.run(model, batch, tta=True)`` beyond the weights and
    the batch (fp32), the weight bytes, and the CPU model when one had to be built (pass it
    back for the next batch of the same family). ``batch`` holds CPU tensors; on meta nothing
    is computed. A model that needs real values is replayed shape-only on the batch's first
    sample and the peak scaled by the batch size: every activation of a network that treats
    samples independently grows with the batch (checked: 2 samples = 2 x 1 exactly), and the
    placeholders of a full batch would take as much memory as the activations they stand for."""
    import torch

    from .shape_only import ShapeOnly, flop_registry_ops

    if model is None:
        try:
            with torch.device("meta"):
                meta_model = family.build().eval()
            meta_batch = {k: v.to("meta") for k, v in batch.items()}
            with torch.inference_mode(), LiveBytes() as live:
                family.run(meta_model, meta_batch, tta=True)
            return RunMemory(live.peak, "meta", weight_bytes(meta_model, 4), weight_bytes(meta_model, 2)), None
        except Exception as e:  # data-dependent shapes: replay on real tensors, arithmetic skipped
            logger.debug("%s: meta replay impossible (%s); shape-only on the CPU", family.entry.name, type(e).__name__)
        model = family.build().eval()
    n = int(next(iter(batch.values())).shape[0])
    one = {k: v[:1] for k, v in batch.items()}

    # placeholders with their own storage: `LiveBytes` sees them like the real tensors (the
    # shared zero buffer would hide them); entered last, LiveBytes sees each operator first
    # and the shape-only answer after it
    with torch.inference_mode(), ShapeOnly(flop_registry_ops(), own_storage=True), LiveBytes() as live:
        family.run(model, one, tta=True)
    return RunMemory(live.peak * n, "shape-only x batch", weight_bytes(model, 4), weight_bytes(model, 2)), model


def batch_bytes(batch: dict[str, "torch.Tensor"]) -> int:
    return int(sum(v.numel() * v.element_size() for v in batch.values()))


def member_memory(name: str, group: str, run: RunMemory, batch: int, batch_nbytes: int, weight_dtype: str,
                  autocast: bool) -> "MemberMemory":
    """A member's plan row from its model's `RunMemory` at ``batch`` samples (``batch_nbytes``
    on the device): weights in ``weight_dtype`` (``fp16``/``bf16``/``fp32``); under ``autocast``
    activations are halved, and fp32 weights add autocast's half-precision weight copies."""
    half = weight_dtype in ("fp16", "bf16")
    w = run.weight_bytes_half if half else run.weight_bytes_fp32
    act = run.activation_bytes * (0.5 if autocast else 1.0) + batch_nbytes
    if autocast and not half:
        act += run.weight_bytes_half
    return MemberMemory(name, group, int(w), int(act), int(batch), run.method, weight_dtype)


def weight_bytes(model: "nn.Module", dtype_bytes: int) -> int:
    """Bytes of ``model``'s parameters and buffers held as `rsna_infer.models.members.cast_weights`
    does: normalisation layers in fp32, other floating tensors at ``dtype_bytes`` each."""
    from ..models.members import is_norm_layer

    total = 0
    for module in model.modules():
        keep = is_norm_layer(module)
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            if t is None:
                continue
            size = t.element_size() if keep or not t.is_floating_point() else dtype_bytes
            total += t.numel() * size
    return total


@dataclass
class MemberMemory:
    """Device memory of one member at ``batch`` samples per forward."""

    name: str
    group: str  # its preparation group (folds share one)
    weight_bytes: int
    activation_bytes: int  # peak of one run, the batch on the device included
    batch: int
    method: str  # how the activations were counted
    precision: str = "fp16"
    measured_bytes: int | None = None  # peak seen during a run (activations + batch), when measured

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "weight_mb": _mb(self.weight_bytes), "activation_mb": _mb(self.activation_bytes),
                "batch": self.batch, "method": self.method, "precision": self.precision,
                "measured_activation_mb": None if self.measured_bytes is None else _mb(self.measured_bytes)}


def _mb(n: float) -> float:
    return round(n / MB, 1)


@dataclass
class MemoryPlan:
    """The members' device memory on one replica and how they are held (see the module docstring)."""

    members: dict[str, MemberMemory]
    groups: list[tuple[str, list[str]]]  # (group key, member names), in run order
    budget_bytes: int | None  # usable bytes (after `USABLE_FRACTION`); None: unbounded (CPU)
    mode: str = "resident"
    units: dict[str, str] = field(default_factory=dict)  # streamed: group -> "group" | "member"
    reason: str = ""
    advice: list[str] = field(default_factory=list)

    @property
    def weights_bytes(self) -> int:
        return sum(m.weight_bytes for m in self.members.values())

    @property
    def resident_bytes(self) -> int:
        """Every member on the device, the largest activation peak on top."""
        return self.weights_bytes + max((m.activation_bytes for m in self.members.values()), default=0)

    def unit_bytes(self, group: str, names: Sequence[str], unit: str) -> int:
        ms = [self.members[n] for n in names]
        if unit == "group":
            return sum(m.weight_bytes for m in ms) + max((m.activation_bytes for m in ms), default=0)
        return max((m.total_bytes for m in ms), default=0)

    @property
    def streamed_bytes(self) -> int:
        """The largest unit loaded at once when streaming."""
        return max((self.unit_bytes(g, names, self.units.get(g, "group")) for g, names in self.groups), default=0)

    @property
    def peak_bytes(self) -> int:
        return self.resident_bytes if self.mode == "resident" else self.streamed_bytes

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.peak_bytes <= self.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "reason": self.reason,
            "budget_mb": None if self.budget_bytes is None else _mb(self.budget_bytes),
            "weights_mb": _mb(self.weights_bytes), "resident_peak_mb": _mb(self.resident_bytes),
            "streamed_peak_mb": _mb(max((self.unit_bytes(g, n, self.units.get(g, "group")) for g, n in self.groups), default=0)),
            "planned_peak_mb": _mb(self.peak_bytes), "fits": self.fits, "units": dict(self.units),
            "members": {n: m.to_dict() for n, m in self.members.items()}, "advice": list(self.advice),
        }


def plan_memory(members: dict[str, MemberMemory], groups: list[tuple[str, list[str]]], budget_bytes: int | None,
                mode: str = "auto") -> MemoryPlan:
    """Resident when every member fits at once (or ``mode="resident"``), else streamed by
    group (a group that does not fit alone: by member); advice when even that does not fit."""
    if mode not in MODES:
        raise ValueError(f"members must be one of {MODES}, got {mode!r}")
    plan = MemoryPlan(members, groups, budget_bytes)
    for g, names in groups:
        fits_group = budget_bytes is None or plan.unit_bytes(g, names, "group") <= budget_bytes
        plan.units[g] = "group" if fits_group or len(names) == 1 else "member"
    budget = "no budget" if budget_bytes is None else f"{_mb(budget_bytes):,.0f} MB usable"
    if mode == "resident" or (mode == "auto" and (budget_bytes is None or plan.resident_bytes <= budget_bytes)):
        plan.mode = "resident"
        plan.reason = (f"every member resident: {_mb(plan.resident_bytes):,.0f} MB ({budget})" if mode == "auto"
                       else f"resident as asked: {_mb(plan.resident_bytes):,.0f} MB ({budget})")
    else:
        plan.mode = "streamed"
        plan.reason = (f"streamed as asked ({budget})" if mode == "streamed" else
                       f"all members resident need {_mb(plan.resident_bytes):,.0f} MB, more than the {budget}: "
                       f"streamed, at most {_mb(plan.streamed_bytes):,.0f} MB at once")
    plan.advice = _advice(plan)
    return plan


def _advice(plan: MemoryPlan) -> list[str]:
    if plan.budget_bytes is None:
        return []
    out = []
    if plan.mode == "resident" and plan.resident_bytes > plan.budget_bytes:
        out.append(f"the resident ensemble needs {_mb(plan.resident_bytes):,.0f} MB of {_mb(plan.budget_bytes):,.0f} MB: "
                   "stream the members (members='streamed' / --members streamed), or use a smaller batch size")
    worst = max(plan.members.values(), key=lambda m: m.total_bytes, default=None)
    if worst is not None and worst.total_bytes > plan.budget_bytes:
        room = plan.budget_bytes - worst.weight_bytes
        per = max(1.0, worst.activation_bytes / max(worst.batch, 1))
        batch = max(1, int(room // per)) if room > 0 else 0
        out.append(f"{worst.name} alone needs {_mb(worst.total_bytes):,.0f} MB at batch {worst.batch}: "
                   + (f"a batch size of {batch} or less fits ({_mb(worst.weight_bytes):,.0f} MB of weights)" if batch
                      else "its weights alone do not fit this card")
                   + ("" if worst.precision != "fp32" else "; fp16 weights would halve them"))
    elif plan.mode == "streamed":
        out.append(f"streaming moves {_mb(plan.weights_bytes):,.0f} MB of weights to the device per chunk; a larger "
                   "--chunk-size spreads that over more studies, a smaller batch size or fewer members may let "
                   "every member stay resident")
    return out


def usable_bytes(total_bytes: float | None) -> int | None:
    """The plan's budget from a card's (free) memory."""
    return None if total_bytes is None else int(total_bytes * USABLE_FRACTION)


def device_memory_bytes(device: "torch.device", device_memory_gb: float | None = None) -> int | None:
    """What the plan may use on ``device``: ``device_memory_gb`` (GB = 1e9 bytes, a stand-in
    for a card), else a CUDA device's free memory now, else None (the CPU: no device budget)."""
    import torch

    if device_memory_gb is not None:
        if not (device_memory_gb > 0 and math.isfinite(device_memory_gb)):
            raise ValueError(f"device_memory_gb must be a positive number, got {device_memory_gb}")
        return usable_bytes(device_memory_gb * 1e9)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return usable_bytes(free)
    return None


class Residency:
    """Which members of one replica have their weights on its device. Resident members stay
    there; for a streamed plan `hold` makes room (every other member goes back to host
    memory, which copies nothing) and loads the members asked for. One per device thread."""

    def __init__(self, members: dict[str, Any], streamed: bool) -> None:
        self.members = members  # name -> LoadedMember
        self.streamed = streamed
        self.loads = 0
        self.load_s = 0.0
        self.peak_weight_bytes = sum(m.weight_bytes for m in members.values() if m.resident)

    def hold(self, names: Sequence[str]) -> dict[str, float | BaseException]:
        """Load ``names`` (streamed): per name the seconds its weights took to move, or the
        exception that kept it off the device (the caller records that member as failed for
        the studies at hand). A device fault propagates."""
        from .devices import is_device_fault

        out: dict[str, float | BaseException] = {n: 0.0 for n in names}
        if not self.streamed:
            return out
        for name, m in self.members.items():
            if name not in names and m.resident:
                m.to_host()
        _empty_cache(self.members)
        for name in names:
            m = self.members[name]
            try:
                s = m.to_device()
            except Exception as e:
                if is_device_fault(e):
                    raise
                m.to_host()
                out[name] = e
                continue
            if s:
                self.loads += 1
                self.load_s += s
            out[name] = s
        self.peak_weight_bytes = max(self.peak_weight_bytes, sum(m.weight_bytes for m in self.members.values() if m.resident))
        return out


def _empty_cache(members: dict[str, Any]) -> None:
    import torch

    devices = {m.device for m in members.values() if m.device.type == "cuda"}
    for d in devices:
        with torch.cuda.device(d):
            torch.cuda.empty_cache()


class MemoryProbe:
    """The peak memory of one forward beyond what was allocated before it: CUDA's allocator
    statistics on a GPU; on the CPU (when a device budget stands in for a card) `LiveBytes`
    on the real tensors, without changing how they are computed."""

    def __init__(self, device: "torch.device", cpu: bool = False) -> None:
        self.device = device
        self.cpu = cpu
        self.bytes = 0
        self._live: LiveBytes | None = None
        self._base = 0

    def __enter__(self) -> "MemoryProbe":
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.cpu:
            self._live = LiveBytes(decompose=False).__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.device.type == "cuda":
            self.bytes = int(torch.cuda.max_memory_allocated(self.device) - self._base)
        elif self._live is not None:
            self._live.__exit__(*exc)
            self.bytes = int(self._live.peak)
