"""One ensemble member made ready to run: family object + network with its weights loaded
strictly and proved to work by one dummy forward.

Both the predictor and ``rsna-infer manifest verify`` build members here, so a manifest that
verifies is a manifest that runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .constants import N_CLASSES, N_CONDITIONS, N_LEVELS
from .manifest import ManifestError, load_weights
from .registry import make_family
from .specs import ModelEntry

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .family import Family

logger = logging.getLogger(__name__)


@dataclass
class LoadedMember:
    """A built, loaded, checked model on its device."""

    entry: ModelEntry
    family: "Family"
    model: "nn.Module"
    device: "torch.device"

    @property
    def name(self) -> str:
        return self.entry.name


def autocast_for(device: "torch.device"):
    """fp16 autocast on CUDA, a no-op context elsewhere (CPU inference stays fp32)."""
    import contextlib

    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def load_member(entry: ModelEntry, weights: str | Path, device: "str | torch.device" = "cpu", tta: bool = True) -> LoadedMember:
    """Build ``entry``'s network, load its safetensors weights strictly, move it to ``device``
    and run one dummy forward (``family.example_batch``) through ``family.run``.

    Raises `ManifestError` naming the model and what failed.
    """
    import torch

    device = torch.device(device)
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
    model.eval().to(device)
    member = LoadedMember(entry, family, model, device)
    check_forward(member, tta=tta)
    return member


def check_forward(member: LoadedMember, tta: bool = True) -> None:
    """One forward on the family's example batch: right batch size, finite, and for stage 2
    the canonical ``[B, 5, 5, 3]`` logits."""
    import torch

    entry = member.entry
    try:
        batch = {k: v.to(member.device) for k, v in member.family.example_batch(2).items()}
        with torch.inference_mode(), autocast_for(member.device):
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
