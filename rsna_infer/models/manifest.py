"""The weights manifest: which models make up the ensemble, where their weights are, and how
to check that they are the ones that were trained.

A manifest is one JSON file::

    {
      "version": 1,
      "notes": "what these weights are",
      "priors": [[[0.75, 0.17, 0.08], ...5 levels], ...5 conditions],   # optional
      "split": "3f2a...",   # optional: id of the fold split the models were trained on
      "prior_groups": ["foraminal"],   # optional: groups the fitted blend gives the class priors
      "models": [ {ModelEntry}, ... ]
    }

Weight files are safetensors (no code execution, fast loads) named relative to the manifest's
own folder, so a manifest and its ``weights/`` folder can be moved together (e.g. into a
Kaggle dataset). Validation happens on load, before any DICOM is read: unknown fields,
duplicate names, missing files and (with ``verify=True``) sha256 mismatches are errors that
name the field or file. Importing this module does not import torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..constants import GROUPS
from ..output import atomic_copy, atomic_write_text
from ..specs import NAME_PATTERN, ModelEntry, SpecError
from ..validate import head, parse_fields

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

#: Manifest format version this code reads and writes.
MANIFEST_VERSION = 1

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """The manifest or one of its weight files is unusable; the message says which and why."""


def default_priors() -> np.ndarray:
    """[5, 5, 3] fallback priors used when a manifest has none: the metric-optimal constants
    of `rsna_infer.submission.DEFAULT_PRIORS` (approximate competition class shares per
    condition group). Real manifests carry per-target priors fitted on the training labels
    (`rsna_infer.submission.priors_from_labels`)."""
    from ..submission import resolve_priors  # pandas, not torch: imported only when needed

    return resolve_priors(None)


@dataclass
class Manifest:
    """A validated manifest. ``root`` is the folder that entry files are relative to."""

    models: list[ModelEntry] = field(default_factory=list)
    priors: np.ndarray = field(default_factory=default_priors)  # [5 conditions, 5 levels, 3]
    notes: str = ""
    version: int = MANIFEST_VERSION
    root: Path = field(default_factory=Path.cwd)
    path: Path | None = None  # the file it was loaded from
    sha256: str = ""  # of the file's bytes, for the run report
    priors_given: bool = False  # False: `priors` are the documented default
    split: str = ""  # fold split id of the training runs (rsna_infer.train.folds.split_id); "" = unrecorded
    #: Condition groups whose out-of-fold blend fit chose the class priors over every member
    #: (`rsna_infer.train.blend`): their stage-2 weights are all zero on purpose.
    prior_groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.priors = _check_priors(self.priors, "priors")
        bad = [g for g in self.prior_groups if g not in GROUPS]
        if bad:
            raise ManifestError(f"{self._where()}'prior_groups' {bad} are not condition groups; use some of {list(GROUPS)}")
        self.prior_groups = tuple(g for g in GROUPS if g in self.prior_groups)
        self.root = Path(self.root)
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ManifestError(f"{self._where()}duplicate model name(s) {dup}; names must be unique")
        for m in self.models:
            if not NAME_PATTERN.match(m.name):
                raise ManifestError(
                    f"{self._where()}model name {m.name!r} must be letters, digits, '_', '.', '-' (it names files and report rows)"
                )
            if m.stage == 1 and m.blend:
                raise ManifestError(
                    f"{self._where()}model {m.name!r}: 'blend' is for stage-2 members; stage-1 folds are averaged"
                )
            if m.sha256 and not _SHA_RE.match(m.sha256):
                raise ManifestError(f"{self._where()}model {m.name!r}: sha256 must be 64 lowercase hex digits, got {m.sha256!r}")

    def check_for_prediction(self) -> None:
        """What a manifest must also satisfy to predict (training tools build manifests one
        entry at a time and may reference weights elsewhere): weight files inside its folder
        (`check_contained`) and a positive blend weight in every condition group."""
        self.check_contained()
        self.check_blend_groups()

    def check_blend_groups(self) -> None:
        """Every condition group needs a positive weight somewhere among the stage-2 members,
        unless it is one of ``prior_groups``: a group whose weights sum to zero by accident
        would silently give priors in every row. A group listed in ``prior_groups`` must have
        no positive weight (the two would contradict each other)."""
        from .ensemble import member_weights

        if not self.stage2:
            return
        sums = member_weights(self.stage2).sum(0)
        dead = [g for g, s in zip(GROUPS, sums) if not s > 0 and g not in self.prior_groups]
        if dead:
            raise ManifestError(
                f"{self._where()}the blend weights of condition group(s) {dead} sum to zero over the stage-2 members "
                f"{[m.name for m in self.stage2]}: every such row would be the priors. Give a member a positive "
                "'blend' weight there (or drop 'blend' from an entry to weigh it 1 in every group), or, if the "
                "priors are meant (as `rsna-infer fit-blend` decides when no member beats them), list the group "
                "in 'prior_groups'"
            )
        both = [g for g, s in zip(GROUPS, sums) if s > 0 and g in self.prior_groups]
        if both:
            raise ManifestError(
                f"{self._where()}condition group(s) {both} are listed in 'prior_groups' but stage-2 members have a "
                "positive blend weight there; set those weights to 0 or remove the group from 'prior_groups'"
            )

    def _where(self) -> str:
        return f"manifest {self.path}: " if self.path else ""

    def resolve(self, entry: ModelEntry) -> Path:
        """Absolute path of an entry's weight file."""
        p = Path(entry.file)
        return p if p.is_absolute() else (self.root / p)

    def check_contained(self) -> None:
        """Every weight file is named relative to the manifest's folder and stays inside it
        (no absolute path, no ``..`` out): a manifest for prediction moves with its
        ``weights/`` into a Kaggle dataset and reads no file it does not ship."""
        for m in self.models:
            rel = Path(m.file)
            if rel.is_absolute() or os.path.isabs(m.file):
                raise ManifestError(
                    f"{self._where()}model {m.name!r}: weights file {m.file!r} is an absolute path; name it relative to "
                    f"the manifest's folder {self.root} (e.g. 'weights/{m.name}.safetensors')"
                )
            if os.path.normpath(m.file).split(os.sep)[0] == os.pardir:
                raise ManifestError(
                    f"{self._where()}model {m.name!r}: weights file {m.file!r} lies outside the manifest's folder "
                    f"{self.root}; copy it below that folder (`rsna-infer manifest add` does)"
                )

    def entry(self, name: str) -> ModelEntry:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"no model named {name!r} in the manifest")

    @property
    def stage1(self) -> list[ModelEntry]:
        return [m for m in self.models if m.stage == 1]

    @property
    def stage2(self) -> list[ModelEntry]:
        return [m for m in self.models if m.stage == 2]

    def check_files(self, verify: bool = False) -> None:
        """Every weight file exists (and, with ``verify``, matches its sha256)."""
        for m in self.models:
            try:
                self.check_file(m, verify=verify)
            except ManifestError as e:
                raise ManifestError(f"{self._where()}model {m.name!r}: {e}") from None

    def check_file(self, entry: ModelEntry, verify: bool = False) -> Path:
        """``entry``'s weight file, which exists (and, with ``verify``, matches its sha256);
        `ManifestError` says which check failed (the caller names the model)."""
        p = self.resolve(entry)
        if not p.is_file():
            raise ManifestError(f"weights file not found: {p} (entry file {entry.file!r}, relative to {self.root})")
        if verify:
            if not entry.sha256:
                raise ManifestError(f"no sha256 recorded for {p}; add it with `rsna-infer manifest add` or export_model")
            got = sha256_file(p)
            if got != entry.sha256:
                raise ManifestError(
                    f"sha256 mismatch for {p}: manifest says {entry.sha256}, file has {got} (wrong or corrupted weights file)"
                )
        return p

    def to_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        """JSON-ready dict; entry files are rewritten relative to ``relative_to`` when given."""
        models = []
        for m in self.models:
            d = m.to_dict()
            if relative_to is not None and not Path(m.file).is_absolute():
                d["file"] = Path(os.path.relpath(self.resolve(m), relative_to)).as_posix()
            models.append(d)
        out: dict[str, Any] = {"version": self.version, "notes": self.notes}
        if self.priors_given:
            out["priors"] = np.round(self.priors, 6).tolist()
        if self.split:
            out["split"] = self.split
        if self.prior_groups:
            out["prior_groups"] = list(self.prior_groups)
        out["models"] = models
        return out


