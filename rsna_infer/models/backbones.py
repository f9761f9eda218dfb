"""One factory for every backbone: timm (2-D) and timm_3d (3-D), always ``pretrained=False``.

Weights only ever come from our own safetensors files (see `rsna_infer.models.manifest`), so no
code path here can reach the network. Backbones are built headless (``num_classes=0``) and
expose ``num_features``; families put their own heads on top.

Each backbone carries a `BackboneInfo` (attribute ``BACKBONE_ATTR``) saying how it was built,
so that training can find every backbone inside a family's network (`find_backbones`) and
start it from pretrained weights (`rsna_infer.train.init_weights`) without the families
knowing about it. Inference never does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

#: Attribute of a backbone module holding its `BackboneInfo`.
BACKBONE_ATTR = "rsna_backbone"


@dataclass(frozen=True)
class BackboneInfo:
    """How a backbone was built: timm/timm_3d name, 2-D or 3-D, input channels, kwargs."""

    arch: str
    dims: int
    in_chans: int
    kwargs: dict[str, Any] = field(default_factory=dict)


def find_backbones(model: nn.Module) -> list[tuple[str, nn.Module, BackboneInfo]]:
    """``(module path, module, info)`` of every backbone built by `create_backbone` inside
    ``model`` (outermost first; a backbone inside a backbone is not listed twice)."""
    found: list[tuple[str, nn.Module, BackboneInfo]] = []
    for name, module in model.named_modules():
        info = getattr(module, BACKBONE_ATTR, None)
        if isinstance(info, BackboneInfo) and not any(name.startswith(f"{p}.") for p, _, _ in found if p):
            found.append((name, module, info))
    return found


def check_arch_name(arch: str) -> None:
    """An architecture is a plain timm / timm_3d name (``convnext_tiny``, ``resnet18.a1_in1k``).
    A name with ``:`` (``hf-hub:org/model``, ``local-dir:...``) makes timm fetch a config
    over the network before it builds anything: refused, whatever ``HF_HUB_OFFLINE`` says."""
    if ":" in arch:
        raise ValueError(
            f"architecture {arch!r} names a model hub entry ({arch.split(':', 1)[0]}:...); inference is offline: "
            "use the timm architecture name (e.g. 'convnext_tiny') and a local weights file"
        )


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face Hub offline mode for the duration: ``HF_HUB_OFFLINE=1`` in the
    environment (worker processes inherit it) and in ``huggingface_hub``'s constants when
    that is already imported (it reads the variable once, at import)."""
    import os
    import sys

    before = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE",)}
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    hub_before = getattr(hub, "HF_HUB_OFFLINE", None)
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if hub is not None:
            hub.HF_HUB_OFFLINE = hub_before


_BANNED = ("pretrained", "pretrained_cfg_overlay", "checkpoint_path", "num_classes", "features_only", "out_indices")


def _factory(arch: str, dims: int, kwargs: dict[str, Any]) -> Callable[..., nn.Module]:
    """timm's or timm_3d's ``create_model`` for ``arch``, once the kwargs and name are checked."""
    for banned in _BANNED:
        if banned in kwargs:
            raise ValueError(f"backbone kwarg {banned!r} is not allowed: weights come from the manifest only "
                             "and the family decides the backbone's outputs")
    check_arch_name(arch)
    if dims == 2:
        import timm

        return timm.create_model
    if dims == 3:
        try:
            import timm_3d
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"3-D backbone {arch!r} needs the 'timm-3d' package; install it from the bundle's wheelhouse"
            ) from e
        return timm_3d.create_model
    raise ValueError(f"dims must be 2 or 3, got {dims}")


def create_feature_backbone(arch: str, *, dims: int = 2, in_chans: int = 1, min_stride: int = 4, **kwargs: Any) -> nn.Module:
    """timm / timm_3d model returning its feature maps (``features_only``) at every stride
    >= ``min_stride``; ``feature_info.channels()`` / ``.reduction()`` describe them."""
    create = _factory(arch, dims, kwargs)
    try:
        probe = create(arch, pretrained=False, features_only=True, in_chans=in_chans, **kwargs)
    except RuntimeError as e:
        raise ValueError(f"cannot create {dims}-D feature backbone {arch!r}: {e}") from e
    strides = probe.feature_info.reduction()
    keep = tuple(i for i, r in enumerate(strides) if r >= min_stride)
    if not keep:
        raise ValueError(f"backbone {arch!r} has no feature map at stride >= {min_stride} (strides {strides})")
    model = probe if keep == tuple(range(len(strides))) else create(
        arch, pretrained=False, features_only=True, in_chans=in_chans, out_indices=keep, **kwargs)
    setattr(model, BACKBONE_ATTR, BackboneInfo(arch, dims, int(in_chans), dict(kwargs)))
    return model


def create_backbone(arch: str, *, dims: int = 2, in_chans: int = 1, **kwargs: Any) -> nn.Module:
    """Headless timm (``dims=2``) or timm_3d (``dims=3``) model with pooled features.

    ``kwargs`` pass through to ``create_model`` (e.g. ``drop_path_rate``); ``pretrained`` and
    ``num_classes`` are ours to set and may not be given.
    """
    create = _factory(arch, dims, kwargs)
    try:
        model = create(arch, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    except RuntimeError as e:  # unknown model name
        raise ValueError(f"cannot create {dims}-D backbone {arch!r}: {e}") from e
    if not hasattr(model, "num_features"):
        raise ValueError(f"backbone {arch!r} does not expose num_features")
    # Models with a pre-logits head (mobilenetv3, lcnet, ...) pool to ``head_hidden_size``,
    # not ``num_features``; heads are sized from ``num_features``, so make it the pooled width.
    pooled = getattr(model, "head_hidden_size", None)
    if pooled:
        model.num_features = int(pooled)
    setattr(model, BACKBONE_ATTR, BackboneInfo(arch, dims, int(in_chans), dict(kwargs)))
    return model
