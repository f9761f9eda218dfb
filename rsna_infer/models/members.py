"""One ensemble member made ready to run: family object + network with its weights loaded
strictly and proved to work by one dummy forward.

Both the predictor and ``rsna-infer manifest verify`` build members here, so a manifest that
verifies is a manifest that runs.

Precision: on a GPU the weights are held in half precision (fp16; bf16 where the member
asks for it with ``"precision": "bf16"`` and the card supports it) and every forward runs
under the matching autocast, so a member takes half the memory of its fp32 weights and
autocast has no weight copies to make. Normalisation layers keep fp32 parameters (their
statistics are precision-sensitive and tiny). The load-time dummy forward runs in the
precision the member will run in; a member whose half-precision forward fails or is not
finite falls back to fp32 weights, with a note. On the CPU everything is fp32
(``precision="fp16"`` rounds the weights to fp16 and keeps computing in fp32: what storing
them in half precision loses, for tests).

Residency: a member is *resident* (its weights on the device for the whole run) or
*streamed*: its weights stay in (pinned) host memory and `LoadedMember.to_device` /
`to_host` move them when the predictor runs it (`rsna_infer.runtime.memory` decides).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..constants import N_CLASSES, N_CONDITIONS, N_LEVELS
from ..specs import ModelEntry
from .manifest import ManifestError, load_weights
from .registry import make_family

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .family import Family

logger = logging.getLogger(__name__)

#: ``precision=`` of `load_member` / `rsna_infer.inference.engine.Predictor`.
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "fp16")


@dataclass
class LoadedMember:
    """A built, loaded, checked model on its device (or, streamed, in host memory)."""

    entry: ModelEntry
    family: "Family"
    model: "nn.Module"
    device: "torch.device"
    weight_dtype: "torch.dtype | None" = None  # of the convolution / linear weights on the device
    autocast_dtype: "torch.dtype | None" = None  # None: no autocast (CPU)
    resident: bool = True  # weights on ``device`` (False: in host memory until `to_device`)
    rounded_to: "torch.dtype | None" = None  # CPU: weights rounded to this dtype, computed in fp32
    notes: list[str] = field(default_factory=list)
    _host_of: dict[int, Any] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def precision(self) -> str:
        """``"fp16 weights, fp16 autocast"``, ``"fp32"``... for the run report."""
        w = dtype_name(self.weight_dtype)
        if self.rounded_to is not None:
            return f"fp32 (weights rounded to {dtype_name(self.rounded_to)})"
        return w if self.autocast_dtype is None else f"{w} weights, {dtype_name(self.autocast_dtype)} autocast"

    @property
    def weight_bytes(self) -> int:
        """Bytes of the parameters and buffers as they are held (on the device when resident)."""
        return module_bytes(self.model)

    def autocast(self) -> Any:
        return autocast_for(self.device, self.autocast_dtype)

    def to_device(self) -> float:
        """Move the weights to the device (streamed members); seconds it took."""
        import time

        import torch

        if self.resident:
            return 0.0
        t = time.perf_counter()
        self._host_of.clear()

        def to_dev(x: "torch.Tensor") -> "torch.Tensor":
            d = x.to(self.device, non_blocking=True)
            self._host_of[id(x)] = x.data if isinstance(x, torch.nn.Parameter) else x  # a parameter keeps its object
            self._host_of[id(d)] = x
            return d

        self.model._apply(to_dev)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.resident = True
        return time.perf_counter() - t

    def keep_on_device(self) -> float:
        """Resident for good (a streamed member made resident): on the device, with no host
        copies kept to go back to; seconds it took."""
        seconds = self.to_device()
        self._host_of.clear()
        return seconds

    def to_host(self) -> None:
        """Back to host memory: the host copies are kept, so this copies nothing."""
        if self.resident and self._host_of:
            self.model._apply(lambda x: self._host_of.get(id(x), x))
            self._host_of.clear()
            self.resident = False


def dtype_name(dtype: Any) -> str:
    return {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}.get(str(dtype), str(dtype))


def module_bytes(model: "nn.Module") -> int:
    """Bytes of a module's parameters and buffers (each tensor once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def autocast_for(device: "torch.device", dtype: "torch.dtype | None" = None) -> Any:
    """Autocast on CUDA (fp16 unless ``dtype`` says bf16), a no-op context elsewhere (CPU
    inference stays fp32)."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype or torch.float16)
    return contextlib.nullcontext()


def weight_dtype(entry: ModelEntry, device: "torch.device", precision: str = "auto") -> "torch.dtype":
    """The dtype ``entry``'s weights are held in on ``device`` (see the module docstring)."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device.type != "cuda":
        return torch.float16 if precision == "fp16" else torch.float32
    if precision == "fp32" or entry.precision == "fp32":
        return torch.float32
    if entry.precision == "bf16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def is_norm_layer(module: "nn.Module") -> bool:
    """Normalisation layers (batch, layer, group, instance norm, and timm's subclasses)."""
    from torch import nn

    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm))


