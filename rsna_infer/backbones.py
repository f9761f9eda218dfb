"""One factory for every backbone: timm (2-D) and timm_3d (3-D), always ``pretrained=False``.

Weights only ever come from our own safetensors files (see `rsna_infer.manifest`), so no
code path here can reach the network. Backbones are built headless (``num_classes=0``) and
expose ``num_features``; families put their own heads on top.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn


_BANNED = ("pretrained", "pretrained_cfg_overlay", "checkpoint_path", "num_classes", "features_only", "out_indices")


def _factory(arch: str, dims: int, kwargs: dict[str, Any]) -> Callable[..., nn.Module]:
    for banned in _BANNED:
        if banned in kwargs:
            raise ValueError(f"backbone kwarg {banned!r} is not allowed: weights come from the manifest only "
                             "and the family decides the backbone's outputs")
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
    if keep == tuple(range(len(strides))):
        return probe
    return create(arch, pretrained=False, features_only=True, in_chans=in_chans, out_indices=keep, **kwargs)


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
    return model
