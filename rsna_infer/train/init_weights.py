"""Where a training run's backbones start: timm's pretrained weights or a local file.

From scratch, ~2,000 studies are not enough for these backbones; every top solution of the
competition starts from ImageNet weights. The config field ``pretrained`` says where each
backbone's initial weights come from:

=========================  ==========================================================
``null``                   random initialisation
``"timm"``                 timm's default pretrained tag of the backbone's ``arch``, fetched
                           by timm (Hugging Face hub) into its cache on the training machine
``"timm:TAG"``             that tag, e.g. ``"timm:fb_in22k_ft_in1k"``
``"PATH"``                 a local file: safetensors, or a (timm) torch state dict read with
                           ``torch.load(weights_only=True)`` (``.pth``, ``.pt``, ``.bin``)
``{"ARCH": source, ...}``  one of the above per backbone arch (e.g. a fusion model whose
                           axial encoder has another ``axial_arch``); unlisted archs: random
=========================  ==========================================================

Loading goes by key and shape, into every backbone `rsna_infer.models.backbones.find_backbones`
finds in the family's network, and is reported strictly (`InitReport`): what was loaded,
what was *adapted* as timm does it (the first convolution of a model with another number of
input channels, `timm.models.adapt_input_conv`; 2-D kernels inflated to a 3-D model's, as
timm_3d does for its pretrained weights: ``k`` copies along the new axis, divided by ``k``),
what was left at its random initialisation and which source keys went unused (ImageNet
classifiers). A source that fits nothing, or leaves more than half of a backbone random, is
an error that names both.

Inference never reads this field: manifest entries do not carry it, and every predictor
model is built with ``pretrained=False`` and loaded from its own safetensors file.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from ..models.manifest import sha256_file
from ..validate import head

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..models.backbones import BackboneInfo

logger = logging.getLogger(__name__)

PretrainedSpec = Union[None, str, dict]

#: Containers a training script may wrap a state dict in (first match wins).
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")
#: Prefixes a saved state dict may carry (DDP, torch.compile, a wrapper module).
_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.")
#: A source that leaves more than this share of a backbone's parameters random is refused.
MAX_RANDOM_SHARE = 0.5


class InitError(ValueError):
    """The initial weights cannot be used; the message names the source and the backbone."""


@dataclass
class InitReport:
    """What one backbone got from its initial-weights source."""

    backbone: str  # module path inside the family's network ("" = the network itself)
    arch: str
    source: str  # "timm:<name>" or "file:<path> (sha256 <hex>)"
    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # "<key>: <how>"
    random: list[str] = field(default_factory=list)  # "<key>: <why>"
    unused: list[str] = field(default_factory=list)
    random_share: float = 0.0  # share of the backbone's parameter elements left random

    def summary(self) -> str:
        where = self.backbone or "network"
        parts = [f"{len(self.loaded)} tensor(s) loaded"]
        if self.adapted:
            parts.append(f"{len(self.adapted)} adapted ({'; '.join(self.adapted[:3])}{' ...' if len(self.adapted) > 3 else ''})")
        parts.append(f"{len(self.random)} left random{' ' + head(self.random, 4) if self.random else ''}")
        parts.append(f"{len(self.unused)} source key(s) unused{' ' + head(self.unused, 4) if self.unused else ''}")
        return f"{where} ({self.arch}) from {self.source}: " + ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the config value -------------------------------------------------------------------------


def check_spec(value: Any) -> str | None:
    """Why ``value`` is not a valid ``pretrained`` field (None when it is). Local files must
    exist: a typo fails when the config is loaded, not after the data is read."""

    def one(v: Any, where: str) -> str | None:
        if v is None:
            return None
        if not isinstance(v, str) or not v.strip():
            return f"{where} must be null, \"timm\", \"timm:TAG\" or a file path, got {v!r}"
        if v == "timm" or v.startswith("timm:"):
            if v.startswith("timm:") and not v[5:].strip():
                return f"{where}: \"timm:\" needs a tag, e.g. \"timm:fb_in22k_ft_in1k\""
            return None
        if not Path(v).expanduser().is_file():
            return f"{where}: initial weights file {v} does not exist (or use \"timm\" for timm's pretrained weights)"
        return None

    if isinstance(value, dict):
        for arch, v in value.items():
            err = one(v, f"pretrained[{arch!r}]")
            if err:
                return err
        return None
    return one(value, "pretrained")


def source_for(spec: PretrainedSpec, arch: str) -> str | None:
    """The source string for a backbone of ``arch`` (None: random initialisation)."""
    if isinstance(spec, dict):
        return spec.get(arch, spec.get(arch.split(".")[0]))
    return spec


# -- reading sources --------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, "torch.Tensor"]:
    """Tensors of a local weights file: safetensors, or a torch file loaded with
    ``weights_only=True`` (no code runs), unwrapped from a ``state_dict``/``model`` container."""
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise InitError(f"initial weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as e:
            raise InitError(f"initial weights file {path} is not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InitError(f"initial weights file {path} cannot be read as a torch state dict with weights_only=True "
                        f"({type(e).__name__}: {e}); convert it to safetensors") from None
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict):
        raise InitError(f"initial weights file {path} holds a {type(obj).__name__}, not a state dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise InitError(f"initial weights file {path} holds no tensors (keys {list(obj)[:5]})")
    return tensors


def timm_state_dict(arch: str, tag: str | None) -> tuple[dict[str, "torch.Tensor"], str, tuple[str, ...]]:
    """timm's pretrained 2-D weights for ``arch`` (``tag``: a pretrained tag, None = timm's
    default): ``(state dict, name, first-conv module names)``. timm downloads them into its
    cache on this machine (training only; it needs the internet once)."""
    import timm

    base = arch.split(".")[0]
    name = f"{base}.{tag}" if tag else arch
    if not timm.is_model(base):
        raise InitError(f"timm has no 2-D model {base!r} to take pretrained weights from; pass a local file instead")
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:
        raise InitError(f"timm could not fetch pretrained weights {name!r} ({type(e).__name__}: {e}); check the tag "
                        f"and this machine's internet access, or pass a local file") from None
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    first = cfg.get("first_conv") or ()
    first = (first,) if isinstance(first, str) else tuple(first)
    return model.state_dict(), f"timm:{cfg.get('hf_hub_id') or name}", first


# -- loading ------------------------------------------------------------------------------------


def _strip(source: dict[str, "torch.Tensor"], target_keys: set[str], path: str) -> dict[str, "torch.Tensor"]:
    """The source keys with the prefix (none, ``module.``, the backbone's own path, ...) that
    matches most of the target's keys."""
    prefixes = ("", *(_PREFIXES + ((f"{path}.",) if path else ())))
    # A feature-map backbone (timm ``features_only``) names its modules with the nesting
    # dots of the full model's top-level blocks made underscores (``stages.0`` -> ``stages_0``):
    # a source key also matches the target key that is equal up to '.' / '_'.
    by_flat = {k.replace(".", "_"): k for k in target_keys}
    best, best_hits = source, -1
    for p in prefixes:
        cand = {k[len(p):]: v for k, v in source.items() if k.startswith(p)}
        hits = sum(k in target_keys for k in cand)
        if hits < len(target_keys):
            renamed = {(k if k in target_keys else by_flat.get(k.replace(".", "_"), k)): v for k, v in cand.items()}
            renamed_hits = sum(k in target_keys for k in renamed)
            if renamed_hits > hits:
                cand, hits = renamed, renamed_hits
        if hits > best_hits:
            best, best_hits = cand, hits
    return best


def _first_conv_keys(module: "nn.Module", state: dict[str, "torch.Tensor"], hint: tuple[str, ...]) -> set[str]:
    """Weight keys of the input convolution(s): timm's ``pretrained_cfg.first_conv`` (of the
    source, else of the backbone), else the first kernel (>= 4-D tensor) in registration order."""
    names = hint or (getattr(module, "pretrained_cfg", None) or {}).get("first_conv") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    keys = {f"{n}.weight" for n in names if f"{n}.weight" in state}
    if not keys:
        keys = {next((k for k, v in state.items() if v.ndim >= 4), "")} - {""}
    return keys


def _adapt(key: str, src: "torch.Tensor", dst: "torch.Tensor", first_conv: set[str]) -> tuple["torch.Tensor", list[str]] | None:
    """``src`` made to fit ``dst``'s shape the way timm / timm_3d adapt pretrained weights, with
    what was done; None when it cannot be."""
    import torch
    from timm.models import adapt_input_conv

    how: list[str] = []
    w = src
    if w.ndim not in (4,) or dst.ndim not in (4, 5):
        return None
    if w.shape[1] != dst.shape[1]:
        if key not in first_conv or w.shape[0] != dst.shape[0]:
            return None
        try:
            try:
                w = adapt_input_conv(int(dst.shape[1]), w, base_chans=int(w.shape[1]))
            except TypeError:  # timm < 1.0.20: no base_chans, 3-channel sources only
                w = adapt_input_conv(int(dst.shape[1]), w)
        except (NotImplementedError, ValueError, AssertionError):
            return None
        how.append(f"{src.shape[1]} -> {dst.shape[1]} input channels")
    if dst.ndim == 5:
        if tuple(w.shape) != tuple(dst.shape[:4]):
            return None
        k = int(dst.shape[4])
        w = torch.stack([w] * k, dim=-1) / k
        how.append(f"2-D kernel inflated to 3-D (x{k} / {k})")
    if tuple(w.shape) != tuple(dst.shape):
        return None
    return w, how


def load_into(
    module: "nn.Module",
    source: dict[str, "torch.Tensor"],
    *,
    path: str = "",
    arch: str = "",
    description: str = "",
    first_conv: tuple[str, ...] = (),
) -> InitReport:
    """Copy what fits of ``source`` into ``module`` (in place) and report it. Raises
    `InitError` when nothing fits or more than `MAX_RANDOM_SHARE` of the parameters stay random."""
    import torch

    target = module.state_dict()
    src = _strip(source, set(target), path)
    firsts = _first_conv_keys(module, target, first_conv)
    report = InitReport(backbone=path, arch=arch, source=description)
    new: dict[str, torch.Tensor] = {}
    params = dict(module.named_parameters())
    left = 0
    for key, dst in target.items():
        s = src.get(key)
        if s is None or (tuple(s.shape) != tuple(dst.shape) and (not s.dtype.is_floating_point or _adapt(key, s, dst, firsts) is None)):
            why = "not in the source" if s is None else f"shape {list(s.shape)} does not fit {list(dst.shape)}"
            report.random.append(f"{key}: {why}")
            left += params[key].numel() if key in params else 0
            continue
        if tuple(s.shape) == tuple(dst.shape):
            new[key] = s.to(dst.dtype)
            report.loaded.append(key)
            continue
        adapted = _adapt(key, s, dst, firsts)
        assert adapted is not None
        new[key] = adapted[0].to(dst.dtype)
        report.loaded.append(key)
        report.adapted.append(f"{key}: {', '.join(adapted[1])}")
    report.unused = sorted(set(src) - set(target))
    report.random_share = left / max(sum(p.numel() for p in params.values()), 1)
    if not report.loaded:
        raise InitError(f"initial weights {description}: nothing fits backbone {path or 'network'} ({arch}); "
                        f"source keys {list(source)[:4]}, backbone keys {list(target)[:4]}")
    if report.random_share > MAX_RANDOM_SHARE:
        raise InitError(f"initial weights {description} leave {report.random_share:.0%} of backbone {path or 'network'} "
                        f"({arch}) random; they are not weights of this architecture "
                        f"(left random: {report.random[:4]})")
    with torch.no_grad():
        missing, unexpected = module.load_state_dict(new, strict=False)
    assert not unexpected, unexpected
    return report


def init_backbones(model: "nn.Module", spec: PretrainedSpec) -> list[InitReport]:
    """Start every backbone of ``model`` from its source in ``spec`` (see the module
    docstring); log and return one report per backbone that was initialised."""
    from ..models.backbones import find_backbones

    if spec is None:
        return []
    reports: list[InitReport] = []
    cache: dict[str, tuple[dict, str, tuple[str, ...]]] = {}
    backbones = find_backbones(model)
    if not backbones:
        raise InitError("the network holds no backbone built by rsna_infer.models.backbones.create_backbone; "
                        "'pretrained' has nothing to initialise")
    for path, module, info in backbones:
        src = source_for(spec, info.arch)
        if src is None:
            logger.info("backbone %s (%s): random initialisation (no pretrained source for this arch)", path, info.arch)
            continue
        if src not in cache:
            cache[src] = _fetch(src, info)
        state, description, first = cache[src]
        report = load_into(module, state, path=path, arch=info.arch, description=description, first_conv=first)
        (logger.warning if report.random else logger.info)("initial weights: %s", report.summary())
        reports.append(report)
    return reports


def _fetch(src: str, info: "BackboneInfo") -> tuple[dict, str, tuple[str, ...]]:
    if src == "timm" or src.startswith("timm:"):
        tag = src[5:].strip() if src.startswith("timm:") else None
        return timm_state_dict(info.arch, tag or None)
    path = Path(src).expanduser().resolve()
    return read_state_dict(path), f"file:{path} (sha256 {sha256_file(path)[:16]})", ()