def cast_weights(model: "nn.Module", dtype: "torch.dtype", keep_storage_dtype: bool = False) -> "nn.Module":
    """Floating parameters and buffers to ``dtype``, except those of normalisation layers.
    ``keep_storage_dtype``: round to ``dtype`` and back (the CPU stand-in for half weights)."""
    import torch

    for module in model.modules():
        if is_norm_layer(module):
            continue
        for store in (module._parameters, module._buffers):
            for key, t in store.items():
                if t is None or not t.is_floating_point() or t.dtype == dtype:
                    continue
                with torch.no_grad():
                    new = t.to(dtype).to(t.dtype) if keep_storage_dtype else t.to(dtype)
                if isinstance(t, torch.nn.Parameter):
                    t.data = new
                else:
                    store[key] = new
    for module in model.modules():  # recurrent layers cache their flat weights
        if isinstance(module, torch.nn.RNNBase):
            module._init_flat_weights()
    return model


def to_channels_last(model: "nn.Module") -> "nn.Module":
    """4-D weights channels-last, 5-D (3-D convolutions) channels-last-3d; others as they are."""
    import torch

    def fmt(t: "torch.Tensor") -> "torch.Tensor":
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        if t.dim() == 5:
            return t.contiguous(memory_format=torch.channels_last_3d)
        return t

    return model._apply(fmt)


def load_member(
    entry: ModelEntry,
    weights: str | Path,
    device: "str | torch.device" = "cpu",
    tta: bool = True,
    precision: str = "auto",
    channels_last: bool = False,
    resident: bool = True,
) -> LoadedMember:
    """Build ``entry``'s network, load its safetensors weights strictly, hold them in the
    precision of `weight_dtype`, move them to ``device`` and run one dummy forward
    (``family.example_batch``) through ``family.run``. ``channels_last``: 4-D weights in
    channels-last memory format (faster convolutions on tensor cores for some networks).
    ``resident=False``: after the check the weights go back to (pinned) host memory.

    Raises `ManifestError` naming the model and what failed.
    """
    import torch

    device = torch.device(device)
    dtype = weight_dtype(entry, device, precision)
    member = _build(entry, weights, device, dtype, channels_last)
    try:
        check_forward(member, tta=tta)
    except ManifestError as e:
        if device.type != "cuda" or dtype == torch.float32:
            raise
        note = (f"model {entry.name!r}: the {dtype_name(dtype)}-weight check failed ({e}); its weights stay fp32 "
                "(twice the device memory)")
        logger.warning("%s", note)
        del member
        torch.cuda.empty_cache()
        member = _build(entry, weights, device, torch.float32, channels_last)
        check_forward(member, tta=tta)
        member.notes.append(note)
    if not resident:
        member.resident = True
        member._host_of = {}
        to_pinned_host(member)
    return member


def _build(entry: ModelEntry, weights: str | Path, device: "torch.device", dtype: "torch.dtype",
           channels_last: bool) -> LoadedMember:
    import torch

    try:
        family = make_family(entry)
    except Exception as e:  # unknown variant / bad model_kwargs
        raise ManifestError(f"model {entry.name!r}: cannot set up family {entry.family!r}: {e}") from e
    try:
        model = family.build()
    except Exception as e:
        raise ManifestError(f"model {entry.name!r}: cannot build {entry.family}/{entry.variant} on {entry.arch!r}: {e}") from e
    try:
        load_weights(model, weights, strict=True)
    except ManifestError as e:
        raise ManifestError(f"model {entry.name!r}: {e}") from None
    model.eval()
    on_cpu = device.type != "cuda"
    if dtype != torch.float32:
        cast_weights(model, dtype, keep_storage_dtype=on_cpu)
    if channels_last:
        to_channels_last(model)
    model.to(device)
    autocast = None if on_cpu else (torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
    rounded = dtype if on_cpu and dtype != torch.float32 else None
    return LoadedMember(entry, family, model, device, torch.float32 if on_cpu else dtype, autocast, rounded_to=rounded)


def to_pinned_host(member: LoadedMember) -> None:
    """Streamed: the weights wait in host memory (pinned on CUDA, so loading them is a fast
    asynchronous copy) until `LoadedMember.to_device`."""
    import torch

    pin = member.device.type == "cuda"
    member.model._apply(lambda x: x.to("cpu").pin_memory() if pin else x.to("cpu"))
    member.resident = False
    if pin:
        torch.cuda.empty_cache()


def check_forward(member: LoadedMember, tta: bool = True) -> None:
    """One forward on the family's example batch: right batch size, finite, and for stage 2
    the canonical ``[B, 5, 5, 3]`` logits."""
    import torch

    entry = member.entry
    try:
        batch = {k: v.to(member.device) for k, v in member.family.example_batch(2).items()}
        with torch.inference_mode(), member.autocast():
            out = member.family.run(member.model, batch, tta=tta)
    except Exception as e:
        raise ManifestError(f"model {entry.name!r}: dummy forward failed ({type(e).__name__}: {e})") from e
    if not isinstance(out, torch.Tensor) or out.ndim < 1 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ManifestError(f"model {entry.name!r}: dummy forward returned {shape}, expected a batch of 2")
    if entry.stage == 2 and tuple(out.shape[1:]) != (N_CONDITIONS, N_LEVELS, N_CLASSES):
        raise ManifestError(f"model {entry.name!r}: stage-2 output must be [B, 5, 5, 3] logits, got {tuple(out.shape)}")
    if not bool(torch.isfinite(out.float()).all()):
        raise ManifestError(f"model {entry.name!r}: dummy forward produced non-finite values")
