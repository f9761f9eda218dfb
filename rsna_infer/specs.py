"""Model input contracts and manifest entries, as validated dataclasses.

A model's input (size, slices, channels, intensity normalisation) is data, stored in its
manifest entry, never a constant in code: the same family code serves a 64-px demo model
and a 384-px competition model. This module imports no torch so that a manifest can be
validated instantly.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .constants import GROUPS
from .validate import FieldError, coerce, integer, optional_dict, parse_fields

if TYPE_CHECKING:
    from .io.volume import Volume

#: How a member's weights may be held on a GPU (`ModelEntry.precision`).
WEIGHT_PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
#: Stage-1 families (keypoints) in the order the predictor runs them: later ones may use
#: earlier ones' keypoints (the axial xy model needs the level classifier's slices).
STAGE1_FAMILIES: tuple[str, ...] = ("sag2d", "sag3d", "axial3d", "axial_level", "axial_xy")
#: Stage-2 families (grades): three-view fusion (model1) and per-view ROI (model2).
STAGE2_FAMILIES: tuple[str, ...] = ("fusion", "roi")
FAMILIES: tuple[str, ...] = STAGE1_FAMILIES + STAGE2_FAMILIES
#: What a model name (and a training config's name, its prefix) may hold: it names files and
#: report rows.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class SpecError(FieldError):
    """A manifest entry, input spec or family option is invalid; the message names the field."""


@dataclass(frozen=True)
class NormSpec:
    """Intensity normalisation: clip to per-volume percentiles, scale to [0, 1], then
    ``(x - mean) / std``. Percentiles are robust to the very different scanner ranges."""

    lo_pct: float = 1.0
    hi_pct: float = 99.5
    mean: float = 0.5
    std: float = 0.25

    def __post_init__(self) -> None:
        if not 0.0 <= self.lo_pct < self.hi_pct <= 100.0:
            raise SpecError(f"norm: need 0 <= lo_pct < hi_pct <= 100, got {self.lo_pct}, {self.hi_pct}")
        if self.std <= 0:
            raise SpecError(f"norm.std must be > 0, got {self.std}")

    def bounds(self, pixels: "np.ndarray | Volume") -> tuple[float, float]:
        """The clip range for one volume (computed once per volume, applied to every crop).
        Given a `Volume`, its cached percentiles are used."""
        if hasattr(pixels, "percentiles"):
            lo, hi = pixels.percentiles(self.lo_pct, self.hi_pct)
        else:
            from .quantiles import percentiles, subsample

            lo, hi = percentiles(subsample(np.asarray(pixels, dtype=np.float32)), [self.lo_pct, self.hi_pct])
        if not np.isfinite(lo) or not np.isfinite(hi):
            return 0.0, 1.0
        return float(lo), float(max(hi, lo + 1e-3))

    def apply(self, arr: np.ndarray, bounds: tuple[float, float] | None = None) -> np.ndarray:
        """Normalised float32 copy of ``arr`` (``bounds`` from `bounds`, else from ``arr``)."""
        lo, hi = bounds if bounds is not None else self.bounds(arr)
        out = (np.clip(np.asarray(arr, dtype=np.float32), lo, hi) - lo) / (hi - lo)
        return ((out - self.mean) / self.std).astype(np.float32, copy=False)


@dataclass(frozen=True)
class InputSpec:
    """What a model eats. ``size`` is ``(H, W)`` for 2-D inputs or ``(D, H, W)`` for 3-D ones;
    ``n_slices`` is the number of slices taken per view (2.5-D channels, crop depth or the
    slice sample count); ``crop_mm`` the physical side of a stage-2 crop (None: family
    default). ``extra`` holds family-specific options (documented by each family)."""

    size: tuple[int, ...]
    n_slices: int = 1
    in_chans: int = 1
    crop_mm: float | None = None
    norm: NormSpec = field(default_factory=NormSpec)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        size = tuple(int(s) for s in self.size)
        if len(size) not in (2, 3) or min(size) < 1:
            raise SpecError(f"input.size must be (H, W) or (D, H, W) of positive ints, got {self.size}")
        object.__setattr__(self, "size", size)
        if int(self.n_slices) < 1:
            raise SpecError(f"input.n_slices must be >= 1, got {self.n_slices}")
        if int(self.in_chans) < 1:
            raise SpecError(f"input.in_chans must be >= 1, got {self.in_chans}")
        if self.crop_mm is not None and float(self.crop_mm) <= 0:
            raise SpecError(f"input.crop_mm must be > 0, got {self.crop_mm}")

    @classmethod
    def from_dict(cls, d: Any, context: str = "") -> "InputSpec":
        """Validated spec from a manifest's or config's ``input`` object (``context`` prefixes
        every message, e.g. ``"model 'm0': "``)."""
        where = f"{context}input"

        def norm(value: Any, label: str) -> NormSpec:
            try:
                return NormSpec(**parse_fields(NormSpec, value or {}, label, error=SpecError))
            except SpecError as e:
                raise SpecError(e if str(e).startswith(label) else f"{where}.{e}") from None

        kw = parse_fields(cls, d, where, error=SpecError, convert={
            "size": lambda v, label: coerce(v, tuple, label), "n_slices": integer, "in_chans": integer,
            "norm": norm, "extra": optional_dict,
        })
        try:
            return cls(**kw)
        except SpecError as e:
            raise SpecError(f"{context}{e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size)
        return d


@dataclass
class ModelEntry:
    """One trained model in the manifest.

    ``family`` picks the code (see `STAGE1_FAMILIES`, `STAGE2_FAMILIES`); ``variant`` picks
    the flavour inside it (e.g. ``"t2"``/``"t1"`` for sagittal keypoints, ``"spinal"`` for an
    ROI grader); ``model_kwargs`` sets the head (documented per family). ``blend`` weights
    are per condition group and used by stage-2 members only. ``precision``: how its weights
    are held on a GPU (`WEIGHT_PRECISIONS`): ``auto`` half precision (fp16), ``bf16`` bfloat16
    where the card supports it (else fp16), ``fp32`` full precision; on the CPU weights are fp32.
    """

    name: str
    family: str
    variant: str
    arch: str
    input: InputSpec
    file: str
    sha256: str = ""
    fold: int = 0
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    blend: dict[str, float] = field(default_factory=dict)
    precision: str = "auto"

    @property
    def stage(self) -> int:
        return 1 if self.family in STAGE1_FAMILIES else 2

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise SpecError("model name must be a non-empty string")
        if self.family not in FAMILIES:
            raise SpecError(f"model {self.name!r}: unknown family {self.family!r}; expected one of {FAMILIES}")
        if ":" in self.arch:
            raise SpecError(
                f"model {self.name!r}: arch {self.arch!r} names a model hub entry; inference is offline: use the "
                "timm / timm_3d architecture name (e.g. 'convnext_tiny') with a local weights file"
            )
        if self.precision not in WEIGHT_PRECISIONS:
            raise SpecError(f"model {self.name!r}: precision {self.precision!r} unknown; expected one of {WEIGHT_PRECISIONS}")
        for g, w in self.blend.items():
            if g not in GROUPS:
                raise SpecError(f"model {self.name!r}: blend group {g!r} unknown; expected {GROUPS}")
            if not np.isfinite(float(w)) or float(w) < 0:
                raise SpecError(f"model {self.name!r}: blend weight for {g!r} must be finite and >= 0, got {w}")

    @classmethod
    def from_dict(cls, d: Any) -> "ModelEntry":
        """Validated entry from a manifest's model object (``stage`` is optional and must
        match the family)."""
        name = d.get("name", "<unnamed>") if isinstance(d, dict) else "<unnamed>"
        where = f"model {name!r}"
        kw = parse_fields(cls, d, where if isinstance(d, dict) else "model entry", sep=": ", error=SpecError,
                          ignore=("stage",), convert={
            "input": lambda v, label: InputSpec.from_dict(v, context=f"{where}: "),
            "fold": integer,
            "arch_kwargs": optional_dict,
            "model_kwargs": optional_dict,
            "blend": lambda v, label: {str(k): float(w) for k, w in optional_dict(v, label).items()},
        })
        entry = cls(**kw)
        try:
            stage = integer(d["stage"], f"{where}: stage") if "stage" in d else entry.stage
        except FieldError as e:
            raise SpecError(str(e)) from None
        if stage != entry.stage:
            raise SpecError(f"{where}: stage {d['stage']} does not match family {entry.family!r} (stage {entry.stage})")
        return entry

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stage": self.stage,
            "family": self.family,
            "variant": self.variant,
            "arch": self.arch,
            "arch_kwargs": dict(self.arch_kwargs),
            "model_kwargs": dict(self.model_kwargs),
            "input": self.input.to_dict(),
            "fold": self.fold,
            "file": self.file,
            "sha256": self.sha256,
            "blend": dict(self.blend),
        } | ({} if self.precision == "auto" else {"precision": self.precision})
