"""Training configs: one JSON file per model (family, variant, backbone, input, schedule).

A config is validated completely on load, before any data is read, so a typo costs
seconds, not a GPU hour: unknown fields, wrong types, impossible values and a family that
rejects its variant or kwargs all fail with a message naming the field.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..specs import FAMILIES, NAME_PATTERN, STAGE1_FAMILIES, InputSpec, ModelEntry
from ..validate import optional_dict, parse_fields


class ConfigError(ValueError):
    """A training config is invalid; the message names the field and what to fix."""


KEYPOINT_SOURCES = ("truth", "predicted", "mixed")
VAL_KEYPOINT_SOURCES = ("predicted", "truth")
MISSING_KEYPOINTS = ("error", "truth", "skip")


@dataclass
class TrainConfig:
    """Everything that defines one trained model except the data and the fold.

    ``name`` names the ensemble member; fold ``k`` of it is exported as ``{name}_f{k}``.
    ``epochs`` pass over the training studies ``repeats`` times each (small sets: more
    steps per epoch, fewer validations). ``warmup_epochs`` of linear warm-up (at most half
    the run) precede a cosine decay to ``lr * min_lr_ratio``. ``ema_decay`` (e.g. 0.999)
    keeps an exponential moving average of the weights, which is what gets validated and
    exported. ``pretrained``: where the backbones start (`rsna_infer.train.init_weights`;
    training only, inference never reads it).

    Stage 2 only: ``keypoints`` says where *training* crops come from: ``"truth"`` (labelled
    points, jittered by the family), ``"predicted"`` (out-of-fold stage-1 keypoints given with
    ``--keypoints``) or ``"mixed"`` (predicted with probability ``predicted_prob``, else
    truth). *Validation* crops, hence the out-of-fold logits that pick the epoch and fit the
    blend, come from the predicted keypoints (``val_keypoints: "predicted"``, as at test
    time); ``"truth"`` validates on the labelled points instead (optimistic; the run records
    it). ``missing_keypoints`` says what happens to a validation study the keypoint files do
    not cover: ``"error"`` (stop before training), ``"truth"`` (validate it on its labelled
    points) or ``"skip"`` (leave it out of validation); both choices are logged and recorded.
    """

    name: str
    family: str
    variant: str
    arch: str
    input: InputSpec
    epochs: int
    lr: float
    batch_size: int
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    repeats: int = 1
    seed: int = 0
    n_folds: int = 5
    ema_decay: float | None = None
    grad_clip: float | None = 1.0
    amp: bool = True
    num_workers: int = 0
    val_batch_size: int | None = None
    select: str = field(default="best", metadata={"choices": ("best", "last")})
    keypoints: str = field(default="truth", metadata={"choices": KEYPOINT_SOURCES})
    predicted_prob: float = 0.5
    val_keypoints: str = field(default="predicted", metadata={"choices": VAL_KEYPOINT_SOURCES})
    missing_keypoints: str = field(default="error", metadata={"choices": MISSING_KEYPOINTS})
    pretrained: Any = None
    export_dtype: str = field(default="float32", metadata={"choices": ("float32", "float16")})
    notes: str = ""

    @property
    def stage(self) -> int:
        return 1 if self.family in STAGE1_FAMILIES else 2

    def effective_warmup_epochs(self) -> float:
        """Warm-up as run: at most half of the epochs (so ``--set epochs=1`` works with any
        config's warm-up and still decays)."""
        return min(float(self.warmup_epochs), self.epochs / 2.0)

    def entry_name(self, fold: int) -> str:
        """Manifest entry name of fold ``fold`` (-1: trained on every study)."""
        return f"{self.name}_f{fold}" if fold >= 0 else f"{self.name}_all"

    def model_entry(self, fold: int, file: str = "", sha256: str = "") -> ModelEntry:
        """The manifest entry this config produces for ``fold`` (file/sha filled at export;
        fold -1, trained on every study, stays -1: it has no out-of-fold studies)."""
        return ModelEntry(
            name=self.entry_name(fold),
            family=self.family,
            variant=self.variant,
            arch=self.arch,
            input=self.input,
            file=file or f"weights/{self.entry_name(fold)}.safetensors",
            sha256=sha256,
            fold=fold,
            arch_kwargs=dict(self.arch_kwargs),
            model_kwargs=dict(self.model_kwargs),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input"] = self.input.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any, *, check_family: bool = True) -> "TrainConfig":
        """Validate and build; ``check_family`` also instantiates the family (imports torch)."""
        kw = parse_fields(cls, d, "config", error=ConfigError, convert={
            "input": lambda v, label: InputSpec.from_dict(v, context="config: "),
            "arch_kwargs": optional_dict,
            "model_kwargs": optional_dict,
        })
        cfg = cls(**kw)
        cfg.check()
        if check_family:
            cfg._check_family()
        return cfg

    # -- validation -----------------------------------------------------------------------
    def check(self) -> None:
        """The rules on the parsed values (types and choices were checked by `from_dict`)."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(bool(NAME_PATTERN.match(self.name)),
             f"name must be letters, digits, '_', '-', '.' (it becomes a file name), got {self.name!r}")
        need(self.family in FAMILIES, f"family {self.family!r} unknown; expected one of {list(FAMILIES)}")
        for key in ("variant", "arch"):
            need(bool(getattr(self, key)), f"{key} must be a non-empty string")
        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.repeats >= 1, f"repeats must be >= 1, got {self.repeats}")
        need(self.n_folds >= 2, f"n_folds must be >= 2, got {self.n_folds}")
        need(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        need(0 < self.lr < 1, f"lr must be in (0, 1), got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(0 <= self.predicted_prob <= 1, f"predicted_prob must be in [0, 1], got {self.predicted_prob}")
        need(self.ema_decay is None or 0 < self.ema_decay < 1, f"ema_decay must be null or in (0, 1), got {self.ema_decay!r}")
        need(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be null or > 0, got {self.grad_clip!r}")
        need(self.val_batch_size is None or self.val_batch_size >= 1,
             f"val_batch_size must be null or a positive integer, got {self.val_batch_size!r}")
        need(self.stage == 2 or self.keypoints == "truth",
             f"keypoints={self.keypoints!r} applies to stage-2 families only ({self.family!r} is stage 1)")
        from .init_weights import check_spec

        bad = check_spec(self.pretrained)
        need(bad is None, str(bad))

    def _check_family(self) -> None:
        """Let the family reject its variant/kwargs and build the network once (cheap for
        the configs we ship; catches a wrong arch name before any data is read)."""
        from ..models.registry import make_family

        try:
            family = make_family(self.model_entry(0))
            family.build()
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"config {self.name!r}: family {self.family!r} rejects it: {e}") from e


def load_config(path: str | Path, *, check_family: bool = True, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read, override (e.g. ``{"epochs": 1}`` from the command line) and validate a config."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    if isinstance(raw, dict) and overrides:
        raw = {**raw, **overrides}
    try:
        return TrainConfig.from_dict(raw, check_family=check_family)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` from the command line; the value is JSON when it parses, else a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value
