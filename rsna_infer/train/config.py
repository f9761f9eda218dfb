"""Training configs: one JSON file per model (family, variant, backbone, input, schedule).

A config is validated completely on load, before any data is read, so a typo costs
seconds, not a GPU hour: unknown fields, wrong types, impossible values and a family that
rejects its variant or kwargs all fail with a message naming the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..specs import FAMILIES, STAGE1_FAMILIES, InputSpec, ModelEntry, SpecError


class ConfigError(ValueError):
    """A training config is invalid; the message names the field and what to fix."""


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
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
    select: str = "best"
    keypoints: str = "truth"
    predicted_prob: float = 0.5
    val_keypoints: str = "predicted"
    missing_keypoints: str = "error"
    pretrained: Any = None
    export_dtype: str = "float32"
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
    def from_dict(cls, d: dict[str, Any], *, check_family: bool = True) -> "TrainConfig":
        """Validate and build; ``check_family`` also instantiates the family (imports torch)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; allowed: {sorted(allowed)}")
        required = ("name", "family", "variant", "arch", "input", "epochs", "lr", "batch_size")
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"config is missing required field(s) {missing}")
        try:
            spec = InputSpec.from_dict(d["input"])
        except SpecError as e:
            raise ConfigError(f"config field 'input': {e}") from None
        kw = {k: v for k, v in d.items() if k != "input"}
        cfg = cls(input=spec, **kw)
        cfg._validate()
        if check_family:
            cfg._check_family()
        return cfg

    # -- validation -----------------------------------------------------------------------
    def _validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(isinstance(self.name, str) and bool(_NAME_RE.match(self.name)),
             f"name must be letters, digits, '_', '-', '.' (it becomes a file name), got {self.name!r}")
        need(self.family in FAMILIES, f"family {self.family!r} unknown; expected one of {list(FAMILIES)}")
        for key in ("variant", "arch"):
            need(isinstance(getattr(self, key), str) and bool(getattr(self, key)), f"{key} must be a non-empty string")
        for key in ("arch_kwargs", "model_kwargs"):
            need(isinstance(getattr(self, key), dict), f"{key} must be an object")
        for key in ("epochs", "batch_size", "repeats", "n_folds", "seed", "num_workers"):
            val = getattr(self, key)
            need(isinstance(val, int) and not isinstance(val, bool), f"{key} must be an integer, got {val!r}")
        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.repeats >= 1, f"repeats must be >= 1, got {self.repeats}")
        need(self.n_folds >= 2, f"n_folds must be >= 2, got {self.n_folds}")
        need(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        for key in ("lr", "weight_decay", "warmup_epochs", "min_lr_ratio", "predicted_prob"):
            val = getattr(self, key)
            need(isinstance(val, (int, float)) and not isinstance(val, bool), f"{key} must be a number, got {val!r}")
        need(0 < self.lr < 1, f"lr must be in (0, 1), got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(0 <= self.predicted_prob <= 1, f"predicted_prob must be in [0, 1], got {self.predicted_prob}")
        need(self.ema_decay is None or (isinstance(self.ema_decay, (int, float)) and 0 < self.ema_decay < 1),
             f"ema_decay must be null or in (0, 1), got {self.ema_decay!r}")
        need(self.grad_clip is None or (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0),
             f"grad_clip must be null or > 0, got {self.grad_clip!r}")
        need(isinstance(self.amp, bool), f"amp must be true/false, got {self.amp!r}")
        need(self.val_batch_size is None or (isinstance(self.val_batch_size, int) and self.val_batch_size >= 1),
             f"val_batch_size must be null or a positive integer, got {self.val_batch_size!r}")
        need(self.select in ("best", "last"), f"select must be 'best' or 'last', got {self.select!r}")
        need(self.keypoints in KEYPOINT_SOURCES, f"keypoints must be one of {KEYPOINT_SOURCES}, got {self.keypoints!r}")
        need(self.stage == 2 or self.keypoints == "truth",
             f"keypoints={self.keypoints!r} applies to stage-2 families only ({self.family!r} is stage 1)")
        need(self.val_keypoints in VAL_KEYPOINT_SOURCES,
             f"val_keypoints must be one of {VAL_KEYPOINT_SOURCES}, got {self.val_keypoints!r}")
        need(self.missing_keypoints in MISSING_KEYPOINTS,
             f"missing_keypoints must be one of {MISSING_KEYPOINTS}, got {self.missing_keypoints!r}")
        from .init_weights import check_spec

        bad = check_spec(self.pretrained)
        need(bad is None, str(bad))
        need(self.export_dtype in ("float32", "float16"), f"export_dtype must be 'float32' or 'float16', got {self.export_dtype!r}")

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