def load_manifest(path: str | os.PathLike, verify: bool = False, check_files: bool = True) -> Manifest:
    """Read and validate a manifest.

    ``check_files``: every weight file must exist. ``verify``: also compare sha256 (reads every
    weight file once; a few seconds per GB). Raises `ManifestError` naming the field or file.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ManifestError(f"manifest {path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    man = manifest_from_dict(data, root=path.parent, path=path)
    man.sha256 = hashlib.sha256(raw).hexdigest()
    if check_files or verify:
        man.check_files(verify=verify)
    return man


def manifest_from_dict(data: Any, root: str | os.PathLike = ".", path: Path | None = None) -> Manifest:
    """Validate a parsed manifest (files are not checked; see `Manifest.check_files`)."""
    where = f"manifest {path}" if path else "manifest"
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: top level must be an object with 'models', got {type(data).__name__}")

    def version(value: Any, label: str) -> int:
        if isinstance(value, bool) or value != MANIFEST_VERSION:  # True == 1 in Python; not here
            raise ManifestError(f"{where}: version {value!r} is not supported; this rsna_infer reads version {MANIFEST_VERSION}")
        return int(value)

    def models(value: Any, label: str) -> list[ModelEntry]:
        if not isinstance(value, list):
            raise ManifestError(f"{where}: 'models' must be a list of model entries")
        out = []
        for i, d in enumerate(value):
            try:
                out.append(ModelEntry.from_dict(d))
            except (SpecError, TypeError, ValueError) as e:
                raise ManifestError(f"{where}: models[{i}]: {e}") from None
        return out

    def priors(value: Any, label: str) -> np.ndarray:
        try:
            return _check_priors(value, "priors")
        except ManifestError as e:
            raise ManifestError(f"{where}: {e}") from None

    def prior_groups(value: Any, label: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
            raise ManifestError(f"{where}: 'prior_groups' must be a list of condition group names, some of {list(GROUPS)}")
        return tuple(value)

    kw = parse_fields(Manifest, data, where, sep=": ", error=ManifestError, required=("models",),
                      skip=("root", "path", "sha256", "priors_given"),
                      convert={"version": version, "models": models, "priors": priors, "prior_groups": prior_groups})
    return Manifest(**kw, root=Path(root).resolve(), path=path, priors_given="priors" in data)


def save_manifest(manifest: Manifest, path: str | os.PathLike) -> Path:
    """Write ``manifest`` as JSON at ``path``; entry files are made relative to its folder."""
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(manifest.to_dict(relative_to=path.parent), indent=2) + "\n")


def _check_priors(priors: Any, name: str) -> np.ndarray:
    """[5, 5, 3] priors from a [3] (every target), [5, 3] (per condition) or [5, 5, 3] list
    whose rows sum to 1 (`rsna_infer.submission.resolve_priors`, as `ManifestError`)."""
    from ..submission import SubmissionError, resolve_priors  # pandas, not torch: imported only when needed

    try:
        return resolve_priors(priors, name, sum_tolerance=1e-3)
    except SubmissionError as e:
        raise ManifestError(str(e)) from None


# -- files and weights -----------------------------------------------------------------------


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _unwrap(model: "nn.Module") -> "nn.Module":
    """The plain module under DistributedDataParallel / torch.compile wrappers."""
    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and type(model).__name__ in ("DistributedDataParallel", "DataParallel", "OptimizedModule"):
            model = getattr(model, attr)
    return model


def export_model(model: "nn.Module", entry: ModelEntry, out_dir: str | os.PathLike, subdir: str = "weights") -> ModelEntry:
    """Save ``model``'s state dict as ``out_dir/subdir/{entry.name}.safetensors``.

    Returns a copy of ``entry`` whose ``file`` is relative to ``out_dir`` (where the manifest
    goes) and whose ``sha256`` is filled in. Tied (shared) tensors are stored once.
    """
    from safetensors.torch import save_model

    if not NAME_PATTERN.match(entry.name):
        raise ManifestError(f"model name {entry.name!r} must be letters, digits, '_', '.', '-' (it becomes a file name)")
    out_dir = Path(out_dir)
    rel = Path(subdir) / f"{entry.name}.safetensors"
    dest = out_dir / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    # One metadata key holding sorted JSON: safetensors writes several keys in hash order, which
    # would give identical weights a different sha256 on every export.
    meta = {"name": entry.name, "family": entry.family, "variant": entry.variant, "arch": entry.arch, "fold": entry.fold}
    save_model(_unwrap(model), str(dest), metadata={"rsna_infer": json.dumps(meta, sort_keys=True)})
    return replace(entry, file=rel.as_posix(), sha256=sha256_file(dest))


def load_weights(model: "nn.Module", path: str | os.PathLike, strict: bool = True, device: str = "cpu") -> tuple[list[str], list[str]]:
    """Load a safetensors state dict into ``model``; returns ``(missing, unexpected)`` keys.

    With ``strict`` any missing or unexpected key (or shape mismatch) raises `ManifestError`
    listing them, so a weights file never silently half-loads into the wrong architecture.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"weights file not found: {path}")
    try:
        missing, unexpected = load_model(_unwrap(model), str(path), strict=False, device=device)
    except SafetensorError as e:
        raise ManifestError(f"{path}: not a readable safetensors file ({e})") from None
    except RuntimeError as e:  # shape mismatch from load_state_dict
        raise ManifestError(f"{path}: weights do not fit the model: {e}") from None
    missing, unexpected = sorted(missing), sorted(unexpected)
    if strict and (missing or unexpected):
        raise ManifestError(
            f"{path}: weights do not match the model architecture: "
            f"{len(missing)} missing key(s) {head(missing)}, {len(unexpected)} unexpected key(s) {head(unexpected)}"
        )
    return missing, unexpected


# -- resolution of the manifest to use -------------------------------------------------------

#: Environment variable naming the manifest when none is passed.
MANIFEST_ENV = "RSNA_INFER_MANIFEST"


def packaged_demo_manifest() -> Path:
    """Where the demo manifest ships inside the package (it may be absent in a checkout)."""
    return Path(__file__).resolve().parent.parent / "demo" / "weights_manifest.json"


def demo_weight_hashes() -> set[str]:
    """sha256 of every packaged demo weight file (empty when the demo is not installed)."""
    path = packaged_demo_manifest()
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return set()
    return {str(m.get("sha256")) for m in data.get("models", []) if isinstance(m, dict) and m.get("sha256")}


def demo_entries(manifest: Manifest) -> list[str]:
    """Names of ``manifest``'s entries whose weights are the packaged demo weights (by
    sha256, wherever the files were copied or renamed)."""
    demo = demo_weight_hashes()
    return [m.name for m in manifest.models if m.sha256 and m.sha256 in demo]


def resolve_manifest_path(manifest: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """``(path, is_demo)``: the argument, else ``$RSNA_INFER_MANIFEST``, else the packaged demo.

    Raises `ManifestError` saying what to pass when none exists.
    """
    if manifest is not None:
        p = Path(manifest).expanduser()
        if not p.is_file():
            raise ManifestError(f"manifest not found: {p}")
        return p.resolve(), p.resolve() == packaged_demo_manifest()
    env = os.environ.get(MANIFEST_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise ManifestError(f"${MANIFEST_ENV} points at {p}, which does not exist")
        return p.resolve(), p.resolve() == packaged_demo_manifest()
    demo = packaged_demo_manifest()
    if demo.is_file():
        return demo, True
    raise ManifestError(
        "no weights manifest: pass manifest=PATH (CLI: --manifest PATH) or set "
        f"${MANIFEST_ENV}; the packaged demo manifest ({demo}) is not installed either"
    )


# -- editing and listing (``rsna-infer manifest``, `rsna_infer.commands.manifest`) ----------------


def add_model(
    manifest_path: str | os.PathLike,
    entry_json: str | os.PathLike,
    weights: str | os.PathLike,
    replace_existing: bool = False,
    copy: bool = True,
) -> ModelEntry:
    """Add one model to a manifest file (created when absent) and return its final entry."""
    manifest_path = Path(manifest_path).expanduser().resolve()
    weights = Path(weights).expanduser().resolve()
    if not weights.is_file():
        raise ManifestError(f"weights file not found: {weights}")
    try:
        raw = json.loads(Path(entry_json).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"entry {entry_json}: cannot read ({e})") from None
    if isinstance(raw, dict):
        raw = {**raw, "file": raw.get("file", weights.name)}
    try:
        entry = ModelEntry.from_dict(raw)
    except SpecError as e:
        raise ManifestError(f"entry {entry_json}: {e}") from None
    man = load_manifest(manifest_path, check_files=False) if manifest_path.is_file() else Manifest(root=manifest_path.parent, path=manifest_path)
    if any(m.name == entry.name for m in man.models) and not replace_existing:
        raise ManifestError(f"manifest {manifest_path}: model {entry.name!r} already exists (use --replace)")
    if copy:
        dest = manifest_path.parent / "weights" / f"{entry.name}.safetensors"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.resolve() != weights:
            atomic_copy(weights, dest)
    else:
        dest = weights
    digest = sha256_file(dest)
    if entry.sha256 and entry.sha256 != digest:
        raise ManifestError(f"entry {entry_json}: sha256 {entry.sha256} does not match {weights} ({digest})")
    file = os.path.relpath(dest, manifest_path.parent)
    entry = replace(entry, file=Path(file).as_posix(), sha256=digest)
    models = [m for m in man.models if m.name != entry.name] + [entry]
    new = replace(man, models=models, root=manifest_path.parent, path=manifest_path)
    save_manifest(new, manifest_path)
    return entry


def summary_table(man: Manifest) -> str:
    """A fixed-width table of the manifest's models (torch-free)."""
    header = ("name", "stage", "family", "variant", "arch", "fold", "input", *(f"w_{g[:4]}" for g in GROUPS), "MB")
    rows = []
    for m in sorted(man.models, key=lambda e: (e.stage, e.family, e.variant, e.arch, e.fold, e.name)):
        p = man.resolve(m)
        size = f"{p.stat().st_size / 1e6:.1f}" if p.is_file() else "missing"
        if m.stage == 2:
            w = [f"{m.blend.get(g, 0.0) if m.blend else 1.0:.3g}" for g in GROUPS]
        else:
            w = ["-"] * len(GROUPS)
        rows.append((m.name, str(m.stage), m.family, m.variant, m.arch, str(m.fold), "x".join(map(str, m.input.size)), *w, size))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    lines = [fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)]
    lines.append(
        f"{len(man.models)} model(s): {len(man.stage1)} stage-1, {len(man.stage2)} stage-2; "
        f"priors: {'from the manifest' if man.priors_given else 'default (rsna_infer.submission.DEFAULT_PRIORS)'}"
    )
    if man.notes:
        lines.append(f"notes: {man.notes}")
    return "\n".join(lines)
